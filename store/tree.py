"""The content model: blake3 blobs and a Merkle tree of file, symlink and directory nodes.

See ``spec/tree.md`` for the normative encoding. In short:

* a *blob* is a file's bytes; its digest is ``blake3(bytes)`` (what ``b3sum`` prints);
* a *file node* is (blob digest, size, executable bit); a *symlink node* is its target;
* a *directory* is its entries sorted by name bytes, encoded canonically; child
  directories appear by digest, so identical subtrees are one object;
* the *root digest* of a path is the digest of its root node.
"""

from __future__ import annotations

import os
import stat
import struct

import blake3

from .errors import IntegrityError, NotFound, UsageError
from .forkpool import hash_threads
from .values import Value

DIGEST_SIZE = 32
MAX_NAME = 255
MAX_TARGET = 4095
MAX_DEPTH = 512  # entry names from the root to the deepest object (spec/tree.md §3)

_FILE_MAGIC = b"fimio-file-1\0"
_LINK_MAGIC = b"fimio-link-1\0"
_DIR_MAGIC = b"fimio-dir-1\0"

KIND_FILE = 1
KIND_SYMLINK = 2
KIND_DIR = 3


class TreeError(IntegrityError):
    """A directory encoding that is malformed or does not match its digest."""


class FileNode(Value):
    """A regular file: its contents' blake3 digest, its size and its executable bit."""

    __slots__ = ("blob", "size", "executable")

    def __init__(self, blob: bytes, size: int, executable: bool):
        self.blob, self.size, self.executable = blob, size, executable

    def encode(self) -> bytes:
        return bytes([KIND_FILE, 1 if self.executable else 0]) + struct.pack("<Q", self.size) + self.blob

    @property
    def digest(self) -> bytes:
        return blake3.blake3(_FILE_MAGIC + self.encode()).digest()


class SymlinkNode(Value):
    """A symbolic link: its target bytes."""

    __slots__ = ("target",)

    def __init__(self, target: bytes):
        self.target = target

    def encode(self) -> bytes:
        return bytes([KIND_SYMLINK]) + struct.pack("<H", len(self.target)) + self.target

    @property
    def digest(self) -> bytes:
        return blake3.blake3(_LINK_MAGIC + self.encode()).digest()


class DirNode(Value):
    """A directory: ``entries`` maps name bytes to child nodes. Treat as immutable once hashed."""

    __slots__ = ("entries", "_digest", "_encoding")
    __hash__ = None  # mutable while it is built

    def __init__(self, entries: dict[bytes, "Node"] | None = None):
        self.entries = {} if entries is None else entries
        self._digest: bytes | None = None
        self._encoding: bytes | None = None

    def __eq__(self, other) -> bool:
        if type(other) is not DirNode:
            return NotImplemented
        return self.entries == other.entries

    def __repr__(self) -> str:
        return f"DirNode({self.entries!r})"

    def encoding(self) -> bytes:
        """The canonical directory encoding (spec/tree.md); child directories by digest."""
        if self._encoding is None:
            parts = [_DIR_MAGIC, struct.pack("<I", len(self.entries))]
            for name in sorted(self.entries):
                node = self.entries[name]
                parts.append(struct.pack("<H", len(name)))
                parts.append(name)
                if isinstance(node, DirNode):
                    parts.append(bytes([KIND_DIR]))
                    parts.append(node.digest)
                else:
                    parts.append(node.encode())
            self._encoding = b"".join(parts)
        return self._encoding

    @property
    def digest(self) -> bytes:
        if self._digest is None:
            self._digest = blake3.blake3(self.encoding()).digest()
        return self._digest


Node = FileNode | SymlinkNode | DirNode


def valid_name(name: bytes) -> bool:
    """True if ``name`` may be a directory entry: not empty, '.', '..', no '/' or NUL, <= 255 bytes."""
    return bool(name) and name not in (b".", b"..") and b"/" not in name and b"\0" not in name and len(name) <= MAX_NAME


