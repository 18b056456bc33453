"""Fault injection for the crash-safety tests (a helper module, not a test module).

The contract says nothing half-written is ever visible as valid after any error, crash or
kill. This harness checks it the hard way: it runs the real ``fimio`` console script and
SIGKILLs it at seeded random moments, then checks the store (and the cache) it was writing.

* :class:`Operation` describes one command to kill: how to prepare a fresh attempt, its
  argv and environment, what must hold after a kill, and the result a complete run gives.
* :func:`run_kills` calibrates the command with one uninterrupted run (duration ``T``,
  expected result), then, ``kills`` times: prepares an attempt, starts the command, kills
  it after a delay drawn from a seeded RNG (a fraction of ``T``: anywhere, early, late --
  the commit window -- or at the first sight of an event such as a new entry in
  ``store/``), sometimes kills a second run on top of the first one's leftovers, checks
  the invariants (``fimio verify --check-contents`` exits 0 and whatever the operation
  adds), reruns the command to completion and compares its result with the calibrated one.
* :class:`World`: what the operations share, built once: a ~30-derivation graph (some
  multi-file and two-output derivations) realised in a source store, a big tree, a signing
  key and a config trusting it, a file:// cache holding both, and a signed bundle.

Reproducibility: the delays are fractions of the calibrated duration drawn from
``random.Random(f"{seed}:{operation}")``; ``FIMIO_FAULT_SEED`` changes the seed. Every
failure message names the attempt, the kill mode and the delay.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field

from conftest import STORE_DIR, fimio_env, fimio_executable, run_fimio

SEED = int(os.environ.get("FIMIO_FAULT_SEED", "20250704"))
HOST_PATHS = '[sandbox]\nhost_paths = ["/usr", "/bin", "/lib", "/lib64"]\n'


# ---- small helpers --------------------------------------------------------------------------


def fim(args, root, config=None, env=None, check=None, timeout=600) -> subprocess.CompletedProcess:
    """``run_fimio`` with ``FIMIO_CONFIG=config`` (when given)."""
    e = dict(env or {})
    if config is not None:
        e["FIMIO_CONFIG"] = str(config)
    return run_fimio([str(a) for a in args], root, env=e, check=check, timeout=timeout)


def open_store(root):
    from fimio.store.local import LocalStore

    return LocalStore(str(root), STORE_DIR)


def store_digests(root, bases=None) -> dict[str, str]:
    """``{base name: root digest hex}`` of the valid paths (all, or those among ``bases``)."""
    s = open_store(root)
    try:
        out = {i.path.base: i.root.hex() for i in s.all_paths()}
    finally:
        s.close()
    return out if bases is None else {b: out[b] for b in bases if b in out}


def leftovers(root) -> tuple[set[str], list[str]]:
    """(entries of ``store/`` with no record, entries of ``tmp/``) -- what ``verify`` must clear."""
    s = open_store(root)
    try:
        valid = {i.path.base for i in s.all_paths()}
        garbage = {e for e in os.listdir(s.store) if e != ".links" and e not in valid}
        return garbage, os.listdir(s.tmp)
    finally:
        s.close()


def assert_verify_clean(root, where: str, config=None) -> None:
    """``fimio verify --check-contents`` exits 0, and leaves no garbage behind."""
    if not (pathlib.Path(root) / "db").exists():
        return  # killed before the store was even created
    proc = fim(["verify", "--check-contents"], root, config)
    assert proc.returncode == 0, f"{where}: verify exited {proc.returncode}\n{proc.stdout}{proc.stderr}"
    garbage, tmp = leftovers(root)
    assert not garbage, f"{where}: unregistered entries survived verify: {sorted(garbage)[:5]}"
    assert not tmp, f"{where}: verify left {tmp[:5]} in tmp/"


def write_drv(directory: pathlib.Path, name: str, script: str, inputs: dict[str, str], outputs=None) -> None:
    lines = [f'name = "{name}"', 'builder = "/bin/sh"', "args = [\"-c\", " + json.dumps(script) + "]"]
    if outputs:
        lines.append("outputs = [" + ", ".join(f'"{o}"' for o in outputs) + "]")
    lines += ["[env]", 'PATH = "/usr/bin:/bin"', "[inputs]"]
    for k, v in inputs.items():
        lines.append(f'{k} = {{ path = {json.dumps(str(v["path"]))} }}' if isinstance(v, dict)
                     else f'{k} = {{ drv = "{v}.toml" }}')
    (directory / f"{name}.toml").write_text("\n".join(lines) + "\n" + HOST_PATHS)


def make_graph(directory: pathlib.Path, tree: pathlib.Path | None = None, salt: str = "") -> pathlib.Path:
    """32 derivations: 5 layers of 6 (each depending on two of the layer below), a copy of
    ``tree`` (a source input: a big multi-file output), and a top depending on the last
    layer and the copy.

    A third of the layered ones write a directory of 40 small files and a 1.5 MB file, a
    third have two outputs (``out`` and ``dev``), a third write one file. Outputs mention
    the paths of their inputs, so ``top``'s closure spans the graph. Builds are deterministic."""
    directory.mkdir(parents=True, exist_ok=True)
    for layer in range(5):
        for j in range(6):
            n = f"n{layer}{j}"
            ins = {f"i{k}": f"n{layer - 1}{k}" for k in range(6) if layer > 0 and k in (j, (j + 1) % 6)}
            deps = " ".join(f"${k}" for k in ins)
            if j % 3 == 0:
                write_drv(directory, n, f"mkdir -p $out/sub; for i in $(seq 1 40); do echo {n}{salt} $i > "
                                        f"$out/sub/f$i; done; echo {deps} > $out/refs; "
                                        f"head -c 1500000 /dev/zero | tr '\\0' {j} > $out/big", ins)
            elif j % 3 == 1:
                write_drv(directory, n, f"mkdir -p $out $dev; echo {n}{salt} {deps} > $out/x; echo $out > $dev/y; "
                                        "seq 1 20000 > $dev/seq", ins, ["out", "dev"])
            else:
                write_drv(directory, n, f"echo {n}{salt} {deps} > $out", ins)
    ins = {f"i{k}": f"n4{k}" for k in range(6)}
    if tree is not None:
        write_drv(directory, "copy", "cp -r $src $out", {"src": {"path": tree}})
        ins["big"] = "copy"
    write_drv(directory, "top", "mkdir $out; echo " + " ".join(f"${k}" for k in ins) + " > $out/all", ins)
    return directory / "top.toml"


