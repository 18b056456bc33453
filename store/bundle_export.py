"""Exporting: what a bundle holds (:func:`plan_export`) and writing it (:func:`export_bundle`).

``spec/bundle.md`` §4 and §7 are normative. Blobs are read from ``.links`` (or the store
file), checked against their digests as they are read, small ones on a two-thread pool in
batches a bounded distance ahead of the compressor, large ones streamed in chunks.
"""

from __future__ import annotations

import collections
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import blake3

from .bundle import (DIGEST, MAX_LOG, RECORD_HEAD, T_BLOB, T_DIR, T_HEADER, T_LOG, T_PATH, T_REALISATION,
                     T_RECORD, VERSION, BundleWriter, canonical, info_payload)
from .errors import IntegrityError, NotFound, UsageError
from .paths import StorePath
from .tree import DirNode, FileNode, Node

_SMALL = 4 << 20  # blobs up to this size are read whole (and hashed on a worker thread)
_CHUNK = 1 << 20
_LOOKAHEAD_BYTES = 16 << 20  # bytes of small blobs read ahead of the compressor
_BATCH_BYTES = 1 << 20
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


def export_bundle(store, plan: ExportPlan, out, keys=(), level: int = 2) -> ExportStats:
    """Write ``plan`` as a bundle to the binary file object ``out``, signed by ``keys``.

    Every blob is checked against its digest as it is read, so a damaged local store is
    refused (IntegrityError) rather than exported. Paths must be valid (NotFound)."""
    from .cache.keys import add_signature

    store_dir = store.store_dir
    w = BundleWriter(out, level=level)
    stats = ExportStats(paths=len(plan.paths))
    w.record(T_HEADER, canonical({"format": "fimio-bundle", "version": VERSION, "storeDir": store_dir,
                                  "paths": len(plan.paths)}))
    sent: set[bytes] = set()
    with ThreadPoolExecutor(max_workers=2) as pool:
        for path in plan.paths:
            info = store.info(path)
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
            for digest, records, count in _read_ahead(pool, store, info, where, [(b, sizes[b]) for b in blobs]):
                if records is not None:  # a batch of small blob records, framed on the pool
                    w.framed(records, count)
                else:
                    w.blob(digest, sizes[digest], _stream_blob(store, info, where, digest, sizes[digest]))
                stats.blobs += count
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


def _stream_blob(store, info, where, digest: bytes, size: int):
    h = blake3.blake3()
    done = 0
    with open(_blob_file(store, info, where, digest), "rb", buffering=0) as f:
        while done < size:
            chunk = f.read(min(_CHUNK * 4, size - done))
            if not chunk:
                break
            h.update(chunk)
            done += len(chunk)
            yield chunk
        if done != size or f.read(1) or h.digest() != digest:
            raise _damaged(store, info, digest)


def _read_batch(store, info, where, batch) -> bytes:
    """The blob records of ``batch`` (small blobs), read, checked and framed."""
    parts = []
    for digest, size in batch:
        parts.append(RECORD_HEAD.pack(T_BLOB, DIGEST + size))
        parts.append(digest)
        parts.append(_read_small(store, info, where, digest, size))
    return b"".join(parts)


def _read_ahead(pool, store, info, where, blobs):
    """Yield ``(None, framed records, count)`` for batches of small blobs, read, checked and
    framed on the pool up to ``_LOOKAHEAD_BYTES`` ahead (file I/O and blake3 release the GIL,
    and batches keep per-blob Python work off the compressing thread), and
    ``(digest, None, 1)`` for each large blob, which the caller streams; in blob order."""
    queue: collections.deque = collections.deque()  # (future, count, bytes) or (digest, None, size)
    ahead = 0
    batch: list = []
    batch_bytes = 0
    it = iter(blobs)
    exhausted = False

    def flush():
        nonlocal batch, batch_bytes
        if batch:
            queue.append((pool.submit(_read_batch, store, info, where, batch), len(batch), batch_bytes))
            batch, batch_bytes = [], 0

    while True:
        while not exhausted and ahead < _LOOKAHEAD_BYTES:
            nxt = next(it, None)
            if nxt is None:
                exhausted = True
                flush()
                break
            if nxt[1] > _SMALL:
                flush()
                queue.append((nxt[0], None, 0))
                continue
            batch.append(nxt)
            batch_bytes += nxt[1]
            ahead += nxt[1]
            if batch_bytes >= _BATCH_BYTES or len(batch) >= _BATCH_ITEMS:
                flush()
        if not queue:
            flush()
            if not queue:
                return
        item, count, size = queue.popleft()
        if count is None:
            yield item, None, 1
        else:
            ahead -= size
            yield None, item.result(), count


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
            path, sub = store.resolve(target)
            if sub:
                raise UsageError(f"'{target}' is a file inside a store path", "give the store path itself")
            roots.append(path)
            deriver = store.info(path).deriver
            if with_sources and deriver and store.is_valid(StorePath.parse(deriver)):
                drvs.append(graph.load(store.logical_base(deriver)))
    if missing:
        raise NotFound(f"{len(missing)} output(s) to export are not valid here", "run 'fimio realise' first",
                       details=missing)
    if with_sources and drvs:
        rs = rebuild_set(store, graph, drvs)
        closed.extend(rs.paths)
        for r in rs.realisations:
            realisations.setdefault(r.key, r)
    if closure:
        roots = store.closure(roots)
    paths = order_paths(store, list(dict.fromkeys(roots + store.closure(closed))))
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


def order_paths(store, paths: list[StorePath]) -> list[StorePath]:
    """``paths`` with references before referrers (ties by base name): deterministic."""
    wanted = set(paths)
    refs = {p: [r for r in store.info(p).references if r in wanted and r != p] for p in paths}
    out: list[StorePath] = []
    state: dict[StorePath, int] = {}
    for start in sorted(paths):
        if start in state:
            continue
        stack = [(start, iter(sorted(refs[start])))]
        state[start] = 1
        while stack:
            p, it = stack[-1]
            child = next(it, None)
            if child is None:
                stack.pop()
                state[p] = 2
                out.append(p)
            elif child not in state:
                state[child] = 1
                stack.append((child, iter(sorted(refs[child]))))
    return out
