"""Download the objects of chosen store paths and materialise them under ``tmp/``.

Input: ``(backend, RemoteInfo)`` pairs whose infos were already verified (signature and
shape). Everything fetched is checked before use: the manifest against its digest and
the signed root digest and size, each pack against its manifest-implied header and each
blob in it against its digest, each chunk against its digest and each large blob against
its digest once assembled. Sizes are capped before decompression. Blobs the local store
already has (either executable variant) are not downloaded.

All work runs in phases on one thread pool (manifests, then packs and chunks, then
materialisation), so nothing waits on a task of its own pool. When there are many packs,
the threads only download them: decompressing, checking and writing their blobs (a few
system calls per small file) is handed to worker processes (``forkpool``), which share
no GIL. The new blobs are flushed in the background meanwhile (``fsutil.EarlyFlush``).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import blake3

from .. import fsutil
from ..errors import FimioError, IntegrityError
from ..forkpool import ForkPool
from ..paths import content_address_error
from ..tree import DirNode, FileNode, Node, text_blob
from . import ingest, manifest, packing
from .layout import object_key


_EMPTY = b"empty"  # a key that is no digest
_FORK_MIN_BYTES = 64 << 20  # packs to unpack before worker processes pay for their start
_EMPTY_DIGEST = blake3.blake3(b"").digest()


@dataclass
class _Item:
    backend: object
    info: object  # RemoteInfo
    manifest: manifest.Manifest | None = None
    tmp: str | None = None


@dataclass
class FetchStats:
    """What a fetch downloaded; ``progress(done, total)``, if set, is called (from worker
    threads) as file contents arrive, in bytes of content: ``total`` grows as each batch
    of paths learns from its manifests what it lacks."""

    objects: int = 0
    bytes: int = 0  # stored bytes downloaded
    paths: int = 0  # paths registered by this process (not those another made valid meanwhile)
    content: int = 0  # bytes of file content fetched
    expected: int = 0  # bytes of file content to fetch
    progress: object = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, n: int) -> None:
        with self.lock:
            self.objects += 1
            self.bytes += n

    def expect(self, n: int) -> None:
        with self.lock:
            self.expected += n

    def fetched(self, n: int) -> None:
        with self.lock:
            self.content += n
            done, total = self.content, self.expected
        if self.progress is not None:
            self.progress(done, total)


def _blamed(backend_of):
    """Decorate a step of the fetch: a FimioError it raises is marked with the cache it
    came from (``cache_url``: the URL of ``backend_of(*args)``), so that a caller can stop
    using that cache and go on with the others."""
    def wrap(fn):
        @functools.wraps(fn)
        def step(*args):
            try:
                return fn(*args)
            except FimioError as e:
                if getattr(e, "cache_url", None) is None:
                    e.cache_url = backend_of(*args).url
                raise
        return step
    return wrap


def fetch_paths(store, pairs, pool: ThreadPoolExecutor, stats: FetchStats | None = None) -> list:
    """Fetch and materialise ``pairs``; return ``[(tmp dir, RemoteInfo, node)]`` ready for
    :func:`ingest.register`. On any error the tmp dirs made so far are removed and the
    error (IntegrityError, RemoteError) propagates; blobs already published stay (they
    are verified and content-addressed, hence harmless)."""
    stats = stats if stats is not None else FetchStats()
    items = [_Item(b, i) for b, i in pairs]
    try:
        list(pool.map(lambda it: _fetch_manifest(it, stats, store.store_dir), items))
        with fsutil.EarlyFlush(store.root) as flush:
            flush.wrote(_fetch_blobs(store, items, pool, stats))
            flush.start()  # the blobs go to disk while the trees are linked
            list(pool.map(lambda it: _materialise(store, it), items))
    except BaseException:
        for it in items:
            if it.tmp:
                fsutil.remove_tree(it.tmp)
        raise
    return [(it.tmp, it.info, it.manifest.root) for it in items]


def _download(backend, key: str, raw_size: int, stats: FetchStats) -> bytes:
    """The stored (compressed) bytes of object ``key``, capped by its raw size."""
    data = backend.get(key, packing.compress_bound(raw_size))
    if data is None:
        raise IntegrityError(f"cache '{backend.url}' lacks '{key}', which a signed path needs",
                             "the cache is incomplete or was damaged")
    stats.add(len(data))
    return data


def _get(backend, key: str, raw_size: int, stats: FetchStats) -> bytes:
    return packing.decompress(_download(backend, key, raw_size, stats), raw_size, key)


def _unpack(store, data: bytes, blobs, key: str, wanted: dict) -> None:
    """Decompress a pack, check it against its manifest entry ``blobs`` and every blob
    against its digest, and publish the ``wanted`` ones ({digest: executable variants})."""
    for digest, piece in packing.split_pack(packing.decompress(data, packing.pack_raw_size(blobs), key), blobs, key):
        for executable in wanted.get(digest, ()):
            ingest.write_blob(store, digest, executable, piece)


# Manifests are fetched several at a time; large ones one at a time, so that forged sizes
# (unsigned, see layout.MAX_MANIFEST) cannot add up to several times that much memory.
_LARGE_MANIFEST = 16 << 20
_one_large_manifest = threading.Lock()


@_blamed(lambda item, *_: item.backend)
def _fetch_manifest(item: _Item, stats: FetchStats, store_dir: str) -> None:
    info = item.info
    key = object_key("trees", info.manifest)
    with _one_large_manifest if info.manifest_size > _LARGE_MANIFEST else contextlib.nullcontext():
        raw = _get(item.backend, key, info.manifest_size, stats)
        packing.check_digest(raw, info.manifest, key)
        item.manifest = manifest.decode(raw, info.root, info.size, key)
        del raw
    root = item.manifest.root
    wrong = content_address_error(store_dir, info.path, info.ca, root.digest, text_blob(root), info.references)
    if wrong:
        raise IntegrityError(f"'{info.path.logical(store_dir)}' in cache '{item.backend.url}' {wrong}",
                             "the cache holds a forged path; remove it from the cache")


def _variants(node: Node, out: dict, sizes: dict) -> None:
    """Collect ``{blob digest: {executable variants used}}`` of a tree, and each blob's size."""
    if isinstance(node, DirNode):
        for child in node.entries.values():
            _variants(child, out, sizes)
    elif isinstance(node, FileNode):
        out.setdefault(node.blob, set()).add(node.executable)
        sizes[node.blob] = node.size
        if node.size == 0:
            out.setdefault(_EMPTY, set())  # marks: the tree has empty files


