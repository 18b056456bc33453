"""How file contents become cache objects (``spec/cache.md`` §Objects).

* The *blob order* of a tree: its distinct non-empty file contents in depth-first order,
  entries sorted by name bytes, first occurrence kept.
* *Large* blobs (``size >= largeFile``) are cut with FastCDC into chunks; each chunk is one
  ``chunks/`` object, so identical content anywhere in the cache is stored once and an
  edit re-sends only the chunks it touched.
* *Small* blobs are grouped, in blob order, into *packs* (``packs/`` objects): a pack ends
  after a blob whose digest is an anchor (``digest % anchor == 0``) once it holds
  ``minSize`` bytes, or before a blob that would take it past ``maxSize``. Cut points depend
  only on nearby content, so after an edit the packs downstream come out identical and are
  not sent again, and a 50,000-file tree is a few hundred requests, not 50,000.
* A pack is self-describing: ``"fimio-pack-1\\n"``, u32 count, count x (digest[32], u64
  size), then the blobs' bytes. Its address is blake3 of that header, so a pusher knows
  every pack's address from the tree alone, without reading a byte of content, and asks
  the cache which packs it lacks before reading anything.
* Every object is one zstd frame that records its content size; readers cap decompression
  at the size the manifest implies and check the digest of what comes out. Stored
  (compressed) sizes are capped by :func:`compress_bound` of the raw size.
"""

from __future__ import annotations

import struct
import threading

import blake3
import zstandard

from ..errors import IntegrityError
from ..forkpool import hash_threads
from ..tree import DirNode, FileNode, Node
from .layout import CacheParams

_local = threading.local()
PACK_MAGIC = b"fimio-pack-1\n"


def blob_order(root: Node) -> list[tuple[bytes, int]]:
    """``(digest, size)`` of every distinct non-empty blob of ``root``, in blob order."""
    seen: set[bytes] = set()
    out: list[tuple[bytes, int]] = []

    def walk(node):
        if isinstance(node, DirNode):
            for name in sorted(node.entries):
                walk(node.entries[name])
        elif isinstance(node, FileNode) and node.size and node.blob not in seen:
            seen.add(node.blob)
            out.append((node.blob, node.size))

    walk(root)
    return out


def split_blobs(blobs, large_file: int):
    """``(small, large)`` lists, each in blob order."""
    small = [b for b in blobs if b[1] < large_file]
    large = [b for b in blobs if b[1] >= large_file]
    return small, large


def plan_packs(small, params: CacheParams) -> list[list[tuple[bytes, int]]]:
    """Group small blobs into packs (content-defined cut points, see the module docstring)."""
    packs, current, size = [], [], 0
    for digest, n in small:
        if current and size + n > params.pack_max:
            packs.append(current)
            current, size = [], 0
        current.append((digest, n))
        size += n
        if size >= params.pack_min and int.from_bytes(digest[:4], "little") % params.pack_anchor == 0:
            packs.append(current)
            current, size = [], 0
    if current:
        packs.append(current)
    return packs


def chunker(params: CacheParams):
    """A FastCDC chunker for large blobs (one per thread: the object is not thread-safe)."""
    cdc = getattr(_local, "cdc", None)
    key = (params.chunk_min, params.chunk_avg, params.chunk_max)
    if cdc is None or _local.cdc_key != key:
        from pyfastcdc import FastCDC

        cdc = FastCDC(params.chunk_avg, min_size=params.chunk_min, max_size=params.chunk_max)
        _local.cdc, _local.cdc_key = cdc, key
    return cdc


def compress(data, level: int) -> bytes:
    """One zstd frame with its content size recorded."""
    comp = getattr(_local, "zc", None)
    if comp is None or _local.zc_level != level:
        comp = zstandard.ZstdCompressor(level=level, write_content_size=True)
        _local.zc, _local.zc_level = comp, level
    return comp.compress(data)


