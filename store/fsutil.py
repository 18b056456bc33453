"""Small filesystem helpers: durability, locks, removal of read-only trees."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from contextlib import contextmanager

_libc = None


def syncfs(path: str) -> None:
    """Flush every dirty page of the filesystem holding ``path`` (one call instead of an fsync per file)."""
    import ctypes

    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)


class EarlyFlush:
    """Flush a filesystem in the background while a large write goes on, so that the
    ``syncfs`` that makes it durable at the end finds little left to write.

    Without it, nothing of a 1 GB add reaches the disk before that final ``syncfs`` (the
    kernel starts writing back only at a tenth of the RAM), which then takes most of a
    second on its own. ``wrote(n)`` reports ``n`` more bytes written; every ``every`` bytes
    a ``syncfs`` starts on a background thread, unless one is still running. ``start()``
    starts one at once (when the writing is done and what remains is cheap to do alongside),
    if at least ``minimum`` bytes were written: for less, the final ``syncfs`` alone costs
    less than two. Leaving the ``with`` block (or ``join()``) waits for it; errors are left
    to the final, foreground ``syncfs``.
    """

    def __init__(self, path: str, every: int = 128 << 20, minimum: int = 32 << 20):
        import threading

        self.path, self.every, self.minimum = path, every, minimum
        self._pending = 0
        self.written = 0
        self._thread = None
        self._lock = threading.Lock()  # wrote() may be called from several threads

    def wrote(self, n: int) -> None:
        with self._lock:
            self._pending += n
            self.written += n
            due = self._pending >= self.every
        if due:
            self.start()

    def start(self) -> None:
        """Start a background ``syncfs`` now, unless one is running or too little was written."""
        import threading

        with self._lock:
            if self.written < self.minimum or (self._thread is not None and self._thread.is_alive()):
                return
            self._pending = 0
            self._thread = threading.Thread(target=self._flush, daemon=True)
            self._thread.start()

    def _flush(self) -> None:
        try:
            syncfs(self.path)
        except OSError:
            pass

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "EarlyFlush":
        return self

    def __exit__(self, *exc) -> None:
        self.join()

    def writer(self, f) -> "_ReportingWriter":
        """``f`` (a binary file object) with every write reported to :meth:`wrote`."""
        return _ReportingWriter(f, self)


class _ReportingWriter:
    def __init__(self, f, flush: EarlyFlush):
        self.f, self.flush = f, flush

    def write(self, data) -> int:
        n = self.f.write(data)
        self.flush.wrote(len(data))
        return n


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}


def exchange(a: str, b: str) -> bool:
    """Atomically swap the names ``a`` and ``b`` (``renameat2(RENAME_EXCHANGE)``; files,
    directories or one of each). False when this kernel or filesystem cannot; OSError on
    other failures (e.g. ENOENT when either is missing)."""
    import ctypes
    import platform

    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    args = (_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    fn = getattr(_libc, "renameat2", None)
    if fn is not None:
        rc = fn(ctypes.c_int(args[0]), ctypes.c_char_p(args[1]), ctypes.c_int(args[2]), ctypes.c_char_p(args[3]),
                ctypes.c_uint(args[4]))
    elif platform.machine() in _SYS_RENAMEAT2:
        rc = _libc.syscall(ctypes.c_long(_SYS_RENAMEAT2[platform.machine()]), ctypes.c_int(args[0]),
                           ctypes.c_char_p(args[1]), ctypes.c_int(args[2]), ctypes.c_char_p(args[3]),
                           ctypes.c_uint(args[4]))
    else:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), a)


def move_tree(src: str, dst: str) -> None:
    """``os.rename`` that also moves a read-only directory (a normalised tree) to another
    parent. That rewrites the directory's ``..`` entry, which takes write permission on the
    directory itself: root bypasses the check, an unprivileged owner does not. The owner's
    write bit is lent for the rename and taken back at the new name."""
    modes = _lend_write([src])
    try:
        os.rename(src, dst)
    except BaseException:
        _take_back(modes)
        raise
    _take_back({dst: mode for mode in modes.values()})


def exchange_trees(a: str, b: str) -> bool:
    """:func:`exchange` for read-only directories too (see :func:`move_tree`)."""
    modes = _lend_write([a, b])
    try:
        swapped = exchange(a, b)
    except BaseException:
        _take_back(modes)
        raise
    _take_back({({a: b, b: a}[p] if swapped else p): mode for p, mode in modes.items()})
    return swapped


def _lend_write(paths) -> dict[str, int]:
    """Make the read-only directories among ``paths`` owner-writable; their modes."""
    modes = {}
    for p in paths:
        st = os.lstat(p)
        if stat.S_ISDIR(st.st_mode) and not st.st_mode & stat.S_IWUSR:
            os.chmod(p, st.st_mode | stat.S_IWUSR)
            modes[p] = stat.S_IMODE(st.st_mode)
    return modes


def _take_back(modes: dict[str, int]) -> None:
    for p, mode in modes.items():
        os.chmod(p, mode)


def write_all(fd: int, data) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def widen_pipe(f, size: int = 1 << 20) -> None:
    """Give file object ``f`` a ``size``-byte kernel buffer if it is a pipe (Linux; silently
    left as it is otherwise, or when the system caps it lower). Through the 64 KiB default,
    a streaming writer and reader hand over a gigabyte in 16,000 wake-ups; through 1 MiB,
    in 1,000."""
    try:
        fd = f.fileno()
        if stat.S_ISFIFO(os.fstat(fd).st_mode) and fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) < size:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)  # never shrinks one made larger already
    except (OSError, AttributeError, ValueError, TypeError):
        pass


def open_input(path: str, kind: str):
    """``path`` opened for binary reading, or the one-line error a user should see: NotFound
    (exit 5) when it does not exist, UsageError (exit 2) when it is a directory or cannot
    be read. ``kind`` names what it should be ("bundle", "derivation file")."""
    from .errors import NotFound, UsageError

    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise NotFound(f"{kind} '{path}' does not exist", "check the name") from None
    except IsADirectoryError:
        raise UsageError(f"'{path}' is a directory, not a {kind}") from None
    except OSError as e:
        raise _cannot_read(path, e) from None


def read_input(path: str, kind: str) -> bytes:
    """The whole of ``path``, with :func:`open_input`'s errors (a failed read too)."""
    with open_input(path, kind) as f:
        try:
            return f.read()
        except OSError as e:
            raise _cannot_read(path, e) from None