def _fetch_blobs(store, items: list[_Item], pool: ThreadPoolExecutor, stats: FetchStats) -> int:
    """Download and publish the blobs the store lacks; return how many bytes that wrote."""
    needed: dict[bytes, set] = {}
    sizes: dict[bytes, int] = {}
    for it in items:
        _variants(it.manifest.root, needed, sizes)
    fresh = store.blobs.empty()  # a fresh store has nothing: two stats per blob saved
    store.blobs.prepare_bulk()
    if needed.pop(_EMPTY, None) is not None:
        # empty files are in no pack: their blob is made here
        for executable in needed.pop(_EMPTY_DIGEST, ()):
            ingest.write_blob(store, _EMPTY_DIGEST, executable, b"")
    # what we already have, or can make from the other variant, is not downloaded
    for digest, variants in list(needed.items()) if not fresh else ():
        missing = {x for x in variants if not ingest.has_blob(store, digest, x, sizes[digest])}
        if len(missing) == 1:
            # the other variant, if this store has it, is copied instead of downloaded
            (x,) = missing
            other_here = (not x) in variants or ingest.has_blob(store, digest, not x, sizes[digest])
            if other_here and ingest.copy_variant(store, digest, x):
                missing = set()
        if missing:
            needed[digest] = missing
        else:
            del needed[digest]
    tasks, large_files, seen = [], [], set()
    for it in items:
        for p in it.manifest.packs:
            want = [b for b in p.blobs if b[0] in needed and b[0] not in seen]
            if want:
                seen.update(b[0] for b in want)
                tasks.append(("pack", it.backend, p, None, 0))
        for blob in it.manifest.large:
            if blob.digest in needed and blob.digest not in seen:
                seen.add(blob.digest)
                target = ingest.LargeBlobFile(store, blob.digest, blob.size)
                large_files.append((target, needed[blob.digest], it.backend))
                offset = 0
                for c in blob.chunks:
                    tasks.append(("chunk", it.backend, c, target, offset))
                    offset += c.raw_size
    pack_bytes = sum(t[2].raw_size for t in tasks if t[0] == "pack")
    stats.expect(sum(t[2].raw_size for t in tasks))
    with contextlib.ExitStack() as stack:
        # many small blobs: unpacked and written by worker processes (see forkpool)
        unpack = (stack.enter_context(ForkPool(functools.partial(_unpack, store)))
                  if pack_bytes >= _FORK_MIN_BYTES else None)
        try:
            list(pool.map(lambda t: _run_task(store, t, needed, stats, unpack), tasks))
            list(pool.map(_publish_large, large_files))
        finally:
            for target, _, _ in large_files:
                target.close()
    return pack_bytes + sum(target.size for target, _, _ in large_files)


@_blamed(lambda large: large[2])
def _publish_large(large) -> None:
    target, variants, _ = large
    target.publish(variants)


@_blamed(lambda store, task, *_: task[1])
def _run_task(store, task, needed, stats: FetchStats, unpack) -> None:
    kind, backend, obj, target, offset = task
    if kind == "pack":
        key = object_key("packs", obj.digest)
        data = _download(backend, key, obj.raw_size, stats)
        wanted = {d: tuple(needed[d]) for d, _ in obj.blobs if d in needed}
        if unpack is None:
            _unpack(store, data, obj.blobs, key, wanted)
        else:
            unpack.submit([(data, obj.blobs, key, wanted)]).result()
    else:
        key = object_key("chunks", obj.digest)
        raw = _get(backend, key, obj.raw_size, stats)
        packing.check_digest(raw, obj.digest, key)
        target.write_at(offset, raw)
    stats.fetched(obj.raw_size)


def _materialise(store, item: _Item) -> None:
    item.tmp = ingest.tmp_name(store, "sub")
    store.materialise(item.manifest.root, item.tmp)
