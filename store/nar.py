"""Nix archives (NAR): a canonical, byte-exact serialisation of a filesystem object.

``dump`` writes exactly what ``nix-store --dump`` writes; ``restore`` reads an archive
back into a tree, refusing anything that is not the canonical serialisation of a tree
(see ``spec/nar.md``). Because restore only accepts canonical archives, every archive
it accepts satisfies ``dump(restore(nar)) == nar``: a NAR's hash is a tree's identity.

The format, in one breath: every item is a *string* -- a little-endian u64 length, the
bytes, then zero padding up to a multiple of 8. An archive is ``"nix-archive-1"``
followed by one node::

    node  = "(" "type" ( "regular" ["executable" ""] "contents" <bytes>
                       | "symlink" "target" <target>
                       | "directory" { "entry" "(" "name" <name> "node" node ")" } )
            ")"

with directory entries in strictly increasing byte order of their names.
"""

from __future__ import annotations

import ctypes
import errno
import io
import os
import shutil
import stat
from typing import BinaryIO, Iterator, NamedTuple

from . import fsutil
from .errors import IntegrityError, NotFound, UsageError
from .tree import MAX_DEPTH  # bounds the open-fd stack in restore and recursion in dump

MAGIC = b"nix-archive-1"

MAX_NAME = 255  # NAME_MAX: longer names cannot be created on Linux filesystems
MAX_TARGET = 4095  # PATH_MAX - 1: the longest target symlink(2) accepts
MAX_TOKEN = 64  # every keyword is far shorter; a long "token" is garbage
MAX_SIZE = 2**63 - 1  # off_t: no file can be larger

_CHUNK = 1 << 20  # unit of streamed file contents (flat memory)
_FLUSH_AT = 1 << 18  # header buffer size that triggers a write
_SENDFILE_MIN = 1 << 16  # below this, a read() into the buffer beats a flush + sendfile
_PAD = [b"\0" * ((8 - i) % 8) for i in range(8)]

# Node kinds reported by iter_entries.
REGULAR = "regular"
SYMLINK = "symlink"
DIRECTORY = "directory"
END_DIRECTORY = "end-directory"


class NarError(IntegrityError):
    """A malformed, non-canonical or hostile archive. The message names the problem."""

    default_hint = "only a whole, canonical archive as 'fimio dump' or 'nix-store --dump' writes it is restored"


_NEW_DIR_HINT = "name a directory that does not exist yet"


def _str(data: bytes) -> bytes:
    """One NAR string: u64 LE length, the bytes, zero padding to 8."""
    return len(data).to_bytes(8, "little") + data + _PAD[len(data) & 7]


# Pre-serialised fragments: dump only ever concatenates these with names, targets
# and file contents.
_MAGIC = _str(MAGIC)
_OPEN, _CLOSE = _str(b"("), _str(b")")
_NODE_TYPE = _OPEN + _str(b"type")
_REGULAR = _NODE_TYPE + _str(b"regular") + _str(b"contents")
_EXECUTABLE = _NODE_TYPE + _str(b"regular") + _str(b"executable") + _str(b"") + _str(b"contents")
_SYMLINK = _NODE_TYPE + _str(b"symlink") + _str(b"target")
_DIRECTORY = _NODE_TYPE + _str(b"directory")
_ENTRY = _str(b"entry") + _OPEN + _str(b"name")
_NODE = _str(b"node")

_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: if a file is swapped for a fifo between listing and open, do not hang.
_O_READ_FILE = _O_READ | os.O_NONBLOCK
_O_READ_DIR = _O_READ | os.O_DIRECTORY
_O_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _show(data: bytes) -> str:
    """A name or token for an error message: printable, escaped, not too long."""
    text = repr(data.decode("utf-8", "backslashreplace"))[1:-1]
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- dump