def make_tree(directory: pathlib.Path, seed: int, files: int = 1600, large: int = 6,
              large_size: int = 9_000_000) -> pathlib.Path:
    """A tree of ``files`` files in nested directories: ``large`` files over 8 MiB (streamed
    by ``add``, chunked by caches), some 700 KB files, the rest small; some executable,
    some duplicated, a symlink and an empty directory."""
    rnd = random.Random(seed)
    previous = b""
    for i in range(files):
        d = directory / f"d{i % 29:02d}" / f"e{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        if large and i % (files // large) == 0:
            data = rnd.randbytes(large_size + i)
        elif i % 60 == 0:
            data = rnd.randbytes(700_000)
        elif i % 50 == 7:
            data = previous
        else:
            data = rnd.randbytes(rnd.randrange(0, 12_000))
        f = d / f"f{i:04d}"
        f.write_bytes(data)
        if i % 7 == 0:
            os.chmod(f, 0o755)
        previous = data
    os.symlink("d00/e0/f0000", directory / "link")
    (directory / "empty").mkdir()
    return directory


def realise_result(root, proc: subprocess.CompletedProcess) -> dict:
    """``{output base: digest}`` of every target output of a ``realise --json`` run, plus their closures."""
    data = json.loads(proc.stdout)
    bases = [o["path"].rsplit("/", 1)[1] for t in data["targets"] for o in t["outputs"].values()]
    s = open_store(root)
    try:
        from fimio.store.paths import StorePath

        closure = s.closure([StorePath.parse(b) for b in bases])
        return {p.base: s.info(p).root.hex() for p in closure}
    finally:
        s.close()


# ---- the shared world -----------------------------------------------------------------------