def decode_dir(data: bytes, expected_digest: bytes | None = None) -> dict[bytes, "Node | bytes"]:
    """Decode a directory encoding into ``{name: node}``.

    Child directories are returned as their 32-byte digest (``bytes``), to be resolved by the
    caller. Raises TreeError on any malformation, or if ``expected_digest`` does not match.
    """
    if expected_digest is not None and blake3.blake3(data).digest() != expected_digest:
        raise TreeError("directory object does not match its digest")
    try:
        if not data.startswith(_DIR_MAGIC):
            raise TreeError("not a fimio directory encoding")
        pos = len(_DIR_MAGIC)
        (count,) = struct.unpack_from("<I", data, pos)
        pos += 4
        entries: dict[bytes, Node | bytes] = {}
        previous = None
        for _ in range(count):
            (nlen,) = struct.unpack_from("<H", data, pos)
            pos += 2
            name = data[pos : pos + nlen]
            pos += nlen
            if len(name) != nlen:
                raise TreeError("truncated directory encoding")
            if not valid_name(name):
                raise TreeError(f"invalid entry name {name!r} in directory object")
            if previous is not None and name <= previous:
                raise TreeError("directory entries not strictly sorted")
            previous = name
            kind = data[pos]
            pos += 1
            if kind == KIND_FILE:
                flags = data[pos]
                if flags > 1:
                    raise TreeError("bad file flags")
                (size,) = struct.unpack_from("<Q", data, pos + 1)
                blob = data[pos + 9 : pos + 9 + DIGEST_SIZE]
                if len(blob) != DIGEST_SIZE:
                    raise TreeError("truncated directory encoding")
                pos += 9 + DIGEST_SIZE
                entries[name] = FileNode(blob, size, bool(flags))
            elif kind == KIND_SYMLINK:
                (tlen,) = struct.unpack_from("<H", data, pos)
                target = data[pos + 2 : pos + 2 + tlen]
                if len(target) != tlen or tlen == 0 or tlen > MAX_TARGET or b"\0" in target:
                    raise TreeError("bad symlink target")
                pos += 2 + tlen
                entries[name] = SymlinkNode(target)
            elif kind == KIND_DIR:
                child = data[pos : pos + DIGEST_SIZE]
                if len(child) != DIGEST_SIZE:
                    raise TreeError("truncated directory encoding")
                pos += DIGEST_SIZE
                entries[name] = child
            else:
                raise TreeError(f"unknown node kind {kind}")
        if pos != len(data):
            raise TreeError("trailing bytes after directory encoding")
        return entries
    except (struct.error, IndexError):
        raise TreeError("truncated directory encoding") from None


def iter_dirs(node: Node):
    """Yield every DirNode of a tree, children before parents."""
    if isinstance(node, DirNode):
        for child in node.entries.values():
            yield from iter_dirs(child)
        yield node


def iter_files(node: Node, prefix: bytes = b""):
    """Yield ``(relative path bytes, node)`` for every non-directory node (and the root if it is one)."""
    if isinstance(node, DirNode):
        for name in sorted(node.entries):
            child = node.entries[name]
            yield from iter_files(child, prefix + b"/" + name if prefix else name)
    else:
        yield prefix, node


def blob_sizes(node: Node) -> dict[bytes, int]:
    """``{blob digest: size}`` of every file of a tree (iterative: deep trees need no recursion)."""
    out: dict[bytes, int] = {}
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, DirNode):
            stack.extend(n.entries.values())
        elif isinstance(n, FileNode):
            out[n.blob] = n.size
    return out


def text_blob(node: Node) -> bytes | None:
    """The blob digest of a root that is one plain (non-executable) file, as a text object
    is (spec/store-paths.md §3); None for any other root."""
    return node.blob if isinstance(node, FileNode) and not node.executable else None


def tree_size(node: Node) -> int:
    """Total size of the file contents in the tree."""
    return sum(n.size for _, n in iter_files(node) if isinstance(n, FileNode))


