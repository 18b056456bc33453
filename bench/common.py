"""Shared pieces of the benchmark harness: running commands, timing, rows, the table.

Nothing here knows about a particular benchmark group; groups (``store_bench.py``, later
``realise``, ``cache``, ``bundle``) build :class:`Row` objects with the helpers below.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field


# ---- running commands -------------------------------------------------------------------


@dataclass
class Sample:
    """One run of one command: wall time, peak RSS of that child, its exit status and stdout."""

    seconds: float
    maxrss_bytes: int
    returncode: int
    stdout: bytes = b""
    stderr: bytes = b""
    cpu_seconds: float = 0.0  # user + system time of the child


class CommandFailed(RuntimeError):
    pass


def run_cmd(argv: list[str], env: dict | None = None, stdout=subprocess.PIPE, check: bool = True,
            cwd: str | None = None) -> Sample:
    """Run ``argv`` and measure it: wall-clock seconds and the child's own ``ru_maxrss``.

    ``os.wait4`` gives the resource usage of exactly this child (not the aggregate of every
    child ever waited for, as ``RUSAGE_CHILDREN`` would), so peak RSS is per command.
    ``stdout`` may be ``subprocess.PIPE`` (captured), ``subprocess.DEVNULL`` or a file object.
    """
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, env=env, stdout=stdout, stderr=subprocess.PIPE, cwd=cwd)
    out = b""
    if stdout is subprocess.PIPE:
        out = p.stdout.read()
        p.stdout.close()
    err = p.stderr.read()
    p.stderr.close()
    _, status, ru = os.wait4(p.pid, 0)
    seconds = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)  # tell Popen the child is reaped
    s = Sample(seconds, ru.ru_maxrss * 1024, p.returncode, out, err, ru.ru_utime + ru.ru_stime)
    if check and p.returncode != 0:
        raise CommandFailed(f"{' '.join(argv)} exited {p.returncode}: {err.decode(errors='replace')[-2000:]}")
    return s


_INSTALLED: list[str] | None = None  # set by install_fimio


def fimio_argv() -> list[str]:
    """How to start fimio: the wheel install of :func:`install_fimio` if there is one, else
    the console script next to this Python (else on PATH, else ``-m``)."""
    if _INSTALLED is not None:
        return list(_INSTALLED)
    script = os.path.join(os.path.dirname(sys.executable), "fimio")
    if os.access(script, os.X_OK):
        return [script]
    found = shutil.which("fimio")
    return [found] if found else [sys.executable, "-m", "fimio.cli"]


def install_fimio(workdir: str) -> bool:
    """Install fimio from this checkout into ``<workdir>/venv`` (untimed), as users install
    it: a wheel with its bytecode, in an environment of its own. What a development
    environment adds to every start-up is then not timed: an editable install's import
    hook and its missing bytecode, and whatever ``.pth`` files the base interpreter's
    site-packages run. The first run fetches the dependencies; later runs only rebuild
    fimio (about 2 s). False (with a message) when it cannot be done."""
    global _INSTALLED
    venv = os.path.join(os.path.abspath(workdir), "venv")
    python = os.path.join(venv, "bin", "python")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    steps = [[python, "-m", "pip", "install", "-q", "--no-build-isolation", repo]]
    if not os.access(python, os.X_OK):
        steps[:0] = [[sys.executable, "-m", "venv", venv], [python, "-m", "pip", "install", "-q", "wheel"]]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            log(f"could not install fimio into {venv} ({done.stderr.strip()[-300:]}); timing this environment's fimio")
            return False
    _INSTALLED = [os.path.join(venv, "bin", "fimio")]
    return True


def compile_fimio() -> None:
    """Without :func:`install_fimio`: compile this environment's fimio to bytecode (untimed),
    as a wheel install does. An editable install gets none, and with PYTHONDONTWRITEBYTECODE
    set every timed command would compile its modules again (about 25 ms)."""
    import compileall

    import fimio.cli
    import fimio.store

    for package in (fimio.store, fimio.cli):
        for directory in package.__path__:
            compileall.compile_dir(directory, quiet=1)


def fimio_env(root: str) -> dict:
    env = dict(os.environ)
    env["FIMIO_ROOT"] = root
    env.pop("FIMIO_DEBUG", None)
    return env


def have_nix() -> bool:
    return shutil.which("nix-store") is not None


def settle() -> None:
    """Write back every dirty page before a timed run (untimed), so that one tool never pays
    for flushing what the previous command (or tree generation) left in the page cache."""
    os.sync()


def warm_tree(path: str) -> None:
    """Read every file of a tree (untimed), so that whichever tool runs first does not pay
    for bringing the tree into the page cache alone."""
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            with open(p, "rb", buffering=0) as f:
                while f.read(1 << 20):
                    pass


def remove_tree(path: str) -> None:
    """Delete a tree even when a store made it read-only."""
    if not os.path.lexists(path):
        return
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                try:
                    os.chmod(p, 0o755)
                except OSError:
                    pass
    try:
        os.chmod(path, 0o755)
    except OSError:
        pass
    shutil.rmtree(path, ignore_errors=True)


# ---- results ----------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table.

    ``kind`` says how to read the numbers: ``time`` (seconds; lower is better; ratio =
    fimio/peer), ``rate`` (bytes/s; higher is better; ratio = fimio/peer), ``bytes``
    (peak memory; lower is better). ``target`` is a human string; ``met`` whether it holds
    (None when it cannot be judged, e.g. no peer).
    """

    work: str
    kind: str
    fimio: float | None
    peer: float | None
    target: str = ""
    met: bool | None = None
    note: str = ""
    fimio_samples: list[float] = field(default_factory=list)
    peer_samples: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        if self.fimio is None or not self.peer:
            return None
        return self.fimio / self.peer


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def fmt_value(kind: str, v: float | None) -> str:
    if v is None:
        return "–"
    if kind == "time":
        return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s"
    if kind == "rate":
        return f"{v / 1e9:.2f} GB/s"
    if kind == "bytes":
        return f"{v / 1e6:.0f} MB"
    return f"{v:g}"