@dataclass
class World:
    work: pathlib.Path
    graph: pathlib.Path  # top.toml
    tree: pathlib.Path  # the big tree
    source: pathlib.Path  # a store root holding the realised graph and the added tree
    secret: pathlib.Path  # secret key file
    public: str
    config: pathlib.Path  # trusts ``public``
    cache: pathlib.Path  # file:// cache with the graph's top closure (+ realisation) and the tree
    bundle: pathlib.Path  # signed bundle of the same
    tree_path: str = ""  # logical store path of the tree
    top_path: str = ""  # logical store path of the graph's top output
    top_outputs: dict = field(default_factory=dict)  # realise result of the graph
    realise_seconds: float = 0.0
    push_seconds: float = 0.0

    @property
    def cache_url(self) -> str:
        return f"file://{self.cache}"


def build_world(work: pathlib.Path) -> World:
    from cachefixtures import make_keys, write_config

    work.mkdir(parents=True, exist_ok=True)
    tree = make_tree(work / "tree" / "big", seed=SEED, files=1200, large=4)
    graph = make_graph(work / "graph", tree)
    sk, pk = make_keys("faults-1")
    (work / "secret").write_text(str(sk) + "\n")
    config = pathlib.Path(write_config(work / "config.toml", trusted=[pk]))
    w = World(work, graph, tree, work / "source", work / "secret", pk, config, work / "cache", work / "bundle.fimio")
    start = time.monotonic()
    proc = fim(["realise", "--json", "--no-out-link", "-j", "2", graph], w.source, config, check=0)
    w.realise_seconds = time.monotonic() - start
    w.top_outputs = realise_result(w.source, proc)
    w.top_path = json.loads(proc.stdout)["targets"][0]["outputs"]["out"]["path"]
    w.tree_path = fim(["add", tree], w.source, config, check=0).stdout.strip()
    w.tree_path = STORE_DIR + "/" + os.path.basename(w.tree_path)
    start = time.monotonic()
    fim(["push", w.cache_url, graph, w.tree_path, "--key", w.secret], w.source, config, check=0)
    w.push_seconds = time.monotonic() - start
    fim(["export", "--closure", "-o", w.bundle, "--key", w.secret, graph, w.tree_path], w.source, config, check=0)
    return w


# ---- cache checks -------------------------------------------------------------------------


def cache_problems(cache_dir, deep: bool = True) -> list[str]:
    """What is wrong with a file:// cache: an ``info/`` whose manifest, packs, chunks or
    references are missing (or, with ``deep``, whose objects do not match their digests),
    or a realisation whose path has no info. Empty: every reader sees whole paths."""
    from fimio.store.cache import manifest as manifestmod
    from fimio.store.cache import packing
    from fimio.store.cache.layout import RemoteInfo, info_key, object_key

    root = pathlib.Path(cache_dir)
    problems = []
    info_dir = root / "info"
    infos = sorted(info_dir.iterdir()) if info_dir.is_dir() else []
    for f in infos:
        where = f"info/{f.name}"
        try:
            info = RemoteInfo.parse(f.read_bytes(), STORE_DIR, f.name[:-5], where)
        except Exception as e:  # noqa: BLE001 -- any failure is a finding
            problems.append(f"{where}: unreadable: {e}")
            continue
        for ref in info.references:
            if not (root / info_key(ref.hash_part)).exists():
                problems.append(f"{where}: reference {ref.base} has no info")
        mkey = object_key("trees", info.manifest)
        try:
            raw = packing.decompress((root / mkey).read_bytes(), info.manifest_size, mkey)
            packing.check_digest(raw, info.manifest, mkey)
            m = manifestmod.decode(raw, info.root, info.size, mkey)
        except FileNotFoundError:
            problems.append(f"{where}: manifest {mkey} is missing")
            continue
        except Exception as e:  # noqa: BLE001
            problems.append(f"{where}: manifest {mkey} is bad: {e}")
            continue
        keys = [(object_key("packs", p.digest), p) for p in m.packs]
        keys += [(object_key("chunks", c.digest), c) for b in m.large for c in b.chunks]
        for key, obj in keys:
            p = root / key
            if not p.exists():
                problems.append(f"{where}: object {key} is missing")
            elif deep:
                try:
                    raw = packing.decompress(p.read_bytes(), obj.raw_size, key)
                    if key.startswith("packs/"):
                        if packing.pack_id(packing.parse_pack(raw, key)) != obj.digest:
                            raise ValueError("pack does not match its address")
                    else:
                        packing.check_digest(raw, obj.digest, key)
                except Exception as e:  # noqa: BLE001
                    problems.append(f"{where}: object {key} is bad: {e}")
    rdir = root / "realisations"
    for f in sorted(rdir.iterdir()) if rdir.is_dir() else []:
        try:
            path = json.loads(f.read_bytes())["path"].rsplit("/", 1)[1]
        except Exception as e:  # noqa: BLE001
            problems.append(f"realisations/{f.name}: unreadable: {e}")
            continue
        if not (root / info_key(path[:32])).exists():
            problems.append(f"realisations/{f.name}: names {path}, which has no info")
    return problems


