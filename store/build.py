"""One build: run the builder in the sandbox, normalise its outputs, find their references.

:func:`run_build` never registers anything: it leaves normalised outputs under the build's
scratch directory and returns them, so the caller can register them (``realise``) or
compare them with the registered ones (``--check``).
"""

from __future__ import annotations

import errno
import os
import re
import signal
import stat
import subprocess
import threading
import time
from dataclasses import dataclass, field

import blake3

from . import fsutil
from .derivation import Derivation
from .errors import BuildError, IntegrityError, NotFound, UsageError
from .paths import StorePath
from .sandbox import SandboxSpec, builder_visible, masked_proc_fds
from .tree import MAX_DEPTH, DirNode, FileNode, Node, SymlinkNode

SOURCE_DATE_EPOCH = "315532800"
LOG_TAIL_LINES = 25
_HASH_RUN = re.compile(rb"[0123456789abcdfghijklmnpqrsvwxyz]{32,}")


@dataclass
class Variation:
    """What a build's environment may vary in without changing a reproducible output."""

    tz: str = "UTC"
    lang: str = "C.UTF-8"
    umask: int = 0o022
    hostname: str = "localhost"
    uid: int = 1000
    gid: int = 100
    cores: int | None = None  # None: the configured value, all CPUs; else also the CPU affinity
    env_order: str = "sorted"  # "sorted" | "reversed"
    build_dir: str = "/build"
    # Where the build directory lives, which decides the order readdir() returns entries
    # the build creates there: "fs" = a directory on the store's filesystem (ext4/xfs/btrfs:
    # hash or b-tree order), "tmpfs" = a fresh tmpfs (reverse creation order on Linux 6.x).
    # spec/reproducibility.md explains why this is the only directory-order lever bwrap 0.8 gives.
    dir_order: str = "fs"

    def changed_from(self, other: "Variation") -> list[str]:
        return [f for f in self.__dataclass_fields__ if getattr(self, f) != getattr(other, f)]


@dataclass
class BuiltOutput:
    name: str
    path: StorePath
    tmp: str  # normalised tree, ready to rename into the store
    node: Node
    references: list[StorePath]


@dataclass
class BuildResult:
    drv: Derivation
    outputs: dict[str, BuiltOutput]
    record: dict
    log: bytes
    scratch: str
    extra: dict = field(default_factory=dict)


def build_env(drv: Derivation, input_paths: dict[str, str], cores: int,
              variation: Variation) -> list[tuple[str, str]]:
    """The builder's exact environment (contract), in the order ``variation`` asks for."""
    env = dict(drv.env)
    env.update(input_paths)
    env.update(drv.outputs)
    env.setdefault("PATH", "/path-not-set")
    env.update({
        "HOME": "/homeless-shelter",
        "TMPDIR": variation.build_dir,
        "TZ": variation.tz,
        "LANG": variation.lang,
        "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH,
        "FIMIO_BUILD_CORES": str(variation.cores if variation.cores is not None else cores),
        "FIMIO_STORE": drv.store_dir,
    })
    items = sorted(env.items())
    return items[::-1] if variation.env_order == "reversed" else items


