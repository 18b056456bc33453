"""Exporting: what a bundle holds (:func:`plan_export`) and writing it (:func:`export_bundle`).

``spec/bundle.md`` §4 and §7 are normative. Blobs are read from ``.links`` (or the store
file), checked against their digests as they are read, and compressed on a two-thread
pool a bounded distance ahead of the writer: small ones in batches of one zstd frame each,
large ones in pieces of a frame each.
"""

from __future__ import annotations

import collections
import json
import os
import struct
from dataclasses import dataclass, field

import blake3

from .bundle import (DIGEST, MAX_LOG, RECORD_HEAD, T_BLOB, T_DIR, T_HEADER, T_LOG, T_PATH, T_REALISATION,
                     T_RECORD, VERSION, BundleWriter, canonical, compress_frame, info_payload)
from .errors import IntegrityError, NotFound, UsageError
from .paths import StorePath
from .threadpool import ThreadPool
from .tree import DirNode, FileNode, Node

_SMALL = 4 << 20  # blobs up to this size are read whole (and hashed on a worker thread)
_PIECE = 4 << 20  # a larger blob is read and compressed in pieces of this size
_LOOKAHEAD_BYTES = 16 << 20  # bytes read ahead of the writer
_BATCH_BYTES = 1 << 20  # small blobs per frame
_BATCH_ITEMS = 128


@dataclass
class ExportPlan:
    """What a bundle will hold: paths in bundle order, realisations, drv hashes with logs."""

    paths: list[StorePath]
    realisations: list = field(default_factory=list)  # cache.layout.Realisation
    logs: list[str] = field(default_factory=list)


@dataclass
class ExportStats:
    paths: int = 0
    blobs: int = 0
    bytes: int = 0  # uncompressed record bytes
    digest: bytes = b""


def export_bundle(store, plan: ExportPlan, out, keys=(), level: int = 2, progress=None) -> ExportStats:
    """Write ``plan`` as a bundle to the binary file object ``out``, signed by ``keys``.

    Every blob is checked against its digest as it is read, so a damaged local store is
    refused (IntegrityError) rather than exported. Paths must be valid (NotFound).
    ``progress(done, total)``, if given, is called as file contents are written, in bytes
    of the paths' contents (content already sent for an earlier path counts as done)."""
    from .cache.keys import add_signature

    store_dir = store.store_dir
    w = BundleWriter(out, level=level)
    stats = ExportStats(paths=len(plan.paths))
    infos = [store.info(p) for p in plan.paths]
    total = sum(info.size for info in infos)
    done = 0
    w.record(T_HEADER, canonical({"format": "fimio-bundle", "version": VERSION, "storeDir": store_dir,
                                  "paths": len(plan.paths)}))
    sent: set[bytes] = set()
    with ThreadPool(max_workers=2) as pool:
        for info in infos:
            node = store.load_tree(info)
            dirs = _dirs_preorder(node)
            where: dict[bytes, tuple[bool, bytes]] = {}
            sizes: dict[bytes, int] = {}
            _blob_places(node, b"", where, sizes)
            blobs = [d for d in where if d not in sent]
            sent.update(blobs)
            fp = _path_fingerprint(store_dir, info)
            sigs = list(info.signatures)
            for k in keys:
                sigs = add_signature(sigs, k.sign(fp))
            w.record(T_PATH, info_payload(store_dir, info, node, sigs, len(dirs), len(blobs)))
            for d in dirs:
                w.record(T_DIR, d.encoding())
            tasks = _tasks(store, info, where, [(b, sizes[b]) for b in blobs], level)
            written = 0
            for frame, raw_size, records in _frames(pool, tasks):
                w.frame(frame, raw_size, records)
                stats.blobs += records
                if progress:
                    written += raw_size
                    progress(done + min(written, info.size), total)
            done += info.size
            if progress:
                progress(done, total)
    for r in plan.realisations:
        for k in keys:
            r.signatures = add_signature(r.signatures, k.sign(r.fingerprint(store_dir)))
        w.record(T_REALISATION, r.to_json(store_dir))
    for drv_hash in dict.fromkeys(plan.logs):
        _write_log_and_records(store, w, drv_hash)
    stats.digest = w.finish(keys)
    stats.bytes = w.bytes
    return stats


def _path_fingerprint(store_dir: str, info) -> str:
    from .cache.keys import path_fingerprint

    return path_fingerprint(info.path.logical(store_dir), info.root, info.size,
                            [r.logical(store_dir) for r in info.references])


def _dirs_preorder(node: Node) -> list[DirNode]:
    """Every distinct directory of a tree, parents before children (what a reader can check)."""
    out, seen, stack = [], set(), [node]
    while stack:
        d = stack.pop()
        if not isinstance(d, DirNode) or d.digest in seen:
            continue
        seen.add(d.digest)
        out.append(d)
        stack.extend(d.entries[name] for name in sorted(d.entries, reverse=True))
    return out