def infos_in(cache_dir) -> set[str]:
    d = pathlib.Path(cache_dir) / "info"
    return {f.name for f in d.iterdir()} if d.is_dir() else set()


# ---- the kill loop --------------------------------------------------------------------------


@dataclass
class Attempt:
    index: object  # int, or "calibrate"
    root: pathlib.Path  # the store root the command writes to
    extra: dict = field(default_factory=dict)


class Operation:
    """One command under fault injection. Subclasses override what they need."""

    name = "op"
    config: pathlib.Path | None = None

    def prepare(self, index) -> Attempt:
        raise NotImplementedError

    def argv(self, a: Attempt) -> list:
        raise NotImplementedError

    def env(self, a: Attempt) -> dict:
        return {"FIMIO_CONFIG": str(self.config)} if self.config else {}

    def triggers(self, a: Attempt) -> dict:
        """``{name: predicate()}``: events worth a kill the moment they are seen."""
        return {}

    def after_kill(self, a: Attempt, where: str) -> str:
        """Check the invariants after a kill; return an outcome label for the tally."""
        assert_verify_clean(a.root, where, self.config)
        return "ok"

    def result(self, a: Attempt, proc: subprocess.CompletedProcess):
        """The comparable result of a complete run."""
        return proc.stdout

    def expected(self, a: Attempt, calibrated):
        return calibrated

    def after_rerun(self, a: Attempt, where: str) -> None:
        pass

    def cleanup(self, a: Attempt) -> None:
        shutil.rmtree(a.root, ignore_errors=True)


class FreshRootOp(Operation):
    """An operation that runs into a fresh root per attempt (``base/r<index>``); after a
    kill, verify must be clean and :meth:`check_store` judges what the store holds."""

    def __init__(self, world: "World", base: pathlib.Path):
        self.w, self.base, self.config = world, base, world.config

    def prepare(self, index) -> Attempt:
        return Attempt(index, self.base / f"r{index}")

    def after_kill(self, a, where):
        assert_verify_clean(a.root, where, self.config)
        if not (a.root / "db").exists():
            return "no-store"
        return self.check_store(a, where)

    def check_store(self, a: Attempt, where: str) -> str:
        raise NotImplementedError


@dataclass
class Tally:
    name: str
    attempts: int = 0
    kills: int = 0  # SIGKILLs sent to a running command
    finished_first: int = 0  # the command was done before its kill moment
    stacked: int = 0  # attempts with a second kill on top of the first's leftovers
    modes: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)
    calibrated: float = 0.0
    final: float = 0.0  # the duration the delays were scaled to at the end (see run_kills)
    seconds: float = 0.0

    def line(self) -> str:
        return (f"{self.name}: {self.kills} kills in {self.attempts} attempts ({self.finished_first} finished "
                f"before the kill, {self.stacked} stacked), T={self.calibrated:.2f}s (finally {self.final:.2f}s), "
                f"{self.seconds:.1f}s total, "
                f"modes {dict(self.modes)}, outcomes {dict(self.outcomes)}")


def _start(op: Operation, a: Attempt, errfile) -> subprocess.Popen:
    argv = [fimio_executable(), *[str(x) for x in op.argv(a)]]
    return subprocess.Popen(argv, env=fimio_env(a.root, op.env(a)), stdout=subprocess.DEVNULL, stderr=errfile,
                            cwd=str(a.root.parent))


_startup: list[float] = []


