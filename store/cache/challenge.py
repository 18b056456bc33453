"""Compare what caches and the local store claim for the same outputs (``fimio challenge``).

For a derivation output the claim is its realisation (output path -> root digest); for a
plain store path it is the info record's root digest. Each claim is marked *trusted* when
it carries a valid signature by a key in ``trusted-public-keys`` (the local store's own
records are trusted). Outputs *disagree* when two trusted claims name different root
digests: somebody's build was not reproducible, or somebody lies. Untrusted claims are
reported but never decide anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import FimioError, IntegrityError
from ..paths import StorePath
from ..threadpool import ThreadPool
from .keys import TrustedKeys
from .layout import MAX_INFO, MAX_REALISATION, Realisation, RemoteInfo, info_key, realisation_key


@dataclass
class Claim:
    source: str  # "local" or a cache URL
    root: bytes | None  # None: absent
    trusted: bool = False
    error: str | None = None  # unreachable, malformed, ...


@dataclass
class Comparison:
    what: str  # "<drv hash>!<output>" or the logical store path
    path: StorePath
    claims: list[Claim] = field(default_factory=list)

    @property
    def roots(self) -> set[bytes]:
        return {c.root for c in self.claims if c.root is not None and c.trusted}

    @property
    def agree(self) -> bool:
        return len(self.roots) <= 1


def compare(store, backends, keys, items, require_sigs: bool = True) -> list[Comparison]:
    """``items``: ``[(drv hash | None, output | None, StorePath)]``. ``backends``: opened caches.
    Returns one Comparison per item, claims in the order local, then ``backends``."""
    trusted = keys if isinstance(keys, TrustedKeys) else TrustedKeys(keys)
    out = []
    for drv_hash, output, path in items:
        what = f"{drv_hash}!{output}" if drv_hash else store.logical(path)
        comp = Comparison(what, path, [_local_claim(store, drv_hash, output, path)])
        with ThreadPool(max_workers=max(1, len(backends))) as pool:
            comp.claims += list(pool.map(lambda b: _remote_claim(store, b, trusted, require_sigs,
                                                                 drv_hash, output, path), backends))
        out.append(comp)
    return out


def _local_claim(store, drv_hash, output, path) -> Claim:
    if drv_hash:
        with store.db.read() as txn:
            data = txn.get(f"{drv_hash}!{output}".encode(), db=store.db.dbs["realisations"])
        if data is not None:
            return Claim("local", Realisation.from_local(bytes(data)).root, True)
    info = store.query(path)
    return Claim("local", info.root if info is not None else None, True)


def _remote_claim(store, backend, trusted, require_sigs, drv_hash, output, path) -> Claim:
    store_dir = store.store_dir
    try:
        if drv_hash:
            key = realisation_key(drv_hash, output)
            data = backend.get(key, MAX_REALISATION)
            if data is None:
                return Claim(backend.url, None)
            record = Realisation.parse(data, store_dir, drv_hash, output, f"{backend.url}/{key}")
            if record.path != path:
                return Claim(backend.url, None, False, f"names another path: {record.path.logical(store_dir)}")
        else:
            key = info_key(path.hash_part)
            data = backend.get(key, MAX_INFO)
            if data is None:
                return Claim(backend.url, None)
            record = RemoteInfo.parse(data, store_dir, path.hash_part, f"{backend.url}/{key}")
    except IntegrityError as e:
        return Claim(backend.url, None, False, e.message)
    except FimioError as e:
        return Claim(backend.url, None, False, e.message)
    signed = trusted.verify(record.fingerprint(store_dir), record.signatures) is not None
    return Claim(backend.url, record.root, signed or not require_sigs,
                 None if signed or not require_sigs else "not signed by a trusted key")