def _blob_places(node: Node, rel: bytes, where: dict, sizes: dict) -> None:
    """Fill ``where`` with ``{blob digest: (executable, relative path)}`` of first
    occurrences, depth-first by name, and ``sizes`` with ``{blob digest: size}``."""
    if isinstance(node, DirNode):
        for name in sorted(node.entries):
            _blob_places(node.entries[name], rel + b"/" + name if rel else name, where, sizes)
    elif isinstance(node, FileNode):
        where.setdefault(node.blob, (node.executable, rel))
        sizes[node.blob] = node.size


def _blob_file(store, info, where, digest: bytes) -> str:
    executable, rel = where[digest]
    return store.blob_file(info.path, digest, executable, rel)


def _damaged(store, info, digest: bytes) -> IntegrityError:
    return IntegrityError(f"local file {digest.hex()[:16]}… of '{store.logical(info.path)}' is damaged; "
                          "refusing to export it", "run 'fimio verify --check-contents'")


def _read_small(store, info, where, digest: bytes, size: int) -> bytes:
    executable, rel = where[digest]
    data = store.read_blob(info.path, digest, executable, rel, size)
    if data is None:
        raise _damaged(store, info, digest)
    return data


def _small_batch(store, info, where, batch, level: int) -> tuple[bytes, int, bytes | None]:
    """The blob records of ``batch`` (small blobs), read, checked, framed and compressed."""
    parts = []
    for digest, size in batch:
        parts.append(RECORD_HEAD.pack(T_BLOB, DIGEST + size))
        parts.append(digest)
        parts.append(_read_small(store, info, where, digest, size))
    raw = b"".join(parts)
    return compress_frame(raw, level), len(raw), None


def _large_piece(fd: int, offset: int, length: int, head: bytes, level: int) -> tuple[bytes, int, bytes]:
    """``length`` bytes of a large blob at ``offset`` (after ``head``, its record head, for the
    first piece) as a frame; the bytes themselves too, for the blob's digest."""
    data = os.pread(fd, length, offset)
    if len(data) != length:
        data += b"\0" * (length - len(data))  # shrank while read: the digest check refuses it
    return compress_frame(head + data if head else data, level), len(head) + length, data


class _LargeBlob:
    """A large blob being exported in pieces: its open file and the digest of what was read."""

    def __init__(self, store, info, where, digest: bytes, size: int):
        self.store, self.info, self.digest = store, info, digest
        self.fd = os.open(_blob_file(store, info, where, digest), os.O_RDONLY)
        self.hash = blake3.blake3()
        if os.fstat(self.fd).st_size != size:
            self.close()
            raise _damaged(store, info, digest)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def finish(self) -> None:
        self.close()
        if self.hash.digest() != self.digest:
            raise _damaged(self.store, self.info, self.digest)


def _tasks(store, info, where, blobs, level: int):
    """The work of exporting ``blobs``, in bundle order: ``(function, args, bytes read,
    large blob or None, records completed)``. Small blobs go in batches; a large blob is
    cut into pieces, the last of which completes its record."""
    batch: list = []
    batch_bytes = 0
    for digest, size in blobs:
        if size <= _SMALL:
            batch.append((digest, size))
            batch_bytes += size
            if batch_bytes >= _BATCH_BYTES or len(batch) >= _BATCH_ITEMS:
                yield _small_batch, (store, info, where, batch, level), batch_bytes, None, len(batch)
                batch, batch_bytes = [], 0
            continue
        if batch:
            yield _small_batch, (store, info, where, batch, level), batch_bytes, None, len(batch)
            batch, batch_bytes = [], 0
        large = _LargeBlob(store, info, where, digest, size)
        head = RECORD_HEAD.pack(T_BLOB, DIGEST + size) + digest
        for offset in range(0, size, _PIECE):
            length = min(_PIECE, size - offset)
            last = offset + length == size
            yield _large_piece, (large.fd, offset, length, head, level), length, large, 1 if last else 0
            head = b""
    if batch:
        yield _small_batch, (store, info, where, batch, level), batch_bytes, None, len(batch)


def _frames(pool, tasks):
    """Run ``tasks`` on the pool up to ``_LOOKAHEAD_BYTES`` ahead (file I/O, blake3 and zstd
    release the GIL, so reading, checking and compressing proceed in parallel); yield
    ``(frame, raw size, records completed)`` in order, checking each large blob's digest
    once its last piece is in."""
    pending: collections.deque = collections.deque()
    ahead = 0
    try:
        for fn, args, cost, large, records in tasks:
            pending.append((pool.submit(fn, *args), cost, large, records))
            ahead += cost
            while ahead >= _LOOKAHEAD_BYTES:
                ahead -= yield from _take(pending)
        while pending:
            yield from _take(pending)
    finally:
        for future, _, large, _ in pending:
            if not future.cancel():
                future.exception()  # running: wait, it may be reading a file closed below
            if large is not None:
                large.close()