def startup_seconds(scratch: pathlib.Path) -> float:
    """How long the console script takes to start, create a store and exit (best of 3;
    measured once per session)."""
    if _startup:
        return _startup[0]
    best = 10.0
    for i in range(3):
        root = scratch / f".startup-{i}"
        start = time.monotonic()
        subprocess.run([fimio_executable(), "verify"], env=fimio_env(root), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=True)
        best = min(best, time.monotonic() - start)
        shutil.rmtree(root, ignore_errors=True)
    _startup.append(best)
    return best


def _choose(rnd: random.Random, triggers: dict) -> tuple[str, float]:
    modes = ["any", "early", "late"] + (["event"] if triggers else [])
    mode = rnd.choice(modes)
    if mode == "early":
        return mode, rnd.uniform(0.0, 0.5)
    if mode == "late":
        return mode, rnd.uniform(0.6, 1.05)
    return mode, rnd.uniform(0.0, 1.0)


def _kill_once(op: Operation, a: Attempt, rnd: random.Random, T: float, S: float, tally: Tally,
               where: str) -> str:
    triggers = op.triggers(a)
    mode, frac = _choose(rnd, triggers)
    event = rnd.choice(sorted(triggers)) if mode == "event" else None
    a.root.parent.mkdir(parents=True, exist_ok=True)
    errpath = a.root.parent / f".{a.root.name}.stderr"
    with open(errpath, "wb") as err:
        proc = _start(op, a, err)
        start = time.monotonic()
        if event is not None:
            pred = triggers[event]
            deadline = start + max(2 * T, 5)
            while proc.poll() is None and time.monotonic() < deadline and not pred():
                time.sleep(0.001)
            mode = f"event:{event}"
        else:
            # most of the first S seconds are interpreter start-up: spread the kills over the work
            time.sleep(0.8 * S + frac * max(T - 0.8 * S, 0.01))
        delay = time.monotonic() - start
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            tally.kills += 1
        else:
            tally.finished_first += 1
        proc.wait(timeout=120)
    tally.modes[mode.split(":")[0]] += 1
    text = errpath.read_text(errors="replace")
    errpath.unlink()
    assert proc.returncode in (0, -signal.SIGKILL), (
        f"{where}: {op.argv(a)} exited {proc.returncode} (mode {mode}, delay {delay:.3f}s)\n{text}")
    return f"{mode} after {delay:.3f}s"


def run_kills(op: Operation, kills: int, seed: int = SEED, calibration=None, log=print,
              verbose: bool = bool(os.environ.get("FIMIO_FAULT_VERBOSE")), min_kills: int = 0) -> Tally:
    """Calibrate ``op`` (or take ``calibration = (seconds, result)``), then make ``kills``
    attempts (see the module docstring), more if needed until ``min_kills`` SIGKILLs hit a
    running command (at most three times as many attempts). When a command finishes before
    its kill moment, the calibrated duration shrinks by 10% (runs after the first may be
    faster: warm caches, less to send). Raises AssertionError naming the attempt on any
    violation."""
    rnd = random.Random(f"{seed}:{op.name}")
    tally = Tally(op.name)
    t0 = time.monotonic()
    if calibration is None:
        a = op.prepare("calibrate")
        start = time.monotonic()
        proc = fim(op.argv(a), a.root, env=op.env(a), check=0)
        T = time.monotonic() - start
        expected = op.result(a, proc)
        op.cleanup(a)
    else:
        T, expected = calibration
    tally.calibrated = T
    S = startup_seconds(op.base)
    i = -1
    while i + 1 < kills or (tally.kills < min_kills and i + 1 < 3 * kills):
        i += 1
        a = op.prepare(i)
        tally.attempts += 1
        rounds = 2 if rnd.random() < 0.25 else 1
        tally.stacked += rounds == 2
        how = []
        for r in range(rounds):
            finished = tally.finished_first
            how.append(_kill_once(op, a, rnd, T, S, tally, f"{op.name} attempt {i} (seed {seed})"))
            if tally.finished_first > finished:
                T = max(0.9 * T, S)
        where = f"{op.name} attempt {i} (seed {seed}, killed: {'; '.join(how)})"
        outcome = op.after_kill(a, where)
        tally.outcomes[outcome] += 1
        start = time.monotonic()
        proc = fim(op.argv(a), a.root, env=op.env(a))
        if verbose:
            log(f"  {where}: {outcome}; rerun {time.monotonic() - start:.2f}s")
        assert proc.returncode == 0, f"{where}: the rerun exited {proc.returncode}\n{proc.stderr}"
        got = op.result(a, proc)
        assert got == op.expected(a, expected), f"{where}: the rerun gave another result"
        op.after_rerun(a, where)
        op.cleanup(a)
    tally.seconds = time.monotonic() - t0
    tally.final = T
    log(tally.line())
    return tally


