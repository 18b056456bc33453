"""``fimio provenance TARGET``: every build of a derivation and every check of its outputs.

A derivation's build records (``records`` sub-database, oldest first) include the build
that registered its outputs (``purpose`` absent or ``"build"``) and the unregistered
builds of ``--check`` (``check``, ``control``, ``bisect``). Records are numbered from 1;
``<drv hash part>@<n>`` names one of them for ``fimio diff``. Builds are grouped by the
root digests they produced, which shows at a glance which builds agreed.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

from .check import check_records
from .checkreport import show_value
from .diff import describe_fingerprint, record_id
from .realise import build_records


@dataclass
class ProvenanceReport:
    drv: object  # Derivation
    drv_logical: str
    outputs: dict  # name -> (logical path, PathInfo | None)
    records: list[dict] = field(default_factory=list)
    checks: dict = field(default_factory=dict)  # output name -> check records

    def _id(self, i: int) -> str:
        return record_id(self.drv, i)

    def groups(self) -> list[dict]:
        """Builds that produced identical outputs, in order of first appearance."""
        groups: dict[str, dict] = {}
        for i, r in enumerate(self.records):
            key = _outputs_key(r)
            g = groups.setdefault(key, {"outputs": {n: o.get("root") for n, o in (r.get("outputs") or {}).items()},
                                        "records": []})
            g["records"].append(self._id(i))
        registered = {n: (info.root.hex() if info else None) for n, (_, info) in self.outputs.items()}
        out = list(groups.values())
        for g in out:
            g["registered"] = g["outputs"] == registered
        return out

    def to_json(self) -> dict:
        return {
            "drv": self.drv_logical,
            "drvHash": self.drv.drv_hash,
            "outputs": {n: {"path": p, "root": info.root.hex() if info else None, "valid": info is not None}
                        for n, (p, info) in self.outputs.items()},
            "records": [dict(r, id=self._id(i)) for i, r in enumerate(self.records)],
            "groups": self.groups(),
            "checks": self.checks,
        }

    def render(self) -> str:
        lines = [f"derivation {self.drv_logical}", f"  drv hash {self.drv.drv_hash}"]
        for name, (path, info) in self.outputs.items():
            state = f"blake3:{info.root.hex()[:16]}…, registered {_iso(info.registered)}" if info else "not valid here"
            lines.append(f"  output {name}: {path} ({state})")
        if not self.records:
            lines.append("no build records here (substituted, imported, or never built on this machine)")
        else:
            lines.append("")
            lines.append(f"builds ({len(self.records)}):")
            letters = {}
            for g in self.groups():
                letters[tuple(sorted(g["outputs"].items()))] = chr(ord("A") + len(letters)) if len(letters) < 26 else "?"
            lines[-1] += f" (ids {self.drv.drv_path.hash_part}@<n>, for 'fimio diff')"
            previous = None
            for i, r in enumerate(self.records):
                lines.extend(self._render_record(i, r, previous, letters))
                previous = r
            lines.append("")
            lines.append("agreement:")
            for g in self.groups():
                letter = letters[tuple(sorted(g["outputs"].items()))]
                outs = ", ".join(f"{n} {str(d)[:16]}…" for n, d in g["outputs"].items())
                mark = "  (the registered output)" if g["registered"] else ""
                ids = ", ".join("@" + x.rsplit("@", 1)[1] for x in g["records"])
                lines.append(f"  [{letter}] {outs}: builds {ids}{mark}")
            if len(self.groups()) == 1 and len(self.records) > 1:
                lines.append(f"  all {len(self.records)} builds agree bit for bit")
        checks = [(n, c) for n, cs in self.checks.items() for c in cs]
        if checks:
            lines.append("")
            lines.append(f"checks ({len(checks)}):")
            for name, c in sorted(checks, key=lambda x: x[1].get("when", 0)):
                varied = f"varying {', '.join(c['variations'])}" if c.get("variations") else "no variation"
                lines.append(f"  {_iso(c.get('when'))}  {name}: {c.get('result')} in {c.get('count')} builds ({varied})")
                if c.get("cause"):
                    lines.append(f"      cause: {c['cause'].get('text')}")
                for p in c.get("checkPaths") or []:
                    lines.append(f"      kept {p}")
        return "\n".join(lines)

    def _render_record(self, i: int, r: dict, previous: dict | None, letters: dict) -> list[str]:
        purpose = r.get("purpose", "build")
        if purpose == "bisect" and r.get("bisect"):
            purpose = f"bisect {r['bisect']}"
        letter = letters.get(tuple(sorted(_roots(r).items())), "?")
        status = "ok" if r.get("exitStatus", 0) == 0 else f"exit {r.get('exitStatus')}"
        from .build import Variation

        default = Variation()
        variation = r.get("variation") or {}
        changed = {k: v for k, v in variation.items() if k in default.__dataclass_fields__ and v != getattr(default, k)}
        varied = ", ".join(f"{k}={show_value(k, v)}" for k, v in changed.items()) or "defaults"
        if r.get("fetched"):
            varied = f"fetched {r['fetched']}"  # a fixed-output derivation: no sandbox, no variation
        head = f"  @{i + 1:<3} {purpose:16} {_iso(r.get('start'))}  {r.get('duration', 0):5.2f} s  {status}  [{letter}]"
        host_line = _host_line(r)
        fps = r.get("fingerprints") or {}
        if previous is not None and host_line == _host_line(previous) and fps == previous.get("fingerprints"):
            # same machine, same host paths: one line is enough (bisect builds come in tens)
            kept = ", ".join(f"kept {p}" for p in (r.get("checkPaths") or {}).values())
            return [f"{head}  {varied}" + (f"  {kept}" if kept else "")]
        lines = [head]
        lines.append("      host       " + host_line)
        lines.append(("      source     " if r.get("fetched") else "      variation  ") + varied)
        for p, fp in (fps.get("hostPaths") or {}).items():
            lines.append(f"      host path  {p}: {describe_fingerprint(fp)}")
        if fps.get("builder"):
            lines.append(f"      builder    {fps['builder'].get('path')}: {str(fps['builder'].get('digest'))[:30]}…")
        for n, o in (r.get("outputs") or {}).items():
            kept = (r.get("checkPaths") or {}).get(n)
            lines.append(f"      output {n}  blake3:{str(o.get('root'))[:16]}…" + (f"  kept as {kept}" if kept else ""))
        return lines


def provenance_report(store, drv) -> ProvenanceReport:
    """Collect the build records of ``drv`` and the check records of its outputs."""
    outputs = {n: (store.logical(p), store.query(p)) for n, p in drv.output_paths().items()}
    checks = {n: check_records(store, p) for n, p in drv.output_paths().items()}
    return ProvenanceReport(drv, store.logical(drv.drv_path), outputs, build_records(store, drv.drv_hash),
                            {n: c for n, c in checks.items() if c})


def _host_line(r: dict) -> str:
    h = r.get("host") or {}
    return f"{h.get('hostname')}, {h.get('kernel')}, {h.get('cpu')} ({h.get('cpus')} CPUs), {h.get('os')}; fimio {r.get('fimio')}"


def _roots(r: dict) -> dict:
    return {n: o.get("root") for n, o in (r.get("outputs") or {}).items()}


def _outputs_key(r: dict) -> str:
    return repr(sorted(_roots(r).items()))


def _iso(t) -> str:
    if not t:
        return "?"
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")
