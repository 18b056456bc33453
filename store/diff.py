"""``fimio diff A B``: explain why two derivations, build records or outputs differ.

Like ``nix-diff``, the explanation is recursive: when an input derivation differs, the
comparison descends into it, so a change three levels down is named with the chain that
leads to it (``app -> input 'lib' -> input 'base' -> source 'src' -> hello.c``). Each pair
of derivations is compared once (memoised), so shared sub-graphs cost nothing twice.

Operands (``resolve``):

* a derivation file (``*.toml``, instantiated first), a ``.drv`` store path or its hash part;
* an output, i.e. any other valid store path (``.check`` paths included);
* a build record ``<drv hash part>@<n>``: the n-th build of that derivation, oldest first
  (``-1`` = the newest), as ``fimio provenance`` numbers them.

Both operands must be of the same sort. The result is a tree of :class:`Finding`; its
leaves are the causes, and :attr:`DiffReport.chains` lists the path to each.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from . import treediff
from .errors import NotFound, UsageError
from .paths import StorePath, is_hash_part

_RECORD_RE = re.compile(r"^(.+)@(-?\d+)$")
_SHOW = 60  # characters of a value shown inline


@dataclass
class Finding:
    """One difference. ``label`` is the short name used in chains; ``lines`` are details."""

    kind: str  # input, source, file, env, args, builder, system, outputs, sandbox, hostPath, ...
    label: str
    what: str
    a: object = None
    b: object = None
    lines: list[str] = field(default_factory=list)
    children: list["Finding"] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"kind": self.kind, "label": self.label, "what": self.what, "a": self.a, "b": self.b,
                "detail": self.lines, "children": [c.to_json() for c in self.children]}


@dataclass
class Operand:
    sort: str  # "derivation" | "output" | "record"
    text: str  # how to show it
    drv: object = None  # Derivation (derivation, record)
    raw: dict | None = None  # the .drv JSON (derivation)
    info: object = None  # PathInfo (output)
    record: dict | None = None  # (record)
    record_id: str | None = None


@dataclass
class DiffReport:
    a: Operand
    b: Operand
    findings: list[Finding]

    @property
    def identical(self) -> bool:
        return not self.findings

    @property
    def chains(self) -> list[str]:
        out: list[str] = []

        def walk(f: Finding, trail: list[str]):
            trail = trail + [f.label]
            if not f.children:
                out.append(" -> ".join(trail))
            for c in f.children:
                walk(c, trail)

        for f in self.findings:
            walk(f, [])
        return out

    def to_json(self) -> dict:
        return {"a": {"sort": self.a.sort, "name": self.a.text}, "b": {"sort": self.b.sort, "name": self.b.text},
                "identical": self.identical, "findings": [f.to_json() for f in self.findings],
                "chains": self.chains}

    def render(self) -> str:
        lines = [f"- {self.a.text}", f"+ {self.b.text}"]
        if self.identical:
            lines.append(f"identical {self.a.sort}s" if self.a.sort != "output" else "identical contents")
            return "\n".join(lines)

        def walk(f: Finding, depth: int):
            pad = "  " * depth
            lines.append(f"{pad}• {f.what}")
            lines.extend(f"{pad}    {line}" for line in f.lines)
            for c in f.children:
                walk(c, depth + 1)

        for f in self.findings:
            walk(f, 0)
        chains = self.chains
        if chains:
            lines.append("")
            lines.append("why:" if len(chains) == 1 else f"why ({len(chains)} differences):")
            lines.extend(f"  {c}" for c in chains[:50])
            if len(chains) > 50:
                lines.append(f"  ... and {len(chains) - 50} more")
        return "\n".join(lines)


# ---- operands ---------------------------------------------------------------------------


def resolve(store, graph, text: str) -> Operand:
    """Turn a command-line operand into an :class:`Operand`; UsageError/NotFound if it is none."""
    m = _RECORD_RE.match(text)
    if m and not text.endswith(".toml"):
        drv = _derivation_of(store, graph, m.group(1))
        records = _records(store, drv)
        n = int(m.group(2))
        if not records:
            raise NotFound(f"'{store.logical(drv.drv_path)}' has no build records here")
        index = n - 1 if n > 0 else len(records) + n
        if n == 0 or not 0 <= index < len(records):
            raise NotFound(f"'{text}': there are builds @1 to @{len(records)} of '{drv.drv_path.base}'",
                           "see 'fimio provenance'")
        rid = record_id(drv, index)
        return Operand("record", f"build record {rid} ({drv.drv_path.base})", drv=drv, record=records[index],
                       record_id=rid)
    if text.endswith(".toml") or _is_local_file(store, text):
        drv = graph.from_file(text)
        return _drv_operand(store, graph, drv)
    path, sub = store.resolve(text)
    if sub:
        raise UsageError(f"'{text}': give a store path, not a file inside one")
    if path.name.endswith(".drv"):
        return _drv_operand(store, graph, graph.load(store.logical(path)))
    return Operand("output", store.logical(path), info=store.info(path))


def _is_local_file(store, text: str) -> bool:
    import os

    return os.path.isfile(text) and not os.path.realpath(text).startswith(store.store + "/")


def _drv_operand(store, graph, drv) -> Operand:
    with open(store.physical(drv.drv_path), "rb") as f:
        raw = json.loads(f.read())
    return Operand("derivation", store.logical(drv.drv_path), drv=drv, raw=raw)


def _derivation_of(store, graph, text: str):
    if text.endswith(".toml") or _is_local_file(store, text):
        return graph.from_file(text)
    path, _ = store.resolve(text)
    if not path.name.endswith(".drv"):
        deriver = store.info(path).deriver
        if deriver is None:
            raise NotFound(f"'{store.logical(path)}' was not built by a derivation here")
        path = StorePath.parse(deriver)
    return graph.load(store.logical(path))


def _records(store, drv) -> list[dict]:
    from .realise import build_records

    return build_records(store, drv.drv_hash)


def record_id(drv, index: int) -> str:
    """The id of the ``index``-th (0-based) build record of ``drv``: ``<drv hash part>@<n>``."""
    return f"{drv.drv_path.hash_part}@{index + 1}"


# ---- entry point ------------------------------------------------------------------------


def diff(store, graph, a: Operand, b: Operand) -> DiffReport:
    """Explain the differences between two operands of the same sort."""
    if a.sort != b.sort:
        article = {"derivation": "a derivation", "output": "an output", "record": "a build record"}
        raise UsageError(f"cannot compare {article[a.sort]} with {article[b.sort]}",
                         "give two derivations, two outputs, or two build records (<drv hash>@<n>)")
    differ = _Differ(store, graph)
    if a.sort == "derivation":
        findings = differ.derivations(a.drv, a.raw, b.drv, b.raw)
    elif a.sort == "output":
        findings = differ.outputs(a.info, b.info)
    else:
        findings = differ.records(a.drv, a.record, b.drv, b.record)
    return DiffReport(a, b, findings)


class _Differ:
    def __init__(self, store, graph):
        self.store = store
        self.graph = graph
        self.seen: dict[tuple[str, str], list[Finding]] = {}

    # ---- derivations ---------------------------------------------------------------------

    def derivations(self, da, ra: dict, db, rb: dict) -> list[Finding]:
        key = (da.drv_path.base, db.drv_path.base)
        if key[0] == key[1]:
            return []
        if key in self.seen:
            return [Finding("same", "(see above)", "differs as explained above")] if self.seen[key] else []
        self.seen[key] = []
        out: list[Finding] = []
        for name in ("name", "system", "builder", "fimio"):
            if ra.get(name) != rb.get(name):
                kind = {"fimio": "format"}.get(name, name)
                what = {"fimio": "the derivation format version"}.get(name, f"the {name}")
                out.append(Finding(kind, name, f"{what} differs: {_short(ra.get(name))} vs {_short(rb.get(name))}",
                                   ra.get(name), rb.get(name)))
        if ra.get("args") != rb.get("args"):
            out.append(Finding("args", "args", "the builder arguments differ", ra.get("args"), rb.get("args"),
                               _args_diff(ra.get("args") or [], rb.get("args") or [])))
        out.extend(self._env(ra.get("env") or {}, rb.get("env") or {}))
        if sorted(ra.get("outputs") or {}) != sorted(rb.get("outputs") or {}):
            out.append(Finding("outputs", "outputs", f"the outputs differ: {sorted(ra['outputs'])} vs {sorted(rb['outputs'])}"))
        out.extend(self._sandbox(ra.get("sandbox") or {}, rb.get("sandbox") or {}))
        if ra.get("fetch") != rb.get("fetch"):
            out.append(Finding("fetch", "fetch", f"the fetch differs: {_short(ra.get('fetch'))} vs {_short(rb.get('fetch'))}",
                               ra.get("fetch"), rb.get("fetch")))
        out.extend(self._inputs(da, db))
        known = {"name", "system", "builder", "fimio", "args", "env", "outputs", "sandbox", "fetch", "inputs"}
        for name in sorted((set(ra) | set(rb)) - known):
            if ra.get(name) != rb.get(name):
                out.append(Finding("field", name, f"field '{name}' differs", ra.get(name), rb.get(name)))
        if not out:
            out.append(Finding("outputs", "output paths", "only the output paths differ (a different store directory?)"))
        self.seen[key] = out
        return out

    def _env(self, ea: dict, eb: dict) -> list[Finding]:
        out = []
        for k in sorted(set(ea) | set(eb)):
            if k not in eb:
                out.append(Finding("env", f"env {k}", f"environment variable {k} only in A: {_short(ea[k])}", ea[k], None))
            elif k not in ea:
                out.append(Finding("env", f"env {k}", f"environment variable {k} only in B: {_short(eb[k])}", None, eb[k]))
            elif ea[k] != eb[k]:
                lines = _lines_diff(ea[k], eb[k]) if "\n" in ea[k] + eb[k] or len(ea[k] + eb[k]) > 2 * _SHOW else []
                out.append(Finding("env", f"env {k}", f"environment variable {k} differs: {_short(ea[k])} vs {_short(eb[k])}",
                                   ea[k], eb[k], lines))
        return out

    def _sandbox(self, sa: dict, sb: dict) -> list[Finding]:
        out = []
        ha, hb = sa.get("hostPaths") or [], sb.get("hostPaths") or []
        if ha != hb:
            extra = [f"only in A: {p}" for p in ha if p not in hb] + [f"only in B: {p}" for p in hb if p not in ha]
            out.append(Finding("sandbox", "host_paths", "the sandbox host paths differ", ha, hb, extra or ["order differs"]))
        if sa.get("timeout") != sb.get("timeout"):
            out.append(Finding("sandbox", "timeout", f"the timeout differs: {sa.get('timeout')} vs {sb.get('timeout')}",
                               sa.get("timeout"), sb.get("timeout")))
        return out

    def _inputs(self, da, db) -> list[Finding]:
        out = []
        ia, ib = da.inputs, db.inputs
        for var in sorted(set(ia) | set(ib)):
            x, y = ia.get(var), ib.get(var)
            if y is None:
                out.append(Finding("input", f"input '{var}'", f"input '{var}' only in A: {x.path}", x.path, None))
            elif x is None:
                out.append(Finding("input", f"input '{var}'", f"input '{var}' only in B: {y.path}", None, y.path))
            elif x.to_json() == y.to_json():
                continue
            elif x.kind != y.kind:
                out.append(Finding("input", f"input '{var}'", f"input '{var}' is a {_input_kind(x)} in A, a {_input_kind(y)} in B",
                                   x.path, y.path))
            elif x.kind == "drv":
                sub_a, sub_b = self.graph.load(x.path), self.graph.load(y.path)
                f = Finding("input", f"input '{var}' ({sub_a.name})",
                            f"input '{var}' (derivation '{sub_a.name}', output '{x.output}') differs", x.path, y.path,
                            [f"- {x.path}", f"+ {y.path}"])
                if x.output != y.output:
                    f.children.append(Finding("input", "output", f"output '{x.output}' vs '{y.output}'", x.output, y.output))
                f.children.extend(self.derivations(sub_a, _raw(self.store, sub_a), sub_b, _raw(self.store, sub_b)))
                out.append(f)
            else:
                f = Finding("source", f"{_input_kind(x)} '{var}'", f"{_input_kind(x)} '{var}' differs", x.path, y.path,
                            [f"- {x.path}", f"+ {y.path}"])
                f.children.extend(self._paths(x.path, y.path))
                out.append(f)
        return out

    def _paths(self, la: str, lb: str) -> list[Finding]:
        """File findings between two valid store paths given by logical path."""
        try:
            pa, _ = self.store.resolve(la)
            pb, _ = self.store.resolve(lb)
        except NotFound as e:
            return [Finding("missing", "not here", f"cannot compare files: {e.message}")]
        return self._files(self.store.info(pa), self.store.info(pb))

    def _files(self, ia, ib) -> list[Finding]:
        d = treediff.compare(self.store, treediff.side_of(self.store, ia), treediff.side_of(self.store, ib))
        return [_file_finding(c) for c in d.changes]

    # ---- outputs -------------------------------------------------------------------------

    def outputs(self, ia, ib) -> list[Finding]:
        if ia.path == ib.path:
            return []
        out = []
        if ia.root == ib.root:
            out.append(Finding("same-contents", "contents", "the contents are identical (same root digest); only the paths differ"))
        else:
            files = Finding("files", "files", "", children=self._files(ia, ib))
            files.what = f"the contents differ: {_count(len(files.children), 'file')} (root blake3:{ia.root.hex()[:16]}… vs blake3:{ib.root.hex()[:16]}…)"
            out.append(files)
        ra, rb = sorted(r.base for r in ia.references), sorted(r.base for r in ib.references)
        own = {ia.path.base, ib.path.base}  # a self-reference and a .check's reference to its original
        if [r for r in ra if r not in own] != [r for r in rb if r not in own]:
            out.append(Finding("references", "references", "the references differ", ra, rb,
                               [f"only in A: {r}" for r in ra if r not in rb] + [f"only in B: {r}" for r in rb if r not in ra]))
        if ia.deriver and ib.deriver and ia.deriver != ib.deriver:
            da = self.graph.load(self.store.logical_base(ia.deriver))
            db = self.graph.load(self.store.logical_base(ib.deriver))
            f = Finding("deriver", "built by", "they were built by different derivations",
                        ia.deriver, ib.deriver, [f"- {ia.deriver}", f"+ {ib.deriver}"])
            f.children = self.derivations(da, _raw(self.store, da), db, _raw(self.store, db))
            out.append(f)
        elif ia.deriver and ia.deriver == ib.deriver and ia.root != ib.root:
            drv = self.graph.load(self.store.logical_base(ia.deriver))
            recs = _records(self.store, drv)
            xa, xb = _record_for(recs, ia), _record_for(recs, ib)
            if xa is not None and xb is not None and xa is not xb:
                (na, ra_), (nb, rb_) = xa, xb
                f = Finding("builds", "builds", f"both come from '{ia.deriver}'; its builds "
                            f"{record_id(drv, na)} and {record_id(drv, nb)} differ in:", record_id(drv, na), record_id(drv, nb))
                f.children = self._record_fields(ra_, rb_)
                cause = _check_cause(self.store, ia, ib)
                if cause:
                    f.children.insert(0, Finding("cause", f"cause: {cause}", f"--check found the cause: {cause}"))
                if not f.children:
                    f.what = (f"both come from '{ia.deriver}' (builds {record_id(drv, na)} and {record_id(drv, nb)}), "
                              "under the same recorded conditions: the build is not deterministic")
                    f.kind = "non-deterministic"
                out.append(f)
        return out

    # ---- build records -------------------------------------------------------------------

    def records(self, da, ra: dict, db, rb: dict) -> list[Finding]:
        out = []
        if da.drv_path != db.drv_path:
            f = Finding("deriver", "derivation", "the records are of different derivations",
                        da.drv_path.base, db.drv_path.base, [f"- {da.drv_path.base}", f"+ {db.drv_path.base}"])
            f.children = self.derivations(da, _raw(self.store, da), db, _raw(self.store, db))
            out.append(f)
        out.extend(self._record_fields(ra, rb))
        oa, ob = ra.get("outputs") or {}, rb.get("outputs") or {}
        for name in sorted(set(oa) | set(ob)):
            x, y = (oa.get(name) or {}).get("root"), (ob.get(name) or {}).get("root")
            if x == y:
                continue
            f = Finding("output", f"output '{name}'", f"output '{name}' differs: blake3:{str(x)[:16]}… vs blake3:{str(y)[:16]}…", x, y)
            pa, pb = self._kept(ra, name, x), self._kept(rb, name, y)
            if pa is not None and pb is not None:
                f.children = self._files(pa, pb)
            else:
                f.lines.append("(one of the two results was not kept in the store: no file comparison)")
            out.append(f)
        return out

    def _kept(self, record: dict, output: str, root: str | None):
        """The valid store path holding a record's output ``root``: the output or a .check path."""
        candidates = [(record.get("outputs") or {}).get(output, {}).get("path")]
        candidates += list((record.get("checkPaths") or {}).values())
        for base in candidates:
            if not base:
                continue
            info = self.store.query(StorePath.parse(base))
            if info is not None and info.root.hex() == root:
                return info
        return None

    def _record_fields(self, ra: dict, rb: dict) -> list[Finding]:
        out = []
        if ra.get("fimio") != rb.get("fimio"):
            out.append(Finding("fimio", "fimio version", f"fimio version: {ra.get('fimio')} vs {rb.get('fimio')}",
                               ra.get("fimio"), rb.get("fimio")))
        fa, fb = (ra.get("fingerprints") or {}), (rb.get("fingerprints") or {})
        ha, hb = fa.get("hostPaths") or {}, fb.get("hostPaths") or {}
        for p in sorted(set(ha) | set(hb)):
            x, y = ha.get(p), hb.get(p)
            if x != y:
                out.append(Finding("hostPath", f"host path {p}", f"host path {p} changed: {describe_fingerprint(x)} vs {describe_fingerprint(y)}", x, y))
        ba, bb = fa.get("builder"), fb.get("builder")
        if ba != bb and ba is not None and bb is not None:
            out.append(Finding("builder", f"builder {ba.get('path')}", f"builder {ba.get('path')} changed: "
                               f"{_short(ba.get('digest'))} vs {_short(bb.get('digest'))}", ba, bb))
        va, vb = ra.get("variation") or {}, rb.get("variation") or {}
        changed = [k for k in sorted(set(va) | set(vb)) if va.get(k) != vb.get(k)]
        if changed:
            # one finding: ten variations are one cause to look at, not ten
            out.append(Finding("variation", f"build conditions ({', '.join(changed)})",
                               f"the build conditions differ (--vary): {', '.join(changed)}",
                               {k: va.get(k) for k in changed}, {k: vb.get(k) for k in changed},
                               [f"{k}: {_var(k, va.get(k))} vs {_var(k, vb.get(k))}" for k in changed]))
        host_a, host_b = ra.get("host") or {}, rb.get("host") or {}
        for k in ("kernel", "os", "cpu", "cpus", "machine", "hostname"):
            if host_a.get(k) != host_b.get(k):
                out.append(Finding("host", f"host {k}", f"host {k}: {_short(host_a.get(k))} vs {_short(host_b.get(k))}",
                                   host_a.get(k), host_b.get(k)))
        return out


