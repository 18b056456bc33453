"""Where a bundle import puts bytes before they are trusted: trees under ``tmp/import-*``.

Nothing here is visible in ``store/`` (not even ``.links``) until the importer, after the
whole bundle verified, calls :meth:`Staging.publish` and registers the trees. To create
each file once (file creation is what an import of many small files spends its time on):
as soon as a path section's directories are read and checked, its tree is laid out under
``tmp/`` (directories, symlinks) and every file location is noted; each blob is then
written straight to its first location as it streams in and hard-linked to the others
(copied where the executable bit differs, since the mode belongs to the inode). Blobs the
store already has are linked from ``.links``. Publishing links each blob written here into
``.links`` and gives the directories their normal form.

Small blobs are hashed and written on a small thread pool in batches, so decompression on
the reading thread overlaps file creation; every placing decision is taken on the reading
thread, the workers only do I/O, and the bytes in flight are bounded. Large blobs stream
in chunks on the reading thread.
"""

from __future__ import annotations

import collections
import errno
import os
import struct
from concurrent.futures import ThreadPoolExecutor

import blake3

from . import fsutil
from .blobs import creation_mode_exact
from .errors import IntegrityError
from .tree import DirNode, FileNode, SymlinkNode

SMALL = 1 << 20  # blobs up to this size are handled whole on the pool
_BATCH_BYTES = 1 << 20
_BATCH_ITEMS = 128
_MAX_INFLIGHT = 8  # batches; bounds memory to about 8 MiB of small blobs
_CHUNK = 1 << 20
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW


def mismatch(digest: bytes) -> IntegrityError:
    return IntegrityError(f"bad bundle: blob {digest.hex()[:16]}… does not match its digest",
                          "the bundle is corrupt, truncated or hostile; nothing was imported")


