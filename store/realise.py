"""Realisation: make every output of a derivation graph valid, substituting or building.

Plan first (valid outputs are skipped; only what is missing is looked up in substituters;
only what no one has is built), then build leaves first with up to ``jobs`` builds at a
time. Each build holds its outputs' locks, so concurrent ``fimio realise`` processes build
each output once: the others wait, then find it valid.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import dataclass, field

from . import build as buildmod
from . import fsutil
from .db import dumps, loads
from .derivation import Derivation, host_system
from .errors import BuildError, FimioError, IntegrityError, NotFound, RemoteError
from .instantiate import Graph, is_derivation_file, note_lack
from .paths import StorePath
from .prefetch import absent_target_line, substitute_drv_targets, target_hash_part
from .roots import TempRoots


@dataclass
class RealiseOptions:
    jobs: int = 0  # 0: number of cores
    cores: int = 0  # FIMIO_BUILD_CORES; 0: all
    keep_failed: bool = False
    offline: bool = False
    substituters: list = field(default_factory=list)  # a SubstituterSet-like object, or empty
    log_sink: object = None  # callable(drv, line) for live logs
    progress: object = None  # callable(event, drv, counts)
    dry_run: bool = False  # plan only: ask the substituters, fetch no output, build nothing (see dry_run)
    keep_going: bool = False  # after a failed build, go on with every build that does not need it


@dataclass
class Outcome:
    """What ``realise`` did: outputs per target, and which derivations it built or fetched."""

    targets: list[tuple[Derivation, dict[str, StorePath]]]
    built: list[str] = field(default_factory=list)
    substituted: list[str] = field(default_factory=list)
    # each target's place among those asked for: a partial outcome (an error's) holds only
    # the targets made valid, and result-3 must still be the third target's link
    positions: list[int] | None = None


def _drop_dependents(key: str, pending: dict, deps: dict) -> list[str]:
    """Remove from ``pending`` every derivation that needs ``key``, directly or not; return them."""
    dropped, frontier = [], [key]
    while frontier:
        k = frontier.pop()
        for other in [o for o in pending if k in deps[o]]:
            del pending[other]
            dropped.append(other)
            frontier.append(other)
    return dropped


# exit codes, gravest first: integrity (4), not reproducible (3), a cache (6), something not
# found (5), a build (1), usage (2)
_GRAVITY = (4, 3, 6, 5, 1, 2)


def _gravest_code(errors) -> int:
    return min((e.exit_code for e in errors), key=_GRAVITY.index)


def gravest(errors: list[FimioError], what: str, hint: str) -> FimioError:
    """One error for several: a lone one as it is, else ``what`` with each error's message
    (and detail lines) as its details, and the exit code of the gravest (_GRAVITY)."""
    if len(errors) == 1:
        return errors[0]
    err = BuildError(what, hint, details=[line for e in errors for line in [e.line, *e.details]])
    err.exit_code = _gravest_code(errors)
    return err


def _failures(failed: list, skipped: list[tuple[str, str]]) -> FimioError:
    """The error of a ``keep_going`` schedule: a lone failure as it was, else one error
    naming each failure and what was not built, with the exit code of the gravest failure
    (_GRAVITY: an integrity alarm, 4, is never hidden behind another failure)."""
    if len(failed) == 1 and not skipped:
        return failed[0][1]
    err = BuildError(f"{len(failed)} derivation(s) failed" + (f", {len(skipped)} not built" if skipped else ""),
                     "'fimio log DRV' shows a build's log",
                     details=sorted(e.line if d.drv_path.base in e.message else f"{d.drv_path.base}: {e.line}"
                                    for d, e in failed)
                     + sorted(f"{k}: not built, it needs {cause}, which failed" for k, cause in skipped))
    err.exit_code = _gravest_code(e for _, e in failed)
    # each failed build's log tail, as a lone failure shows its own
    err.log_tails = sorted((d.drv_path.base, e.log_tail) for d, e in failed if getattr(e, "log_tail", ""))
    return err


def resolve_outputs(store, target: str) -> list[tuple[str, str, StorePath]]:
    """``(drv hash, output name, output path)`` for each output of a TARGET (file or .drv)."""
    drv = Graph(store).target(target)
    return [(drv.drv_hash, name, path) for name, path in drv.output_paths().items()]


def input_paths(graph: Graph, drv: Derivation) -> dict[str, str]:
    """Each input variable's logical store path (a derivation input: its output's path)."""
    out = {}
    for var, i in drv.inputs.items():
        out[var] = graph.load(i.path).outputs[i.output] if i.kind == "drv" else i.path
    return out


def _base(logical: str) -> StorePath:
    return StorePath.parse(logical.rsplit("/", 1)[1])


class Realiser:
    def __init__(self, store, options: RealiseOptions, fingerprinter=None):
        self.store = store
        self.options = options
        self.graph = Graph(store)
        if options.substituters:  # a `store` input not valid here comes from them
            self.graph.substitute = options.substituters.substitute
        self.builder = buildmod.Builder(
            store, cores=options.cores, keep_failed=options.keep_failed, log_sink=options.log_sink,
            fingerprinter=fingerprinter,
        )
        self._owns_temp_roots = False
        self._lock = threading.Lock()
        self.substituted: list[str] = []
        self.lacking: list[str] = []  # what load_targets found unobtainable (see check_obtainable)
        self._planned = None  # FetchPlan: what the substituters hold of the plan being made
        self._substitution_failed = False  # in this plan, a cache failed that we cannot name
        self.warn = lambda message: None  # the CLI shows these on stderr

    @property
    def temp_roots(self) -> TempRoots:
        # One temp-roots file per process: a second one would wait forever for the first's lock.
        if self.store.temp_roots is None:
            self.store.temp_roots = TempRoots(self.store)
            self._owns_temp_roots = True
        return self.store.temp_roots

    def close(self) -> None:
        if self._owns_temp_roots:
            self.store.temp_roots.close()
            self.store.temp_roots = None
            self._owns_temp_roots = False

    # ---- planning ----------------------------------------------------------------------

    def load_targets(self, targets: list[str]) -> list[Derivation]:
        """The targets' derivations. What cannot be had of them (a ``.drv`` target nobody
        has, ``store`` inputs not valid here) is not an error yet: :meth:`plan` names it
        together with everything else the plan lacks, in one error."""
        self.temp_roots  # protect sources and .drv files from a concurrent GC as they are added
        lacking: dict[str, str] = {}
        if self.options.substituters:
            # a .drv target that is not valid here comes from the substituters with its closure
            # (input derivations, sources): what an offline rebuild from a prefetched cache needs
            lacking = substitute_drv_targets(self.store, self.options.substituters, targets)
        self.graph.defer_missing = True
        roots = []
        for t in targets:
            if t in lacking:
                continue
            try:
                roots.append(self.graph.target(t))
            except NotFound as e:
                if is_derivation_file(self.store, t):
                    raise
                lacking[t] = absent_target_line(self.store, t) or e.message
        lines: dict[str, str] = {}  # one per path, however many spellings named it
        for t, line in lacking.items():
            note_lack(lines, target_hash_part(self.store, t) or t, line)
        self.lacking = list(lines.values())
        return roots

    def missing_outputs(self, drv: Derivation) -> list[StorePath]:
        return [p for p in drv.output_paths().values() if self._lacks(p)]

    def _lacks(self, path: StorePath) -> bool:
        """Not valid here, nor to be fetched by the plan being made."""
        return not self.store.is_valid(path) and (self._planned is None or path not in self._planned.paths)

    def plan(self, roots: list[Derivation]) -> list[Derivation]:
        """The derivations that must be built, dependencies first, after fetching what the
        substituters hold of the missing outputs (unless a dry run).

        The substituters are first only asked, level by level, so that a plan that cannot
        be carried out (:meth:`check_obtainable`) fails before anything is downloaded; then
        everything they hold of it is fetched in one batch. A cache that fails while its
        objects are downloaded is taken as having nothing: it is not used again, and the
        plan is made again with the others (what they lack is built)."""
        self._protect(roots)
        self._substitution_failed = False
        needed = self._plan_needed(roots)
        while not self.options.dry_run and self._planned is not None and (
                self._planned.paths or self._planned.realisations):
            try:
                got = self.options.substituters.fetch(self._planned)
            except (IntegrityError, RemoteError) as e:
                url = getattr(e, "cache_url", None)
                if url is not None:
                    self.warn(f"{e.message}; not using '{url}' again; {self._instead('what no other cache has')}")
                    self.options.substituters.drop(url)
                else:  # not one cache's fault that we can tell: substitute nothing more
                    self.warn(f"{e.message}; {self._instead()}")
                    self._substitution_failed = True
                needed = self._plan_needed(roots)
                continue
            with self._lock:
                self.substituted.extend(sorted(self.store.logical(p) for p in got))  # closures too
            self._planned = None  # fetched: validity alone tells from now on
        order = self.graph.closure(list(needed.values()))
        return [d for d in order if d.drv_path.base in needed]

    def _plan_needed(self, roots: list[Derivation]) -> dict[str, Derivation]:
        """Ask the substituters (afresh) what they hold; the derivations to build, checked."""
        self._planned = None
        if self.options.substituters:  # (the cache modules are not imported without them)
            from .cache.substitute import FetchPlan

            self._planned = FetchPlan()
        needed = self._needed(roots)
        self.check_obtainable(list(needed.values()))
        return needed

    def planned_fetches(self) -> dict:
        """After a dry run's :meth:`plan`: ``{path: (Substituter, RemoteInfo)}`` it would fetch."""
        return dict(self._planned.paths) if self._planned is not None else {}

    def _needed(self, roots: list[Derivation]) -> dict[str, Derivation]:
        """The derivations to build: those whose outputs are neither valid nor held by a
        substituter, with the inputs they need that are not either (asking level by level)."""
        needed: dict[str, Derivation] = {}
        frontier = [d for d in roots if self.missing_outputs(d)]
        while frontier:
            self._substitute(frontier)
            nxt = []
            for drv in frontier:
                key = drv.drv_path.base
                if key in needed or not self.missing_outputs(drv):
                    continue
                needed[key] = drv
                for path, outs in drv.input_drvs().items():
                    dep = self.graph.load(path)
                    if any(self._lacks(dep.output_paths()[o]) for o in outs):
                        nxt.append(dep)
            frontier = nxt
        return needed

    def check_obtainable(self, needed: list[Derivation]) -> None:
        """Fail early, naming every item, when something needed cannot be had here: what
        :meth:`load_targets` found lacking, and what building ``needed`` lacks."""
        missing = self.lacking + list(self.graph.unavailable.values())
        for drv in needed:
            for i in drv.inputs.values():
                if (i.kind != "drv" and not self.store.is_valid(_base(i.path))
                        and _base(i.path).hash_part not in self.graph.unavailable):
                    missing.append(f"{i.path}: source of {drv.drv_path.base}, not in the store")
            if not drv.is_fixed_output and drv.system != host_system():
                missing.append(f"{self.store.logical(drv.drv_path)}: a '{drv.system}' derivation cannot be built "
                               f"on this '{host_system()}' host, and no substituter has it")
            if drv.is_fixed_output and self.options.offline:
                missing.append(f"{drv.outputs['out']}: fixed-output derivation {drv.drv_path.base} "
                               f"was never fetched ({drv.fetch['url']})")
        if missing:
            missing = sorted(set(missing))
            where = "offline" if self.options.offline else "here"
            raise NotFound(f"{len(missing)} item(s) needed cannot be obtained {where}",
                           "run 'fimio prefetch' while online, or import a bundle" if self.options.offline
                           else "realise or copy them first, or give a --substituter that has them",
                           details=missing)

    def _protect(self, roots: list[Derivation]) -> None:
        """Temp-root the whole graph (derivations, sources, outputs) before judging validity."""
        paths = []
        for drv in self.graph.closure(roots):
            paths.append(drv.drv_path)
            paths.extend(drv.output_paths().values())
            paths.extend(_base(i.path) for i in drv.inputs.values() if i.kind != "drv")
        self.temp_roots.add(paths)

    def _substitute(self, drvs: list[Derivation]) -> None:
        """Ask the substituters what they hold of ``drvs``' missing outputs (one batched
        query), adding it to the plan. A cache whose records fail verification is not
        trusted, and the outputs are built instead; the refusal is reported as a warning."""
        if not self.options.substituters or self._substitution_failed:
            return
        wanted = [(d.drv_hash, name, path) for d in drvs for name, path in d.output_paths().items()
                  if self._lacks(path)]
        if not wanted:
            return
        try:
            self._planned.merge(self.options.substituters.plan_outputs(wanted))
        except (IntegrityError, RemoteError) as e:
            self.warn(f"{e.message}; {self._instead()}")

    def _instead(self, what: str = "") -> str:
        """What a refused substitution leads to: offline, a fixed output cannot be built."""
        text = "building instead" + (f" {what}" if what else "")
        return text + (" (offline, a fixed output cannot be)" if self.options.offline else "")

    def realise_drvs(self, drvs: list[Derivation]) -> list[str]:
        """Make every output of the loaded ``drvs`` valid (substituting, else building what they
        need); return the ``.drv`` base names built. Used by ``prefetch`` for fixed outputs."""
        return self._build_all(self.plan(drvs))

    # ---- building ----------------------------------------------------------------------

    def realise(self, targets: list[str], before_build=None) -> Outcome:
        """Make every output of ``targets`` valid. ``before_build(roots)``, if given, is
        called with the loaded target derivations before anything is fetched or built."""
        roots = self.load_targets(targets)
        if before_build is not None:
            before_build(roots)
        todo = self.plan(roots)
        try:
            built = self._build_all(todo)
        except FimioError as e:
            # what was done anyway, for --keep-going's checks and --json: the targets made valid
            valid = [i for i, d in enumerate(roots) if not self.missing_outputs(d)]
            e.partial = Outcome([(roots[i], roots[i].output_paths()) for i in valid],
                                getattr(e, "built", []), self.substituted, valid)
            raise
        outcome = Outcome([(d, d.output_paths()) for d in roots], built, self.substituted)
        for d, outs in outcome.targets:
            for p in outs.values():
                if not self.store.is_valid(p):
                    raise NotFound(f"output '{self.store.logical(p)}' of '{d.drv_path.base}' could not be realised")
        return outcome

    def dry_run(self, targets: list[str]) -> tuple[list[Derivation], list[Derivation], dict]:
        """What :meth:`realise` would do: ``(target derivations, derivations it would build,
        dependencies first, {path: (Substituter, RemoteInfo)} it would fetch)``. Nothing is
        built or fetched but what is needed to know the graph: derivation files are
        instantiated, and ``.drv`` targets and ``store`` inputs not valid here are taken
        from the substituters. Raises NotFound as :meth:`realise` would."""
        assert self.options.dry_run
        roots = self.load_targets(targets)
        return roots, self.plan(roots), self.planned_fetches()

    def realise_inputs(self, drv: Derivation) -> None:
        """Make the outputs of ``drv``'s input derivations valid (substituted or built): a
        rebuild of ``drv`` needs them even when its own outputs were valid all along."""
        self._build_all(self.plan([self.graph.load(p) for p in drv.input_drvs()]))

    def _build_all(self, todo: list[Derivation]) -> list[str]:
        if not todo:
            return []
        jobs = self.options.jobs or os.cpu_count() or 1
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            try:
                return self._schedule(pool, todo, jobs)
            except KeyboardInterrupt:  # the pool's exit would wait for every running build
                self.builder.interrupt()
                raise

    def _schedule(self, pool, todo: list[Derivation], jobs: int) -> list[str]:
        """Run ``todo`` on ``pool``, each once its dependencies are done; the derivations
        built. After a failure nothing new starts (with ``keep_going``, nothing that needs
        the failed build); the builds running finish first."""
        pending = {d.drv_path.base: d for d in todo}
        deps = {
            key: {self.graph.load(p).drv_path.base for p in d.input_drvs()} & pending.keys()
            for key, d in pending.items()
        }
        done: set[str] = set()
        built: list[str] = []
        running = {}
        failure: BaseException | None = None
        failed: list[tuple[Derivation, FimioError]] = []  # with keep_going
        skipped: list[tuple[str, str]] = []  # with keep_going: (not built, the failed build it needs)
        counts = {"total": len(todo), "done": 0, "failed": 0}
        while pending or running:
            if failure is None:
                for key in [k for k in pending if deps[k] <= done][: max(0, jobs - len(running))]:
                    drv = pending.pop(key)
                    self._progress("start", drv, counts)
                    running[pool.submit(self.realise_one, drv)] = drv
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                drv = running.pop(fut)
                try:
                    if fut.result():
                        built.append(drv.drv_path.base)
                    done.add(drv.drv_path.base)
                    counts["done"] += 1
                    self._progress("done", drv, counts)
                except FimioError as e:
                    counts["failed"] += 1
                    self._progress("failed", drv, counts)
                    if not self.options.keep_going:
                        failure = failure or e
                        pending.clear()  # stop scheduling; let running builds finish
                        continue
                    failed.append((drv, e))
                    dropped = _drop_dependents(drv.drv_path.base, pending, deps)
                    skipped += [(k, drv.drv_path.base) for k in dropped]
                    counts["total"] -= len(dropped)
                except KeyboardInterrupt:
                    raise  # now: _build_all stops the running builds
                except BaseException as e:  # a bug: stop whatever keep_going says
                    failure = failure or e
                    pending.clear()
        if failure is not None:
            if isinstance(failure, FimioError):
                failure.built = built
            raise failure
        if failed:
            err = _failures(failed, skipped)
            err.built = built
            raise err
        return built

    def _progress(self, event: str, drv: Derivation, counts: dict) -> None:
        if self.options.progress is not None:
            self.options.progress(event, drv, counts)

    def realise_one(self, drv: Derivation) -> bool:
        """Make ``drv``'s outputs valid under their locks. True if this call built them."""
        outputs = drv.output_paths()
        with ExitStack() as stack:
            for path in sorted(outputs.values()):
                stack.enter_context(self.store.lock_path(path))
            if not self.missing_outputs(drv):
                return False  # another process built it while we waited
            result = self.build(drv)
            if self.builder.interrupted:  # finished as Ctrl-C came: nothing of it is registered
                fsutil.remove_tree(result.scratch)
                raise BuildError(f"build of '{drv.drv_path.base}' interrupted")
            self.register(result)
            return True

    def build(self, drv: Derivation, variation=None, save_failed_log: bool = True):
        """Run one build (or fetch) without registering it. A failed build's log becomes the
        derivation's log (``fimio log``) unless ``save_failed_log`` is false (check rounds:
        the log of the registered build stays)."""
        if drv.is_fixed_output:
            return buildmod.fetch(self.store, drv, offline=self.options.offline,
                                  interrupted=lambda: self.builder.interrupted)
        inputs = input_paths(self.graph, drv)
        closure = self.store.closure(_base(p) for p in inputs.values())
        self.temp_roots.add(closure)
        try:
            return self.builder.run_build(drv, inputs, closure, variation)
        except BuildError as e:
            if getattr(e, "log", None) is None:
                raise
            if not save_failed_log:
                e.hint = e.hint or "a check build's log is not kept: its last lines are above"
                raise
            try:
                self.save_log(drv, e.log)
                e.hint = e.hint or f"see 'fimio log {drv.drv_path.hash_part}'"
            except OSError:
                pass  # (a full disk) the failure is the news; its log tail is in the error
            raise

    def register(self, result) -> None:
        """Register a build's outputs, realisations and build record in one transaction."""
        drv = result.drv
        items = [(o.tmp, o.path, o.node, o.references, drv.drv_path.base) for o in result.outputs.values()]

        def also(txn):
            db = self.store.db.dbs
            for name, o in result.outputs.items():
                txn.put(f"{drv.drv_hash}!{name}".encode(), dumps(realisation(drv, name, o.path, o.node.digest)),
                        db=db["realisations"])
            txn.put(f"{drv.drv_hash}!{time.time_ns()}".encode(), dumps(result.record), db=db["records"])

        try:
            with self.store.writing():
                self.store.commit_many(items, also=also)
        finally:
            fsutil.remove_tree(result.scratch)
        try:
            self.save_log(drv, result.log)
        except OSError as e:  # the outputs are valid: a log that does not fit is no failure
            self.warn(f"the build log of '{drv.drv_path.base}' was not kept: {e.strerror}")

    def save_log(self, drv: Derivation, log: bytes) -> None:
        import zstandard

        path = os.path.join(self.store.root, "logs", f"{drv.drv_hash}.log.zst")
        # no fsync: a log lost to a power cut costs nothing the store relies on; the temp file
        # is under tmp/, where a killed process's leftovers are removed (recovery.py)
        fsutil.write_atomic(path, zstandard.ZstdCompressor(level=3).compress(log), durable=False,
                            tmp=self.store._tmp_name("log"))


