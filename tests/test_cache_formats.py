"""Cache formats: pinned vectors (spec/vectors/cache/vectors.json), keys (also against Nix),
URLs, and hostile input to every decoder (only the module's own errors may come out)."""

from __future__ import annotations

import json
import pathlib
import subprocess

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fimio.store.cache import manifest as manifest_mod
from fimio.store.cache import packing
from fimio.store.cache.keys import PublicKey, SecretKey, TrustedKeys
from fimio.store.cache.layout import CacheParams, Realisation, RemoteInfo
from fimio.store.cache.url import parse_cache_url
from fimio.store.errors import IntegrityError, UsageError

VECTORS = pathlib.Path(__file__).parent.parent / "spec" / "vectors" / "cache"


def _load_generator():
    """spec/vectors/cache/make_vectors.py under a name of its own (other vector directories
    have a make_vectors.py too; sharing sys.modules' entry would mix them up)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fimio_cache_make_vectors", VECTORS / "make_vectors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_vectors = _load_generator()

V = json.loads((VECTORS / "vectors.json").read_text())
STORE_DIR = V["storeDir"]


def test_vectors_are_reproduced_exactly():
    """Any change to a format, a default parameter or the signing scheme fails here."""
    assert make_vectors.build() == V


def test_vector_key_signs_and_verifies():
    key = SecretKey.parse(V["key"]["secret"])
    assert str(key.public_key()) == V["key"]["public"]
    assert key.seed.hex() == V["key"]["seedHex"]
    info = RemoteInfo.parse(V["info"]["json"].encode(), STORE_DIR, V["info"]["key"][5:-5], "vector")
    assert info.fingerprint(STORE_DIR) == V["info"]["fingerprint"]
    trusted = TrustedKeys([V["key"]["public"]])
    assert trusted.verify(V["info"]["fingerprint"], info.signatures) == "test-1"
    assert trusted.verify(V["info"]["fingerprint"] + "x", info.signatures) is None
    assert TrustedKeys([str(SecretKey.generate("test-1").public_key())]).verify(
        V["info"]["fingerprint"], info.signatures) is None
    drv_hash, _, out = V["realisation"]["key"][len("realisations/"):-5].partition("!")
    r = Realisation.parse(V["realisation"]["json"].encode(), STORE_DIR, drv_hash, out, "vector")
    assert r.fingerprint(STORE_DIR) == V["realisation"]["fingerprint"]
    assert trusted.verify(r.fingerprint(STORE_DIR), r.signatures) == "test-1"


def test_vector_manifest_decodes_and_checks():
    root, blobs = make_vectors.sample_tree()
    t = V["tree"]
    assert "blake3:" + root.digest.hex() == t["rootDigest"]
    raw = bytes.fromhex(t["firstPackRawHex"])
    got = packing.parse_pack(raw, "vector")
    assert [d.hex() for d, _ in got] == t["packs"][0]["blobs"]
    assert packing.pack_id(got).hex() == t["packs"][0]["id"]


def test_keys_interoperate_with_nix(tmp_path):
    """A key made by nix-store --generate-binary-cache-key parses, and derives Nix's public key."""
    from conftest import nix_available

    nix_available("nix-store")
    sk, pk = tmp_path / "sk", tmp_path / "pk"
    subprocess.run(["nix-store", "--generate-binary-cache-key", "nix-test-1", sk, pk], check=True,
                   capture_output=True)
    key = SecretKey.parse(sk.read_text())
    assert str(key.public_key()) == pk.read_text().strip()
    assert PublicKey.parse(pk.read_text()).name == "nix-test-1"


@pytest.mark.parametrize("text", ["", "nocolon", "a:!!!", "a:" + "A" * 10, "a b:AAAA", ":" + "A" * 88])
def test_bad_keys_are_usage_errors(text):
    with pytest.raises(UsageError):
        SecretKey.parse(text)
    with pytest.raises(UsageError):
        PublicKey.parse(text)


def test_secret_key_with_mismatched_halves():
    import base64

    good = SecretKey.generate("k")
    bad = f"k:{base64.b64encode(good.seed + bytes(32)).decode()}"
    with pytest.raises(UsageError, match="corrupt"):
        SecretKey.parse(bad)