def dump(path: str | os.PathLike | bytes, out: BinaryIO) -> int:
    """Write the NAR of the filesystem object at ``path`` to ``out``; return the byte count.

    The output is byte-identical to ``nix-store --dump path``. ``path`` itself is not
    followed if it is a symlink. Regular files are executable iff their owner-execute
    bit is set; other metadata (times, owners, other mode bits) is not recorded.
    Directory entries are written in byte order of their (``os.fsencode``) names.

    ``out`` is any binary writable object. When it is a real OS file (``io.FileIO`` or
    a buffered wrapper of one, e.g. ``open(p, "wb")`` or ``sys.stdout.buffer``) writes
    go straight to its descriptor and large file contents use ``sendfile``. Memory use
    does not depend on file sizes.

    Raises ``NotFound`` if ``path`` does not exist; ``UsageError`` for an object that
    cannot be archived (socket, fifo, device -- the message names it), for nesting
    deeper than ``MAX_DEPTH``, or for a file that shrank while being read (whatever was
    written to ``out`` by then must be discarded). Other ``OSError``s propagate.
    """
    path = os.fsdecode(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise NotFound(f"NAR: cannot archive '{path}': no such file or directory") from None
    sink = _Sink(out)
    sink.buf += _MAGIC
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        sink.buf += _SYMLINK + _str(os.readlink(os.fsencode(path))) + _CLOSE
    elif stat.S_ISREG(mode):
        sink.regular(os.open(path, _O_READ_FILE), path)
    elif stat.S_ISDIR(mode):
        dfd = os.open(path, _O_READ_DIR)
        try:
            sink.buf += _DIRECTORY
            sink.directory(dfd, path, 0)
            sink.buf += _CLOSE
        finally:
            os.close(dfd)
    else:
        raise _unsupported(path, mode)
    sink.finish()
    return sink.count


def _unsupported(path: str, mode: int) -> UsageError:
    kinds = {stat.S_IFSOCK: "a socket", stat.S_IFIFO: "a fifo", stat.S_IFCHR: "a character device",
             stat.S_IFBLK: "a block device"}
    what = kinds.get(stat.S_IFMT(mode), "of an unknown type")
    return UsageError(f"NAR: cannot archive '{path}': it is {what} "
                      "(only regular files, symlinks and directories can be archived)")


def _real_fd(out) -> int | None:
    """The OS descriptor behind ``out`` if writing to it directly is equivalent to ``out.write``.

    Only plain OS files qualify: wrappers such as ``gzip.GzipFile`` also have a
    ``fileno()``, but it is the *compressed* file's, so bypassing them would be wrong.
    """
    raw = out.raw if isinstance(out, (io.BufferedWriter, io.BufferedRandom)) else out
    if isinstance(raw, io.FileIO) and not raw.closed:
        return raw.fileno()
    return None


def _write_fd(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class _Sink:
    """Collects output and writes it in few system calls.

    Headers accumulate in the small bytearray ``buf``; file contents are not copied
    into it but queued as separate pieces, and ``flush`` hands everything to the
    kernel with one ``writev``. Big file contents bypass Python entirely (sendfile).
    """

    def __init__(self, out: BinaryIO):
        self.out = out
        self.fd = _real_fd(out)
        if self.fd is not None:
            out.flush()  # whatever ``out`` buffered must precede our direct writes
        self.use_sendfile = self.fd is not None
        self.buf = bytearray()
        self.pieces: list[bytes] = []  # sealed output awaiting flush, in order
        self.pending = 0  # bytes in pieces
        self.count = 0  # bytes handed to out

    def seal(self) -> None:
        if self.buf:
            self.pieces.append(bytes(self.buf))
            self.pending += len(self.buf)
            self.buf.clear()

    def full(self) -> bool:
        # IOV_MAX is 1024; callers add at most a few pieces between checks.
        return self.pending + len(self.buf) >= _FLUSH_AT or len(self.pieces) >= 512

    def flush(self) -> None:
        self.seal()
        if not self.pieces:
            return
        if self.fd is not None:
            written = os.writev(self.fd, self.pieces)
            if written < self.pending:  # rare (signals, odd fds): finish byte-wise
                _write_fd(self.fd, b"".join(self.pieces)[written:])
        else:
            data = memoryview(b"".join(self.pieces))
            while data:
                n = self.out.write(data)
                if n is None:
                    raise BlockingIOError(errno.EAGAIN, "NAR: output would block")
                data = data[n:]
        self.count += self.pending
        self.pieces.clear()
        self.pending = 0

    def finish(self) -> None:
        self.flush()
        if self.fd is not None and self.out.seekable():
            # Resynchronise a buffered wrapper's idea of the position with the fd's.
            self.out.seek(os.lseek(self.fd, 0, os.SEEK_CUR))

    def regular(self, fd: int, path: str, name: bytes | None = None) -> None:
        """Append a complete regular-file node for the open ``fd``; closes ``fd``.

        ``path`` (joined with ``name`` if given) is only for error messages, and is
        built only when one is raised: joining paths per file is measurable.
        """
        try:
            st = os.fstat(fd)  # of what we opened: no window for a swap after the check
            if not stat.S_ISREG(st.st_mode):
                raise _unsupported(_child(path, name), st.st_mode)
            size = st.st_size
            self.buf += _EXECUTABLE if st.st_mode & stat.S_IXUSR else _REGULAR
            self.buf += size.to_bytes(8, "little")
            offset = 0
            if size >= _SENDFILE_MIN and self.use_sendfile:
                offset = self._sendfile(fd, size, path, name)
            self._copy(fd, offset, size, path, name)
            self.buf += _PAD[size & 7]
            self.buf += _CLOSE
        finally:
            os.close(fd)

    def _sendfile(self, fd: int, size: int, path: str, name: bytes | None) -> int:
        """Copy contents in the kernel; return how far it got (size, or less on fallback)."""
        self.flush()
        offset = 0
        try:
            while offset < size:
                sent = os.sendfile(self.fd, fd, offset, min(size - offset, 1 << 30))
                if sent == 0:
                    raise _shrunk(_child(path, name))
                offset += sent
                self.count += sent
        except OSError:
            # e.g. an O_APPEND output: fall back to read/write from where we got to.
            self.use_sendfile = False
            os.lseek(fd, offset, os.SEEK_SET)
        return offset

    def _copy(self, fd: int, offset: int, size: int, path: str, name: bytes | None) -> None:
        remaining = size - offset
        while remaining:
            chunk = os.read(fd, min(remaining, _CHUNK))
            if not chunk:
                raise _shrunk(_child(path, name))
            self.seal()
            self.pieces.append(chunk)
            self.pending += len(chunk)
            remaining -= len(chunk)
            if self.full():
                self.flush()

    def directory(self, dfd: int, path: str, depth: int) -> None:
        """Append the entries of the open directory ``dfd`` at ``depth`` (root: 0), not
        its header or close."""
        # One scandir per directory; d_type spares an lstat per entry.
        with os.scandir(dfd) as it:
            entries = sorted((os.fsencode(e.name), e) for e in it)
        if entries and depth >= MAX_DEPTH:  # restore would refuse the entries' depth
            raise UsageError(f"NAR: cannot archive '{path}': nested deeper than {MAX_DEPTH} levels")
        buf = self.buf
        for name, entry in entries:
            buf += _ENTRY
            buf += _str(name)
            buf += _NODE
            if entry.is_symlink():
                buf += _SYMLINK
                buf += _str(os.readlink(name, dir_fd=dfd))
                buf += _CLOSE
            elif entry.is_file(follow_symlinks=False):
                self.regular(_open_at(dfd, name, _O_READ_FILE, path), path, name)
            elif entry.is_dir(follow_symlinks=False):
                sub = _open_at(dfd, name, _O_READ_DIR, path)
                try:
                    buf += _DIRECTORY
                    self.directory(sub, _child(path, name), depth + 1)
                    buf += _CLOSE
                finally:
                    os.close(sub)
            else:
                raise _unsupported(_child(path, name), entry.stat(follow_symlinks=False).st_mode)
            buf += _CLOSE
            if self.full():
                self.flush()


def _child(path: str, name: bytes | None) -> str:
    return path if name is None else os.path.join(path, os.fsdecode(name))


def _open_at(dfd: int, name: bytes, flags: int, path: str) -> int:
    """Open ``name`` in the open directory ``dfd`` (at ``path``); an error names the whole path."""
    try:
        return os.open(name, flags, dir_fd=dfd)
    except OSError as e:
        raise type(e)(e.errno, e.strerror, _child(path, name)) from None


def _shrunk(path: str) -> UsageError:
    return UsageError(f"NAR: '{path}' shrank while it was being archived")


# ------------------------------------------------------------------------ parsing


class NarEntry(NamedTuple):
    """One event of :func:`iter_entries`.

    ``kind`` is REGULAR, SYMLINK, DIRECTORY (a directory starts; its entries follow)
    or END_DIRECTORY (the directory at ``path`` is complete). ``path`` is the tuple of
    entry names from the root (``()`` for the root). For REGULAR, ``chunks`` yields the
    ``size`` content bytes and must be consumed before the next event (whatever is not
    consumed is skipped, still checked).
    """

    kind: str
    path: tuple[bytes, ...]
    executable: bool = False
    size: int = 0
    target: bytes = b""
    chunks: Iterator[bytes] | None = None


class _Reader:
    """Reads NAR strings from a stream, tracking the offset for error messages."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.pos = 0

    def exact(self, n: int) -> bytes:
        data = self.stream.read(n)
        if data is None or len(data) < n:  # raw streams and pipes may return short reads
            parts, got = [data or b""], len(data or b"")
            while got < n:
                more = self.stream.read(n - got)
                if not more:
                    raise NarError(f"NAR: archive truncated at byte {self.pos + got}")
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        self.pos += n
        return data

    def u64(self) -> int:
        return int.from_bytes(self.exact(8), "little")

    def padding(self, n: int) -> None:
        pad = -n & 7
        if pad and self.exact(pad) != _PAD[8 - pad]:
            raise NarError(f"NAR: non-zero padding at byte {self.pos - pad}")

    def string(self, limit: int, what: str) -> bytes:
        start = self.pos
        n = self.u64()
        if n > limit:
            raise NarError(f"NAR: {what} length {n} at byte {start} exceeds the limit of {limit}")
        data = self.exact(n)
        self.padding(n)
        return data

    def token(self) -> bytes:
        return self.string(MAX_TOKEN, "token")

    def expect(self, token: bytes) -> None:
        start = self.pos
        got = self.token()
        if got != token:
            raise NarError(f"NAR: expected '{token.decode()}' at byte {start}, got '{_show(got)}'")

    def contents(self, size: int) -> Iterator[bytes]:
        remaining = size
        while remaining:
            chunk = self.stream.read(min(remaining, _CHUNK))
            if not chunk:
                raise NarError(f"NAR: archive truncated at byte {self.pos} "
                               f"({remaining} bytes of file contents missing)")
            self.pos += len(chunk)
            remaining -= len(chunk)
            yield chunk
        self.padding(size)

    def end(self) -> None:
        if self.stream.read(1):
            raise NarError(f"NAR: trailing data after the archive at byte {self.pos}")


def _check_name(name: bytes, previous: bytes | None, start: int) -> None:
    """Entry names must be single path components, strictly increasing (length is
    capped when the name is read)."""
    if name in (b"", b".", b"..") or b"/" in name or b"\0" in name:
        raise NarError(f"NAR: entry name '{_show(name)}' at byte {start} is not allowed")
    if previous is not None and name <= previous:
        what = "duplicate" if name == previous else "unsorted"
        raise NarError(f"NAR: {what} entry name '{_show(name)}' at byte {start} "
                       f"(after '{_show(previous)}'; names must be strictly increasing)")


def _check_target(target: bytes, start: int) -> None:
    # Any other target is fine: restore never follows symlinks, so '..' or an
    # absolute target cannot make it write outside dest.
    if not target or b"\0" in target:
        raise NarError(f"NAR: symlink target at byte {start} is empty or contains NUL")


def _regular(r: _Reader, path: tuple[bytes, ...]) -> Iterator[NarEntry]:
    """The rest of a regular node, after "type" "regular". Only the canonical form."""
    start = r.pos
    token = r.token()
    executable = token == b"executable"
    if executable:
        if r.token() != b"":
            raise NarError(f"NAR: 'executable' at byte {start} must be followed by an empty string")
        start = r.pos
        token = r.token()
    if token != b"contents":
        raise NarError(f"NAR: expected 'contents' at byte {start}, got '{_show(token)}'")
    start = r.pos
    size = r.u64()
    if size > MAX_SIZE:
        raise NarError(f"NAR: file size {size} at byte {start} is absurd")
    chunks = r.contents(size)
    yield NarEntry(REGULAR, path, executable, size, chunks=chunks)
    for _ in chunks:  # skip (and check) what the consumer left
        pass
    r.expect(b")")


def iter_entries(stream: BinaryIO) -> Iterator[NarEntry]:
    """Parse a NAR from ``stream``, yielding a :class:`NarEntry` per node, in order.

    Every check of the format lives here (restore only materialises): wrong magic,
    unknown or misplaced tokens, non-canonical forms, bad or unsorted names, absurd
    lengths, non-zero padding, truncation and trailing data all raise :class:`NarError`.
    Events are yielded as soon as they are known, so a consumer may already have acted
    on earlier ones when a later error is found. Iterative, so nesting costs no stack.
    """
    r = _Reader(stream)
    if r.u64() != len(MAGIC) or r.exact(len(MAGIC)) != MAGIC or r.exact(3) != b"\0\0\0":
        raise NarError("NAR: bad magic (not a Nix archive, or an unsupported version)")
    stack: list[list] = []  # [path, last entry name] of each directory being parsed
    path: tuple[bytes, ...] = ()
    while True:
        r.expect(b"(")
        r.expect(b"type")
        start = r.pos
        kind = r.token()
        if kind == b"regular":
            yield from _regular(r, path)
        elif kind == b"symlink":
            r.expect(b"target")
            start = r.pos
            target = r.string(MAX_TARGET, "symlink target")
            _check_target(target, start)
            r.expect(b")")
            yield NarEntry(SYMLINK, path, target=target)
        elif kind == b"directory":
            yield NarEntry(DIRECTORY, path)
            stack.append([path, None])
        else:
            raise NarError(f"NAR: unknown node type '{_show(kind)}' at byte {start}")
        # Close finished nodes and entries until the next entry begins or the root ends.
        finished = kind != b"directory"
        while stack:
            if finished:
                r.expect(b")")  # the "entry" wrapping the node just finished
            start = r.pos
            token = r.token()
            if token == b")":
                yield NarEntry(END_DIRECTORY, stack.pop()[0])
                finished = True
                continue
            if token != b"entry":
                raise NarError(f"NAR: expected 'entry' or ')' at byte {start}, got '{_show(token)}'")
            r.expect(b"(")
            r.expect(b"name")
            start = r.pos
            name = r.string(MAX_NAME, "entry name")
            _check_name(name, stack[-1][1], start)
            stack[-1][1] = name
            r.expect(b"node")
            path = stack[-1][0] + (name,)
            if len(path) > MAX_DEPTH:
                raise NarError(f"NAR: directories nested deeper than {MAX_DEPTH} levels")
            break
        else:
            r.end()
            return


# ------------------------------------------------------------------------ restore


def restore(stream: BinaryIO, dest: str | os.PathLike | bytes) -> None:
    """Materialise the NAR read from ``stream`` at ``dest``, all or nothing.

    ``dest`` must not exist (``UsageError``) and its parent must be a directory
    (``UsageError``). The tree is built in a fresh sibling (:func:`fsutil.sibling_tmp`)
    and renamed onto ``dest`` (without replacing anything) only once the whole archive
    was parsed and written; on any error the temporary tree is removed and the error
    re-raised, so ``dest`` is untouched. Malformed, non-canonical or hostile archives
    raise :class:`NarError` (see :func:`iter_entries`); environmental failures (disk
    full, permissions) raise ``OSError``.

    Every object is created exclusively (``O_EXCL``, ``mkdir``, ``symlink``) relative to
    its parent's directory fd, and directories are opened with ``O_NOFOLLOW``, so no
    path through a restored symlink is ever used. Modes are Nix's: 0o755 for
    executables and directories, 0o644 for other files, whatever the umask.
    """
    dest = os.fsdecode(dest).rstrip("/") or "/"
    if os.path.lexists(dest):
        raise UsageError(f"NAR: cannot restore to '{dest}': it already exists", _NEW_DIR_HINT)
    parent = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(parent):
        raise UsageError(f"NAR: cannot restore to '{dest}': '{parent}' is not a directory")
    builder = _Builder(fsutil.sibling_tmp(dest, sweep=True))
    try:
        for entry in iter_entries(stream):
            builder.add(entry)
        _rename_noreplace(builder.tmp, dest)
    except BaseException:
        builder.abort()
        raise


class _Builder:
    """Creates the objects of a parsed archive under the fresh path ``tmp``."""

    def __init__(self, tmp: str):
        self.tmp = tmp
        self.fds: list[int] = []  # directory fds from the root down to the current directory
        self.created = False  # whether tmp is ours (and so ours to remove)

    def add(self, entry: NarEntry) -> None:
        if entry.kind == END_DIRECTORY:
            os.close(self.fds.pop())
            return
        if not entry.path:  # the root: created at tmp itself, exclusively
            self._create(entry, self.tmp, None)
            return
        try:
            self._create(entry, entry.path[-1], self.fds[-1])
        except FileExistsError:
            # Names are unique byte-wise, so only a case-insensitive (or normalising)
            # filesystem gets here: two entries map to one file.
            raise NarError(f"NAR: entry '{_show(entry.path[-1])}' collides with another entry "
                           "on this filesystem (case-insensitive?)") from None

    def _create(self, entry: NarEntry, name, dfd: int | None) -> None:
        """Create ``name`` in the directory ``dfd`` (or the path ``name`` if None)."""
        if entry.kind == REGULAR:
            fd = os.open(name, _O_CREATE, 0o600, dir_fd=dfd)
            self.created = True
            try:
                for chunk in entry.chunks:
                    _write_fd(fd, chunk)
                os.fchmod(fd, 0o755 if entry.executable else 0o644)  # not umask-dependent
            finally:
                os.close(fd)
        elif entry.kind == SYMLINK:
            os.symlink(entry.target, name, dir_fd=dfd)
            self.created = True
        else:
            os.mkdir(name, 0o700, dir_fd=dfd)
            self.created = True
            fd = os.open(name, _O_READ_DIR, dir_fd=dfd)
            self.fds.append(fd)
            os.fchmod(fd, 0o755)

    def abort(self) -> None:
        """Close every fd and remove whatever was created."""
        while self.fds:
            os.close(self.fds.pop())
        if self.created:
            _remove(self.tmp)


def _remove(path: str) -> None:
    """Remove what restore created at ``path`` (a tree, file or symlink)."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path)  # fd-based on Linux: does not follow symlinks
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


_libc = None


def _rename_noreplace(src: str, dst: str) -> None:
    """rename(2) that fails instead of replacing ``dst`` (plain rename replaces an empty dir)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(_libc, "renameat2", None)
    if renameat2 is not None:
        at_fdcwd, rename_noreplace = -100, 1
        if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise UsageError(f"NAR: cannot restore to '{dst}': it already exists", _NEW_DIR_HINT)
        if err not in (errno.EINVAL, errno.ENOSYS):  # else: unsupported here, fall back
            raise OSError(err, os.strerror(err), dst)
    if os.path.lexists(dst):
        raise UsageError(f"NAR: cannot restore to '{dst}': it already exists", _NEW_DIR_HINT)
    os.rename(src, dst)