def table(rows: list[Row]) -> str:
    lines = ["| work | fimio | peer | ratio | target |", "| --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        ratio = "–" if r.ratio is None else f"{r.ratio:.2f}×"
        verdict = {True: " ✓", False: " ✗ MISSED", None: ""}[r.met]
        lines.append(f"| {r.work} | {fmt_value(r.kind, r.fimio)} | {fmt_value(r.kind, r.peer)} | {ratio} | "
                     f"{r.target}{verdict} |")
    return "\n".join(lines)


def row_json(r: Row) -> dict:
    d = asdict(r)
    d["ratio"] = r.ratio
    return d


def machine_info() -> dict:
    import platform

    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if have_nix():
        try:
            info["nix"] = subprocess.run(["nix-store", "--version"], capture_output=True, text=True).stdout.strip()
        except OSError:
            pass
    try:
        info["fimio_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                              text=True, cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        pass
    return info


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- where scratch stores go ----------------------------------------------------------

_FS_IOC_GETFLAGS, _FS_IOC_SETFLAGS, _FS_TOPDIR_FL = 0x80086601, 0x40086602, 0x00020000


def scratch_parent(workdir: str) -> str:
    """The directory under which scratch stores (fresh FIMIO_ROOTs) are created.

    On ext4 it carries the "top of directory hierarchy" flag (``chattr +T``), so each store
    created in it is placed like a top-level directory: in a block group of its own, away
    from the groups where /tmp's other users keep creating and deleting files (which make
    every file creation there scan past their recently freed inodes, see README). The Nix
    store enjoys that placement already, /nix having been created at install time.
    Elsewhere the flag is simply not set.
    """
    import fcntl
    import struct

    path = os.path.join(workdir, "roots")
    os.makedirs(path, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            flags = struct.unpack("i", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, b"\0" * 4))[0]
            if not flags & _FS_TOPDIR_FL:
                fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("i", flags | _FS_TOPDIR_FL))
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


# ---- floors -----------------------------------------------------------------------------

# A floor is a benchmark's file work done by C tools and nothing else: no hashing, no
# verification, no interpreter. It is printed (as a note) next to the target's time
# budget. Its wall time is not a lower bound for a tool that spreads the work over several
# CPUs, so the note also gives its CPU time divided by the CPUs: a target whose budget is
# below even that cannot be met here by a tool doing the same work.


# The least any tool that keeps a durable copy of a tree does: copy it, then flush it.
COPY_FLOOR = 'cp -a "$SRC" "$D/" && sync -f "$D"'
# The same with every CPU copying: the directories first, then the other entries in batches
# of 256, on as many concurrent cp processes as there are CPUs.
PARALLEL_COPY_FLOOR = (
    'cd "$SRC" && mkdir "$D/t" && find . -mindepth 1 -type d -printf "$D/t/%P\\0" | xargs -0r mkdir -p'
    ' && find . -mindepth 1 ! -type d -print0 | xargs -0r -P "$CPUS" -n 256 cp -a --parents -t "$D/t"'
    ' && sync -f "$D"')


def copy_floors(src: str, scratch) -> tuple[Sample, Sample]:
    """One run of each copy floor of ``src``: (``cp -a``, parallel ``cp``), each then
    flushed, into new directories named by ``scratch(label)``."""
    cpus = str(len(os.sched_getaffinity(0)))
    return (floor_time(COPY_FLOOR, scratch("floor"), SRC=src),
            floor_time(PARALLEL_COPY_FLOOR, scratch("pfloor"), SRC=src, CPUS=cpus))


def floor_time(script: str, dest: str, **env: str) -> Sample:
    """Run ``bash -o pipefail -c script`` (after an untimed ``sync``); ``dest`` is created
    first and ``$D`` names it in the script, as ``env`` names the rest. The script must end
    by flushing what it wrote (``sync -f``), as fimio does before it registers a path."""
    os.makedirs(dest)
    settle()
    return run_cmd(["bash", "-o", "pipefail", "-c", script], env={**os.environ, **env, "D": dest})


def floor_note(what: str, samples: list[Sample], peer: float | None, target: float) -> str:
    """One note line: the floor's median wall and CPU time, against the peer and the budget."""
    cpus = len(os.sched_getaffinity(0))
    wall = median([s.seconds for s in samples])
    spread = median([s.cpu_seconds for s in samples]) / cpus
    text = (f"floor of {what}: {wall:.3f} s (median of {len(samples)})"
            + (f" = {wall / peer:.2f}× nix" if peer else "")
            + f"; its CPU time spread over {cpus} CPUs: {spread:.3f} s")
    if not peer:
        return text
    budget = target * peer
    text += f"; the target's budget: {budget:.3f} s ({target}× nix)"
    return text + (", below even the spread floor" if spread > budget else "")


# ---- deletions --------------------------------------------------------------------------

# On ext4 without a journal, a free inode whose deletion time is less than 60 s old (360 s
# while its inode-table block is dirty again, which the next creations nearby make it) is
# skipped by the allocator, one by one: after deleting a large tree, every file creation in
# that block group is slower for minutes, whichever tool creates it. Groups therefore delete
# scratch trees only after their timed runs, record when, and the next timed run waits.
QUIET_AFTER_DELETE = 360.0  # run.py --after-delete-wait sets it


def note_deletion(workdir: str) -> None:
    """Record that a large deletion just finished."""
    os.sync()
    with open(os.path.join(workdir, "last-delete"), "w") as f:
        f.write(f"{time.time()}\n")


def wait_after_deletion(workdir: str, quiet: float | None = None) -> None:
    """Sleep until ``quiet`` seconds (default QUIET_AFTER_DELETE) have passed since the last
    recorded large deletion."""
    quiet = QUIET_AFTER_DELETE if quiet is None else quiet
    try:
        with open(os.path.join(workdir, "last-delete")) as f:
            last = float(f.read().strip())
    except (OSError, ValueError):
        return
    left = last + quiet - time.time()
    if left > 0:
        log(f"waiting {left:.0f} s after the last large deletion (freed inodes slow down file creation; "
            "--after-delete-wait)")
        time.sleep(left)
