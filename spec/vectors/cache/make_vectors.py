#!/usr/bin/env python3
"""Generate ``vectors.json`` for ``spec/cache.md``; ``tests/test_cache_formats.py`` pins it.

    python spec/vectors/cache/make_vectors.py           # print
    python spec/vectors/cache/make_vectors.py --write   # rewrite vectors.json

Everything here is deterministic: a fixed test key (seed = bytes 0..31), a sample tree built
in memory, and the writer's default parameters. Ed25519 signatures are deterministic too.
The key and signatures are checked independently with ``cryptography`` below.
"""

from __future__ import annotations

import base64
import json
import os
import sys

import blake3


def sample_tree():
    """``(root DirNode, {blob digest: bytes})``: small files, a chunked one, an empty file,
    an executable, a symlink, a duplicate, nested and empty directories."""
    from fimio.store.tree import DirNode, FileNode, SymlinkNode

    blobs = {}

    def f(data: bytes, executable=False):
        d = blake3.blake3(data).digest()
        blobs[d] = data
        return FileNode(d, len(data), executable)

    big = blake3.blake3(b"fimio cache vector").digest(length=3_000_000)  # XOF: deterministic, incompressible
    lib = DirNode({b"a.py": f(b"print('a')\n"), b"b.py": f(b"print('b')\n" * 50), b"empty": DirNode()})
    root = DirNode({
        b"README": f(b"hello\n"),
        b"bin": DirNode({b"tool": f(b"#!/bin/sh\necho tool\n", True)}),
        b"big.bin": f(big),
        b"copy-of-README": f(b"hello\n"),
        b"empty.txt": f(b""),
        b"lib": lib,
        b"link": SymlinkNode(b"README"),
    })
    return root, blobs


def build() -> dict:
    from fimio.store.cache import packing
    from fimio.store.cache.keys import SecretKey, path_fingerprint, realisation_fingerprint
    from fimio.store.cache.layout import CacheParams, Realisation, RemoteInfo
    from fimio.store.cache.manifest import Chunk, LargeBlob, Manifest, Pack
    from fimio.store.paths import StorePath, source_path

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    store_dir = "/fimio/store"
    seed = bytes(range(32))
    public = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
    secret_text = "test-1:" + base64.b64encode(seed + public).decode()
    key = SecretKey.parse(secret_text)
    assert str(key.public_key()) == "test-1:" + base64.b64encode(public).decode()

    params = CacheParams(store_dir)
    root, blobs = sample_tree()
    order = packing.blob_order(root)
    small, large = packing.split_blobs(order, params.large_file)
    packs = [Pack(packing.pack_id(b), b) for b in packing.plan_packs(small, params)]
    large_blobs = []
    for digest, size in large:
        lb = LargeBlob(digest, size)
        for c in packing.chunker(params).cut_buf(blobs[digest]):
            lb.chunks.append(Chunk(blake3.blake3(c.data).digest(), c.length))
        large_blobs.append(lb)
    manifest = Manifest(root, params.large_file, packs, large_blobs).encode()

    ref = StorePath.parse("0c6kzph7l0dcbgmjx4v1gzdf8bx6al6j-dep")
    path = source_path(store_dir, "sample", root.digest, [ref])
    from fimio.store.tree import tree_size

    info = RemoteInfo(path, root.digest, tree_size(root), [ref], blake3.blake3(manifest).digest(), len(manifest),
                      None, "source", [])
    fp = info.fingerprint(store_dir)
    assert fp == path_fingerprint(path.logical(store_dir), root.digest, info.size, [ref.logical(store_dir)])
    info.signatures = [key.sign(fp)]
    sig = base64.b64decode(info.signatures[0].split(":", 1)[1])
    Ed25519PrivateKey.from_private_bytes(seed).public_key().verify(sig, fp.encode())  # independent check

    drv_hash = blake3.blake3(b"sample derivation").hexdigest()
    real = Realisation(drv_hash, "1b4ljv3pxkxkgvydvlsidc2xhd7s7bvq-sample.drv", "out", path, root.digest)
    rfp = real.fingerprint(store_dir)
    assert rfp == realisation_fingerprint(drv_hash, "out", path.logical(store_dir), root.digest)
    real.signatures = [key.sign(rfp)]

    pack_raw = packing.pack_header(packs[0].blobs) + b"".join(blobs[d] for d, _ in packs[0].blobs)
    return {
        "storeDir": store_dir,
        "key": {"seedHex": seed.hex(), "secret": secret_text, "public": str(key.public_key())},
        "cacheJson": params.to_json().decode(),
        "tree": {
            "rootDigest": "blake3:" + root.digest.hex(),
            "size": info.size,
            "blobOrder": [[d.hex(), n] for d, n in order],
            "packs": [{"id": p.digest.hex(), "key": f"packs/{p.digest.hex()[:2]}/{p.digest.hex()}.zst",
                       "blobs": [d.hex() for d, _ in p.blobs], "rawSize": p.raw_size} for p in packs],
            "firstPackRawHex": pack_raw.hex(),
            "largeBlobs": [{"digest": b.digest.hex(), "chunks": [[c.digest.hex(), c.raw_size] for c in b.chunks]}
                           for b in large_blobs],
            "manifestDigest": blake3.blake3(manifest).hexdigest(),
            "manifestSize": len(manifest),
            "manifestHead": manifest[:64].hex(),
        },
        "info": {"key": f"info/{path.hash_part}.json", "fingerprint": fp, "json": info.to_json(store_dir).decode()},
        "realisation": {"key": real.key, "fingerprint": rfp, "json": real.to_json(store_dir).decode()},
    }


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(here, "..", "..", ".."))
    text = json.dumps(build(), indent=1, sort_keys=True) + "\n"
    if "--write" in sys.argv:
        with open(os.path.join(here, "vectors.json"), "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