@pytest.mark.parametrize("url,scheme,location", [
    ("file:///var/cache/fimio", "file", "/var/cache/fimio"),
    ("file://localhost/c/", "file", "/c"),
    ("http://127.0.0.1:8080", "http", "http://127.0.0.1:8080"),
    ("https://cache.example.org/team/", "https", "https://cache.example.org/team"),
    ("s3://my-bucket/pre/fix?endpoint=http://127.0.0.1:9000&region=eu-west-1", "s3", "pre/fix"),
    ("s3://my-bucket", "s3", ""),
])
def test_good_urls(url, scheme, location):
    u = parse_cache_url(url)
    assert (u.scheme, u.location) == (scheme, location)


@pytest.mark.parametrize("url", [
    "", "cache", "/abs/dir", "ftp://x/y", "file://host/dir", "file:relative", "file:///a/../b",
    "http://", "http://h:notaport", "http://user:pw@h/", "http://h/?q=1", "s3://", "s3://UPPER",
    "s3://b/p?bogus=1", "s3://b/p?endpoint=ftp://x", "s3://b/p?region=", "file:///with space",
])
def test_bad_urls_are_usage_errors(url):
    with pytest.raises(UsageError, match="bad cache URL"):
        parse_cache_url(url)


@pytest.mark.parametrize("url, needle", [
    ("http://user:hunter2@h:8080/c", "put tokens in the config file"),
    ("s3://key:hunter2@bucket/p", "credentials go in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"),
])
def test_credentials_in_a_url_are_refused_saying_where_they_go_and_never_shown(url, needle):
    with pytest.raises(UsageError, match=needle) as e:
        parse_cache_url(url)
    assert "hunter2" not in e.value.message and "…@" in e.value.message  # an error line ends up in CI logs


def test_cache_params_round_trip_and_refusals():
    p = CacheParams.parse(V["cacheJson"].encode(), "v")
    assert p.to_json().decode() == V["cacheJson"]
    with pytest.raises(UsageError, match="protocol version"):
        CacheParams.parse(b'{"version": 99, "storeDir": "/fimio/store"}', "v")
    with pytest.raises(IntegrityError):
        CacheParams.parse(b'{"version": 1, "storeDir": "/s", "chunking": {"minSize": 5}}', "v")


def _sample_manifest():
    root, blobs = make_vectors.sample_tree()
    params = CacheParams(STORE_DIR)
    small, large = packing.split_blobs(packing.blob_order(root), params.large_file)
    packs = [manifest_mod.Pack(packing.pack_id(b), b) for b in packing.plan_packs(small, params)]
    lbs = []
    for d, n in large:
        lb = manifest_mod.LargeBlob(d, n)
        for c in packing.chunker(params).cut_buf(blobs[d]):
            lb.chunks.append(manifest_mod.Chunk(blake3.blake3(c.data).digest(), c.length))
        lbs.append(lb)
    from fimio.store.tree import tree_size

    return root, manifest_mod.Manifest(root, params.large_file, packs, lbs).encode(), tree_size(root)


def test_manifest_round_trip():
    root, data, size = _sample_manifest()
    assert blake3.blake3(data).hexdigest() == V["tree"]["manifestDigest"]
    m = manifest_mod.decode(data, root.digest, size, "m")
    assert m.root.digest == root.digest
    assert m.encode() == data


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_manifest_decoder_only_raises_integrity_errors(data):
    root, enc, size = _sample_manifest()
    mutation = data.draw(st.sampled_from(["flip", "truncate", "extend", "random"]))
    if mutation == "flip":
        i = data.draw(st.integers(0, len(enc) - 1))
        enc = enc[:i] + bytes([enc[i] ^ data.draw(st.integers(1, 255))]) + enc[i + 1:]
    elif mutation == "truncate":
        enc = enc[:data.draw(st.integers(0, len(enc) - 1))]
    elif mutation == "extend":
        enc = enc + data.draw(st.binary(min_size=1, max_size=64))
    else:
        enc = manifest_mod.MAGIC + data.draw(st.binary(max_size=400))
    try:
        m = manifest_mod.decode(enc, root.digest, size, "m")
    except IntegrityError:
        return
    assert m.root.digest == root.digest  # a decode that succeeds is of the signed tree


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_pack_parser_only_raises_integrity_errors(raw):
    try:
        packing.parse_pack(raw, "p")
    except IntegrityError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.dictionaries(st.sampled_from(
    ["version", "path", "root", "size", "references", "manifest", "signatures", "deriver", "ca"]),
    st.one_of(st.none(), st.integers(), st.text(max_size=80), st.lists(st.text(max_size=60), max_size=3),
              st.dictionaries(st.text(max_size=8), st.integers(), max_size=2)), max_size=9).map(
    lambda d: json.dumps(d).encode())))
