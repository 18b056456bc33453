"""The manifest: one ``trees/`` object per store path (``spec/cache.md`` §Manifest).

It holds every directory encoding of the path and says where each blob lives, so a reader
needs one request for the structure of a whole tree, then one per pack or chunk:

    magic      "fimio-manifest-1\\n"
    root       the root node: a file or symlink node encoding (spec/tree.md), or 0x03 + digest
    u64        largeFile: blobs this size or bigger are chunked, smaller ones packed
    u32 n      directory encodings, each u32 length + bytes (every directory reachable, once)
    u32 n      packs, each: digest[32] u32 blobCount
    u32 n      large blobs in blob order, each: u32 chunkCount, then per chunk
               digest[32] u32 rawSize

Integers are little-endian. Packs take the small blobs in blob order, ``blobCount`` at a
time; a pack's digest is determined by the blobs it holds (``packing.pack_id``), and the
reader checks that too. The manifest is not signed itself: its contents are checked against the signed root
digest (Merkle), and every pack and chunk against its digest, so a wrong manifest can only
cause a refusal, never a wrong file.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import blake3

from ..errors import IntegrityError
from ..tree import (KIND_DIR, KIND_FILE, KIND_SYMLINK, DIGEST_SIZE, MAX_DEPTH, MAX_TARGET, DirNode, FileNode, Node,
                    SymlinkNode, TreeError, decode_dir, iter_dirs, tree_size)
from .packing import blob_order, pack_id, pack_raw_size, split_blobs

MAGIC = b"fimio-manifest-1\n"
MAX_NODES = 20_000_000


@dataclass
class Pack:
    digest: bytes
    blobs: list[tuple[bytes, int]] = field(default_factory=list)

    @property
    def raw_size(self) -> int:
        return pack_raw_size(self.blobs)


@dataclass
class Chunk:
    digest: bytes
    raw_size: int


@dataclass
class LargeBlob:
    digest: bytes
    size: int
    chunks: list[Chunk] = field(default_factory=list)


@dataclass
class Manifest:
    root: Node
    large_file: int
    packs: list[Pack]
    large: list[LargeBlob]

    def encode(self) -> bytes:
        out = [MAGIC, _root_bytes(self.root), struct.pack("<Q", self.large_file)]
        dirs = list({d.digest: d for d in iter_dirs(self.root)}.values())
        out.append(struct.pack("<I", len(dirs)))
        for d in dirs:
            enc = d.encoding()
            out.append(struct.pack("<I", len(enc)))
            out.append(enc)
        out.append(struct.pack("<I", len(self.packs)))
        for p in self.packs:
            out.append(p.digest + struct.pack("<I", len(p.blobs)))
        out.append(struct.pack("<I", len(self.large)))
        for b in self.large:
            out.append(struct.pack("<I", len(b.chunks)))
            for c in b.chunks:
                out.append(c.digest + struct.pack("<I", c.raw_size))
        return b"".join(out)


def _root_bytes(node: Node) -> bytes:
    if isinstance(node, DirNode):
        return bytes([KIND_DIR]) + node.digest
    return node.encode()


def _bad(where: str, why: str) -> IntegrityError:
    return IntegrityError(f"manifest '{where}' is invalid: {why}", "the cache is corrupt or hostile")


class _Reader:
    def __init__(self, data: bytes, where: str):
        self.data, self.pos, self.where = data, 0, where

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise _bad(self.where, "truncated")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))


def decode(data: bytes, root_digest: bytes, size: int, where: str) -> Manifest:
    """Decode and fully check a manifest against the signed ``root_digest`` and ``size``.

    Raises IntegrityError on any malformation or mismatch."""
    r = _Reader(data, where)
    if r.take(len(MAGIC)) != MAGIC:
        raise _bad(where, "bad magic")
    kind = r.take(1)[0]
    root_ref: bytes | Node
    if kind == KIND_DIR:
        root_ref = r.take(DIGEST_SIZE)
    elif kind == KIND_FILE:
        flags, fsize = r.unpack("<BQ")
        if flags > 1:
            raise _bad(where, "bad file flags")
        root_ref = FileNode(r.take(DIGEST_SIZE), fsize, bool(flags))
    elif kind == KIND_SYMLINK:
        (tlen,) = r.unpack("<H")
        target = r.take(tlen)
        if not target or len(target) > MAX_TARGET or b"\0" in target:  # as decode_dir's (spec/tree.md §4)
            raise _bad(where, "bad symlink target")
        root_ref = SymlinkNode(target)
    else:
        raise _bad(where, "bad root kind")
    (large_file,) = r.unpack("<Q")
    (ndirs,) = r.unpack("<I")
    dirs: dict[bytes, bytes] = {}
    for _ in range(ndirs):
        (n,) = r.unpack("<I")
        enc = r.take(n)
        dirs[blake3.blake3(enc).digest()] = enc
    if len(dirs) != ndirs:
        raise _bad(where, "duplicate directory")
    try:
        root = _build(root_ref, dirs, where) if isinstance(root_ref, bytes) else root_ref
    except TreeError as e:
        raise _bad(where, e.message) from None
    if root.digest != root_digest:
        raise IntegrityError(f"manifest '{where}' does not match the signed root digest",
                             "the cache is corrupt or hostile", expected=root_digest.hex(), got=root.digest.hex())
    if isinstance(root, DirNode) and len({d.digest for d in iter_dirs(root)}) != ndirs:
        raise _bad(where, "unreferenced directories")
    if tree_size(root) != size:
        raise _bad(where, "size differs from the signed size")
    small, large = split_blobs(blob_order(root), large_file)
    (npacks,) = r.unpack("<I")
    packs, i = [], 0
    for _ in range(npacks):
        digest = r.take(DIGEST_SIZE)
        (count,) = r.unpack("<I")
        blobs = small[i:i + count]
        i += count
        if len(blobs) != count or count == 0 or pack_id(blobs) != digest:
            raise _bad(where, "pack table does not match the tree")
        packs.append(Pack(digest, blobs))
    if i != len(small):
        raise _bad(where, "pack table does not cover every small file")
    (nlarge,) = r.unpack("<I")
    if nlarge != len(large):
        raise _bad(where, "chunk table does not match the tree")
    out_large = []
    for digest, bsize in large:
        (nchunks,) = r.unpack("<I")
        chunks = []
        for _ in range(nchunks):
            cd = r.take(DIGEST_SIZE)
            (raw,) = r.unpack("<I")
            if raw == 0:
                raise _bad(where, "empty chunk")
            chunks.append(Chunk(cd, raw))
        if sum(c.raw_size for c in chunks) != bsize:
            raise _bad(where, "chunks do not add up to the file size")
        out_large.append(LargeBlob(digest, bsize, chunks))
    if r.pos != len(data):
        raise _bad(where, "trailing bytes")
    return Manifest(root, large_file, packs, out_large)


def _build(digest: bytes, dirs: dict[bytes, bytes], where: str, budget: list | None = None,
           depth: int = 0) -> DirNode:
    budget = budget if budget is not None else [MAX_NODES]
    enc = dirs.get(digest)
    if enc is None:
        raise _bad(where, f"directory {digest.hex()[:16]}… is missing")
    node = DirNode()
    entries = decode_dir(enc)
    budget[0] -= len(entries) + 1
    if budget[0] < 0:
        raise _bad(where, "too many nodes")
    if entries and depth >= MAX_DEPTH:
        raise _bad(where, f"directories nested deeper than {MAX_DEPTH} levels")
    for name, child in entries.items():
        node.entries[name] = _build(child, dirs, where, budget, depth + 1) if isinstance(child, bytes) else child
    return node
