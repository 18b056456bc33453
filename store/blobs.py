"""Blobs: the files of ``store/.links``, one inode per (content, executable bit).

A blob is named ``<blake3 hex>`` (plus ``x`` for the executable variant) and is always
complete and normalised (mtime 1, mode 0444/0555) before it gets that name: it is written
as an anonymous ``O_TMPFILE`` file in ``.links`` and linked once full (or, where the
filesystem cannot, written under ``tmp/`` and renamed). Store paths hard-link their files
to blobs, which is what stores each distinct content once (``spec/local-store.md``).
"""

from __future__ import annotations

import errno
import os
import stat

import blake3

from .errors import UsageError
from .fsutil import unlink_if_exists, write_all
from .forkpool import hash_threads

_SMALL_FILE = 8 << 20  # larger files are streamed, not read whole
_CHUNK = 1 << 20
_O_READ = os.O_RDONLY | os.O_NOFOLLOW
# an O_TMPFILE file is given its name through /proc/self/fd (see _link_anonymous)
_PROC_FD = os.path.isdir("/proc/self/fd")


class Blobs:
    """The blobs of one store: ``links`` is its ``.links`` directory, ``tmp`` its ``tmp/``
    (same filesystem). Writers must hold the store's shared GC lock (``LocalStore.writing``)."""

    def __init__(self, links: str, tmp: str):
        self.links, self.tmp = links, tmp
        self.exact_mode = False  # see prepare_bulk
        self._tmpfile_ok = _PROC_FD

    def empty(self) -> bool:
        """Whether ``.links`` holds no blob at all (a fresh store: nothing to look up)."""
        with os.scandir(self.links) as it:
            return next(it, None) is None

    def path(self, digest: bytes, executable: bool) -> str:
        """The file of a blob variant (which may not exist)."""
        return os.path.join(self.links, digest.hex() + ("x" if executable else ""))

    def intact(self, digest: bytes, executable: bool, size: int) -> str | None:
        """The file of a blob variant if the store has it whole (see :func:`_blob_intact`:
        a torn one is removed, so that the caller publishes the content again)."""
        key = self.path(digest, executable)
        return key if _blob_intact(key, size) else None

    def prepare_bulk(self) -> None:
        """Before publishing many blobs: learn once whether new files get their exact mode
        at creation, which saves a chmod per blob (see :func:`creation_mode_exact`)."""
        self.exact_mode = creation_mode_exact(self.links)

    def ingest_file(self, src: bytes, size: int, executable: bool) -> tuple[bytes, int]:
        """Copy one regular file's contents into ``.links`` (once per distinct content).

        ``size``: what the scan found (a file that changed since is read to its end).
        Reads the file exactly once; the digest is of the bytes actually stored.
        """
        try:
            fd = os.open(src, _O_READ)
        except PermissionError:
            raise UsageError(f"cannot read '{os.fsdecode(src)}': permission denied") from None
        except FileNotFoundError:
            raise UsageError(f"'{os.fsdecode(src)}' vanished while reading") from None
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            raise UsageError(f"'{os.fsdecode(src)}' changed while reading (now a symlink)") from None
        try:
            if size > _SMALL_FILE:
                return self._ingest_stream(fd, executable)
            data = _read_all(fd, size)
        finally:
            os.close(fd)
        digest = blake3.blake3(data).digest()
        key = self.path(digest, executable)
        if not _blob_intact(key, len(data)):
            self.publish(key, executable, data)
        return digest, len(data)

    def _ingest_stream(self, fd: int, executable: bool) -> tuple[bytes, int]:
        """A large file: streamed through one reused buffer (flat memory), hashed with
        blake3's threads, written to an anonymous file that is linked once complete."""
        hasher = blake3.blake3(max_threads=hash_threads())
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        size = 0

        def fill(out: int) -> str:
            nonlocal size
            while n := os.readv(fd, [buf]):
                hasher.update(view[:n])
                write_all(out, view[:n])
                size += n
            key = self.path(hasher.digest(), executable)
            _blob_intact(key, size)  # drops a torn blob of that name so ours replaces it
            return key

        self._write_blob(executable, fill)
        return hasher.digest(), size

    def publish(self, key: str, executable: bool, data) -> None:
        """Write ``data`` as the blob ``key``: complete, normalised, then given its name."""
        self._write_blob(executable, lambda out: (write_all(out, data), key)[1])

    def _write_blob(self, executable: bool, fill) -> None:
        """Create a new blob file, let ``fill(fd) -> key`` write it, then give it its name."""
        mode = 0o555 if executable else 0o444
        out, tmp = self._new_blob_file(mode)
        try:
            key = fill(out)
            if tmp is None:
                _normalise_fd(out, mode, self.exact_mode)
                _link_anonymous(out, key)
            else:
                os.close(out)
                out = -1
                self._finish_blob(tmp, key, executable)
        except BaseException:
            if tmp is not None:
                unlink_if_exists(tmp)
            raise
        finally:
            if out >= 0:
                os.close(out)

    def _new_blob_file(self, mode: int) -> tuple[int, str | None]:
        """Open a file for a new blob: ``(fd, None)`` for an anonymous file in ``.links``
        (``O_TMPFILE``: nothing is visible until it is linked, nothing is left by a crash,
        and creations in one directory do not serialise on its lock), or ``(fd, tmp path)``
        under ``tmp/`` where the filesystem cannot do that."""
        if self._tmpfile_ok:
            try:
                return os.open(self.links, os.O_WRONLY | os.O_TMPFILE, mode), None
            except OSError as e:
                # EISDIR: a kernel without O_TMPFILE; EOPNOTSUPP: a filesystem without it
                if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
                self._tmpfile_ok = False
        tmp = os.path.join(self.tmp, f"blob-{os.getpid()}-{os.urandom(6).hex()}")
        return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), tmp

    @staticmethod
    def _finish_blob(tmp: str, key: str, executable: bool) -> None:
        os.chmod(tmp, 0o555 if executable else 0o444)
        os.utime(tmp, (1, 1))
        # rename over an identical blob another writer just published is harmless
        os.rename(tmp, key)

    def adopt(self, path: bytes, digest: bytes, executable: bool) -> None:
        """Normalise a file under ``tmp/`` whose digest is known and share its inode with ``.links``."""
        key = self.path(digest, executable)
        os.chmod(path, 0o555 if executable else 0o444)
        os.utime(path, (1, 1))
        size = os.lstat(path).st_size
        while True:
            try:
                os.link(path, key)
                return
            except FileExistsError:
                if not _blob_intact(key, size):
                    continue  # a damaged blob (torn, or chmod-ed by hand): removed; ours takes its name
            try:
                if os.path.samestat(os.stat(path), os.stat(key)):
                    return  # a hard link of a file adopted before (a build's own hard links)
            except FileNotFoundError:
                continue  # a GC removed the unused blob meanwhile: publish ours instead
            # a name of our own under tmp/ (same filesystem), never one the build may have made
            tmp = os.path.join(os.fsencode(self.tmp), f"adopt-{os.getpid()}-{os.urandom(6).hex()}".encode())
            try:
                os.link(key, tmp)
                os.rename(tmp, path)
                return
            except FileNotFoundError:
                continue  # a GC removed the unused blob meanwhile: publish ours instead
            except OSError as e:
                if e.errno != errno.EMLINK:
                    raise
                unlink_if_exists(tmp)  # too many links: keep this file as its own copy
                return