class Builder:
    """Runs builds for one store. Thread-safe: each build has its own scratch directory."""

    def __init__(self, store, *, cores: int = 0, keep_failed: bool = False, log_sink=None, fingerprinter=None):
        self.store = store
        # the CPUs this process may use (taskset, cgroups), as nproc inside will see them
        self.cores = cores or len(os.sched_getaffinity(0)) or 1
        self.keep_failed = keep_failed
        self.log_sink = log_sink  # callable(drv, bytes line) for -v, or None
        self.fingerprinter = fingerprinter
        self.interrupted = False  # set by interrupt(): no build may start or succeed after it
        self._running: set = set()  # the builders in progress (Popen)
        self._lock = threading.Lock()

    def interrupt(self) -> None:
        """Stop every build in progress at once (Ctrl-C): their process groups are killed,
        and they end as failed builds, so that nothing of them is registered."""
        with self._lock:
            self.interrupted = True
            running = list(self._running)
        for proc in running:
            _kill_group(proc)

    def run_build(self, drv: Derivation, input_paths: dict[str, str], closure: list[StorePath],
                  variation: Variation | None = None) -> BuildResult:
        """Build ``drv`` once in a fresh sandbox. Raises BuildError (with ``log_tail``) on failure.

        ``input_paths`` maps each input variable to the logical store path it stands for;
        ``closure`` is the closure of those paths (what the sandbox binds).
        """
        variation = variation or Variation()
        scratch = self.store._tmp_name("build")
        os.makedirs(scratch)
        scratch_store = os.path.join(scratch, "store")
        build_dir = os.path.join(scratch, "build")
        os.mkdir(scratch_store)
        os.mkdir(build_dir)
        for d in (scratch, scratch_store, build_dir):  # whatever fimio's own umask: the build sees 0755
            os.chmod(d, 0o755)
        closure_logical = [self.store.logical(p) for p in closure]
        if not builder_visible(drv.builder, drv.host_paths, closure_logical):
            raise BuildError(f"builder '{drv.builder}' of '{drv.name}' is not visible in the sandbox",
                             "add it (or a directory holding it) to [sandbox] host_paths or to the inputs")
        spec = SandboxSpec(
            store_dir=self.store.store_dir,
            scratch_store=scratch_store,
            build_dir=build_dir,
            closure=[(self.store.physical(p), lp) for p, lp in zip(closure, closure_logical)],
            host_paths=drv.host_paths,
            env=build_env(drv, input_paths, self.cores, variation),
            builder=drv.builder,
            args=drv.args,
            hostname=variation.hostname,
            uid=variation.uid,
            gid=variation.gid,
            build_mount=variation.build_dir,
            build_tmpfs=variation.dir_order == "tmpfs",
            store_root=self.store.root,
        )
        record = self._base_record(drv, variation)
        log_path = os.path.join(scratch, "log")
        status, timed_out = self._run(spec, drv, log_path, variation)
        if self.interrupted:
            fsutil.remove_tree(scratch)
            raise BuildError(f"build of '{drv.drv_path.base}' interrupted")
        record["end"] = time.time()
        record["duration"] = round(record["end"] - record["start"], 6)
        record["exitStatus"] = status
        with open(log_path, "rb") as f:
            log = f.read()
        if timed_out or status != 0:
            self._fail(drv, scratch, log, status, timed_out)
        try:
            outputs = self._collect(drv, scratch_store, closure)
        except BuildError as e:
            e.log_tail = _tail(log)
            e.drv, e.log = drv, log  # the log of a failed build is kept (fimio log)
            self._cleanup_failed(scratch, e)
            raise
        except BaseException:
            fsutil.remove_tree(scratch)
            raise
        record["outputs"] = {n: {"path": o.path.base, "root": o.node.digest.hex()} for n, o in outputs.items()}
        return BuildResult(drv, outputs, record, log, scratch)

    def _base_record(self, drv: Derivation, variation: Variation) -> dict:
        from . import __version__
        from .hostfp import host_info

        record = {
            "drv": drv.drv_path.base,
            "drvHash": drv.drv_hash,
            "fimio": __version__,
            "host": host_info(),
            "start": time.time(),
            "variation": {k: getattr(variation, k) for k in variation.__dataclass_fields__},
        }
        # the cores the build was given, configured or varied: a change of either is a cause
        # (kept apart from "variation", which holds only what --vary changed)
        record["cores"] = variation.cores if variation.cores is not None else self.cores
        if self.fingerprinter is not None:
            record["fingerprints"] = self.fingerprinter.fingerprint(drv.host_paths, drv.builder)
        return record

    def _run(self, spec: SandboxSpec, drv: Derivation, log_path: str, variation: Variation) -> tuple[int, bool]:
        # The umask is set in the child only (Popen(umask=)): os.umask() would be
        # process-wide and race with parallel builds and store writes in other threads.
        # A CPU-count variation narrows this thread's affinity, which fork() copies to the
        # child (so nproc and sched_getaffinity inside agree with FIMIO_BUILD_CORES); the
        # affinity is per thread, so other builds are unaffected, and restored at once.
        data_fds = masked_proc_fds()
        saved_affinity = None
        try:
            argv = spec.command(data_fds)
            saved_affinity = _narrow_affinity(variation.cores)
            # Always a pipe, read by fimio into the log: what the builder's stdout and stderr
            # are must not depend on -v (nor name the log's physical path).
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={},
                start_new_session=True, umask=variation.umask, pass_fds=tuple(data_fds.values()),
            )
        finally:
            if saved_affinity is not None:
                os.sched_setaffinity(0, saved_affinity)
            for fd in data_fds.values():
                os.close(fd)
        with self._lock:
            self._running.add(proc)
            if self.interrupted:
                _kill_group(proc)
        try:
            return self._wait(proc, drv, log_path)
        finally:
            with self._lock:
                self._running.discard(proc)

    def _wait(self, proc, drv: Derivation, log_path: str) -> tuple[int, bool]:
        pump = threading.Thread(target=self._pump, args=(proc.stdout, log_path, drv), daemon=True)
        pump.start()
        timed_out = False
        try:
            proc.wait(timeout=drv.timeout or None)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            proc.wait()
        except BaseException:
            _kill_group(proc)
            proc.wait()
            raise
        pump.join()
        return proc.returncode, timed_out

    def _pump(self, pipe, log_path: str, drv: Derivation) -> None:
        """Copy the builder's output to its log, and line by line to the log sink (``-v``),
        until it ends. Whatever fails to write, the pipe is drained to its end: a builder
        blocked on a full pipe would never finish, and the build would wait for it forever.
        Memory stays bounded however long a line is (a builder may print binary data)."""
        log = open(log_path, "ab")
        pending = b""
        while chunk := pipe.read1(_PUMP_CHUNK):
            if log is not None:
                try:
                    log.write(chunk)
                except OSError:  # a full disk: the log ends here
                    log = _close_quietly(log)
            if self.log_sink is not None:
                *lines, pending = (pending + chunk).split(b"\n")
                if len(pending) >= _PUMP_CHUNK:  # no newline for that long: show it anyway
                    lines, pending = [*lines, pending], b""
                self._to_sink(drv, [line + b"\n" for line in lines])
        if pending:
            self._to_sink(drv, [pending + b"\n"])
        pipe.close()
        if log is not None:
            _close_quietly(log)

    def _to_sink(self, drv: Derivation, lines: list[bytes]) -> None:
        try:
            for line in lines:
                self.log_sink(drv, line)
        except OSError:  # the terminal went away; the log is still written
            pass

    def _fail(self, drv: Derivation, scratch: str, log: bytes, status: int, timed_out: bool):
        if timed_out:
            err = BuildError(f"build of '{drv.drv_path.base}' timed out after {drv.timeout} s",
                             "raise [sandbox] timeout, or 0 for none")
        else:
            how = f"was killed by signal {-status}" if status < 0 else f"failed with exit code {status}"
            err = BuildError(f"builder for '{drv.drv_path.base}' {how}")  # the hint: where the log is kept
        err.log_tail = _tail(log)
        err.drv = drv
        err.log = log
        self._cleanup_failed(scratch, err)
        raise err

    def _cleanup_failed(self, scratch: str, err: BuildError) -> None:
        if self.keep_failed:
            # out of tmp/, whose leftovers of dead processes are removed when a store opens
            failed = os.path.join(self.store.root, "failed")
            os.makedirs(failed, exist_ok=True)
            kept = os.path.join(failed, os.path.basename(scratch))
            os.rename(scratch, kept)
            err.kept = kept
            err.message += f"; build directory kept at '{kept}/build'"
        else:
            fsutil.remove_tree(scratch)

    # ---- outputs ---------------------------------------------------------------------

    def _collect(self, drv: Derivation, scratch_store: str, closure: list[StorePath]) -> dict[str, BuiltOutput]:
        outputs = drv.output_paths()
        candidates = {p.hash_part.encode(): p for p in closure}
        candidates.update({p.hash_part.encode(): p for p in outputs.values()})
        result = {}
        for name, path in outputs.items():
            tmp = os.path.join(scratch_store, path.base)
            if not os.path.lexists(tmp):
                raise BuildError(f"builder for '{drv.drv_path.base}' did not create output '{name}' (${name})")
            found: set[bytes] = set()
            where = f"output '{name}' of '{drv.drv_path.base}'"
            try:
                node = self._normalise(os.fsencode(tmp), candidates, found)
            except _Unstorable as e:
                rel = os.fsdecode(e.path[len(os.fsencode(tmp)):])
                raise BuildError(f"{where} contains a {e.kind} at '${name}{rel}'",
                                 "only files, directories and symlinks can be stored") from None
            except _TooDeep:
                raise BuildError(f"{where} has entries nested deeper than {MAX_DEPTH} levels",
                                 "the store's limit (spec/tree.md): a tree that deep cannot be archived") from None
            except OSError as e:
                if e.errno != errno.ENAMETOOLONG:
                    raise
                raise BuildError(f"{where} has a file whose path is longer than the system allows",
                                 "shorten its names or its nesting") from None
            refs = sorted(candidates[h] for h in found)
            result[name] = BuiltOutput(name, path, tmp, node, refs)
        return result

    def _normalise(self, path: bytes, candidates, found: set, depth: int = 0) -> Node:
        """Make the output canonical (mtime 1, 0444/0555, no setuid), hash it, scan references.
        _TooDeep for entries nested deeper than the store allows (spec/tree.md §3)."""
        st = os.lstat(path)
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            target = os.readlink(path)
            scan_refs(target, candidates, found)
            os.utime(path, (1, 1), follow_symlinks=False)
            return SymlinkNode(target)
        if stat.S_ISREG(mode):
            if not mode & stat.S_IRUSR:  # a mode-000 output: its owner reads it like root would
                os.chmod(path, stat.S_IMODE(mode) | stat.S_IRUSR)
            _strip_xattrs(path)
            executable = bool(mode & stat.S_IXUSR)  # the owner's bit, as add and Nix take it
            digest, size = _hash_and_scan(path, candidates, found)
            self.store.blobs.adopt(path, digest, executable)
            return FileNode(digest, size, executable)
        if stat.S_ISDIR(mode):
            os.chmod(path, 0o755)
            _strip_xattrs(path)
            node = DirNode()
            with os.scandir(path) as it:
                names = [e.name for e in it]
            if names and depth >= MAX_DEPTH:
                raise _TooDeep()
            for name in names:
                scan_refs(name, candidates, found)  # a file name can carry a reference too, as in a NAR
                node.entries[name] = self._normalise(path + b"/" + name, candidates, found, depth + 1)
            os.utime(path, (1, 1))
            os.chmod(path, 0o555)
            return node
        raise _Unstorable(path, _KINDS.get(stat.S_IFMT(mode), "special file"))