def _cannot_read(path: str, e: OSError):
    from .errors import UsageError

    return UsageError(f"cannot read '{path}': {e.strerror}")


def unlink_if_exists(path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sibling_tmp(path: str, sweep: bool = False) -> str:
    """A fresh name next to ``path`` for building it before a rename: hidden, carrying our
    pid, and short enough for any name ``path`` may have (NAME_MAX is 255 bytes).

    ``sweep``: first remove the temp siblings of the same name that killed processes left
    (a restore or export killed half-way; each could hold gigabytes). It lists the
    directory, so it is for user-named targets, not for names made in a loop."""
    directory, base = os.path.split(os.path.abspath(path))
    prefix = f".{base[:64]}.tmp-"
    if sweep:
        try:
            names = [n for n in os.listdir(directory) if n.startswith(prefix)]
        except OSError:
            names = []
        for name in names:
            pid = name[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not alive(int(pid)):
                remove_tree(os.path.join(directory, name))
    return os.path.join(directory, f"{prefix}{os.getpid()}-{os.urandom(4).hex()}")


def write_atomic(path: str, data: bytes, mode: int = 0o644, durable: bool = True, tmp: str | None = None) -> None:
    """Write ``data`` to ``path`` via a temp file and rename: readers see old or new, never
    half. ``durable`` also fsyncs the file and its directory. ``tmp``: the temp file's name
    (same file system; default a sibling of ``path``), removed if anything fails."""
    tmp = tmp or sibling_tmp(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        unlink_if_exists(tmp)
        raise
    if durable:
        fsync_dir(os.path.dirname(path) or ".")


def make_writable(path: str) -> None:
    """Give the owner write permission on every directory of a tree so it can be deleted."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        os.chmod(path, 0o755)
        for dirpath, dirnames, _ in os.walk(path):
            for d in dirnames:
                p = os.path.join(dirpath, d)
                if not os.path.islink(p):
                    os.chmod(p, 0o755)


def remove_tree(path: str) -> None:
    """Delete a file or tree, even one made read-only by normalisation. Missing is fine."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        import shutil

        try:
            make_writable(path)
            shutil.rmtree(path)
        except (OSError, RecursionError):
            _remove_by_descriptors(path)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _remove_by_descriptors(path: str) -> None:
    """What Python's walk cannot delete -- names too long for one path, nesting deeper than
    it recurses, a tree changing meanwhile -- coreutils can: they walk by directory
    descriptors, at any depth. What even they leave stays garbage, for the next try."""
    import subprocess

    for argv in (["chmod", "-R", "u+w", "--", path], ["rm", "-rf", "--", path]):
        try:
            subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError:
            return


@contextmanager
def file_lock(path: str, shared: bool = False, blocking: bool = True):
    """Hold an fcntl lock on ``path`` (created if needed) for the ``with`` block.

    Yields True when the lock was taken, False when ``blocking`` is off and it is busy.
    fcntl locks vanish with their process, so a killed holder never leaves a stale lock.
    A lock file may be deleted (:func:`remove_lock_file`): one that was deleted or replaced
    between its opening and its locking is opened again, so that two holders never lock
    two different files of the same name.
    """
    flags = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, flags)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                yield False
                return
            raise
        if _names(fd, path):
            break
        os.close(fd)
    try:
        yield True
    finally:
        os.close(fd)


def _names(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file open at ``fd``."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def remove_lock_file(path: str) -> bool:
    """Delete the lock file ``path`` if no one holds it (and so that whoever opened it
    meanwhile locks a new one, see :func:`file_lock`); whether it was deleted."""
    with file_lock(path, blocking=False) as taken:
        if taken:
            os.unlink(path)  # under the lock: a waiter that then gets it sees it unnamed
    return bool(taken)


def pid_of(name: str) -> int | None:
    """The pid in a ``<tag>-<pid>-<random>`` name under ``tmp/``, or None."""
    parts = name.split("-")
    return int(parts[1]) if len(parts) >= 3 and parts[1].isdigit() else None


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this machine, in this PID namespace)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