def decompress(data: bytes, raw_size: int, where: str, whole: bool = False) -> bytes:
    """Decompress one frame that must hold exactly ``raw_size`` bytes; IntegrityError otherwise.

    The frame's declared content size is checked *before* any output is allocated, so a
    hostile frame cannot make us allocate more than the (signed-for) size. ``whole``: also
    refuse anything after the frame (what a cache stores must be exactly one frame: clients
    cap a download at the bound of its raw size, so extra bytes would make it unreadable)."""
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError:
        raise IntegrityError(f"object '{where}' is not a zstd frame", "the cache is corrupt or hostile") from None
    if declared != raw_size:
        raise IntegrityError(f"object '{where}' declares {declared} bytes, expected {raw_size}",
                             "the cache is corrupt or hostile", expected=raw_size, got=declared)
    dec = getattr(_local, "zd", None)
    if dec is None:
        dec = _local.zd = zstandard.ZstdDecompressor()
    try:
        if whole:
            if len(data) > compress_bound(raw_size):
                raise IntegrityError(f"object '{where}' is larger than its contents can compress to")
            stream = dec.decompressobj()
            out = stream.decompress(data)  # bounded: zstd checks the output against the declared size
            if not stream.eof or stream.unused_data:
                raise IntegrityError(f"object '{where}' is not exactly one zstd frame")
        else:
            out = dec.decompress(data, max_output_size=raw_size) if raw_size else b""
    except zstandard.ZstdError:
        raise IntegrityError(f"object '{where}' is corrupt (zstd)", "the cache is corrupt or hostile") from None
    if len(out) != raw_size:
        raise IntegrityError(f"object '{where}' decompressed to {len(out)} bytes, expected {raw_size}",
                             "the cache is corrupt or hostile", expected=raw_size, got=len(out))
    return out


def check_digest(data, digest: bytes, where: str) -> None:
    got = blake3.blake3(data, max_threads=hash_threads() if len(data) > (4 << 20) else 1).digest()
    if got != digest:
        raise IntegrityError(f"object '{where}' does not match its digest", "the cache is corrupt or hostile",
                             expected=digest.hex(), got=got.hex())


def pack_header(blobs) -> bytes:
    """The header of a pack holding ``blobs`` (``(digest, size)`` in order)."""
    return b"".join([PACK_MAGIC, struct.pack("<I", len(blobs))] + [d + struct.pack("<Q", n) for d, n in blobs])


def pack_id(blobs) -> bytes:
    """A pack's address: blake3 of its header."""
    return blake3.blake3(pack_header(blobs)).digest()


def pack_raw_size(blobs) -> int:
    return len(PACK_MAGIC) + 4 + 40 * len(blobs) + sum(n for _, n in blobs)


def compress_bound(n: int) -> int:
    """An upper bound of a zstd frame holding ``n`` bytes (ZSTD_COMPRESSBOUND, rounded up)."""
    return n + (n >> 7) + 1024


def split_pack(raw: bytes, blobs, where: str):
    """Yield ``(digest, memoryview)`` for each blob of an uncompressed pack expected to hold
    exactly ``blobs``; IntegrityError if the header or any blob does not match."""
    header = pack_header(blobs)
    if len(raw) != pack_raw_size(blobs) or raw[:len(header)] != header:
        raise IntegrityError(f"pack '{where}' does not hold the files its manifest lists",
                             "the cache is corrupt or hostile")
    view = memoryview(raw)
    pos = len(header)
    for digest, n in blobs:
        piece = view[pos:pos + n]
        check_digest(piece, digest, where)
        pos += n
        yield digest, piece


def parse_pack(raw: bytes, where: str) -> list[tuple[bytes, int]]:
    """The blob list of a pack read without a manifest (the server checks uploads with it)."""
    try:
        if not raw.startswith(PACK_MAGIC):
            raise ValueError
        (count,) = struct.unpack_from("<I", raw, len(PACK_MAGIC))
        pos = len(PACK_MAGIC) + 4
        if pos + 40 * count > len(raw):
            raise ValueError
        blobs = []
        for _ in range(count):
            blobs.append((raw[pos:pos + 32], struct.unpack_from("<Q", raw, pos + 32)[0]))
            pos += 40
    except (ValueError, struct.error):
        raise IntegrityError(f"pack '{where}' has a malformed header", "the cache is corrupt or hostile") from None
    for _ in split_pack(raw, blobs, where):
        pass
    return blobs
