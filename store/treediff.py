"""File-level comparison of two store trees: which files differ, were added or removed.

Used by ``fimio diff`` on outputs and sources, and by ``--check`` reports. The walk is a
Merkle walk over the ``trees`` sub-database: a directory whose digest is equal on both
sides is skipped without being decoded, so two 50,000-file outputs that differ in ten
files cost a few dozen directory decodes, not 100,000 entries. File contents are read
from the materialised store only for files that differ (first differing offset, and a
unified diff for small UTF-8 text), and only for the first ``detail_limit`` of them.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field

from .tree import DirNode, FileNode, Node, SymlinkNode, decode_dir, scan

TEXT_DIFF_LIMIT = 64 * 1024  # bytes per side for a unified diff
DIFF_LINES_LIMIT = 200  # lines of one unified diff kept in a report
DETAIL_LIMIT = 50  # changed files whose contents are read for offsets and text diffs
_READ = 1 << 20
_C_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\"": "\\\"", "\\": "\\\\"}


def shown(name: str) -> str:
    """``name`` (decoded with surrogateescape) fit for one line of a report: verbatim when
    printable, else double-quoted with C escapes (``\\n``, ``\\t``, ``\\xNN`` for an ASCII
    control character or a byte that is not UTF-8, ``\\uNNNN`` for another unprintable
    character), in the manner of ``ls --quoting-style=c``. A name that starts with ``"`` is
    quoted too, so distinct names are always shown distinctly."""
    if name.isprintable() and not name.startswith('"'):
        return name
    return quoted(name)


def quoted(name: str) -> str:
    """``name`` double-quoted with the escapes of :func:`shown`."""
    out = []
    for ch in name:
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:  # a byte that was not UTF-8
            out.append(f"\\x{o - 0xDC00:02x}")
        elif ch in _C_ESCAPES:
            out.append(_C_ESCAPES[ch])
        elif not ch.isprintable():  # \xNN above 7f always means a byte that was not UTF-8
            out.append(f"\\x{o:02x}" if o < 0x80 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


@dataclass
class Side:
    """One side of a comparison: a root node, and where its files can be read (if anywhere).

    ``root`` is a node, or the 32-byte digest of a directory held in the ``trees`` database.
    ``physical`` is the materialised path of that root, or None when only digests are known.
    """

    root: "Node | bytes"
    physical: str | None
    label: str = ""


@dataclass
class FileChange:
    """One difference between two trees, at ``path`` (relative, '' for the root itself)."""

    path: str
    change: str  # "changed" | "added" | "removed" | "type" | "executable" | "symlink"
    kind: tuple[str | None, str | None] = (None, None)  # file / symlink / directory per side
    size: tuple[int | None, int | None] = (None, None)  # file size, or bytes under a directory
    files: tuple[int | None, int | None] = (None, None)  # for directories: number of files
    target: tuple[str | None, str | None] = (None, None)  # for symlinks
    first_difference: int | None = None  # byte offset of the first differing byte
    unified: str | None = None  # unified diff of small UTF-8 text files
    note: str | None = None  # why there is no text diff ("binary", "larger than 64 KiB")
    blob: tuple[str | None, str | None] = (None, None)  # blake3 hex of file contents
    executable: tuple[bool | None, bool | None] = (None, None)

    def to_json(self) -> dict:
        return {
            "path": self.path or ".",
            "change": self.change,
            "kind": list(self.kind),
            "size": list(self.size),
            "files": list(self.files),
            "target": list(self.target),
            "blob": list(self.blob),
            "executable": list(self.executable),
            "firstDifference": self.first_difference,
            "unifiedDiff": self.unified,
            "note": self.note,
        }

    def headline(self) -> str:
        """One line: what changed at this path."""
        where = shown(self.path) if self.path else "(the output itself)"
        a, b = self.size
        if self.change == "changed":
            off = "" if self.first_difference is None else f", first difference at byte {self.first_difference}"
            return f"{where}: contents differ ({a} vs {b} bytes{off})"
        if self.change in ("added", "removed"):
            kind = self.kind[1] if self.change == "added" else self.kind[0]
            size = b if self.change == "added" else a
            count = self.files[1] if self.change == "added" else self.files[0]
            extra = f"{count} files, {size} bytes" if kind == "directory" else (
                f"-> {shown(self.target[1] if self.change == 'added' else self.target[0])}" if kind == "symlink"
                else f"{size} bytes")
            return f"{where}: {'only in B' if self.change == 'added' else 'only in A'} ({kind}, {extra})"
        if self.change == "executable":
            mode = ["executable" if e else "not executable" for e in self.executable]
            return f"{where}: same contents, but {mode[0]} in A and {mode[1]} in B"
        if self.change == "symlink":
            return f"{where}: symlink target differs ({shown(self.target[0])} vs {shown(self.target[1])})"
        return f"{where}: a {self.kind[0]} in A, a {self.kind[1]} in B"


@dataclass
class TreeDiff:
    """The differences between two trees, sorted by path; ``identical`` when there are none."""

    changes: list[FileChange] = field(default_factory=list)
    detailed: int = 0  # how many changes had their contents compared

    @property
    def identical(self) -> bool:
        return not self.changes

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.changes:
            out[c.change] = out.get(c.change, 0) + 1
        return out

    def summary(self) -> str:
        if not self.changes:
            return "no file differs"
        names = {"changed": "differ", "added": "only in B", "removed": "only in A", "type": "change type",
                 "executable": "change mode", "symlink": "change target"}
        n = len(self.changes)
        parts = [f"{k} {names[c]}" for c, k in sorted(self.counts().items())]
        return f"{n} path{'s' if n != 1 else ''}: " + ", ".join(parts)

    def to_json(self) -> dict:
        return {"identical": self.identical, "counts": self.counts(), "changes": [c.to_json() for c in self.changes]}


def side_of(store, info, label: str = "") -> Side:
    """The Side of a valid store path: its registered tree (lazily), read from the store."""
    with store.db.read() as txn:
        is_dir = txn.get(info.root, db=store.db.dbs["trees"]) is not None
    physical = store.physical(info.path)
    root = info.root if is_dir else scan(physical)
    return Side(root, physical, label)


def compare(store, a: Side, b: Side, detail_limit: int = DETAIL_LIMIT) -> TreeDiff:
    """Compare two trees; equal subtrees (same digest) are never decoded. See the module doc."""
    diff = TreeDiff()
    with store.db.read() as txn:
        tdb = store.db.dbs["trees"]

        def entries(ref):
            if isinstance(ref, DirNode):
                return ref.entries
            return decode_dir(txn.get(ref, db=tdb), ref)

        def walk(x, y, prefix: str) -> None:
            if _same(x, y):
                return
            kx, ky = _kind(x), _kind(y)
            if kx == "directory" and ky == "directory":
                ex, ey = entries(x), entries(y)
                for name in sorted(set(ex) | set(ey)):
                    sub = f"{prefix}/{os.fsdecode(name)}" if prefix else os.fsdecode(name)
                    cx, cy = ex.get(name), ey.get(name)
                    if cx is None:
                        diff.changes.append(_one_sided(cy, sub, "added", entries))
                    elif cy is None:
                        diff.changes.append(_one_sided(cx, sub, "removed", entries))
                    else:
                        walk(cx, cy, sub)
                return
            change = FileChange(prefix, "type", kind=(kx, ky))
            if kx == ky == "file":
                change.size = (x.size, y.size)
                change.blob = (x.blob.hex(), y.blob.hex())
                change.executable = (x.executable, y.executable)
                if x.blob == y.blob:
                    change.change = "executable"
                else:
                    change.change = "changed"
            elif kx == ky == "symlink":
                change.change = "symlink"
                change.target = (os.fsdecode(x.target), os.fsdecode(y.target))
            else:
                change.size = (_size(x, entries), _size(y, entries))
            diff.changes.append(change)

        walk(a.root, b.root, "")
    if a.physical and b.physical:
        for change in diff.changes:
            if change.change != "changed":
                continue
            if diff.detailed >= detail_limit:
                break
            _content_detail(change, a.physical, b.physical)
            diff.detailed += 1
    return diff


def _same(x, y) -> bool:
    if isinstance(x, bytes) and isinstance(y, bytes):
        return x == y
    if isinstance(x, DirNode) or isinstance(y, DirNode):
        dx = x if isinstance(x, bytes) else x.digest if isinstance(x, DirNode) else None
        dy = y if isinstance(y, bytes) else y.digest if isinstance(y, DirNode) else None
        return dx is not None and dx == dy
    return x == y


def _kind(node) -> str:
    if isinstance(node, (bytes, DirNode)):
        return "directory"
    return "file" if isinstance(node, FileNode) else "symlink"


def _size(node, entries) -> int | None:
    if isinstance(node, FileNode):
        return node.size
    if isinstance(node, SymlinkNode):
        return None
    return sum(n.size for n in _files(node, entries))


def _files(node, entries):
    if isinstance(node, FileNode):
        yield node
    elif isinstance(node, (bytes, DirNode)):
        for child in entries(node).values():
            yield from _files(child, entries)


def _one_sided(node, path: str, change: str, entries) -> FileChange:
    kind = _kind(node)
    c = FileChange(path, change)
    i = 1 if change == "added" else 0
    pair = lambda v: (None, v) if i else (v, None)  # noqa: E731
    c.kind = pair(kind)
    if kind == "file":
        c.size = pair(node.size)
        c.blob = pair(node.blob.hex())
    elif kind == "symlink":
        c.target = pair(os.fsdecode(node.target))
    else:
        files = list(_files(node, entries))
        c.size = pair(sum(f.size for f in files))
        c.files = pair(len(files))
    return c


def _content_detail(change: FileChange, root_a: str, root_b: str) -> None:
    """Fill in the first differing offset and, for small UTF-8 text, a unified diff."""
    pa = os.path.join(root_a, change.path) if change.path else root_a
    pb = os.path.join(root_b, change.path) if change.path else root_b
    try:
        change.first_difference = first_difference(pa, pb)
        sa, sb = change.size
        if sa is not None and sb is not None and sa <= TEXT_DIFF_LIMIT and sb <= TEXT_DIFF_LIMIT:
            with open(pa, "rb") as f:
                da = f.read()
            with open(pb, "rb") as f:
                db = f.read()
            change.unified, change.note = text_diff(da, db, change.path or "out")
        else:
            change.note = f"larger than {TEXT_DIFF_LIMIT // 1024} KiB: no text diff"
    except OSError as e:
        change.note = f"contents not readable: {e.strerror}"


def first_difference(pa: str, pb: str) -> int | None:
    """Offset of the first byte that differs between two files (the shorter length if one is a prefix)."""
    offset = 0
    with open(pa, "rb", buffering=0) as fa, open(pb, "rb", buffering=0) as fb:
        while True:
            ca, cb = fa.read(_READ), fb.read(_READ)
            if ca != cb:
                n = min(len(ca), len(cb))
                i = next((j for j in range(n) if ca[j] != cb[j]), n)
                return offset + i
            if not ca:
                return None
            offset += len(ca)


def text_diff(da: bytes, db: bytes, name: str) -> tuple[str | None, str | None]:
    """``(unified diff, None)`` for UTF-8 text, else ``(None, reason)``."""
    if b"\0" in da or b"\0" in db:
        return None, "binary: no text diff"
    try:
        ta, tb = da.decode(), db.decode()
    except UnicodeDecodeError:
        return None, "not UTF-8: no text diff"
    lines = list(difflib.unified_diff(ta.splitlines(keepends=True), tb.splitlines(keepends=True),
                                      *_diff_headers(name), n=3))
    out = [line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in lines]
    text = "".join(out)
    kept = text.splitlines(keepends=True)
    if len(kept) > DIFF_LINES_LIMIT:
        text = "".join(kept[:DIFF_LINES_LIMIT]) + f"... ({len(kept) - DIFF_LINES_LIMIT} more lines)\n"
    return text, None


def _diff_headers(name: str) -> tuple[str, str]:
    """``a/NAME`` and ``b/NAME``, quoted as a whole when NAME needs quoting (as git does)."""
    if shown(name) == name:
        return f"a/{name}", f"b/{name}"
    return quoted(f"a/{name}"), quoted(f"b/{name}")


def render(diff: TreeDiff, indent: str = "  ", limit: int = 100) -> list[str]:
    """Readable lines: one headline per change, unified diffs indented beneath."""
    lines: list[str] = []
    for change in diff.changes[:limit]:
        lines.append(indent + change.headline())
        if change.unified:
            lines.extend(indent + "    " + line for line in change.unified.rstrip("\n").splitlines())
        elif change.note and change.change == "changed":
            lines.append(indent + "    (" + change.note + ")")
    if len(diff.changes) > limit:
        lines.append(indent + f"... and {len(diff.changes) - limit} more")
    return lines
