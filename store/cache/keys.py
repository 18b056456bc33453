"""Ed25519 signing keys in Nix's ``name:base64`` form, and what gets signed.

Formats (identical to Nix's ``nix-store --generate-binary-cache-key``):

* secret key: ``<name>:<base64 of 64 bytes>`` -- the 32-byte seed followed by the 32-byte
  public key (libsodium's secret key layout);
* public key: ``<name>:<base64 of 32 bytes>``;
* signature:  ``<name>:<base64 of 64 bytes>``.

A signature is over a *fingerprint* string (``spec/cache.md`` §Signatures):

* store path:  ``fimio-1;<logical path>;blake3:<root hex>;<size>;<sorted logical refs, comma-separated>``
* realisation: ``fimio-realisation-1;<drv hash>;<output>;<logical path>;blake3:<root hex>``
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass

from ..errors import UsageError

_NAME_RE = re.compile(r"[^\s:]+")


def _split(text: str, what: str, size: int) -> tuple[str, bytes]:
    name, sep, b64 = text.strip().partition(":")
    try:
        raw = base64.b64decode(b64, validate=True) if sep else b""
    except (binascii.Error, ValueError):
        raw = b""
    if not sep or not _NAME_RE.fullmatch(name) or len(raw) != size:
        # never a secret key's characters in a message (logs keep them): at most its name
        shown = _abbrev(text) if what != "secret key" else (_abbrev(name) if sep else "…")
        raise UsageError(f"invalid {what} '{shown}'", f"expected <name>:<base64 of {size} bytes>")
    return name, raw


def _abbrev(text: str) -> str:
    text = text.strip().replace("\n", " ")
    return text if len(text) <= 24 else text[:12] + "…"


@dataclass(frozen=True)
class PublicKey:
    name: str
    key: bytes  # 32 bytes

    @classmethod
    def parse(cls, text: str) -> "PublicKey":
        """Parse ``name:base64``; UsageError if malformed."""
        return cls(*_split(text, "public key", 32))

    def __str__(self) -> str:
        return f"{self.name}:{base64.b64encode(self.key).decode()}"

    def verify(self, fingerprint: str, signature: bytes) -> bool:
        """True iff ``signature`` (64 raw bytes) is this key's signature of ``fingerprint``."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            Ed25519PublicKey.from_public_bytes(self.key).verify(signature, fingerprint.encode())
            return True
        except (InvalidSignature, ValueError):
            return False


@dataclass(frozen=True)
class SecretKey:
    name: str
    seed: bytes  # 32 bytes
    public: bytes  # 32 bytes

    @classmethod
    def parse(cls, text: str) -> "SecretKey":
        """Parse a Nix-style secret key; UsageError if malformed or seed and public half disagree."""
        name, raw = _split(text, "secret key", 64)
        key = cls(name, raw[:32], raw[32:])
        if key._private().public_key().public_bytes_raw() != key.public:
            raise UsageError(f"secret key '{name}' is corrupt", "its public half does not match its seed")
        return key

    @classmethod
    def generate(cls, name: str) -> "SecretKey":
        if not _NAME_RE.fullmatch(name):
            raise UsageError(f"invalid key name '{name}'", "use a name without ':' or spaces, e.g. 'team-1'")
        seed = os.urandom(32)
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        public = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
        return cls(name, seed, public)

    def __str__(self) -> str:
        return f"{self.name}:{base64.b64encode(self.seed + self.public).decode()}"

    def _private(self):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return Ed25519PrivateKey.from_private_bytes(self.seed)

    def public_key(self) -> PublicKey:
        return PublicKey(self.name, self.public)

    def sign(self, fingerprint: str) -> str:
        """The signature string ``name:base64`` of ``fingerprint``."""
        sig = self._private().sign(fingerprint.encode())
        return f"{self.name}:{base64.b64encode(sig).decode()}"


def load_secret_key_file(path: str) -> SecretKey:
    """Read a secret key file; UsageError if unreadable or malformed."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise UsageError(f"cannot read secret key file '{path}': {e.strerror}",
                         "give the file 'fimio key generate NAME' wrote") from None
    except UnicodeDecodeError:
        raise UsageError(f"secret key file '{path}' is not text") from None
    try:
        return SecretKey.parse(text)
    except UsageError as e:
        raise UsageError(f"secret key file '{path}': {e.message}", e.hint) from None


class TrustedKeys:
    """The set of public keys a client trusts (``trusted-public-keys``)."""

    def __init__(self, keys=()):
        self.by_name: dict[str, list[PublicKey]] = {}
        for k in keys:
            k = k if isinstance(k, PublicKey) else PublicKey.parse(k)
            self.by_name.setdefault(k.name, []).append(k)

    def __bool__(self) -> bool:
        return bool(self.by_name)

    def verify(self, fingerprint: str, signatures) -> str | None:
        """The name of the first trusted key with a valid signature of ``fingerprint``, else None.

        Malformed signature strings are ignored (they cannot make anything trusted)."""
        for sig in signatures:
            if not isinstance(sig, str):
                continue
            name, sep, b64 = sig.partition(":")
            keys = self.by_name.get(name)
            if not sep or not keys:
                continue
            try:
                raw = base64.b64decode(b64, validate=True)
            except (binascii.Error, ValueError):
                continue
            if base64.b64encode(raw).decode() != b64:
                continue  # one spelling per signature: no slack bits an altered copy could use
            if len(raw) == 64 and any(k.verify(fingerprint, raw) for k in keys):
                return name
        return None


def path_fingerprint(logical_path: str, root: bytes, size: int, logical_refs) -> str:
    """What a store path's signature covers (``spec/cache.md``)."""
    return f"fimio-1;{logical_path};blake3:{root.hex()};{size};{','.join(sorted(logical_refs))}"


def realisation_fingerprint(drv_hash: str, output: str, logical_path: str, root: bytes) -> str:
    """What a realisation's signature covers (``spec/cache.md``)."""
    return f"fimio-realisation-1;{drv_hash};{output};{logical_path};blake3:{root.hex()}"


def add_signature(signatures: list[str], new: str) -> list[str]:
    """``signatures`` with ``new`` added, replacing an older signature by the same key name."""
    name = new.partition(":")[0]
    return sorted([s for s in signatures if s.partition(":")[0] != name] + [new])