class Staging:
    """The files of one import in progress. Use as a context manager: leaving removes every
    tree and file still under ``tmp/`` (after a successful registration, none is left)."""

    def __init__(self, store, jobs: int = 2):
        self.store = store
        self.dir = os.fsencode(store._tmp_name("import"))  # logs, and blobs no tree needs yet
        os.mkdir(self.dir)
        self.jobs = jobs
        self.pool = ThreadPoolExecutor(max_workers=jobs)
        self.flush = fsutil.EarlyFlush(store.root)  # blobs go to disk while the bundle streams in
        self._batch: list = []
        self._batch_bytes = 0
        self._inflight: collections.deque = collections.deque()
        self.trees: list[bytes] = []  # tmp roots laid out so far
        self._dirs: list[bytes] = []  # every directory made, parents first
        self._pending: dict[bytes, list] = {}  # blob digest -> [(location, executable)] awaiting it
        self._copies: dict[tuple[bytes, bool], bytes] = {}  # (digest, executable) -> a file of ours with it
        self._stash: dict[bytes, bytes] = {}  # blobs received before any tree needed them
        self._records = None  # the file of build records kept (keep_record)
        global _exact_mode
        _exact_mode = creation_mode_exact(os.fsdecode(self.dir))
        # An empty .links (a fresh store) has nothing to link from: skip two stats per file.
        # A blob another writer publishes meanwhile is merely not shared (publish tolerates it).
        self._links_empty = store.blobs.empty()

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        self.close(interrupted=kind is not None and issubclass(kind, KeyboardInterrupt))

    def close(self, interrupted: bool = False) -> None:
        """Remove what is staged. ``interrupted`` (Ctrl-C): leave it to the next command's
        recovery, which removes ``tmp/`` entries of dead processes, so that the command ends
        at once: removing files the background flush is writing back waits for the disk."""
        if self._records is not None:
            self._records.close()
        self.pool.shutdown(wait=True, cancel_futures=True)
        if interrupted:
            return
        self.flush.join()
        for tree in self.trees:
            fsutil.remove_tree(os.fsdecode(tree))
        fsutil.remove_tree(os.fsdecode(self.dir))

    def log_path(self, drv_hash: str) -> str:
        return os.path.join(os.fsdecode(self.dir), f"log-{drv_hash}")

    def keep_record(self, key: bytes, data: bytes) -> None:
        """Keep a build record on disk until the commit (memory stays flat however many)."""
        if self._records is None:
            self._records = open(os.path.join(self.dir, b"records"), "w+b")
        self._records.write(struct.pack("<II", len(key), len(data)) + key + data)

    def kept_records(self):
        """``(key, data)`` of every record kept, in the order kept."""
        if self._records is None:
            return
        f = self._records
        f.seek(0)
        while head := f.read(8):
            k, n = struct.unpack("<II", head)
            yield f.read(k), f.read(n)

    # ---- trees ----------------------------------------------------------------------------

    def lay_out(self, node) -> str:
        """Create ``node`` under ``tmp/`` except for the contents of files whose blobs are still
        to come (they are written when they arrive). The tree must have been checked (names,
        digest) already. Returns the tmp path."""
        self.drain()  # files of earlier sections are complete before anything links to them
        root = os.fsencode(self.store._tmp_name("import"))
        self.trees.append(root)
        stack = [(root, node)]
        while stack:
            path, n = stack.pop()
            if isinstance(n, DirNode):
                os.mkdir(path, 0o755)
                self._dirs.append(path)
                stack.extend((path + b"/" + name, child) for name, child in n.entries.items())
            elif isinstance(n, SymlinkNode):
                os.symlink(n.target, path)
                os.utime(path, (1, 1), follow_symlinks=False)
            else:
                self._place(n, path)
        return os.fsdecode(root)

    def _in_links(self, digest: bytes, executable: bool, size: int) -> bytes | None:
        """The ``.links`` file of a blob variant, if the store has it whole."""
        if self._links_empty:
            return None
        link = self.store.blobs.intact(digest, executable, size)
        return os.fsencode(link) if link is not None else None

    def _place(self, n: FileNode, path: bytes) -> None:
        key = (n.blob, n.executable)
        if key in self._copies:
            _link_or_copy(self._copies[key], path, n.executable)
            return
        link = self._in_links(n.blob, n.executable, n.size)
        if link is not None:
            _link_or_copy(link, path, n.executable)
            return
        other = (self._copies.get((n.blob, not n.executable)) or self._stash.get(n.blob)
                 or self._in_links(n.blob, not n.executable, n.size))
        if other is not None:
            _copy(other, path, n.executable, n.blob)
            self._copies[key] = path
            return
        self._pending.setdefault(n.blob, []).append((path, n.executable))

    # ---- blobs ----------------------------------------------------------------------------

    def _plan(self, digest: bytes, size: int):
        """Where an arriving blob goes: ``[(location, executable, source)]``. The first entry
        (source None) is written from the data; the others are hard links to an earlier
        location of the same variant, or (source None) copies of the first. Empty: only check
        the blob. Also records what later sections may link to."""
        locations = self._pending.pop(digest, [])
        if not locations:
            if not any(self._in_links(digest, x, size) for x in (False, True)):
                stash = self.dir + b"/" + digest.hex().encode()  # a later section may need it
                self._stash[digest] = stash
                return [(stash, False, None)]
            return []
        plan = []
        for path, executable in locations:
            plan.append((path, executable, self._copies.get((digest, executable))))
            self._copies.setdefault((digest, executable), path)
        return plan

    def add_small(self, digest: bytes, data: bytes) -> None:
        """Check ``data`` against ``digest`` and write it where it goes, on the pool."""
        self._batch.append((digest, data, self._plan(digest, len(data))))
        self._batch_bytes += len(data)
        self.flush.wrote(len(data))
        if self._batch_bytes >= _BATCH_BYTES or len(self._batch) >= _BATCH_ITEMS:
            self._submit()

    def _submit(self) -> None:
        if self._batch:
            self._inflight.append(self.pool.submit(_write_batch, self._batch))
            self._batch, self._batch_bytes = [], 0
        while len(self._inflight) > _MAX_INFLIGHT:
            self._inflight.popleft().result()

    def add_stream(self, digest: bytes, size: int, read) -> None:
        """Stream a large blob from ``read(n)`` (exact reads), checking and placing it."""
        plan = self._plan(digest, size)
        self.flush.wrote(size)
        h = blake3.blake3()  # AUTO threading costs more than it saves on 1 MiB updates
        fd = _create(plan[0][0], plan[0][1]) if plan else None
        try:
            left = size
            while left:
                chunk = read(min(_CHUNK, left))
                h.update(chunk)
                if fd is not None:
                    fsutil.write_all(fd, chunk)
                left -= len(chunk)
            if fd is not None:
                os.utime(fd, (1, 1))
        finally:
            if fd is not None:
                os.close(fd)
        if h.digest() != digest:
            raise mismatch(digest)
        if plan:  # empty: the blob is already here and was only checked
            _place_rest(plan, digest)

    def drain(self) -> None:
        """Wait for every blob in flight; raise the first error (a digest mismatch)."""
        self._submit()
        while self._inflight:
            self._inflight.popleft().result()

    # ---- publishing ---------------------------------------------------------------------------

    def publish(self) -> None:
        """After the bundle verified: link every blob written here into ``.links`` and give the
        directories their normal form (mtime 1, mode 0555). Call under the store's writer lock."""
        self.drain()
        self.flush.start()  # what is still dirty goes to disk while the blobs are linked
        links = [(path, self.store.link_path(digest, executable))
                 for (digest, executable), path in self._copies.items()]
        step = max(1024, -(-len(links) // self.jobs))
        list(self.pool.map(_publish_links, [links[i:i + step] for i in range(0, len(links), step)]))
        for d in reversed(self._dirs):
            os.utime(d, (1, 1))
            os.chmod(d, 0o555)


def _publish_links(links) -> None:
    for path, key in links:
        try:
            os.link(path, key)
        except FileExistsError:
            pass  # another writer published the same content meanwhile: both copies are right
        except OSError as e:
            if e.errno != errno.EMLINK:
                raise


def _create(path: bytes, executable: bool) -> int:
    """A new blob file with its normal mode, whatever the umask (a chmod where creation
    alone does not give it: see blobs.creation_mode_exact)."""
    mode = 0o555 if executable else 0o444
    fd = os.open(path, _CREATE, mode)
    if not _exact_mode:
        try:
            os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            raise
    return fd


# whether files created under tmp/ get their exact mode (set per import: Staging)
_exact_mode = False


def _link_or_copy(src: bytes, dst: bytes, executable: bool) -> None:
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno != errno.EMLINK:
            raise
        _copy(src, dst, executable, None)


def _copy(src: bytes, dst: bytes, executable: bool, digest: bytes | None) -> None:
    """Copy a blob file to a new inode with the given executable bit (checked when ``digest``)."""
    h = blake3.blake3()
    with open(src, "rb") as f:
        fd = _create(dst, executable)
        try:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                fsutil.write_all(fd, chunk)
            os.utime(fd, (1, 1))
        finally:
            os.close(fd)
    if digest is not None and h.digest() != digest:
        raise IntegrityError(f"local blob {digest.hex()[:16]}… is damaged", "run 'fimio verify --check-contents'")


def _place_rest(plan, digest: bytes) -> None:
    first = plan[0][0]
    for path, executable, source in plan[1:]:
        if source is None:
            _copy(first, path, executable, None)
        else:
            _link_or_copy(source, path, executable)


def _write_batch(batch) -> None:
    for digest, data, plan in batch:
        if blake3.blake3(data).digest() != digest:
            raise mismatch(digest)
        if plan:
            path, executable, _ = plan[0]
            fd = _create(path, executable)
            try:
                fsutil.write_all(fd, data)
                os.utime(fd, (1, 1))
            finally:
                os.close(fd)
            _place_rest(plan, digest)