def test_info_parser_only_raises_integrity_errors(data):
    try:
        RemoteInfo.parse(data, STORE_DIR, "b88jjq6gwhwj6fjnm8zppk58kmq744vx", "i")
    except IntegrityError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=500), st.integers(0, 1 << 20))
def test_decompress_only_raises_integrity_errors(data, size):
    try:
        out = packing.decompress(data, size, "z")
        assert len(out) == size
    except IntegrityError:
        pass


@pytest.mark.parametrize("depth,accepted", [(512, True), (513, False)])
def test_manifest_nesting_is_bounded_by_the_tree_depth_limit(depth, accepted):
    """A manifest is checked against the signed root only; it must still not bring in a tree
    deeper than the store holds (tree.md §3)."""
    from fimio.store.tree import DirNode, FileNode, tree_size

    node = DirNode({b"f": FileNode(blake3.blake3(b"").digest(), 0, False)})
    for _ in range(depth - 1):
        node = DirNode({b"d": node})
    enc = manifest_mod.Manifest(node, CacheParams(STORE_DIR).large_file, [], []).encode()
    if accepted:
        assert manifest_mod.decode(enc, node.digest, tree_size(node), "m").root.digest == node.digest
    else:
        with pytest.raises(IntegrityError, match="deeper than 512"):
            manifest_mod.decode(enc, node.digest, tree_size(node), "m")


def test_absurdly_nested_json_is_an_integrity_error():
    """json.loads raises RecursionError (not ValueError) past the interpreter's limit."""
    from fimio.store.bundle_read import load_json

    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(IntegrityError, match="malformed"):
        RemoteInfo.parse(deep, STORE_DIR, "b88jjq6gwhwj6fjnm8zppk58kmq744vx", "i")
    with pytest.raises(IntegrityError, match="malformed"):
        load_json(b'{"a":' + deep + b"}", "header")


@pytest.mark.parametrize("length,accepted", [(4095, True), (4096, False), (60000, False)])
def test_a_manifest_root_symlink_is_bounded_like_any_symlink_target(length, accepted):
    """tree.md §4: a target of 1 to 4095 bytes; a longer root target is an integrity error,
    not an ENAMETOOLONG when the path is materialised."""
    from fimio.store.tree import SymlinkNode

    node = SymlinkNode(b"a" * length)
    enc = manifest_mod.Manifest(node, CacheParams(STORE_DIR).large_file, [], []).encode()
    if accepted:
        assert manifest_mod.decode(enc, node.digest, 0, "m").root.digest == node.digest
    else:
        with pytest.raises(IntegrityError, match="bad symlink target"):
            manifest_mod.decode(enc, node.digest, 0, "m")


def test_the_closure_check_of_a_chain_deeper_than_the_recursion_limit():
    """Which found paths have their whole closure here or found: a chain of any length,
    and one missing link makes every path above it incomplete."""
    import sys
    from types import SimpleNamespace

    from fimio.store.cache.substitute import _complete

    class Store:
        def is_valid(self, path):
            return path == "valid-base"

    n = 3 * sys.getrecursionlimit()
    chain = {f"p{i}": (None, SimpleNamespace(references=[f"p{i - 1}" if i else "valid-base", f"p{i}"]))
             for i in range(n)}
    assert _complete(Store(), chain) == set(chain)
    chain["p10"][1].references.append("missing")
    assert _complete(Store(), chain) == {f"p{i}" for i in range(10)}