# ---- the operations -------------------------------------------------------------------------


def _store_entries(root) -> int:
    try:
        return sum(1 for e in os.scandir(pathlib.Path(root) / "store") if e.name != ".links")
    except FileNotFoundError:
        return 0


def _tmp_has(root, prefix: str) -> bool:
    try:
        return any(e.name.startswith(prefix) for e in os.scandir(pathlib.Path(root) / "tmp"))
    except FileNotFoundError:
        return False


def _grows(root, before: int = 0):
    """A predicate: ``store/`` holds more than ``before`` entries (a path was just renamed in)."""
    return lambda: _store_entries(root) > before


def _output_appeared(root):
    """A predicate: ``store/`` holds something besides ``.drv`` files and the graph's source
    (a build output or substituted path was just renamed in; its commit may not have run)."""
    def pred():
        try:
            return any(not e.name.endswith((".drv", "-big", ".links")) for e in os.scandir(pathlib.Path(root) / "store"))
        except FileNotFoundError:
            return False
    return pred


class AddOp(FreshRootOp):
    """``fimio add`` of the big tree into a fresh root."""

    name = "add"

    def __init__(self, world: World, base: pathlib.Path):
        super().__init__(world, base)
        self.digest = None

    def argv(self, a):
        return ["add", self.w.tree]

    def triggers(self, a):
        return {"renamed": _grows(a.root), "materialising": lambda: _tmp_has(a.root, "add-")}

    def check_store(self, a, where):
        got = store_digests(a.root, [os.path.basename(self.w.tree_path)])
        if not got:
            return "absent"
        assert got == {os.path.basename(self.w.tree_path): self.digest}, f"{where}: wrong digest {got}"
        return "valid"

    def result(self, a, proc):
        base = os.path.basename(proc.stdout.strip())
        self.digest = store_digests(a.root, [base])[base]
        return base


class RealiseOp(FreshRootOp):
    """``fimio realise -j 2`` of the 31-derivation graph into a fresh root (builds everything)."""

    name = "realise"


    def argv(self, a):
        return ["realise", "--json", "--no-out-link", "-j", "2", self.w.graph]

    def triggers(self, a):
        # the .drv files arrive in one commit (31 entries); the next entry is a build output
        return {"output-renamed": _output_appeared(a.root), "building": lambda: _tmp_has(a.root, "build-")}

    def check_store(self, a, where):
        got = store_digests(a.root, self.w.top_outputs)
        wrong = {b: d for b, d in got.items() if d != self.w.top_outputs[b]}
        assert not wrong, f"{where}: outputs with other digests than a complete build's: {wrong}"
        return f"{len(got) // 8 * 8}+ outputs valid"

    def result(self, a, proc):
        return realise_result(a.root, proc)


class SubstituteOp(FreshRootOp):
    """``fimio realise --substituter file://…`` of the graph into a fresh root (builds nothing)."""

    name = "substitute"


    def argv(self, a):
        return ["realise", "--json", "--no-out-link", "--substituter", self.w.cache_url, self.w.graph]

    def triggers(self, a):
        return {"fetching": lambda: _tmp_has(a.root, "sub-"), "renamed": _output_appeared(a.root)}

    def check_store(self, a, where):
        got = store_digests(a.root, self.w.top_outputs)
        assert all(d == self.w.top_outputs[b] for b, d in got.items()), f"{where}: wrong digests"
        return "closure valid" if len(got) == len(self.w.top_outputs) else ("none" if not got else "partial")

    def result(self, a, proc):
        return realise_result(a.root, proc), json.loads(proc.stdout)["built"]

    def expected(self, a, calibrated):
        return self.w.top_outputs, []


