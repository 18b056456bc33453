"""Bundles: one signed, zstd-compressed file of store paths for air-gapped machines.

``spec/bundle.md`` is normative. The file is::

    MAGIC  { u32le n, n bytes of zstd stream }*  u32le 0  u32le m, m bytes trailer

The chunk payloads concatenated are zstd frames whose content is the record stream,
records being ``type:u8 length:u64le payload``::

    H header                       version, store directory, number of path sections
    { P info, D dir..., B blob... } one section per store path, references first
    R realisation | L log | C build record   (between sections, any order)

Each path's info carries the signatures of its store path fingerprint
(``cache.keys.path_fingerprint``); the trailer signs the blake3 of *every byte* of the file
before it (the chunk framing is what lets a reader know exactly which bytes those are
while zstd reads ahead). Every size a reader acts on is declared before the bytes it
governs.

This module holds the format (constants, framing, info records) and the low-level
:class:`BundleWriter`; ``bundle_export`` decides what goes in and writes it,
``bundle_read`` and ``bundle_import`` read and import.
"""

from __future__ import annotations

import json
import struct
import threading

import blake3

from .tree import DirNode, FileNode, Node

MAGIC = b"fimio-bundle-1\n"
VERSION = 1

T_HEADER, T_PATH, T_DIR, T_BLOB, T_REALISATION, T_LOG, T_RECORD = b"HPDBRLC"
RECORD_HEAD = struct.Struct("<BQ")
CHUNK_HEAD = struct.Struct("<I")
MAX_CHUNK = 8 << 20  # compressed bytes per chunk
DIGEST = 32

# Caps on record payloads (a reader refuses a larger declared length before reading it).
MAX_HEADER = 64 << 10
MAX_INFO = 4 << 20
MAX_DIR = 32 << 20
MAX_REALISATION = 64 << 10
MAX_LOG = 256 << 20
MAX_RECORD = 1 << 20
MAX_TRAILER = 64 << 10

_CHUNK = 1 << 20  # record bytes per frame the writer compresses; compressed bytes per chunk


def trailer_fingerprint(digest: bytes) -> str:
    """What a bundle trailer's signatures cover."""
    return f"fimio-bundle-1;blake3:{digest.hex()}"


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


# ---- info records ---------------------------------------------------------------------------


def node_json(node: Node) -> dict:
    """The ``node`` field of an info record: the root's kind, and the node itself unless a directory."""
    if isinstance(node, DirNode):
        return {"type": "directory"}
    if isinstance(node, FileNode):
        return {"type": "file", "blob": "blake3:" + node.blob.hex(), "size": node.size,
                "executable": node.executable}
    return {"type": "symlink", "target": node.target.hex()}


def info_payload(store_dir: str, info, node: Node, signatures, dirs: int, blobs: int) -> bytes:
    """The canonical JSON of a ``P`` record (``spec/bundle.md`` §Path sections)."""
    return canonical({
        "path": info.path.logical(store_dir),
        "root": "blake3:" + info.root.hex(),
        "size": info.size,
        "references": sorted(r.logical(store_dir) for r in info.references),
        "deriver": info.deriver,
        "ca": info.ca,
        "signatures": sorted(signatures),
        "node": node_json(node),
        "dirs": dirs,
        "blobs": blobs,
    })


# ---- writing --------------------------------------------------------------------------------


class _Framer:
    """Cuts compressed bytes into length-prefixed chunks and hashes every byte written to
    ``out`` (what the trailer signs)."""

    def __init__(self, out):
        self.out = out
        self.hash = blake3.blake3()  # single-threaded: AUTO costs far more than it saves on 1 MiB updates
        self.buf = bytearray()
        self.size = 0
        self._put(MAGIC)

    def _put(self, data) -> None:
        self.out.write(data)
        self.hash.update(data)
        self.size += len(data)

    def write(self, data) -> None:
        """Buffered: the writer's own small frames share chunks."""
        self.buf += data
        if len(self.buf) >= _CHUNK:
            self.emit()

    def emit(self) -> None:
        if self.buf:
            buf, self.buf = self.buf, bytearray()
            self.chunks(buf)

    def chunks(self, data) -> None:
        """``data`` as chunks of at most 4 MiB, after whatever is buffered."""
        self.emit()
        view = memoryview(data)
        for i in range(0, len(view), 4 << 20):
            piece = view[i:i + (4 << 20)]
            self._put(CHUNK_HEAD.pack(len(piece)))
            self._put(piece)
        view.release()


_compressors = threading.local()


def compress_frame(data, level: int) -> bytes:
    """``data`` as one zstd frame (checksummed) at ``level``, with this thread's compressor:
    exporters compress frames on worker threads, and a bundle is their concatenation."""
    by_level = _compressors.__dict__.setdefault("by_level", {})
    cctx = by_level.get(level)
    if cctx is None:
        import zstandard

        cctx = by_level[level] = zstandard.ZstdCompressor(level=level, write_checksum=True)
    return cctx.compress(data)


class BundleWriter:
    """Writes records as a sequence of zstd frames, then the signed trailer.

    Records are buffered and compressed a frame per ``_CHUNK`` bytes; :meth:`frame` takes
    frames compressed elsewhere (worker threads), which may hold any run of record bytes.
    Low level on purpose: :func:`export_bundle` drives it for real bundles, and tests use
    it to craft hostile ones. ``out`` is a binary file object; it is not closed."""

    def __init__(self, out, level: int = 2):
        self.level = level
        self._framer = _Framer(out)
        self._buf = bytearray()
        self.records = 0
        self.bytes = 0  # uncompressed record bytes

    def _emit(self, data) -> None:
        self._buf += data
        if len(self._buf) >= _CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            self._framer.write(compress_frame(self._buf, self.level))
            self.bytes += len(self._buf)
            self._buf = bytearray()

    def record(self, rtype: int, payload: bytes) -> None:
        """One whole record (not for blobs: see :meth:`blob`)."""
        self._emit(RECORD_HEAD.pack(rtype, len(payload)))
        self._emit(payload)
        self.records += 1

    def blob(self, digest: bytes, size: int, chunks) -> None:
        """A blob record: ``chunks`` must yield exactly ``size`` bytes whose blake3 is ``digest``
        (the caller checks; the record's length is declared before the bytes)."""
        self._emit(RECORD_HEAD.pack(T_BLOB, DIGEST + size))
        self._emit(digest)
        for chunk in chunks:
            self._emit(chunk)
        self.records += 1

    def frame(self, frame: bytes, raw_size: int, records: int) -> None:
        """A zstd frame from :func:`compress_frame` of ``raw_size`` record bytes, completing
        ``records`` records (a large blob's record spans several frames: count it once)."""
        self._flush()
        self._framer.chunks(frame)  # not copied into the buffer: a frame is about a chunk already
        self.bytes += raw_size
        self.records += records

    def finish(self, keys=(), signatures=None) -> bytes:
        """End the zstd stream and the chunks, then write the trailer signed by ``keys`` (or
        carrying ``signatures`` as given). Returns the digest the trailer signs."""
        self._flush()
        self._framer.emit()
        self._framer._put(CHUNK_HEAD.pack(0))
        digest = self._framer.hash.digest()
        sigs = sorted(signatures if signatures is not None else [k.sign(trailer_fingerprint(digest)) for k in keys])
        payload = canonical({"digest": "blake3:" + digest.hex(), "records": self.records, "signatures": sigs})
        self._framer.out.write(CHUNK_HEAD.pack(len(payload)) + payload)
        return digest