# ---- helpers ------------------------------------------------------------------------------


def _raw(store, drv) -> dict:
    with open(store.physical(drv.drv_path), "rb") as f:
        return json.loads(f.read())


def _record_for(records: list[dict], info):
    """``(index, record)`` of the build that produced ``info``: for a .check path the build
    that kept it, for an output the newest build that registered it, else the first build
    with the same root digest."""
    root = info.root.hex()
    base = info.path.base
    newest_first = list(range(len(records) - 1, -1, -1))
    for i in newest_first:
        if base in (records[i].get("checkPaths") or {}).values():
            return i, records[i]
    for i in newest_first:
        r = records[i]
        if r.get("purpose", "build") == "build" and any(
                o.get("root") == root and o.get("path") == base for o in (r.get("outputs") or {}).values()):
            return i, r
    for i in range(len(records)):
        if any(o.get("root") == root for o in (records[i].get("outputs") or {}).values()):
            return i, records[i]
    return None


def _check_cause(store, ia, ib) -> str | None:
    """The cause a ``--check`` found when it kept one of these paths as the other's .check."""
    from .check import check_records

    for original, other in ((ia, ib), (ib, ia)):
        for r in reversed(check_records(store, original.path)):
            if other.path.base in (r.get("checkPaths") or []) and r.get("cause"):
                return r["cause"].get("text")
    return None