def _strip_xattrs(path: bytes) -> None:
    """Extended attributes are no part of a tree (spec/tree.md), and a file's would ride along
    in the blob its contents share with every other path; Nix removes them too."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return  # a filesystem without them
    for name in names:
        if name != "security.selinux":  # the system's label, not the build's
            os.removexattr(path, name, follow_symlinks=False)


_LOCAL_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)


class _TooDeep(Exception):
    pass


class _Unstorable(Exception):
    def __init__(self, path: bytes, kind: str):
        super().__init__(kind)
        self.path, self.kind = path, kind


_KINDS = {stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket", stat.S_IFCHR: "character device",
          stat.S_IFBLK: "block device"}


def scan_refs(data: bytes, candidates, found: set) -> None:
    """Add to ``found`` every candidate hash part that occurs in ``data``."""
    for m in _HASH_RUN.finditer(data):
        run = m.group()
        if len(run) == 32:
            if run in candidates:
                found.add(run)
        else:
            for i in range(len(run) - 31):
                if run[i:i + 32] in candidates:
                    found.add(run[i:i + 32])


def _hash_and_scan(path: bytes, candidates, found: set) -> tuple[bytes, int]:
    hasher = blake3.blake3()
    size = 0
    tail = b""
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(4 << 20):
            hasher.update(chunk)
            size += len(chunk)
            scan_refs(tail + chunk, candidates, found)
            tail = chunk[-31:]
    return hasher.digest(), size


_PUMP_CHUNK = 1 << 16


def _close_quietly(f) -> None:
    """Close ``f``, ignoring a failure to write back what it buffered (a full disk)."""
    try:
        f.close()
    except OSError:
        pass


def _narrow_affinity(cores: int | None):
    """Restrict the calling thread to its first ``cores`` CPUs; return the old set (None: unchanged)."""
    if cores is None or not hasattr(os, "sched_setaffinity"):
        return None
    allowed = os.sched_getaffinity(0)
    if cores >= len(allowed):
        return None
    os.sched_setaffinity(0, sorted(allowed)[:max(1, cores)])
    return allowed


def _tail(log: bytes, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(log.decode(errors="replace").splitlines()[-lines:])


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ---- fixed-output derivations ---------------------------------------------------------


def fetch(store, drv: Derivation, offline: bool = False, interrupted=lambda: False) -> BuildResult:
    """Realise a fixed-output derivation: download its URL and check the declared hash.

    The only network access fimio's builds have. Raises IntegrityError (exit 4) naming both
    hashes on a mismatch, NotFound (exit 5) when offline or the URL cannot be fetched.
    """
    import hashlib
    import http.client
    import urllib.error
    import urllib.parse
    import urllib.request

    from .hostfp import host_info

    url, declared = drv.fetch["url"], drv.fetch["hash"]
    if offline:
        raise NotFound(f"'{drv.name}' needs to be fetched from {url}, and fimio is offline",
                       "run 'fimio prefetch' while online, or import a bundle")
    algo, _, want = declared.partition(":")
    hasher = hashlib.sha256() if algo == "sha256" else blake3.blake3()
    (name, path), = drv.output_paths().items()
    scratch = store._tmp_name("fetch")
    os.makedirs(os.path.join(scratch, "store"))
    tmp = os.path.join(scratch, "store", path.base)
    start = time.time()
    if url.lower().startswith("file:"):
        local = urllib.request.url2pathname(urllib.parse.urlsplit(url).path)
        if os.path.exists(local) and not os.path.isfile(local):  # a device would never end
            fsutil.remove_tree(scratch)
            raise UsageError(f"'{drv.name}' would fetch {url}, which is not a regular file",
                             "a file:// fetch reads one file")
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as out:
            while chunk := resp.read(1 << 20):
                if interrupted():  # Ctrl-C: the download stops at once too
                    raise BuildError(f"fetch of '{drv.name}' interrupted")
                hasher.update(chunk)
                out.write(chunk)
    except BuildError:
        fsutil.remove_tree(scratch)
        raise
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
        fsutil.remove_tree(scratch)
        if isinstance(e, OSError) and e.errno in _LOCAL_WRITE_ERRNOS:
            # our disk, not the URL: the one-line "check free space" error, exit 1
            raise OSError(e.errno, e.strerror, os.path.dirname(scratch)) from None
        if isinstance(e, http.client.HTTPException):  # a bad status line, a body cut short, ...
            reason = f"a broken answer ({type(e).__name__})"
        else:
            reason = getattr(e, "reason", None) or e
        raise NotFound(f"cannot fetch {url} for '{drv.name}': {reason}",
                       "check the URL and the network, or import the file from a bundle or cache") from None
    got = hasher.hexdigest()
    if got != want:
        fsutil.remove_tree(scratch)
        raise IntegrityError(f"hash mismatch in fixed-output derivation '{drv.name}' from {url}: "
                             f"declared {declared}, got {algo}:{got}",
                             "the file at the URL changed, or the declared hash is wrong; nothing was registered",
                             expected=declared, got=f"{algo}:{got}")
    os.chmod(tmp, 0o444)
    digest, size = _hash_and_scan(os.fsencode(tmp), {}, set())
    store.blobs.adopt(os.fsencode(tmp), digest, False)
    node = FileNode(digest, size, False)
    end = time.time()
    from . import __version__

    record = {"drv": drv.drv_path.base, "drvHash": drv.drv_hash, "fimio": __version__, "host": host_info(),
              "start": start, "end": end, "duration": round(end - start, 6), "exitStatus": 0,
              "fetched": url, "outputs": {name: {"path": path.base, "root": node.digest.hex()}}}
    out = BuiltOutput(name, path, tmp, node, [])
    return BuildResult(drv, {name: out}, record, f"fetched {url}\n".encode(), scratch)
