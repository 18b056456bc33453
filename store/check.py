"""Bit-identical rebuild checks: ``fimio realise --check [--rounds N] [--vary]``.

Procedure (``spec/reproducibility.md`` is normative):

1. For each target derivation, round 1 is its registered output (just built by this
   ``realise``, or valid before). Rounds 2..N are fresh builds, never registered, each
   compared by root digest with every other round. Without ``--vary`` every round uses the
   default build conditions; with ``--vary`` rounds 2..N change every variation at once
   (alternating between two sets of values).
2. A rebuild whose output differs from the registered one is kept as a content-addressed
   store path ``<hash>-<name>.check`` (``ca = "check"``, deriver set, never a GC root) and
   compared file by file.
3. When outputs differ under ``--vary``, a control build under default conditions tells
   non-determinism from a variation; then one build per changed variation (in parallel,
   up to ``jobs``) names the variations that change the output on their own. Each named
   variation is built once more and must give the same output again, and a second control
   must agree with the registered output: a build that only sometimes differs is called
   non-deterministic, never blamed on whichever variation happened to coincide.
   When the registered output differs from rebuilds that all agree, one more control
   built at least a second later must agree too before the host is blamed (a build that
   embeds the time in seconds agrees with itself within one second).
4. Every build is recorded in ``records`` (``purpose``: check/control/bisect), every
   output's verdict in ``checks`` under ``<output hash part>!<time ns>``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import asdict, replace

from . import fsutil, treediff
from .build import Variation
from .checkreport import CheckReport, Cause, DrvCheck, OutputCheck, OutputDiff, Round, VARIATION_TEXT
from .db import dumps
from .errors import BuildError, FimioError
from .paths import StorePath, check_name, fingerprint_hash
from .sandbox import fs_type
from .threadpool import ThreadPool

DEFAULT = Variation()
# Two sets of varied values; round k >= 2 uses ALTERNATES[(k - 2) % 2]. Locales need not
# exist on the host: what a build must not depend on is the variable itself.
ALTERNATES = [
    dict(tz="Etc/GMT-14", lang="fr_FR.UTF-8", umask=0o002, hostname="fimio-vary-a", uid=2001, gid=2001,
         env_order="reversed", dir_order="tmpfs"),
    dict(tz="America/St_Johns", lang="ja_JP.UTF-8", umask=0o027, hostname="fimio-vary-b", uid=3003, gid=3003,
         env_order="reversed", dir_order="tmpfs"),
]
DIFFOSCOPE_TIMEOUT = 300
DIFFOSCOPE_LIMIT = 64 * 1024
_CLOCK_TICK = 1.1  # seconds between two controls: coarser than a clock read in whole seconds


class _Plan:
    """The variation of each round, and what could not be varied on this machine."""

    def __init__(self, realiser, rounds: int, vary: bool):
        self.rounds = max(2, rounds)
        self.vary = vary
        token = os.urandom(4).hex()
        cores = realiser.builder.cores
        self.alternates = []
        for i, alt in enumerate(ALTERNATES):
            # at the sandbox root, which bwrap owns: a host path such as /var would be read-only
            build_dir = f"/build-{token}" if i == 0 else f"/fimio-build-{token}/work"
            self.alternates.append(replace(DEFAULT, **alt, cores=1 if cores > 1 else 2, build_dir=build_dir))
        self.not_varied: dict[str, str] = {}
        if fs_type(realiser.store.tmp) == "tmpfs":
            self.not_varied["dir_order"] = "the store is on a tmpfs, like the varied build directory"
            self.alternates = [replace(v, dir_order=DEFAULT.dir_order) for v in self.alternates]
        if len(os.sched_getaffinity(0)) < 2:
            self.not_varied["cores"] = "one CPU: FIMIO_BUILD_CORES varies, nproc cannot"

    def variation(self, k: int) -> Variation:
        return self.alternates[(k - 2) % len(self.alternates)] if self.vary and k >= 2 else DEFAULT

    def varied(self) -> list[str]:
        return self.alternates[0].changed_from(DEFAULT) if self.vary else []


def check_targets(realiser, outcome, rounds: int, vary: bool, keep_going: bool = False) -> CheckReport:
    """Check every output of every target of ``outcome`` (see the module doc); never raises
    NotReproducible itself: the caller exits 3 when ``report.ok`` is false. A failing
    rebuild raises BuildError naming the round and its variations; with ``keep_going`` the
    other targets are still checked, and the errors are left in ``report.failures``."""
    plan = _Plan(realiser, rounds, vary)
    report = CheckReport(plan.rounds, vary, plan.varied(), plan.not_varied)
    done: set[str] = set()
    for drv, _ in outcome.targets:
        if drv.drv_path.base in done:
            continue
        done.add(drv.drv_path.base)
        subst = {realiser.store.logical(p) for p in drv.output_paths().values()} & set(outcome.substituted)
        source = "built by this realise" if drv.drv_path.base in outcome.built else (
            "substituted by this realise" if subst else "valid before this realise")
        try:
            report.entries.append(_Checker(realiser, plan, drv, source).run())
        except FimioError as e:  # a failed round, or an input that could not be had again
            if not keep_going:
                raise
            report.failures.append(e)
    return report


class _Checker:
    def __init__(self, realiser, plan: _Plan, drv, baseline_source: str):
        self.realiser = realiser
        self.store = realiser.store
        self.plan = plan
        self.drv = drv
        self.entry = DrvCheck(self.store.logical(drv.drv_path), drv.name, baseline=baseline_source)
        self.just_built = baseline_source == "built by this realise"
        self.kept: dict[str, dict[str, StorePath]] = {}  # output -> digest -> .check path
        self.started = time.time()
        self.round_records: dict[int, dict] = {}
        self._count_lock = threading.Lock()

    def run(self) -> DrvCheck:
        drv, e = self.drv, self.entry
        if drv.is_fixed_output:
            e.skipped = "fixed-output derivation: its declared hash is checked on every fetch"
            return e
        self.realiser.realise_inputs(drv)  # a GC may have taken them since the outputs were built
        self.infos = {n: self.store.info(p) for n, p in drv.output_paths().items()}
        base = {n: i.root.hex() for n, i in self.infos.items()}
        e.rounds.append(Round(1, "registered", [], asdict(DEFAULT), base))
        for k in range(2, self.plan.rounds + 1):
            v = self.plan.variation(k)
            digests = self._build(v, "check", k, keep=True)
            e.rounds.append(Round(k, "build", v.changed_from(DEFAULT), asdict(v), digests))
        for name, info in self.infos.items():
            o = OutputCheck(name, self.store.logical(info.path), self.store.physical(info.path),
                            [r.digests[name] for r in e.rounds])
            for path in self.kept.get(name, {}).values():
                o.check_paths.append(self.store.logical(path))
                o.diffs.append(self._diff(info, path))
            e.outputs.append(o)
        if e.result == "different":
            e.cause = self._explain()
        self._record_checks()
        return e

    # ---- builds --------------------------------------------------------------------------

    def _build(self, v: Variation, purpose: str, k: int | None = None, keep: bool = False) -> dict[str, str]:
        """One unregistered build; returns its output digests. Records it; keeps new .check outputs."""
        digests, record, result = self._run(v, purpose, k)
        try:
            if keep:
                kept = self._keep(result, digests)
                if kept:
                    record["checkPaths"] = {n: p.base for n, p in kept.items()}
        finally:
            fsutil.remove_tree(result.scratch)
        self._save_record(record)
        if k is not None:
            self.round_records[k] = record
        return digests

    def _run(self, v: Variation, purpose: str, k: int | None):
        with self._count_lock:  # bisection builds run in worker threads
            self.entry.builds += 1
        try:
            result = self.realiser.build(self.drv, v, save_failed_log=False)
        except BuildError as err:
            varied = v.changed_from(DEFAULT)
            what = f"round {k}" if k else purpose
            err.message = (f"{purpose} build ({what}" + (f", varied {', '.join(varied)}" if varied else "")
                           + f") of '{self.drv.drv_path.base}' failed: {err.message}")
            raise
        digests = {n: o.node.digest.hex() for n, o in result.outputs.items()}
        record = dict(result.record, purpose=purpose)
        if k is not None:
            record["round"] = k
        return digests, record, result

    def _build_quiet(self, v: Variation, purpose: str) -> tuple[dict[str, str], dict]:
        """A build for bisection, safe to run in a worker thread (records are saved by the caller)."""
        digests, record, result = self._run(v, purpose, None)
        fsutil.remove_tree(result.scratch)
        return digests, record

    def _keep(self, result, digests: dict[str, str]) -> dict[str, StorePath]:
        kept = {}
        for name, out in result.outputs.items():
            if digests[name] == self.infos[name].root.hex() or digests[name] in self.kept.get(name, {}):
                continue
            path = keep_check_output(self.store, self.realiser, self.drv, out, self.infos[name].path)
            self.kept.setdefault(name, {})[digests[name]] = path
            kept[name] = path
        return kept

    def _save_record(self, record: dict) -> None:
        db = self.store.db
        with db.write() as txn:
            t = time.time_ns()
            while not txn.put(f"{self.drv.drv_hash}!{t}".encode(), dumps(record), db=db.dbs["records"], overwrite=False):
                t += 1

    # ---- explanation ---------------------------------------------------------------------

    def _explain(self) -> Cause:
        rounds = self.entry.rounds
        base = rounds[0].digests
        first = next(r for r in rounds[1:] if r.digests != base)
        host, ids = self._host_changes(self.round_records.get(first.number) or {})
        if not host and (not self.plan.vary or not first.varied):
            return self._nondeterministic("non-deterministic (no variation applied): builds under the same conditions differ")
        control = self._build(DEFAULT, "control")
        self.entry.bisect_builds = 1
        if control != base:
            agree = all(r.digests == control for r in rounds[1:])
            if agree and (host or not self.just_built):
                # Rebuilds made within a second of each other agree; one made later must too.
                time.sleep(_CLOCK_TICK)
                self.entry.bisect_builds = 2
                if self._build(DEFAULT, "control") != control:
                    return self._nondeterministic("non-deterministic: builds made a second apart differ")
            if host and agree:
                # a changed host path alone is no proof: the rebuilds must also agree
                return Cause("host-changed", "the host changed since the registered output was built: "
                             + "; ".join(host) + f"; every rebuild here agrees (see 'fimio diff {ids[0]} {ids[1]}')")
            if not self.just_built and agree:
                return Cause("registered-differs",
                             f"the registered output ({self.entry.baseline}) differs from every rebuild here, "
                             "and the rebuilds agree with and without variations, also a second apart: it was "
                             "built under conditions fimio does not record (the host's state, files outside the "
                             "fingerprinted host paths, another fimio; see 'fimio provenance')")
            return self._nondeterministic("non-deterministic: a build under default conditions differs too")
        if not first.varied:
            return self._nondeterministic("non-deterministic: builds under the same conditions differ")
        return self._bisect(first)

    def _bisect(self, first: Round) -> Cause:
        """Name the variations of round ``first`` that change the output on their own (see
        the module doc); the registered output and one control agree already."""
        base = self.entry.rounds[0].digests
        changed = first.varied
        alone = {f: replace(DEFAULT, **{f: first.variation[f]}) for f in changed}
        singles = self._parallel([(f, alone[f]) for f in changed])
        named = [f for f in changed if singles[f] != base]
        # confirmations: each named variation again, the whole variation again when none
        # is named, and a second control
        again = self._parallel([(f, alone[f]) for f in named]
                               + ([] if named else [("all", replace(DEFAULT, **first.variation))])
                               + [("control", DEFAULT)])
        self.entry.bisect_builds = 1 + len(singles) + len(again)
        if again["control"] != base:
            return self._nondeterministic("non-deterministic: a second build under default conditions differs")
        unsteady = [f for f in named if again[f] != singles[f]] + (
            ["all"] if not named and again["all"] != first.digests else [])
        if unsteady:
            what = ", ".join(VARIATION_TEXT.get(f, "whole variation") for f in unsteady)
            return self._nondeterministic(f"non-deterministic: the build only sometimes differs (the {what} "
                                          "gave another output when built again)")
        values = {f: [getattr(DEFAULT, f), first.variation[f]] for f in (named or changed)}
        if named:
            names = ", ".join(VARIATION_TEXT[f] for f in named)
            return Cause("variation", f"the output depends on the {names}", named, values)
        return Cause("combination", "no single variation changes the output, all of them together do: "
                     + ", ".join(changed), changed, values)

    def _parallel(self, builds: list[tuple[str, Variation]]) -> dict[str, dict[str, str]]:
        """Run ``(label, variation)`` builds in parallel (up to ``jobs``); their digests by label."""
        jobs = max(1, min(len(builds), self.realiser.options.jobs or os.cpu_count() or 1))
        with ThreadPool(max_workers=jobs) as pool:
            futures = {label: pool.submit(self._build_quiet, v, "control" if label == "control" else "bisect")
                       for label, v in builds}
            results = {label: fut.result() for label, fut in futures.items()}
        for label, (_, record) in results.items():
            if label != "control":
                record["bisect"] = label
            self._save_record(record)
        return {label: digests for label, (digests, _) in results.items()}

    def _host_changes(self, record: dict) -> tuple[list[str], tuple[str, str]]:
        """What differs between the host of the registered build (its record) and ``record``:
        host-path and builder fingerprints, fimio version (empty when unknown or equal); and
        the two records' ids for ``fimio diff``."""
        from .diff import describe_fingerprint, record_id
        from .realise import build_records

        roots = {n: i.root.hex() for n, i in self.infos.items()}
        registered, ids = None, ["?", "?"]
        records = build_records(self.store, self.drv.drv_hash)
        for i in range(len(records) - 1, -1, -1):
            r = records[i]
            if registered is None and r.get("purpose", "build") == "build" and \
                    {n: o.get("root") for n, o in (r.get("outputs") or {}).items()} == roots:
                registered, ids[0] = r, record_id(self.drv, i)
            if r.get("start") == record.get("start") and r.get("purpose") == record.get("purpose"):
                ids[1] = record_id(self.drv, i)
        if registered is None or not record:
            return [], tuple(ids)
        out = []
        old, new = registered.get("fingerprints") or {}, record.get("fingerprints") or {}
        for p in sorted(set(old.get("hostPaths") or {}) | set(new.get("hostPaths") or {})):
            x, y = (old.get("hostPaths") or {}).get(p), (new.get("hostPaths") or {}).get(p)
            if x != y:
                out.append(f"host path {p} ({describe_fingerprint(x)} -> {describe_fingerprint(y)})")
        if old.get("builder") != new.get("builder") and old.get("builder") and new.get("builder"):
            out.append(f"builder {new['builder'].get('path')}")
        if registered.get("fimio") != record.get("fimio"):
            out.append(f"fimio {registered.get('fimio')} -> {record.get('fimio')}")
        was, now = (r.get("cores") for r in (registered, record))
        if was is not None and now is not None and was != now:
            out.append(f"build cores {was} -> {now} (FIMIO_BUILD_CORES, the 'cores' setting)")
        return out, tuple(ids)

    def _nondeterministic(self, text: str) -> Cause:
        if not self.just_built:
            text += (f"; note the registered output was {self.entry.baseline}, so a change of the host since "
                     "would explain it too ('fimio provenance')")
        return Cause("non-deterministic", text, hint=_hint(self.entry, self.started))

    # ---- reports and records -------------------------------------------------------------

    def _diff(self, info, path: StorePath) -> OutputDiff:
        check = self.store.info(path)
        d = treediff.compare(self.store, treediff.side_of(self.store, info), treediff.side_of(self.store, check))
        return OutputDiff(self.store.logical(path), d, run_diffoscope(self.store.physical(info.path),
                                                                      self.store.physical(path)))

    def _record_checks(self) -> None:
        e = self.entry
        now = time.time()
        db = self.store.db
        with db.write() as txn:
            for o in e.outputs:
                info = self.infos[o.output]
                record = {
                    "drv": self.drv.drv_path.base, "drvHash": self.drv.drv_hash, "output": o.output,
                    "path": info.path.base, "when": now, "count": len(o.digests),
                    "variations": self.plan.varied(), "result": "identical" if o.identical else "different",
                    "digests": o.digests, "rounds": [{"round": r.number, "source": r.source, "varied": r.varied}
                                                     for r in e.rounds],
                    "cause": e.cause.to_json() if e.cause and not o.identical else None,
                    "checkPaths": [p.rsplit("/", 1)[1] for p in o.check_paths], "builds": e.builds,
                }
                txn.put(f"{info.path.hash_part}!{time.time_ns()}".encode(), dumps(record), db=db.dbs["checks"])


