"""Upload closures to a cache, sending only what it lacks (``spec/cache.md`` §Push).

Order, so that a reader never sees an ``info/`` whose objects are missing:

1. ``fimio-cache.json`` (created by the first push; its parameters are used from then on);
2. which ``info/`` files exist (one batched query): those paths are skipped entirely;
3. for the rest: plan packs (addresses known from the tree alone) and FastCDC-chunk large
   files, then one batched query for which packs/chunks/manifests are missing;
4. upload the missing ones in parallel; ``barrier()``;
5. ``info/`` files, signed, references before referrers (level by level, ``barrier()`` after
   each level); then realisations, logs and build records.

Local content is checked against its digest while it is read, so a damaged local store can
never poison a cache (objects are never overwritten, a bad one would stay forever).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import blake3

from ..errors import IntegrityError, UsageError
from ..paths import StorePath
from ..threadpool import ThreadPool
from ..tree import DirNode, FileNode, Node
from . import packing
from .keys import add_signature
from .layout import (CACHE_INFO_KEY, MAX_CACHE_INFO, MAX_INFO, CacheParams, Realisation, RemoteInfo, info_key,
                     log_key, object_key, record_key)
from .manifest import Chunk, LargeBlob, Manifest, Pack


@dataclass
class PushStats:
    """What a push did. ``bytes_sent`` counts every byte uploaded (objects as stored)."""

    paths: int = 0
    paths_sent: int = 0
    objects: int = 0
    objects_sent: int = 0
    bytes_sent: int = 0
    raw_bytes_sent: int = 0
    realisations_sent: int = 0
    sent_paths: list[str] = field(default_factory=list)
    # outputs whose realisation was not pushed: the cache holds other contents under that path
    conflicts: list[str] = field(default_factory=list)


def cache_params(backend, store_dir: str, create: bool) -> CacheParams | None:
    """The cache's ``fimio-cache.json`` (created with defaults when ``create`` and absent).

    None when absent and not ``create``. UsageError when it is for another store directory."""
    data = backend.get(CACHE_INFO_KEY, MAX_CACHE_INFO)
    if data is None:
        if not create:
            return None
        params = CacheParams(store_dir)
        backend.put(CACHE_INFO_KEY, params.to_json())
        data = backend.get(CACHE_INFO_KEY, MAX_CACHE_INFO) or params.to_json()  # a racing creator wins
    params = CacheParams.parse(data, backend.url)
    if params.store_dir != store_dir:
        raise UsageError(f"cache '{backend.url}' holds store directory '{params.store_dir}', not '{store_dir}'",
                         "use --store-dir to match, or another cache")
    return params


@dataclass
class _Work:
    """One store path being pushed."""

    info: object  # PathInfo
    node: Node
    where: dict  # blob digest -> (executable, relative path) of its first occurrence
    packs: list = field(default_factory=list)
    large: list = field(default_factory=list)
    chunk_src: dict = field(default_factory=dict)  # chunk digest -> (file, offset, length)
    manifest: bytes = b""


class Pusher:
    """Push store paths (with their closures) to one backend.

    ``keys``: SecretKeys whose signatures are added to every info and realisation sent.
    ``progress(done_bytes, total_bytes)`` is called from worker threads during uploads."""

    def __init__(self, store, backend, keys=(), jobs: int = 8, progress=None):
        self.store, self.backend, self.keys = store, backend, list(keys)
        self.jobs = max(1, jobs)
        self.progress = progress
        self._lock = threading.Lock()
        self._done = 0
        self.stats = PushStats()

    # ---- entry point ------------------------------------------------------------------

    def push(self, paths, realisations=(), drv_hashes=()) -> PushStats:
        """Upload the closures of ``paths``, then ``realisations`` (Realisation objects whose
        output paths must be among the closures) and the logs and build records of
        ``drv_hashes``. Returns what was sent. Raises RemoteError, IntegrityError, UsageError."""
        store = self.store
        self.params = cache_params(self.backend, store.store_dir, create=True)
        closure = store.closure(paths)
        store.refuse_local_only(closure)
        store.hold(closure)
        self.stats.paths = len(closure)
        infos = {p: store.info(p) for p in closure}
        absent = self.backend.missing([info_key(p.hash_part) for p in closure])
        todo = [p for p in closure if info_key(p.hash_part) in absent]
        with ThreadPool(max_workers=self.jobs) as pool:
            self.pool = pool
            works = [self._prepare(infos[p]) for p in todo]
            self._upload_objects(works)
            self.backend.barrier()
            self._upload_infos(works)
            for r in realisations:
                self._push_realisation(r)
            for h in dict.fromkeys(drv_hashes):
                self._push_log_and_records(h)
        return self.stats

    # ---- planning -----------------------------------------------------------------------

    def _prepare(self, info) -> _Work:
        node = self.store.load_tree(info)
        where: dict[bytes, tuple[bool, str]] = {}
        _walk(node, "", where)
        work = _Work(info, node, where)
        small, large = packing.split_blobs(packing.blob_order(node), self.params.large_file)
        work.packs = [Pack(packing.pack_id(blobs), blobs) for blobs in packing.plan_packs(small, self.params)]
        work.large = list(self.pool.map(lambda b: self._chunk(work, b), large))
        manifest = Manifest(node, self.params.large_file, work.packs, work.large)
        work.manifest = manifest.encode()
        return work

    def _blob_file(self, work: _Work, digest: bytes) -> str:
        """A readable file holding the blob: its ``.links`` entry, else the file in the store path."""
        executable, rel = work.where[digest]
        return self.store.blob_file(work.info.path, digest, executable, rel)

    def _read_blob(self, work: _Work, digest: bytes, size: int) -> bytes:
        """A blob's bytes, checked against its digest (one open on the common path)."""
        executable, rel = work.where[digest]
        data = self.store.read_blob(work.info.path, digest, executable, rel, size)
        if data is None:
            raise IntegrityError(f"local file {digest.hex()[:16]}… of '{self.store.logical(work.info.path)}' "
                                 "is damaged; refusing to push it", "run 'fimio verify --check-contents'")
        return data

    def _chunk(self, work: _Work, blob) -> LargeBlob:
        digest, size = blob
        path = self._blob_file(work, digest)
        out = LargeBlob(digest, size)
        whole = blake3.blake3(max_threads=blake3.blake3.AUTO)
        for c in packing.chunker(self.params).cut_file(path):
            data = c.data
            whole.update(data)
            cd = blake3.blake3(data).digest()
            out.chunks.append(Chunk(cd, c.length))
            with self._lock:
                work.chunk_src.setdefault(cd, (path, c.offset, c.length))
        if whole.digest() != digest or sum(c.raw_size for c in out.chunks) != size:
            raise IntegrityError(f"local file {digest.hex()[:16]}… of '{self.store.logical(work.info.path)}' is "
                                 "damaged; refusing to push it", "run 'fimio verify --check-contents'")
        return out

    # ---- uploading ----------------------------------------------------------------------

    def _upload_objects(self, works: list[_Work]) -> None:
        tasks: dict[str, tuple] = {}
        for w in works:
            for p in w.packs:
                tasks.setdefault(object_key("packs", p.digest), ("pack", w, p))
            for b in w.large:
                for c in b.chunks:
                    tasks.setdefault(object_key("chunks", c.digest), ("chunk", w, c))
            tasks.setdefault(object_key("trees", blake3.blake3(w.manifest).digest()), ("manifest", w, None))
        self.stats.objects = len(tasks)
        missing = self.backend.missing(list(tasks)) if tasks else set()
        todo = [(k, tasks[k]) for k in tasks if k in missing]
        self._total = sum(_raw_size(t) for _, t in todo)
        # content before manifests: a manifest is only useful once its objects are there
        first = [x for x in todo if x[1][0] != "manifest"]
        for batch in (first, [x for x in todo if x[1][0] == "manifest"]):
            for _ in self.pool.map(self._send_object, batch):
                pass

    def _send_object(self, item) -> None:
        key, (kind, work, obj) = item
        if kind == "pack":
            raw = self._build_pack(work, obj)
        elif kind == "chunk":
            path, offset, length = work.chunk_src[obj.digest]
            fd = os.open(path, os.O_RDONLY)
            try:
                raw = os.pread(fd, length, offset)
            finally:
                os.close(fd)
            packing.check_digest(raw, obj.digest, path)
        else:
            raw = work.manifest
        self._put(key, packing.compress(raw, self.params.level), len(raw))

    def _build_pack(self, work: _Work, pack: Pack) -> bytes:
        parts = [packing.pack_header(pack.blobs)]
        parts += [self._read_blob(work, digest, size) for digest, size in pack.blobs]
        return b"".join(parts)

    def _put(self, key: str, data: bytes, raw_size: int) -> bool:
        """Upload one object; whether this call published it (false: it was there already)."""
        created = self.backend.put(key, data)
        if created:
            with self._lock:
                self.stats.objects_sent += 1 if not key.startswith(("info/", "realisations/")) else 0
                self.stats.bytes_sent += len(data)
                self.stats.raw_bytes_sent += raw_size
        with self._lock:
            self._done += raw_size
            done = self._done
        if self.progress is not None:
            self.progress(done, getattr(self, "_total", 0))
        return created

    def _upload_infos(self, works: list[_Work]) -> None:
        by_path = {w.info.path: w for w in works}
        level: dict[StorePath, int] = {}

        def depth(p: StorePath) -> int:
            if p not in level:
                level[p] = 0  # self-references
                refs = [r for r in by_path[p].info.references if r in by_path and r != p]
                level[p] = 1 + max((depth(r) for r in refs), default=-1)
            return level[p]

        for p in by_path:
            depth(p)
        for n in range(max(level.values(), default=-1) + 1):
            batch = [by_path[p] for p in sorted(by_path) if level[p] == n]
            for _ in self.pool.map(self._send_info, batch):
                pass
            self.backend.barrier()

    def _send_info(self, work: _Work) -> None:
        info, store_dir = work.info, self.store.store_dir
        remote = RemoteInfo(info.path, info.root, info.size, list(info.references),
                            blake3.blake3(work.manifest).digest(), len(work.manifest),
                            info.deriver, info.ca, list(info.signatures))
        for key in self.keys:
            remote.signatures = add_signature(remote.signatures, key.sign(remote.fingerprint(store_dir)))
        data = remote.to_json(store_dir)
        if not self._put(info_key(info.path.hash_part), data, len(data)):
            return  # another machine published this path meanwhile
        with self._lock:
            self.stats.paths_sent += 1
            self.stats.sent_paths.append(self.store.logical(info.path))

    def _push_realisation(self, r: Realisation) -> None:
        """Publish a realisation, unless the cache already holds its output path with other
        contents (another machine's build of a derivation that is not reproducible): a
        realisation that contradicts the path would only make every reader build instead."""
        store_dir = self.store.store_dir
        if r.path.logical(store_dir) not in self.stats.sent_paths:
            key = info_key(r.path.hash_part)
            data = self.backend.get(key, MAX_INFO)
            if data is not None and RemoteInfo.parse(data, store_dir, r.path.hash_part,
                                                     f"{self.backend.url}/{key}").root != r.root:
                self.stats.conflicts.append(r.path.logical(store_dir))
                return
        for key in self.keys:
            r.signatures = add_signature(r.signatures, key.sign(r.fingerprint(self.store.store_dir)))
        data = r.to_json(self.store.store_dir)
        if self.backend.put(r.key, data):
            self.stats.realisations_sent += 1
            self.stats.bytes_sent += len(data)

    def _push_log_and_records(self, drv_hash: str) -> None:
        log = os.path.join(self.store.root, "logs", f"{drv_hash}.log.zst")
        if os.path.exists(log) and self.backend.missing([log_key(drv_hash)]):
            with open(log, "rb") as f:
                data = f.read()
            if self.backend.put(log_key(drv_hash), data):
                self.stats.bytes_sent += len(data)
        prefix = f"{drv_hash}!".encode()
        with self.store.db.read() as txn:
            cur = txn.cursor(db=self.store.db.dbs["records"])
            records = []
            if cur.set_range(prefix):
                for k, v in cur:
                    if not k.startswith(prefix):
                        break
                    records.append((k[len(prefix):].decode(), bytes(v)))
        for rid, data in records:
            if self.backend.put(record_key(drv_hash, rid), data):
                self.stats.bytes_sent += len(data)


def _raw_size(task) -> int:
    kind, work, obj = task
    if kind == "pack":
        return obj.raw_size
    if kind == "chunk":
        return obj.raw_size
    return len(work.manifest)


def _walk(node: Node, rel: str, where: dict) -> None:
    if isinstance(node, DirNode):
        for name in sorted(node.entries):
            _walk(node.entries[name], f"{rel}/{os.fsdecode(name)}" if rel else os.fsdecode(name), where)
    elif isinstance(node, FileNode):
        where.setdefault(node.blob, (node.executable, rel))