def _take(pending):
    future, cost, large, records = pending[0]
    frame, raw_size, data = future.result()
    pending.popleft()
    if large is not None:
        large.hash.update(data)
        if records:
            large.finish()
    yield frame, raw_size, records
    return cost


def _write_log_and_records(store, w: BundleWriter, drv_hash: str) -> None:
    log = os.path.join(store.root, "logs", f"{drv_hash}.log.zst")
    try:
        with open(log, "rb") as f:
            data = f.read(MAX_LOG + 1)
    except FileNotFoundError:
        data = None
    if data is not None and len(data) <= MAX_LOG - 2 - len(drv_hash):
        h = drv_hash.encode()
        w.record(T_LOG, struct.pack("<H", len(h)) + h + data)
    prefix = f"{drv_hash}!".encode()
    with store.db.read() as txn:
        cur = txn.cursor(db=store.db.dbs["records"])
        if cur.set_range(prefix):
            for k, v in cur:
                if not k.startswith(prefix):
                    break
                w.record(T_RECORD, canonical({"drvHash": drv_hash, "id": k[len(prefix):].decode(),
                                              "record": json.loads(bytes(v))}))


# ---- planning an export -------------------------------------------------------------------


def plan_export(store, targets, closure: bool = False, with_sources: bool = False,
                sources_only: bool = False, with_logs: bool = False) -> ExportPlan:
    """Resolve export TARGETs (``spec/bundle.md`` §Export) into an :class:`ExportPlan`.

    A target is a store path, or a derivation (file, ``.drv`` path or its hash part): then
    its outputs, which must be valid (NotFound otherwise, naming each). ``closure`` adds the
    runtime closures; ``with_sources`` adds every ``.drv``, source and fixed-output result an
    offline rebuild needs (with their realisations); ``sources_only`` is that without the
    targets' outputs."""
    from .instantiate import Graph
    from .prefetch import is_derivation_target, local_realisation, rebuild_set

    with_sources = with_sources or sources_only
    graph = Graph(store)
    roots: list[StorePath] = []
    closed: list[StorePath] = []  # always exported with their closures
    realisations: dict[str, object] = {}
    missing: list[str] = []
    drvs = []
    for target in targets:
        if is_derivation_target(store, target):
            drv = graph.target(target)
            drvs.append(drv)
            if sources_only:
                continue
            for name, p in drv.output_paths().items():
                if not store.is_valid(p):
                    missing.append(f"{store.logical(p)}: output '{name}' of {drv.drv_path.base}")
                    continue
                roots.append(p)
                r = local_realisation(store, drv, name)
                if r is not None:
                    realisations[r.key] = r
        else:
            try:
                path, sub = store.resolve(target)
            except NotFound as e:  # named with every other missing item
                missing.append(e.message)
                continue
            if sub:
                raise UsageError(f"'{target}' is a file inside a store path", "give the store path itself")
            deriver = store.info(path).deriver
            if not (sources_only and deriver):  # a path nothing derived is a source itself
                roots.append(path)
            if with_sources and deriver:
                if store.is_valid(StorePath.parse(deriver)):
                    drvs.append(graph.load(store.logical_base(deriver)))
                else:
                    missing.append(f"{store.logical(path)}: its derivation {deriver} (for its sources)")
    if missing:
        raise NotFound(f"{len(missing)} item(s) to export are not valid here",
                       "run 'fimio realise' (or instantiate the derivation files) first", details=missing)
    if with_sources and drvs:
        rs = rebuild_set(store, graph, drvs)
        closed.extend(rs.paths)
        for r in rs.realisations:
            realisations.setdefault(r.key, r)
    if closure:
        roots = store.closure(roots)
    paths = store.references_first(list(dict.fromkeys(roots + store.closure(closed))))
    store.refuse_local_only(paths)
    store.hold(paths)
    in_bundle = set(paths)
    # every derivation of the targets' graphs with an output in the bundle (a runtime closure
    # holds intermediate outputs too) contributes its realisations, and with_logs its logs
    producers = [d for d in graph.closure(drvs) if in_bundle.intersection(d.output_paths().values())]
    for drv in producers:
        for name, p in drv.output_paths().items():
            r = local_realisation(store, drv, name) if p in in_bundle else None
            if r is not None:
                realisations.setdefault(r.key, r)
    logs = [d.drv_hash for d in producers] if with_logs else []
    return ExportPlan(paths, [r for r in realisations.values() if r.path in in_bundle], logs)