def keep_check_output(store, realiser, drv, out, original: StorePath) -> StorePath:
    """Register a differing rebuild output as ``<hash>-<name>.check`` and return its path.

    The hash part is over (the original output path, the root digest, the references), so
    one kept result per distinct content per output; it is content-addressed (``ca =
    "check"``), its deriver is ``drv``, and nothing roots it: GC may collect it.
    """
    name = check_name(original.name + ".check") if len(original.name) <= 205 else check_name(original.name[:205] + ".check")
    refs = ",".join(sorted(r.base for r in out.references))
    path = StorePath(fingerprint_hash("check", store.store_dir, name, original.base, out.node.digest.hex(), refs), name)
    realiser.temp_roots.add([path])
    with store.lock_path(path):
        if not store.is_valid(path):
            store.commit(out.tmp, path, out.node, references=out.references, deriver=drv.drv_path.base, ca="check")
    return path


def run_diffoscope(a: str, b: str) -> str | None:
    """diffoscope's text report of two paths when ``diffoscope`` is on PATH, else None."""
    exe = shutil.which("diffoscope")
    if exe is None:
        return None
    try:
        proc = subprocess.run([exe, "--text", "-", a, b], capture_output=True, timeout=DIFFOSCOPE_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"(diffoscope did not finish: {e})"
    text = proc.stdout[:DIFFOSCOPE_LIMIT].decode(errors="replace")
    if proc.returncode not in (0, 1):
        text += f"\n(diffoscope exited {proc.returncode}: {proc.stderr[-500:].decode(errors='replace')})"
    elif len(proc.stdout) > DIFFOSCOPE_LIMIT:
        text += f"\n... ({len(proc.stdout) - DIFFOSCOPE_LIMIT} more bytes)"
    return text


_NUMBER = re.compile(r"(?<![0-9])([0-9]{10}(?:[0-9]{3}){0,3})(?![0-9])")
_CLOCK = re.compile(r"\b[0-2][0-9]:[0-5][0-9]:[0-5][0-9]\b")


def _hint(entry: DrvCheck, started: float) -> str | None:
    """A guess at the source of non-determinism from the text diffs: an embedded clock."""
    lo, hi = started - 2 * 86400, time.time() + 86400
    changes = [c for o in entry.outputs for d in o.diffs for c in d.diff.changes]
    for c in changes:
        if not c.unified:
            continue
        changed = [line[1:] for line in c.unified.splitlines()
                   if line[:1] in "+-" and not line.startswith(("+++", "---"))]
        where = treediff.shown(c.path) if c.path else "the output"
        for line in changed:
            for m in _NUMBER.finditer(line):
                digits = m.group(1)
                t = int(digits) / 10 ** (len(digits) - 10)
                if lo <= t <= hi:
                    return f"looks like the current time is embedded ('{digits}' in {where})"
            if _CLOCK.search(line):
                return f"looks like the current time is embedded (a clock time in {where})"
    if entry.outputs and any(o.diffs for o in entry.outputs):
        # said only when binary contents are all there is to look at (not for modes or links)
        binary = not any(c.unified for c in changes) and any((c.note or "").startswith("binary") for c in changes)
        return ("no timestamp found in the differences: randomness (e.g. /dev/urandom), addresses or "
                "scheduling order" + ("; the differing files are binary" if binary else ""))
    return None


def check_records(store, path: StorePath) -> list[dict]:
    """Every check record of an output path, oldest first."""
    return store.db.scan_prefix("checks", f"{path.hash_part}!".encode())


def repro_status(store, path: StorePath) -> dict | None:
    """The reproducibility status of an output for ``fimio path-info``, or None if never checked.

    ``{"checked": runs of --check, "builds": builds compared in all, "bitIdentical": every
    run agreed, "lastChecked": ISO time, "lastResult": "identical"|"different",
    "variations": variations ever tried, "causes": causes of differences, "checkPaths": kept
    .check base names}``.
    """
    records = check_records(store, path)
    if not records:
        return None
    import datetime

    last = records[-1]
    return {
        "checked": len(records),
        "builds": sum(r.get("count", 0) for r in records),
        "bitIdentical": all(r.get("result") == "identical" for r in records),
        "lastChecked": datetime.datetime.fromtimestamp(last["when"], datetime.timezone.utc).isoformat(timespec="seconds"),
        "lastResult": last.get("result"),
        "variations": sorted({v for r in records for v in r.get("variations", [])}),
        "causes": [r["cause"]["text"] for r in records if r.get("cause")],
        "checkPaths": sorted({p for r in records for p in r.get("checkPaths", [])}),
    }
