"""The staging area of a bundle import: verified blobs and logs under ``tmp/import-*``.

Nothing here is visible in ``store/`` until :meth:`Staging.publish`, which the importer
calls only after the whole bundle verified. Small blobs are hashed (and written, when the
store lacks them) on a small thread pool in batches, so that decompression on the
reading thread overlaps file creation, which dominates on trees of many small files;
the bytes in flight are bounded. Large blobs are streamed in chunks on the reading thread.
"""

from __future__ import annotations

import collections
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import blake3

from . import fsutil
from .errors import IntegrityError

SMALL = 1 << 20  # blobs up to this size are handled whole on the pool
_BATCH_BYTES = 1 << 20
_BATCH_ITEMS = 128
_MAX_INFLIGHT = 8  # batches; bounds memory to about 8 MiB of small blobs
_CHUNK = 1 << 20


def mismatch(digest: bytes) -> IntegrityError:
    return IntegrityError(f"bad bundle: blob {digest.hex()[:16]}… does not match its digest",
                          "the bundle is corrupt, truncated or hostile; nothing was imported")


class Staging:
    """Blobs and logs of one import in progress. Use as a context manager: leaving removes
    the staging directory (whatever was not published) and stops the pool."""

    def __init__(self, store, jobs: int = 2):
        self.store = store
        self.dir = os.path.join(store.tmp, f"import-{os.getpid()}-{os.urandom(6).hex()}")
        os.mkdir(self.dir)
        self.pool = ThreadPoolExecutor(max_workers=jobs)
        self._batch: list = []
        self._batch_bytes = 0
        self._inflight: collections.deque = collections.deque()
        self._subdirs: set[str] = set()
        self.staged: dict[bytes, bool] = {}  # digest -> executable bit of the staged file's mode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        fsutil.remove_tree(self.dir)

    def _path(self, digest: bytes) -> str:
        h = digest.hex()
        sub = os.path.join(self.dir, h[:2])
        if sub not in self._subdirs:  # spread over 256 directories: creates in one directory serialise
            os.makedirs(sub, exist_ok=True)
            self._subdirs.add(sub)
        return os.path.join(sub, h)

    # ---- blobs --------------------------------------------------------------------------------

    def add_small(self, digest: bytes, data: bytes, stage: bool, executable: bool) -> None:
        """Check ``data`` against ``digest`` on the pool, and stage it when ``stage``."""
        path = self._path(digest) if stage else None
        if stage:
            self.staged[digest] = executable
        self._batch.append((digest, data, path, executable))
        self._batch_bytes += len(data)
        if self._batch_bytes >= _BATCH_BYTES or len(self._batch) >= _BATCH_ITEMS:
            self._submit()

    def _submit(self) -> None:
        if self._batch:
            self._inflight.append(self.pool.submit(_write_batch, self._batch))
            self._batch, self._batch_bytes = [], 0
        while len(self._inflight) > _MAX_INFLIGHT:
            self._inflight.popleft().result()

    def add_stream(self, digest: bytes, size: int, read, stage: bool, executable: bool) -> None:
        """Stream a large blob from ``read(n)`` (exact reads), checking and maybe staging it."""
        h = blake3.blake3(max_threads=blake3.blake3.AUTO) if size > (8 << 20) else blake3.blake3()
        fd = os.open(self._path(digest), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                     0o555 if executable else 0o444) if stage else None
        try:
            left = size
            while left:
                chunk = read(min(_CHUNK, left))
                h.update(chunk)
                if fd is not None:
                    _write_all(fd, chunk)
                left -= len(chunk)
            if fd is not None:
                os.utime(fd, (1, 1))
        finally:
            if fd is not None:
                os.close(fd)
        if h.digest() != digest:
            raise mismatch(digest)
        if stage:
            self.staged[digest] = executable

    def drain(self) -> None:
        """Wait for every blob in flight; raise the first error (a digest mismatch)."""
        self._submit()
        while self._inflight:
            self._inflight.popleft().result()

    def publish(self, variants: dict[bytes, set[bool]]) -> None:
        """Put into ``.links`` every ``(digest, executable)`` variant in ``variants`` that the
        store lacks, from the staged blob or, if none was staged, from the other variant in
        ``.links``. Call only after the bundle verified, under the store's writer lock."""
        store = self.store
        for digest, wanted in variants.items():
            todo = [x for x in sorted(wanted) if not os.path.exists(store.link_path(digest, x))]
            if not todo:
                continue
            mode_x = self.staged.get(digest)
            if mode_x is None:
                for x in todo:
                    _copy_variant(store, digest, x)
                continue
            staged = self._path(digest)
            # the staged file becomes the variant its mode already has, if that one is wanted
            last = mode_x if mode_x in todo else todo[-1]
            for x in [y for y in todo if y != last]:
                tmp = staged + f".{int(x)}"
                shutil.copyfile(staged, tmp)
                _finish(tmp, x)
                os.rename(tmp, store.link_path(digest, x))
            if last != mode_x:
                _finish(staged, last)
            os.rename(staged, store.link_path(digest, last))
            del self.staged[digest]

    # ---- logs ---------------------------------------------------------------------------------

    def log_path(self, drv_hash: str) -> str:
        return os.path.join(self.dir, f"log-{drv_hash}")


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _finish(path: str, executable: bool) -> None:
    os.chmod(path, 0o555 if executable else 0o444)
    os.utime(path, (1, 1))


def _write_batch(batch) -> None:
    for digest, data, path, executable in batch:
        if blake3.blake3(data).digest() != digest:
            raise mismatch(digest)
        if path is not None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o555 if executable else 0o444)
            try:
                _write_all(fd, data)
                os.utime(fd, (1, 1))
            finally:
                os.close(fd)


def _copy_variant(store, digest: bytes, executable: bool) -> None:
    """Make the ``executable`` variant of a blob from the other one in ``.links``, streaming and
    checking it (a damaged local blob must not spread)."""
    src = store.link_path(digest, not executable)
    tmp = os.path.join(store.tmp, f"blob-{os.getpid()}-{os.urandom(6).hex()}")
    h = blake3.blake3()
    try:
        with open(src, "rb") as f, open(tmp, "xb") as out:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
        if h.digest() != digest:
            raise IntegrityError(f"local blob {digest.hex()[:16]}… is damaged", "run 'fimio verify --check-contents'")
        _finish(tmp, executable)
        os.rename(tmp, store.link_path(digest, executable))
    except FileNotFoundError:
        raise IntegrityError(f"blob {digest.hex()[:16]}… vanished from the store during the import",
                             "run the import again") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