def _read_all(fd: int, size: int) -> bytes:
    """Read an open file whose scan found ``size`` bytes. Asking for one byte more tells
    in one call whether it is still that size (a short read of a regular file is its end);
    a file that changed since is read to its actual end."""
    data = os.read(fd, size + 1)
    if len(data) == size:
        return data
    if not data:
        return data
    more = os.read(fd, 1 << 16)  # small: a large read buffer would be allocated for nothing
    if not more:
        return data
    parts = [data, more]
    while more := os.read(fd, _CHUNK):
        parts.append(more)
    return b"".join(parts)


def _normalise_fd(fd: int, mode: int, exact: bool = False) -> None:
    """Give a new blob its normal form: mtime 1 and its exact mode, which creation already
    gave it when ``exact`` (see :func:`creation_mode_exact`)."""
    if not exact:
        os.fchmod(fd, mode)
    os.utime(fd, (1, 1))


def creation_mode_exact(directory: str) -> bool:
    """Whether a file created in ``directory`` with mode 0o444 or 0o555 gets exactly that
    mode: the process umask clears none of those bits and the directory has no default ACL
    (either could narrow the mode). Checked once per add: it saves a chmod per new blob."""
    try:
        with open("/proc/self/status", "rb") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith(b"Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return False
    if umask & 0o555:
        return False
    try:
        os.getxattr(directory, "system.posix_acl_default")
    except OSError as e:
        return e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP)
    return False


def _blob_intact(key: str, size: int) -> bool:
    """Whether blob ``key`` exists with the right size and mode. A blob of the wrong size
    can only be one torn by a power cut before it was flushed (blobs are published complete);
    one of the wrong mode was chmod-ed by hand through a store path. Either is removed, so
    that the caller publishes the content again and no new path links to it. Paths still
    linking to the damaged inode are damaged either way; ``verify`` finds them. (Contents
    changed in place at the same size are not looked for here: that would mean hashing every
    blob reused; ``verify --check-contents`` finds them.)"""
    try:
        st = os.stat(key)
    except FileNotFoundError:
        return False
    if st.st_size == size and stat.S_IMODE(st.st_mode) == (0o555 if key.endswith("x") else 0o444):
        return True
    unlink_if_exists(key)
    return False


def _link_anonymous(fd: int, key: str) -> None:
    """Give an ``O_TMPFILE`` file its name in ``.links``; an existing name is an identical blob."""
    try:
        # linkat(..., AT_SYMLINK_FOLLOW) is what links an anonymous file; Python only uses
        # linkat (instead of link(), which would not follow /proc's link) when a dir_fd is
        # given. The path is absolute, so linkat ignores that dir_fd.
        os.link(f"/proc/self/fd/{fd}", key, src_dir_fd=fd, follow_symlinks=True)
    except FileExistsError:
        pass
