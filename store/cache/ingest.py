"""Putting fetched content into the local store: blobs into ``.links``, paths registered atomically.

Blobs are published through the store's own :class:`~fimio.store.blobs.Blobs` (complete
and normalised before they get their ``.links`` name) only after their digest was
checked, so ``.links`` never holds a wrong blob; a large blob assembled from chunks is
renamed to its key once its whole digest is checked. Paths are materialised
under ``tmp/`` and registered by :func:`register` -- all of them in one LMDB transaction,
after one ``syncfs``: a kill at any point leaves each path either valid with its whole
closure, or absent (an unregistered directory in ``store/`` is garbage that ``verify``
removes).
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import ExitStack

import blake3

from .. import fsutil
from ..errors import IntegrityError, NotFound
from ..local import PathInfo


def tmp_name(store, tag: str) -> str:
    """A fresh name under ``tmp/`` carrying our pid (``verify`` removes those of dead processes)."""
    return os.path.join(store.tmp, f"{tag}-{os.getpid()}-{os.urandom(6).hex()}")


def has_blob(store, digest: bytes, executable: bool, size: int) -> bool:
    """Whether the store has this blob variant whole (a torn one is removed: fetch it again)."""
    return store.blobs.intact(digest, executable, size) is not None


def write_blob(store, digest: bytes, executable: bool, data) -> None:
    """Publish verified ``data`` as the blob ``digest`` (the caller checked the digest)."""
    key = store.link_path(digest, executable)
    if not os.access(key, os.F_OK):
        store.blobs.publish(key, executable, data)


def copy_variant(store, digest: bytes, executable: bool) -> bool:
    """Make the ``executable`` variant of a blob from the other one, if that one exists."""
    other = store.link_path(digest, not executable)
    try:
        with open(other, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return False
    if blake3.blake3(data).digest() != digest:
        raise IntegrityError(f"local blob {digest.hex()} is damaged", "run 'fimio verify --check-contents'")
    write_blob(store, digest, executable, data)
    return True


class LargeBlobFile:
    """A large blob assembled from chunks written at their offsets (possibly in parallel).

    Its descriptor is used and closed under a lock, and not used once closed: a fetch that
    fails closes its files while other threads may still be writing chunks, and a write to
    a closed descriptor could land in whatever file reused its number."""

    def __init__(self, store, digest: bytes, size: int):
        self.store, self.digest, self.size = store, digest, size
        self.path = tmp_name(store, "blob")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o444)
        self._lock = threading.Lock()
        os.ftruncate(self.fd, size)

    def _open_fd(self) -> int:
        if self.fd is None:
            raise IntegrityError(f"blob {self.digest.hex()[:16]}… was given up", "its fetch failed")
        return self.fd

    def write_at(self, offset: int, data) -> None:
        view = memoryview(data)
        with self._lock:
            fd = self._open_fd()
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n

    def publish(self, variants) -> None:
        """Check the whole blob's digest, then publish it as each ``executable`` variant."""
        with self._lock:
            self._publish(self._open_fd(), variants)

    def _publish(self, fd: int, variants) -> None:
        try:
            h = blake3.blake3(max_threads=blake3.blake3.AUTO)
            pos = 0
            while pos < self.size:
                buf = os.pread(fd, min(8 << 20, self.size - pos), pos)
                if not buf:
                    break
                h.update(buf)
                pos += len(buf)
            if h.digest() != self.digest:
                raise IntegrityError(f"chunks of blob {self.digest.hex()[:16]}… do not add up to it",
                                     "the cache is corrupt or hostile")
            os.utime(fd, (1, 1))
            variants = sorted(set(variants))
            for i, executable in enumerate(variants):
                key = self.store.link_path(self.digest, executable)
                if os.path.exists(key):
                    continue
                if i == len(variants) - 1:
                    os.fchmod(fd, 0o555 if executable else 0o444)
                    os.rename(self.path, key)
                else:
                    with open(self.path, "rb") as f:
                        write_blob(self.store, self.digest, executable, f.read())
        finally:
            self._close()

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            fsutil.unlink_if_exists(self.path)


BATCH = 256  # paths per transaction: each holds a lock file open while it commits


def register(store, items, realisations=(), locks_held=()) -> list:
    """Register materialised paths; return the paths registered.

    ``items``: ``(tmp dir, PathInfo-like remote info, node)``, in any order; every reference
    must be valid already or among ``items``. They are registered references first, in
    transactions of up to 256 paths (one for an ordinary closure), after one ``syncfs``:
    whenever a transaction commits, every path it makes valid has its whole closure valid.
    ``realisations``: Realisation objects stored with the last transaction (an existing
    local realisation is never overwritten). Paths another process made valid meanwhile
    are skipped and their tmp dirs removed. The caller must not hold the per-path locks
    unless it lists those paths in ``locks_held``.
    """
    held = {p.hash_part if hasattr(p, "hash_part") else p for p in locks_held}
    fsutil.syncfs(store.root)
    ordered = _references_first(list(items))
    batches = [ordered[i:i + BATCH] for i in range(0, len(ordered), BATCH)] or [[]]
    ours = {info.path for _, info, _ in ordered}  # a cycle (out <-> dev) may span two batches
    done = []
    for n, batch in enumerate(batches):
        done += _register_batch(store, batch, realisations if n == len(batches) - 1 else (), held, ours)
    return done


def _register_batch(store, items, realisations, held, ours) -> list:
    done = []
    with ExitStack() as stack:
        for tmp, info, node in sorted(items, key=lambda x: x[1].path.hash_part):
            if info.path.hash_part not in held:
                stack.enter_context(store.lock_path(info.path))
        for _, info, _ in items:
            for ref in info.references:
                if ref not in ours and not store.is_valid(ref):
                    raise NotFound(f"'{store.logical(ref)}' vanished before '{store.logical(info.path)}', "
                                   "which refers to it, was registered (a concurrent gc?)", "run the command again")
        infos = []
        for tmp, remote, node in items:
            if store.is_valid(remote.path):
                fsutil.remove_tree(tmp)
                continue
            dest = store.physical(remote.path)
            if os.path.lexists(dest):
                fsutil.remove_tree(dest)  # unregistered leftover of a crashed writer
            fsutil.move_tree(tmp, dest)
            local = PathInfo(remote.path, remote.root, remote.size, sorted(remote.references), remote.deriver,
                             time.time(), remote.ca, sorted(remote.signatures))
            infos.append((local, node))
        if infos:
            fsutil.fsync_dir(store.store)
        with store.db.write() as txn:
            for local, node in infos:
                store._put_info(txn, local, node)
                done.append(local.path)
            rdb = store.db.dbs["realisations"]
            for r in realisations:
                txn.put(f"{r.drv_hash}!{r.output}".encode(), r.to_local(), db=rdb, overwrite=False)
    return done


def _references_first(items: list) -> list:
    by_path = {it[1].path: it for it in items}
    out, seen = [], set()
    for start in sorted(by_path):
        stack = [(start, False)]
        while stack:  # iterative depth-first post-order: deep closures need no recursion
            p, expanded = stack.pop()
            if expanded:
                out.append(by_path[p])
                continue
            if p in seen:
                continue
            seen.add(p)
            stack.append((p, True))
            stack.extend((r, False) for r in by_path[p][1].references if r in by_path and r not in seen)
    return out
