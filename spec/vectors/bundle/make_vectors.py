#!/usr/bin/env python3
"""Generate the bundle test vectors of spec/bundle.md §8.

* ``simple.bundle``: the tree below, added to a fresh store (store dir ``/fimio/store``) and
  exported by ``fimio.store.bundle.export_bundle`` signed by the vector key. ``vectors.json``
  pins its path, root digest and the blake3 of its decompressed record stream: a change to
  the format or to the exporter's order changes them. (The trailer's digest covers the
  compressed bytes, which depend on the zstd library, so it is not pinned.)
* ``hostile-*.bundle``: crafted record by record with ``BundleWriter`` and signed by the
  vector key (trusted), so that each is refused for the one reason its name gives.

The secret key is derived from a fixed seed: it is a test key, never trust it anywhere.

Usage: python spec/vectors/bundle/make_vectors.py [--check]
  (no flag: rewrite the files; --check: exit 1 if vectors.json is not what it would write)
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import sys
import tempfile

import blake3

HERE = pathlib.Path(__file__).resolve().parent
STORE_DIR = "/fimio/store"

# name -> (kind, content): "f" file, "x" executable file, "l" symlink, "d" directory
TREE = {
    "a.txt": ("f", "hello\n"),
    "b.txt": ("f", "hello\n"),  # same blob as a.txt
    "run": ("x", "#!/bin/sh\necho run\n"),
    "empty": ("f", ""),
    "link": ("l", "a.txt"),
    "sub": ("d", {"c.txt": ("f", "deep\n"), "more": ("d", {"d.bin": ("f", "\x00\x01\x02" * 1000)})}),
}


def vector_key(seed: str = "fimio-bundle-vector-key"):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fimio.store.cache.keys import SecretKey

    raw = blake3.blake3(seed.encode()).digest()
    public = Ed25519PrivateKey.from_private_bytes(raw).public_key().public_bytes_raw()
    name = "vector-1" if seed == "fimio-bundle-vector-key" else "untrusted-1"
    return SecretKey(name, raw, public)


def write_tree(dest: str, tree: dict) -> None:
    os.mkdir(dest)
    for name, (kind, content) in tree.items():
        p = os.path.join(dest, name)
        if kind == "d":
            write_tree(p, content)
        elif kind == "l":
            os.symlink(content, p)
        else:
            with open(p, "wb") as f:
                f.write(content.encode("latin-1"))
            os.chmod(p, 0o755 if kind == "x" else 0o644)


def stream_digest(path: str) -> str:
    """blake3 of the decompressed record stream of a bundle file (chunks unwrapped, every
    zstd frame decoded)."""
    import zstandard

    from fimio.store.bundle import CHUNK_HEAD, MAGIC

    payload = io.BytesIO()
    with open(path, "rb") as f:
        assert f.read(len(MAGIC)) == MAGIC
        while True:
            (n,) = CHUNK_HEAD.unpack(f.read(CHUNK_HEAD.size))
            if n == 0:
                break
            payload.write(f.read(n))
    payload.seek(0)
    reader = zstandard.ZstdDecompressor().stream_reader(payload, read_across_frames=True)
    return blake3.blake3(reader.read()).hexdigest()


def export_simple(out_dir: str, work: str) -> dict:
    """Add TREE to a fresh store under ``work`` and export it to ``out_dir/simple.bundle``."""
    from fimio.store.bundle_export import ExportPlan, export_bundle
    from fimio.store.local import LocalStore

    src = os.path.join(work, "vector-tree")
    write_tree(src, TREE)
    store = LocalStore(os.path.join(work, "root"), STORE_DIR)
    try:
        info = store.add_path(src, "vector-tree")
        out = os.path.join(out_dir, "simple.bundle")
        with open(out, "wb") as f:
            export_bundle(store, ExportPlan([info.path]), f, [vector_key()])
        return {"file": "simple.bundle", "path": store.logical(info.path), "root": "blake3:" + info.root.hex(),
                "size": info.size, "stream": stream_digest(out)}
    finally:
        store.close()


# ---- hostile bundles ----------------------------------------------------------------------------


def _craft(root_node, blobs: dict, *, key=None, size_delta=0, blob_extra=0, dirs=None, blob_flip=False,
           dir_length=None, name="hostile") -> bytes:
    """A one-path bundle for ``root_node`` (a DirNode whose encodings may be malformed),
    signed by ``key`` so that only the planted defect can make an importer refuse it."""
    from fimio.store.bundle import T_DIR, T_HEADER, T_PATH, RECORD_HEAD, BundleWriter, canonical
    from fimio.store.cache.keys import path_fingerprint
    from fimio.store.paths import source_path
    from fimio.store.tree import DirNode

    key = key or vector_key()
    all_dirs, stack = [], [root_node]
    while stack:
        d = stack.pop()
        if isinstance(d, DirNode):
            all_dirs.append(d)
            stack.extend(d.entries[n] for n in sorted(d.entries, reverse=True))
    path = source_path(STORE_DIR, name, root_node.digest).logical(STORE_DIR)
    size = sum(len(b) for b in blobs.values()) + size_delta
    info = {"path": path, "root": "blake3:" + root_node.digest.hex(), "size": size, "references": [],
            "deriver": None, "ca": "source", "node": {"type": "directory"},
            "signatures": [key.sign(path_fingerprint(path, root_node.digest, size, []))],
            "dirs": len(all_dirs) if dirs is None else dirs, "blobs": len(blobs)}
    buf = io.BytesIO()
    w = BundleWriter(buf)
    w.record(T_HEADER, canonical({"format": "fimio-bundle", "version": 1, "storeDir": STORE_DIR, "paths": 1}))
    w.record(T_PATH, canonical(info))
    for d in all_dirs[: info["dirs"]]:
        if dir_length is not None:  # a length far beyond the cap, and not that many bytes
            w._emit(RECORD_HEAD.pack(T_DIR, dir_length))
            w.records += 1
            break
        w.record(T_DIR, d.encoding())
    for digest, data in blobs.items():
        body = data + b"!" * blob_extra
        if blob_flip:
            body = bytes([body[0] ^ 1]) + body[1:]
        w.blob(digest, len(body), [body])
    w.finish([key])
    return buf.getvalue()


def hostile_bundles() -> dict[str, tuple[bytes, str]]:
    from fimio.store.tree import DirNode, FileNode

    data = b"payload\n"
    digest = blake3.blake3(data).digest()
    out = {}

    def tree(name: bytes):
        inner = DirNode({b"f": FileNode(digest, len(data), False)})
        return DirNode({name: inner})

    out["traversal-dotdot"] = (_craft(tree(b".."), {digest: data}), "a directory entry named '..'")
    out["traversal-slash"] = (_craft(tree(b"../../etc"), {digest: data}), "a directory entry containing '/'")
    ok = tree(b"ok")
    out["size-lie-blob"] = (_craft(ok, {digest: data}, blob_extra=16),
                            "a blob record longer than the size its tree declares")
    out["size-lie-info"] = (_craft(ok, {digest: data}, size_delta=1), "a signed size that the tree does not add up to")
    out["size-lie-dir"] = (_craft(ok, {digest: data}, dir_length=1 << 40),
                           "a directory record declaring 1 TiB, more than the cap")
    out["blob-mismatch"] = (_craft(ok, {digest: data}, blob_flip=True), "blob bytes that do not match their digest")
    out["missing-dir"] = (_craft(ok, {digest: data}, dirs=1), "fewer directory records than the tree names")
    out["untrusted-key"] = (_craft(ok, {digest: data}, key=vector_key("untrusted")),
                            "well formed, signed by a key that is not trusted")
    return out


def generate(out_dir: str) -> dict:
    with tempfile.TemporaryDirectory() as work:
        simple = export_simple(out_dir, work)
    key = vector_key()
    hostile = []
    for name, (data, why) in sorted(hostile_bundles().items()):
        fname = f"hostile-{name}.bundle"
        with open(os.path.join(out_dir, fname), "wb") as f:
            f.write(data)
        hostile.append({"file": fname, "why": why, "stream": stream_digest(os.path.join(out_dir, fname))})
    return {
        "comment": "spec/bundle.md §8; regenerate with make_vectors.py. The secret key is a public test key.",
        "storeDir": STORE_DIR,
        "secretKey": str(key),
        "publicKey": str(key.public_key()),
        "untrustedPublicKey": str(vector_key("untrusted").public_key()),
        "simple": simple,
        "hostile": hostile,
    }


def main(argv) -> int:
    check = "--check" in argv
    if check:
        with tempfile.TemporaryDirectory() as tmp:
            got = generate(tmp)
        with open(HERE / "vectors.json") as f:
            want = json.load(f)
        if got != want:
            print("vectors.json is out of date: run make_vectors.py", file=sys.stderr)
            return 1
        return 0
    vectors = generate(str(HERE))
    with open(HERE / "vectors.json", "w") as f:
        json.dump(vectors, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {HERE / 'vectors.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
