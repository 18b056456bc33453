#!/usr/bin/env python3
"""Generate ``trees.json``: test vectors for spec/tree.md and spec/store-paths.md.

The digests are computed by a small independent implementation of the two specs (below,
using only ``blake3``), then cross-checked against ``fimio.store`` (each tree is built on
disk and scanned) and, for Nix base-32, against the real ``nix-hash --to-base32``.
Any disagreement aborts, so the file only ever holds values three sides agree on.

Usage: python spec/vectors/make_tree_vectors.py [--check]
  (no flag: rewrite trees.json; --check: exit 1 if the file is not what it would write)

Tree descriptions (JSON):
  {"type": "file", "text": "...", "executable": false}   (or "hex": "..." instead of "text")
  {"type": "symlink", "target": "..."}
  {"type": "directory", "entries": {"<name>": <node>, ...}}   (names are UTF-8)
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import tempfile

import blake3

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE / "trees.json"
STORE_DIR = "/fimio/store"
ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"


# ---- the independent implementation of spec/tree.md ------------------------------------

def b3(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def contents(desc: dict) -> bytes:
    return bytes.fromhex(desc["hex"]) if "hex" in desc else desc["text"].encode()


def kind_bytes(desc: dict, dirs: dict, path: str) -> bytes:
    """The per-kind bytes of a node (FILE, LINK, or kind 3 + digest), registering dir encodings."""
    if desc["type"] == "file":
        data = contents(desc)
        return bytes([1, 1 if desc.get("executable") else 0]) + struct.pack("<Q", len(data)) + b3(data)
    if desc["type"] == "symlink":
        target = desc["target"].encode()
        return bytes([2]) + struct.pack("<H", len(target)) + target
    return bytes([3]) + dir_digest(desc, dirs, path)


def dir_digest(desc: dict, dirs: dict, path: str) -> bytes:
    entries = sorted((name.encode(), node) for name, node in desc["entries"].items())
    enc = b"fimio-dir-1\0" + struct.pack("<I", len(entries))
    for name, node in entries:
        child = f"{path}/{name.decode()}" if path != "." else name.decode()
        enc += struct.pack("<H", len(name)) + name + kind_bytes(node, dirs, child)
    dirs[path] = enc.hex()
    return b3(enc)


def root_digest(desc: dict, dirs: dict) -> tuple[bytes, bytes | None]:
    """(root digest, the bytes hashed for a file/symlink root or None for a directory)."""
    if desc["type"] == "directory":
        return dir_digest(desc, dirs, "."), None
    magic = b"fimio-file-1\0" if desc["type"] == "file" else b"fimio-link-1\0"
    preimage = magic + kind_bytes(desc, dirs, ".")
    return b3(preimage), preimage


def nixbase32(data: bytes) -> str:
    n = int.from_bytes(data, "little")
    length = (len(data) * 8 + 4) // 5
    return "".join(ALPHABET[(n >> (5 * (length - 1 - k))) & 31] for k in range(length))


def fingerprint(kind: str, name: str, part1: str, part2: str) -> str:
    return f"fimio-path-1:{kind}:{STORE_DIR}:{name}:{part1}:{part2}"


def hash_part(fp: str) -> str:
    return nixbase32(b3(fp.encode())[:20])


# ---- the sample trees -------------------------------------------------------------------

def F(text=None, hex=None, x=False):
    d = {"type": "file", "executable": x}
    if hex is not None:
        d["hex"] = hex
    else:
        d["text"] = text
    return d


def L(target):
    return {"type": "symlink", "target": target}


def D(**entries):
    return {"type": "directory", "entries": entries}


def D_(entries: dict):
    return {"type": "directory", "entries": entries}


TREES = [
    ("single-file", F("hello, world\n")),
    ("empty-file", F("")),
    ("exec-file", F("#!/bin/sh\necho hi\n", x=True)),
    ("binary-file", F(hex="00ff10fe8081c3a9000a")),
    ("symlink-root", L("target/does/not/exist")),
    ("empty-dir", D()),
    ("small-tree", D_({
        "a": F("a\n"),
        "bin": D(run=F("#!/bin/sh\n", x=True)),
        "empty": D(),
        "l": L("a"),
    })),
    ("sorted-names", D_({name: F(name + "\n") for name in
                         ["b", "B", "a", "ab", "a.b", "a-b", "_", "Z", "é", "日本", "~"]})),
    ("exec-and-not", D_({
        "plain": F("same bytes\n"),
        "exec": F("same bytes\n", x=True),
    })),
    ("identical-subtrees", D_({
        "one": D(file=F("x\n"), link=L("../two/file")),
        "two": D(file=F("x\n"), link=L("../two/file")),
        "three": D(file=F("x\n", x=True), link=L("../two/file")),
        "deep": D(a=D(b=D(c=D(leaf=F(hex=""))))),
    })),
]


# ---- cross-checks -----------------------------------------------------------------------

def build(desc: dict, path: pathlib.Path) -> None:
    if desc["type"] == "file":
        path.write_bytes(contents(desc))
        os.chmod(path, 0o755 if desc.get("executable") else 0o644)
    elif desc["type"] == "symlink":
        os.symlink(desc["target"], path)
    else:
        path.mkdir()
        for name, child in desc["entries"].items():
            build(child, path / name)


def check_against_fimio(name: str, desc: dict, digest: bytes, store_path: str) -> None:
    from fimio.store.paths import source_path
    from fimio.store.tree import scan

    tmp = pathlib.Path(tempfile.mkdtemp())
    try:
        build(desc, tmp / name)
        node = scan(tmp / name)
        if node.digest != digest:
            sys.exit(f"{name}: fimio.store computes {node.digest.hex()}, the spec {digest.hex()}")
        if source_path(STORE_DIR, name, node.digest).logical(STORE_DIR) != store_path:
            sys.exit(f"{name}: store path differs from fimio.store")
    finally:
        shutil.rmtree(tmp)


def nix_hash_base32(algo: str, hexes: list[str]) -> list[str]:
    out = subprocess.run(["nix-hash", "--type", algo, "--to-base32", *hexes],
                         check=True, capture_output=True, text=True).stdout.split()
    assert len(out) == len(hexes)
    return out


def nix_vectors() -> list[dict]:
    import hashlib

    vectors = []
    for algo in ("md5", "sha1", "sha256", "sha512"):
        inputs = [b"", b"abc", b"fimio", bytes(range(256))]
        hexes = [hashlib.new(algo, data).hexdigest() for data in inputs]
        hexes += ["00" * hashlib.new(algo).digest_size, "ff" * hashlib.new(algo).digest_size,
                  "01" + "00" * (hashlib.new(algo).digest_size - 1)]
        for hx, nix in zip(hexes, nix_hash_base32(algo, hexes)):
            ours = nixbase32(bytes.fromhex(hx))
            if ours != nix:
                sys.exit(f"nix base-32 of {hx}: ours {ours}, nix-hash {nix}")
            vectors.append({"algo": algo, "hex": hx, "base32": nix})
    return vectors


def fingerprint_vectors(trees: list[dict]) -> list[dict]:
    """A few typed fingerprints, including references and the other kinds."""
    from fimio.store.paths import StorePath, output_path, source_path, text_path

    tree = {t["name"]: t for t in trees}
    small, single = tree["small-tree"], tree["single-file"]
    ref_a, ref_b = small["store_path"].rsplit("/", 1)[1], single["store_path"].rsplit("/", 1)[1]
    refs = ",".join(sorted([ref_a, ref_b]))
    out = []
    # a source path with references
    root = small["digest"][7:]
    fp = fingerprint("source", "with-refs", root, refs)
    lib = source_path(STORE_DIR, "with-refs", bytes.fromhex(root),
                      [StorePath.parse(ref_b), StorePath.parse(ref_a)])
    out.append({"kind": "source", "name": "with-refs", "fingerprint": fp,
                "path": f"{STORE_DIR}/{hash_part(fp)}-with-refs"})
    assert lib.hash_part == hash_part(fp)
    # a text path (part1 is blake3 of the bytes, not the file-node digest)
    data = b'{"name":"hello"}'
    fp = fingerprint("text", "hello.drv", b3(data).hex(), ref_a)
    lib = text_path(STORE_DIR, "hello.drv", b3(data), [StorePath.parse(ref_a)])
    assert lib.hash_part == hash_part(fp)
    out.append({"kind": "text", "name": "hello.drv", "content_text": data.decode(),
                "fingerprint": fp, "path": f"{STORE_DIR}/{hash_part(fp)}-hello.drv"})
    # outputs: "out" keeps the derivation name, others get a suffix
    for output in ("out", "dev"):
        name = "hello" if output == "out" else f"hello-{output}"
        drv_hash = b3(b"example derivation").hex()
        fp = fingerprint("output", name, drv_hash, output)
        assert output_path(STORE_DIR, "hello", drv_hash, output).hash_part == hash_part(fp)
        out.append({"kind": "output", "drv_name": "hello", "drv_hash": drv_hash, "output": output,
                    "fingerprint": fp, "path": f"{STORE_DIR}/{hash_part(fp)}-{name}"})
    return out


def generate() -> dict:
    trees = []
    for name, desc in TREES:
        dirs: dict[str, str] = {}
        digest, preimage = root_digest(desc, dirs)
        fp = fingerprint("source", name, digest.hex(), "")
        store_path = f"{STORE_DIR}/{hash_part(fp)}-{name}"
        check_against_fimio(name, desc, digest, store_path)
        entry = {"name": name, "tree": desc, "digest": "blake3:" + digest.hex(),
                 "store_path": store_path}
        if preimage is not None:
            entry["node_preimage_hex"] = preimage.hex()
        if dirs:
            entry["dir_encodings_hex"] = dict(sorted(dirs.items()))
        trees.append(entry)
    return {
        "description": "Vectors for spec/tree.md and spec/store-paths.md; generated by "
                       "make_tree_vectors.py. store_path = source_path(store_dir, name, root digest), "
                       "no references. dir_encodings_hex maps each directory (relative path, '.' = root) "
                       "to its canonical encoding; node_preimage_hex is what a file/symlink root digest hashes.",
        "store_dir": STORE_DIR,
        "trees": trees,
        "fingerprints": fingerprint_vectors(trees),
        "nix_base32": nix_vectors(),
    }


def main() -> None:
    text = json.dumps(generate(), indent=1, ensure_ascii=False) + "\n"
    if "--check" in sys.argv[1:]:
        if OUT.read_text() != text:
            sys.exit(f"{OUT} is out of date: run {sys.argv[0]}")
        print(f"{OUT} is up to date")
    else:
        OUT.write_text(text)
        print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