class ImportOp(FreshRootOp):
    """``fimio import`` of the signed bundle (graph closure + big tree) into a fresh root."""

    name = "import"


    def argv(self, a):
        return ["import", self.w.bundle]

    def triggers(self, a):
        return {"renamed": _grows(a.root), "staging": lambda: _tmp_has(a.root, "import")}

    def check_store(self, a, where):
        n = len(store_digests(a.root))
        return "none" if n == 0 else ("all" if n >= len(self.w.top_outputs) + 1 else "partial")

    def result(self, a, proc):
        bases = sorted(os.path.basename(line) for line in proc.stdout.split())
        return bases, store_digests(a.root, bases)


class PushOp(Operation):
    """``fimio push`` of the graph (closure + realisation) and the big tree to a fresh file:// cache."""

    name = "push-file"

    def __init__(self, world: World, base: pathlib.Path):
        self.w, self.base, self.config = world, base, world.config
        base.mkdir(parents=True, exist_ok=True)

    def prepare(self, index) -> Attempt:
        return Attempt(index, self.w.source, {"cache": self.base / f"c{index}"})

    def url(self, a) -> str:
        return f"file://{a.extra['cache']}"

    def targets(self, a) -> list:
        return [self.w.graph, self.w.tree_path]

    def argv(self, a):
        return ["push", self.url(a), *self.targets(a), "--key", self.w.secret]

    def triggers(self, a):
        info = a.extra["cache"] / "info"
        return {"first-info": lambda: info.is_dir() and any(True for _ in os.scandir(info))}

    def after_kill(self, a, where):
        assert_verify_clean(a.root, where, self.config)
        problems = cache_problems(a.extra["cache"], deep=False)
        assert not problems, f"{where}: the cache shows incomplete paths: {problems[:5]}"
        return self.consume(a, where)

    def consumed(self, a) -> list:
        """The paths a reader substitutes after a kill."""
        return [self.w.top_path, self.w.tree_path]

    def consume(self, a, where) -> str:
        """A reader substituting from the killed push's cache gets each path whole or not at all."""
        present = infos_in(a.extra["cache"])
        outcome = []
        for path in self.consumed(a):
            reader = self.base / f"reader-{a.index}"
            proc = fim(["copy", "--from", self.url(a), path], reader, self.config)
            has = f"{path.rsplit('/', 1)[1][:32]}.json" in present
            # a push killed before it made the cache's directory leaves no cache: that is down (6)
            absent = (6,) if self.url(a).startswith("file://") and not os.path.isdir(a.extra["cache"]) else (5,)
            assert proc.returncode in ((0,) if has else absent), (
                f"{where}: substituting {path} from {self.url(a)} (info {'present' if has else 'absent'}) "
                f"exited {proc.returncode}: {proc.stderr}")
            assert_verify_clean(reader, f"{where} (reader)", self.config)
            shutil.rmtree(reader, ignore_errors=True)
            outcome.append("whole" if has else "absent")
        return "/".join(outcome)

    @staticmethod
    def cache_result(cache):
        realisations = pathlib.Path(cache) / "realisations"
        return infos_in(cache), sorted(os.listdir(realisations)) if realisations.is_dir() else []

    def result(self, a, proc):
        return self.cache_result(a.extra["cache"])

    def after_rerun(self, a, where):
        problems = cache_problems(a.extra["cache"], deep=True)
        assert not problems, f"{where}: after the rerun: {problems[:5]}"

    def cleanup(self, a):
        shutil.rmtree(a.extra["cache"], ignore_errors=True)


