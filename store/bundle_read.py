"""Reading a bundle's bytes (``spec/bundle.md`` §1, §2): the chunk framing, the zstd
stream inside it, exact reads with caps, and the hostile-input checks of record fields.

Everything here raises IntegrityError (exit 4) for malformed input; the whole file is
hashed as it is read, for the trailer check.
"""

from __future__ import annotations

import io
import json

import blake3

from .bundle import CHUNK_HEAD, DIGEST, MAGIC, MAX_CHUNK
from .errors import IntegrityError

_HINT = "the bundle is corrupt, truncated or hostile; nothing was imported"


def bad(what: str) -> IntegrityError:
    return IntegrityError(f"bad bundle: {what}", _HINT)


class Deframer(io.RawIOBase):
    """The zstd stream inside a bundle's chunks, as a readable file; hashes every raw byte
    (magic, chunk heads, payloads, end marker) for the trailer check."""

    def __init__(self, f):
        self.f = f
        self.hash = blake3.blake3()  # single-threaded: AUTO costs far more than it saves on 1 MiB updates
        self.consumed = 0  # bytes of the file read so far
        self.left = 0
        self.done = False
        magic = read_exact_raw(f, len(MAGIC))
        if magic != MAGIC:
            raise bad("not a fimio bundle (wrong magic)" if len(magic) == len(MAGIC) else "truncated")
        self.hash.update(magic)
        self.consumed = len(magic)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.done:
            return 0
        if self.left == 0:
            head = read_exact_raw(self.f, CHUNK_HEAD.size)
            if len(head) != CHUNK_HEAD.size:
                raise bad("truncated")
            self.hash.update(head)
            self.consumed += len(head)
            (n,) = CHUNK_HEAD.unpack(head)
            if n == 0:
                self.done = True
                return 0
            if n > MAX_CHUNK:
                raise bad(f"chunk of {n} bytes, more than the {MAX_CHUNK} allowed")
            self.left = n
        view = memoryview(b)[:min(len(b), self.left)]
        k = self.f.readinto(view)
        if not k:
            raise bad("truncated")
        self.hash.update(view[:k])
        self.consumed += k
        self.left -= k
        return k


class RecordStream:
    """Decompressed bundle records with exact reads."""

    def __init__(self, f):
        import zstandard

        self._zstd = zstandard
        self.raw = Deframer(f)
        reader = zstandard.ZstdDecompressor().stream_reader(self.raw, read_size=1 << 20, read_across_frames=True)
        self._r = io.BufferedReader(reader, buffer_size=1 << 20)

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes, else IntegrityError (truncated or undecodable)."""
        try:
            data = self._r.read(n)
        except self._zstd.ZstdError as e:
            raise bad(f"compressed stream is damaged ({e})") from None
        if len(data) != n:
            raise bad("truncated")
        return data

    def at_end(self) -> bool:
        """True at the end of the record stream (a record head otherwise follows)."""
        try:
            return self._r.peek(1) == b""
        except self._zstd.ZstdError as e:
            raise bad(f"compressed stream is damaged ({e})") from None


def read_exact_raw(f, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = f.read(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def load_json(data: bytes, what: str) -> dict:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: absurd nesting
        raise bad(f"malformed {what}") from None
    if not isinstance(obj, dict):
        raise bad(f"malformed {what}")
    return obj


def hex32(value, what: str) -> bytes:
    """``blake3:<64 lowercase hex>`` as 32 bytes; any other spelling is corrupt (one form
    per digest, so that no flipped bit -- not even a letter's case -- goes unnoticed)."""
    text = value[7:] if isinstance(value, str) and value.startswith("blake3:") else None
    try:
        raw = bytes.fromhex(text) if text is not None else b""
    except ValueError:
        raw = b""
    if len(raw) != DIGEST or raw.hex() != text:
        raise bad(f"bad {what}")
    return raw


def int_field(value, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1 << 62:
        raise bad(f"bad {what}")
    return value


