"""Store paths: ``<store-dir>/<hashpart>-<name>``.

The hash part is 32 characters of Nix's base-32 alphabet over the first 160 bits of
blake3 of a typed fingerprint (``spec/store-paths.md``). Nothing here touches the disk.
"""

from __future__ import annotations

import functools
import re

import blake3

from .errors import UsageError
from .values import Value

NIX_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"
HASH_PART_LEN = 32
_NAME_RE = re.compile(r"[A-Za-z0-9+\-._?=]+")
_HASH_RE = re.compile(f"[{NIX_BASE32}]{{{HASH_PART_LEN}}}")


def nix_base32(data: bytes) -> str:
    """Nix's base-32 encoding (least significant 5-bit group first, as ``nix-hash --to-base32``)."""
    n = int.from_bytes(data, "little")
    length = (len(data) * 8 + 4) // 5
    return "".join(NIX_BASE32[(n >> (5 * i)) & 31] for i in reversed(range(length)))


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid store path name, else raise UsageError."""
    if not name or len(name) > 211 or name.startswith(".") or not _NAME_RE.fullmatch(name):
        raise UsageError(
            f"invalid store path name '{name}'",
            "names use A-Z a-z 0-9 + - . _ ? = and do not start with '.'",
        )
    return name


def is_hash_part(text: str) -> bool:
    return bool(_HASH_RE.fullmatch(text))


@functools.total_ordering  # <=, >, >= from < and ==, each NotImplemented for another type
class StorePath(Value):
    """A store path's base name ``<hashpart>-<name>``, independent of the store directory.
    Ordered by hash part, then name. Immutable by convention (it is hashed by value)."""

    __slots__ = ("hash_part", "name")

    def __init__(self, hash_part: str, name: str):
        self.hash_part, self.name = hash_part, name

    def __lt__(self, other: "StorePath") -> bool:
        if type(other) is not StorePath:
            return NotImplemented
        return (self.hash_part, self.name) < (other.hash_part, other.name)

    @classmethod
    def parse(cls, base: str) -> "StorePath":
        """Parse ``<hashpart>-<name>``; UsageError if malformed."""
        hash_part, sep, name = base.partition("-")
        if not sep or not is_hash_part(hash_part):
            raise UsageError(f"'{base}' is not a store path name", "expected <32-char hash>-<name>")
        check_name(name)
        return cls(hash_part, name)

    @property
    def base(self) -> str:
        return f"{self.hash_part}-{self.name}"

    def __str__(self) -> str:
        return self.base

    def logical(self, store_dir: str) -> str:
        return f"{store_dir}/{self.base}"


def fingerprint_hash(kind: str, store_dir: str, name: str, *parts: str) -> str:
    """The hash part for a typed fingerprint ``fimio-path-1:<kind>:<store_dir>:<name>:<parts...>``."""
    text = ":".join(("fimio-path-1", kind, store_dir, name, *parts))
    return nix_base32(blake3.blake3(text.encode()).digest()[:20])


def source_path(store_dir: str, name: str, root_digest: bytes, references=()) -> StorePath:
    """The store path of content added by ``fimio add`` (content-addressed)."""
    check_name(name)
    refs = ",".join(sorted(str(r) for r in references))
    return StorePath(fingerprint_hash("source", store_dir, name, root_digest.hex(), refs), name)


def text_path(store_dir: str, name: str, content_digest: bytes, references=()) -> StorePath:
    """The store path of a text object such as a ``.drv`` file (content-addressed)."""
    check_name(name)
    refs = ",".join(sorted(str(r) for r in references))
    return StorePath(fingerprint_hash("text", store_dir, name, content_digest.hex(), refs), name)


def content_address_error(store_dir: str, path: StorePath, ca, root_digest: bytes, text_blob: bytes | None,
                          references) -> str | None:
    """Why ``path``, which claims to be content-addressed (``ca`` "source" or "text"), is not
    the path its content and ``references`` give; None when it is, or when it is input-
    addressed (``ca`` None: only a signature can vouch for those). A source path is
    addressed by its root digest; a text object is one plain file, addressed by the digest
    of its bytes: ``text_blob`` (``tree.text_blob`` of the root; None if it is no such file)."""
    if ca == "source":
        content = root_digest
    elif ca == "text":
        if text_blob is None:
            return "is a text object but not a plain file"
        content = text_blob
    else:
        return None
    make = source_path if ca == "source" else text_path
    if make(store_dir, path.name, content, references) != path:
        return f"is not the {ca} path its contents and references give (spec/store-paths.md §3)"
    return None


def output_path(store_dir: str, drv_name: str, drv_hash: str, output: str) -> StorePath:
    """The input-addressed path of derivation output ``output`` (``<name>`` or ``<name>-<output>``)."""
    name = drv_name if output == "out" else f"{drv_name}-{output}"
    check_name(name)
    return StorePath(fingerprint_hash("output", store_dir, name, drv_hash, output), name)