def realisation(drv: Derivation, output: str, path: StorePath, root: bytes) -> dict:
    return {"drvHash": drv.drv_hash, "drv": drv.drv_path.base, "output": output,
            "path": path.base, "root": root.hex(), "signatures": []}


def realisation_of_output(store, path: StorePath) -> dict | None:
    """The realisation that names ``path`` as an output (its .drv may be gone after GC)."""
    with store.db.read() as txn:
        for _, value in txn.cursor(db=store.db.dbs["realisations"]):
            record = loads(value)
            if record.get("path") == path.base:
                return record
    return None


def build_records(store, drv_hash: str) -> list[dict]:
    """Every build record of a derivation, oldest first."""
    return store.db.scan_prefix("records", f"{drv_hash}!".encode())


def realisations_of(store, drv_hash: str) -> list[dict]:
    """Every realisation of a derivation's outputs."""
    return store.db.scan_prefix("realisations", f"{drv_hash}!".encode())


def read_log(store, drv_hash: str) -> bytes:
    import zstandard

    path = os.path.join(store.root, "logs", f"{drv_hash}.log.zst")
    try:
        with open(path, "rb") as f:
            return zstandard.ZstdDecompressor().decompress(f.read(), max_output_size=1 << 31)
    except FileNotFoundError:
        raise NotFound("no build log for this derivation", "it was substituted, or never built here") from None