def hash_file(path: str | bytes, chunk: int = 1 << 20) -> tuple[bytes, int]:
    """Return ``(blake3 digest, size)`` of a file, streaming in ``chunk``-sized reads."""
    fd = os.open(path, os.O_RDONLY)
    try:
        expected = os.fstat(fd).st_size
        h = blake3.blake3(max_threads=hash_threads()) if expected > (8 << 20) else blake3.blake3()
        # one reused buffer (flat memory, no allocation per read); a small file takes one
        # read plus the one that sees its end
        buf = bytearray(min(chunk, expected + 1))
        view = memoryview(buf)
        size = 0
        while n := os.readv(fd, [buf]):
            h.update(view[:n])
            size += n
    finally:
        os.close(fd)
    return h.digest(), size


def scan(path: str | os.PathLike, on_file=None) -> Node:
    """Build the tree of the filesystem object at ``path`` (never following symlinks).

    ``on_file(path_bytes, stat_result) -> (blob digest, size)`` hashes (and may store) each
    regular file; the default only hashes. Raises UsageError for a missing path, an
    unreadable file, an invalid name, or a socket/fifo/device anywhere in the tree.
    """
    on_file = on_file or (lambda p, st: hash_file(p))
    root = os.fsencode(path)
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        raise NotFound(f"path '{os.fsdecode(root)}' does not exist", "check the name") from None
    except OSError as e:
        raise UsageError(f"cannot read '{os.fsdecode(root)}': {e.strerror}") from None
    return _scan_entry(root, st, on_file, 0)


def _scan_entry(path: bytes, st: os.stat_result, on_file, depth: int) -> Node:
    mode = st.st_mode
    try:
        if stat.S_ISREG(mode):
            digest, size = on_file(path, st)
            return FileNode(digest, size, bool(mode & 0o100))
        if stat.S_ISLNK(mode):
            target = os.readlink(path)
            if len(target) > MAX_TARGET:
                raise UsageError(f"symlink target too long at '{os.fsdecode(path)}'")
            return SymlinkNode(target)
        if stat.S_ISDIR(mode):
            node = DirNode()
            with os.scandir(path) as it:
                children = [(e.name, e.path, e.stat(follow_symlinks=False)) for e in it]
            entries = node.entries
            if children and depth >= MAX_DEPTH:
                raise UsageError(f"'{os.fsdecode(path)}' has entries nested deeper than {MAX_DEPTH} levels",
                                 "the store's limit (spec/tree.md)")
            for name, child_path, child_st in children:
                if not valid_name(name):
                    raise UsageError(f"invalid file name {name!r} in '{os.fsdecode(path)}'")
                child_mode = child_st.st_mode
                if not stat.S_ISREG(child_mode):
                    entries[name] = _scan_entry(child_path, child_st, on_file, depth + 1)
                    continue
                # regular files, the bulk of a tree, are handled inline (as _scan_entry would)
                try:
                    digest, size = on_file(child_path, child_st)
                except PermissionError:
                    raise UsageError(f"cannot read '{os.fsdecode(child_path)}': permission denied") from None
                except FileNotFoundError:
                    raise UsageError(f"'{os.fsdecode(child_path)}' vanished while reading") from None
                entries[name] = FileNode(digest, size, bool(child_mode & 0o100))
            return node
    except PermissionError:
        raise UsageError(f"cannot read '{os.fsdecode(path)}': permission denied") from None
    except FileNotFoundError:
        raise UsageError(f"'{os.fsdecode(path)}' vanished while reading") from None
    raise UsageError(
        f"'{os.fsdecode(path)}' is a {_kind_name(mode)}; only files, directories and symlinks can be stored"
    )


def _kind_name(mode: int) -> str:
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"


def format_digest(digest: bytes) -> str:
    return "blake3:" + digest.hex()


def parse_digest(text: str) -> bytes:
    """Parse ``blake3:<64 hex>`` (or bare hex) into 32 bytes; UsageError otherwise."""
    hexpart = text[7:] if text.startswith("blake3:") else text
    try:
        raw = bytes.fromhex(hexpart)
    except ValueError:
        raw = b""
    if len(raw) != DIGEST_SIZE:
        raise UsageError(f"invalid digest '{text}'", "expected blake3:<64 hex digits>")
    return raw