class ServePushOp(PushOp):
    """``fimio push`` to ``fimio serve`` (authenticated PUTs) of a fresh ~45 MB payload per
    attempt (a long-lived server and cache receiving new paths). Every 10 attempts the
    server restarts on a new, empty cache and the source store is renewed."""

    name = "push-serve"

    def __init__(self, world: World, base: pathlib.Path):
        super().__init__(world, base)
        self.server = None
        self.generation = -1
        self.src = None
        self.cache = None

    def _rotate(self):
        from cachefixtures import WRITE_TOKEN, Serve, write_config

        if self.server is not None:
            self.server.stop()
            shutil.rmtree(self.base / f"g{self.generation}", ignore_errors=True)
        self.generation += 1
        g = self.base / f"g{self.generation}"
        self.cache = g / "cache"
        self.cache.mkdir(parents=True)
        self.src = g / "source"
        self.server = Serve(f"file://{self.cache}", g, tokens={WRITE_TOKEN: "write"})
        self.config = pathlib.Path(write_config(g / "config.toml", trusted=[self.w.public],
                                                tokens={self.server.url: WRITE_TOKEN}))

    def prepare(self, index) -> Attempt:
        if self.server is None or (isinstance(index, int) and index % 10 == 0):
            self._rotate()
        payload = self.base / "payload" / f"p{index}"
        shutil.rmtree(payload.parent, ignore_errors=True)
        make_tree(payload, seed=zlib.crc32(f"{SEED}:{index}".encode()), files=400, large=8, large_size=5_000_000)
        path = fim(["add", payload], self.src, self.config, check=0).stdout.strip()
        return Attempt(index, self.src, {"cache": self.cache, "payload": STORE_DIR + "/" + os.path.basename(path)})

    def url(self, a) -> str:
        return self.server.url

    def targets(self, a) -> list:
        return [a.extra["payload"]]

    def consumed(self, a) -> list:
        return [a.extra["payload"]]

    def result(self, a, proc):
        return f"{a.extra['payload'].rsplit('/', 1)[1][:32]}.json" in infos_in(a.extra["cache"])

    def expected(self, a, calibrated):
        return True

    def cleanup(self, a):
        pass

    def close(self):
        if self.server is not None:
            self.server.stop()


class GcOp(Operation):
    """``fimio gc`` of a copy of a store with ~390 dead paths (chains of references, trees)
    and rooted outputs whose closures must survive."""

    name = "gc"

    def __init__(self, world: World, base: pathlib.Path):
        self.w, self.base, self.config = world, base, world.config
        self.template = base / "template"
        self.kept: set[str] = set()
        self._make_template()

    def _make_template(self):
        from fimio.store.paths import StorePath

        self.base.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-a", str(self.w.source), str(self.template)], check=True)
        s = open_store(self.template)
        try:
            import blake3

            from fimio.store.paths import text_path

            for chain in range(30):  # 30 chains of 10 text paths, each referring to the previous
                items, prev = [], []
                for k in range(10):
                    data = f"dead text {chain} {k} {SEED}\n".encode() * (k + 1)
                    items.append((f"dead-{chain}-{k}", data, prev))
                    prev = [text_path(STORE_DIR, f"dead-{chain}-{k}", blake3.blake3(data).digest(), prev)]
                s.add_texts(items)
            src = self.base / "dirs"
            for i in range(50):
                d = src / f"dir{i}"
                (d / "a" / "b").mkdir(parents=True)
                for k in range(12):
                    (d / "a" / "b" / f"f{k}").write_bytes(f"{i} {k} ".encode() * (k + 1))
                s.add_path(str(d))
            shutil.rmtree(src)
            roots = [b for b in self.w.top_outputs if b.endswith(("-n20", "-n23", "-n31"))]
            for b in roots:
                os.symlink(s.physical(StorePath.parse(b)), self.template / "gcroots" / f"root-{b}")
            self.kept = {p.base for p in s.closure([StorePath.parse(b) for b in roots])}
            self.total = len(s.all_paths())
        finally:
            s.close()

    def prepare(self, index) -> Attempt:
        root = self.base / f"r{index}"
        subprocess.run(["cp", "-a", str(self.template), str(root)], check=True)
        for link in (root / "gcroots").iterdir():  # roots name physical paths: re-point them
            target = os.readlink(link).replace(str(self.template), str(root), 1)
            link.unlink()
            os.symlink(target, link)
        return Attempt(index, root)

    def argv(self, a):
        return ["gc"]

    def triggers(self, a):
        n = _store_entries(a.root)
        return {"deleting": lambda: _store_entries(a.root) < n - 50}

    def after_kill(self, a, where):
        assert_verify_clean(a.root, where, self.config)
        valid = set(store_digests(a.root))
        lost = self.kept - valid
        assert not lost, f"{where}: gc lost rooted paths {sorted(lost)[:5]}"
        return "untouched" if len(valid) == self.total else ("done" if valid == self.kept else "partial")

    def result(self, a, proc):
        return sorted(store_digests(a.root))