def _file_finding(c: treediff.FileChange) -> Finding:
    lines = []
    if c.unified:
        lines = c.unified.rstrip("\n").splitlines()
    elif c.note and c.change == "changed":
        lines = [f"({c.note})"]
    return Finding("file", treediff.shown(c.path) if c.path else "(the file itself)", c.headline(), c.blob[0], c.blob[1],
                   lines)


def _input_kind(i) -> str:
    return {"drv": "derivation", "src": "source", "store": "store path"}[i.kind]


def _args_diff(a: list[str], b: list[str]) -> list[str]:
    la = [f"[{i}] {line}" for i, arg in enumerate(a) for line in (arg.splitlines() or [""])]
    lb = [f"[{i}] {line}" for i, arg in enumerate(b) for line in (arg.splitlines() or [""])]
    return _unified(la, lb)


def _lines_diff(a: str, b: str) -> list[str]:
    return _unified(a.splitlines(), b.splitlines())


def _unified(la: list[str], lb: list[str]) -> list[str]:
    import difflib

    return [line.rstrip("\n") for line in difflib.unified_diff(la, lb, "A", "B", n=2, lineterm="")][2:]


def _short(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    text = repr(text) if isinstance(value, str) else text
    return text if len(text) <= _SHOW else text[: _SHOW - 1] + "…"


def describe_fingerprint(x) -> str:
    """A host-path fingerprint record (hostfp.py) in a few words."""
    if x is None:
        return "not listed"
    kind = x.get("kind")
    if kind == "packages":
        return f"packages {str(x.get('packages'))[:23]}…"
    if kind in ("tree", "file"):
        return f"{kind} {str(x.get('digest'))[:23]}…"
    if kind == "symlink":
        return f"symlink -> {x.get('target')}"
    return str(kind)


def _var(key: str, value) -> str:
    from .checkreport import show_value

    return show_value(key, value) if value is not None or key == "cores" else "unset"


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def is_record_operand(text: str) -> bool:
    m = _RECORD_RE.match(text)
    return bool(m) and is_hash_part(m.group(1))
