"""Object keys and the JSON records of the cache layout (``spec/cache.md`` §Layout, §Records).

Every parser here treats its input as hostile: it checks types, sizes and names, and
raises IntegrityError (exit 4) for anything malformed or not matching what was asked for.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from ..errors import IntegrityError, UsageError
from ..paths import StorePath
from .keys import path_fingerprint, realisation_fingerprint

CACHE_INFO_KEY = "fimio-cache.json"
PROTOCOL_VERSION = 1
MAX_CACHE_INFO = 64 << 10
MAX_INFO = 4 << 20
MAX_REALISATION = 64 << 10
# A manifest's size is not signed (the root digest it must produce is): what a reader may
# have to hold before it can tell. 256 MiB describes millions of files.
MAX_MANIFEST = 256 << 20
MAX_OBJECT = 64 << 20  # chunks and packs are at most a few MiB; a bound for the server

_HEX_RE = re.compile(r"[0-9a-f]{64}")
_DRVHASH_RE = re.compile(r"[0-9a-z]{16,128}")
_OUTPUT_RE = re.compile(r"[A-Za-z0-9+\-._?=]{1,64}")


def object_key(kind: str, digest: bytes) -> str:
    """``chunks/``, ``packs/`` or ``trees/`` object: ``<kind>/<2 hex>/<64 hex>.zst``."""
    h = digest.hex()
    return f"{kind}/{h[:2]}/{h}.zst"


def info_key(hash_part: str) -> str:
    return f"info/{hash_part}.json"


def realisation_key(drv_hash: str, output: str) -> str:
    return f"realisations/{drv_hash}!{output}.json"


def log_key(drv_hash: str) -> str:
    return f"logs/{drv_hash}.zst"


def record_key(drv_hash: str, record_id: str) -> str:
    return f"records/{drv_hash}/{record_id}.json"


def check_drv_hash(text: str) -> str:
    if not isinstance(text, str) or not _DRVHASH_RE.fullmatch(text):
        raise UsageError(f"invalid derivation hash '{text}'")
    return text


def check_output(text: str) -> str:
    if not isinstance(text, str) or not _OUTPUT_RE.fullmatch(text):
        raise UsageError(f"invalid output name '{text}'")
    return text


def _bad(what: str, where: str) -> IntegrityError:
    return IntegrityError(f"{what} in '{where}'", "the cache is corrupt or hostile")


def _load_json(data: bytes, where: str) -> dict:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: absurd nesting
        raise _bad("malformed JSON", where) from None
    if not isinstance(obj, dict):
        raise _bad("malformed record", where)
    return obj


def _hex32(value, what: str, where: str) -> bytes:
    text = value[7:] if isinstance(value, str) and value.startswith("blake3:") else value
    if not isinstance(text, str) or not _HEX_RE.fullmatch(text):
        raise _bad(f"bad {what}", where)
    return bytes.fromhex(text)


def _int(value, what: str, where: str, limit: int = 1 << 62) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
        raise _bad(f"bad {what}", where)
    return value


def dumps(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


# ---- fimio-cache.json -----------------------------------------------------------------------


@dataclass
class CacheParams:
    """``fimio-cache.json``: the store directory and the writers' chunking/packing parameters.

    Readers only need ``store_dir``; writers use the rest so that every pusher cuts the same
    content into the same objects (that is what makes re-pushes cheap)."""

    store_dir: str
    large_file: int = 512 << 10  # files this size or bigger are chunked; smaller ones packed
    chunk_min: int = 256 << 10
    chunk_avg: int = 1 << 20
    chunk_max: int = 4 << 20
    pack_min: int = 1 << 20
    pack_max: int = 4 << 20
    pack_anchor: int = 16  # a blob ends a pack (once pack_min is reached) when digest % this == 0
    level: int = 1  # zstd level used by writers

    def to_json(self) -> bytes:
        return dumps({
            "version": PROTOCOL_VERSION, "storeDir": self.store_dir, "compression": "zstd",
            "chunking": {"algorithm": "fastcdc-2020", "largeFile": self.large_file, "minSize": self.chunk_min,
                         "avgSize": self.chunk_avg, "maxSize": self.chunk_max},
            "packing": {"minSize": self.pack_min, "maxSize": self.pack_max, "anchor": self.pack_anchor,
                        "level": self.level},
        })

    @classmethod
    def parse(cls, data: bytes, where: str) -> "CacheParams":
        obj = _load_json(data, where)
        if obj.get("version") != PROTOCOL_VERSION:
            raise UsageError(f"cache '{where}' uses protocol version {obj.get('version')!r}",
                             f"this fimio speaks version {PROTOCOL_VERSION}")
        store_dir = obj.get("storeDir")
        if not isinstance(store_dir, str) or not store_dir.startswith("/"):
            raise _bad("bad storeDir", where)
        p = cls(store_dir)
        ch, pk = obj.get("chunking") or {}, obj.get("packing") or {}
        try:
            p.large_file = _int(ch.get("largeFile", p.large_file), "largeFile", where, 1 << 30)
            p.chunk_min = _int(ch.get("minSize", p.chunk_min), "minSize", where, 1 << 20)
            p.chunk_avg = _int(ch.get("avgSize", p.chunk_avg), "avgSize", where, 4 << 20)
            p.chunk_max = _int(ch.get("maxSize", p.chunk_max), "maxSize", where, 16 << 20)
            p.pack_min = _int(pk.get("minSize", p.pack_min), "pack minSize", where, 64 << 20)
            p.pack_max = _int(pk.get("maxSize", p.pack_max), "pack maxSize", where, 64 << 20)
            p.pack_anchor = max(1, _int(pk.get("anchor", p.pack_anchor), "anchor", where, 1 << 20))
            p.level = _int(pk.get("level", p.level), "level", where, 19)
        except AttributeError:
            raise _bad("bad chunking parameters", where) from None
        if not (64 <= p.chunk_min <= p.chunk_avg <= p.chunk_max) or p.pack_min > p.pack_max:
            raise _bad("inconsistent chunking parameters", where)
        return p


# ---- info/<hash>.json -----------------------------------------------------------------------


@dataclass
class RemoteInfo:
    """``info/<hash>.json``: a store path as a cache holds it (the commit point)."""

    path: StorePath
    root: bytes
    size: int
    references: list[StorePath]
    manifest: bytes  # digest of the uncompressed manifest (trees/ object)
    manifest_size: int
    deriver: str | None = None
    ca: str | None = None
    signatures: list[str] = field(default_factory=list)

    def fingerprint(self, store_dir: str) -> str:
        return path_fingerprint(self.path.logical(store_dir), self.root, self.size,
                                [r.logical(store_dir) for r in self.references])

    def to_json(self, store_dir: str) -> bytes:
        return dumps({
            "version": PROTOCOL_VERSION,
            "path": self.path.logical(store_dir),
            "root": "blake3:" + self.root.hex(),
            "size": self.size,
            "references": sorted(r.logical(store_dir) for r in self.references),
            "deriver": self.deriver,
            "ca": self.ca,
            "manifest": {"digest": "blake3:" + self.manifest.hex(), "size": self.manifest_size},
            "signatures": sorted(self.signatures),
        })

    @classmethod
    def parse(cls, data: bytes, store_dir: str, expected_hash: str, where: str) -> "RemoteInfo":
        """Parse and check an info record; IntegrityError unless well-formed and for ``expected_hash``."""
        obj = _load_json(data, where)
        if obj.get("version") != PROTOCOL_VERSION:
            raise _bad("unknown info version", where)
        path = _store_path(obj.get("path"), store_dir, where)
        if path.hash_part != expected_hash:
            raise IntegrityError(f"'{where}' describes '{obj.get('path')}', not the path asked for",
                                 "the cache is corrupt or hostile")
        refs = obj.get("references")
        if not isinstance(refs, list):
            raise _bad("bad references", where)
        m = obj.get("manifest")
        if not isinstance(m, dict):
            raise _bad("no manifest", where)
        sigs = obj.get("signatures", [])
        if not isinstance(sigs, list) or not all(isinstance(s, str) for s in sigs):
            raise _bad("bad signatures", where)
        deriver, ca = obj.get("deriver"), obj.get("ca")
        if deriver is not None:
            try:
                StorePath.parse(deriver)
            except UsageError:
                raise _bad("bad deriver", where) from None
        if ca not in (None, "source", "text"):
            raise _bad("bad ca", where)
        return cls(
            path=path, root=_hex32(obj.get("root"), "root digest", where),
            size=_int(obj.get("size"), "size", where),
            references=sorted({_store_path(r, store_dir, where) for r in refs}),
            manifest=_hex32(m.get("digest"), "manifest digest", where),
            manifest_size=_int(m.get("size"), "manifest size", where, MAX_MANIFEST),
            deriver=deriver, ca=ca, signatures=sigs,
        )


def _store_path(text, store_dir: str, where: str) -> StorePath:
    prefix = store_dir + "/"
    if not isinstance(text, str) or not text.startswith(prefix):
        raise _bad(f"path '{str(text)[:80]}' outside store directory '{store_dir}'", where)
    try:
        return StorePath.parse(text[len(prefix):])
    except UsageError:
        raise _bad(f"bad store path '{text[:80]}'", where) from None


# ---- realisations/<drvhash>!<out>.json --------------------------------------------------------


@dataclass
class Realisation:
    """``(derivation hash, output) -> (output path, root digest)``, signed.

    The local database keeps it as ``{"drvHash", "drv", "output", "path", "root",
    "signatures"}`` with base names and a hex root; the cache file has the same fields with
    logical paths plus ``version``."""

    drv_hash: str
    drv: str  # base name of the .drv
    output: str
    path: StorePath
    root: bytes
    signatures: list[str] = field(default_factory=list)

    def fingerprint(self, store_dir: str) -> str:
        return realisation_fingerprint(self.drv_hash, self.output, self.path.logical(store_dir), self.root)

    @property
    def key(self) -> str:
        return realisation_key(self.drv_hash, self.output)

    def to_local(self) -> bytes:
        return dumps({"drvHash": self.drv_hash, "drv": self.drv, "output": self.output, "path": self.path.base,
                      "root": self.root.hex(), "signatures": sorted(self.signatures)})

    @classmethod
    def from_local(cls, data: bytes) -> "Realisation":
        r = json.loads(data)
        return cls(r["drvHash"], r["drv"], r["output"], StorePath.parse(r["path"]), bytes.fromhex(r["root"]),
                   list(r.get("signatures", [])))

    def to_json(self, store_dir: str) -> bytes:
        return dumps({"version": PROTOCOL_VERSION, "drvHash": self.drv_hash, "drv": f"{store_dir}/{self.drv}",
                      "output": self.output, "path": self.path.logical(store_dir),
                      "root": "blake3:" + self.root.hex(), "signatures": sorted(self.signatures)})

    @classmethod
    def parse(cls, data: bytes, store_dir: str, drv_hash: str, output: str, where: str) -> "Realisation":
        obj = _load_json(data, where)
        if obj.get("version") != PROTOCOL_VERSION:
            raise _bad("unknown realisation version", where)
        if obj.get("drvHash") != drv_hash or obj.get("output") != output:
            raise IntegrityError(f"'{where}' is for another derivation output", "the cache is corrupt or hostile")
        sigs = obj.get("signatures", [])
        if not isinstance(sigs, list) or not all(isinstance(s, str) for s in sigs):
            raise _bad("bad signatures", where)
        drv = _store_path(obj.get("drv"), store_dir, where)
        return cls(drv_hash, drv.base, output, _store_path(obj.get("path"), store_dir, where),
                   _hex32(obj.get("root"), "root digest", where), sigs)
