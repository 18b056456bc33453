"""One contract, every backend built from its URL (spec/cache.md).

Backends: ``file://``; ``fimio serve`` on loopback over a file:// cache; ``fimio serve``
over an s3:// cache; a static file server (python -m http.server) for reading a cache
written through file://; ``s3://`` against moto's standalone S3 server.
"""

from __future__ import annotations

import os
import random
import stat

import pytest

from cachefixtures import WRITE_TOKEN, Serve, StaticServer, make_keys, moto_s3  # noqa: F401
from fimio.store.cache.layout import Realisation, info_key
from fimio.store.cache.push import Pusher
from fimio.store.cache.substitute import SubstituterSet
from fimio.store.cache.url import open_backend
from fimio.store.local import LocalStore

STORE_DIR = "/fimio/store"
BACKENDS = ["file", "serve", "static", "s3", "serve-s3"]


class Cache:
    """A cache under test: ``read_url`` to substitute from, ``write`` a backend to push to."""

    def __init__(self, read_url, write_url, token=None, stop=()):
        self.read_url, self.write_url, self.token, self._stop = read_url, write_url, token, list(stop)

    def writer(self):
        return open_backend(self.write_url, self.token)

    def reader(self):
        return open_backend(self.read_url, self.token)

    def close(self):
        for s in self._stop:
            s.stop()


@pytest.fixture(params=BACKENDS)
def cache(request, tmp_path):
    kind = request.param
    d = tmp_path / "cache"
    if kind == "file":
        c = Cache(f"file://{d}", f"file://{d}")
    elif kind == "serve":
        srv = Serve(f"file://{d}", tmp_path, tokens={WRITE_TOKEN: "write"}, anonymous_read=True)
        c = Cache(srv.url, srv.url, WRITE_TOKEN, [srv])
    elif kind == "static":
        srv = StaticServer(d)
        c = Cache(srv.url, f"file://{d}", None, [srv])
    elif kind == "s3":
        url = request.getfixturevalue("moto_s3").url()
        c = Cache(url, url)
    else:
        url = request.getfixturevalue("moto_s3").url("served")
        srv = Serve(url, tmp_path, tokens={WRITE_TOKEN: "write"}, anonymous_read=True)
        c = Cache(srv.url, srv.url, WRITE_TOKEN, [srv])
    yield c
    c.close()


def make_tree(root, seed=1, small=120, large=(3 << 20,)):
    """Small files (packed), large ones (chunked), an empty file, an executable, a symlink,
    a duplicate, an empty directory."""
    rnd = random.Random(seed)
    os.makedirs(root / "lib" / "deep" / "er")
    os.makedirs(root / "empty-dir")
    for i in range(small):
        sub = root / "lib" / ("deep" if i % 3 else "deep/er")
        (sub / f"f{i:03}.txt").write_bytes(rnd.randbytes(rnd.randint(1, 30_000)))
    for i, n in enumerate(large):
        (root / f"big{i}.bin").write_bytes(rnd.randbytes(n))
    (root / "empty").write_bytes(b"")
    (root / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "run.sh", 0o755)
    (root / "dup.txt").write_bytes((root / "lib" / "deep" / "f001.txt").read_bytes())
    (root / "run-copy.txt").write_bytes(b"#!/bin/sh\necho hi\n")  # same content, not executable
    os.symlink("lib/deep/f001.txt", root / "link")
    return root


def snapshot(path) -> dict:
    """Everything a store path's bytes and metadata say, for bit-identity comparisons."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, path)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_mtime)
            else:
                with open(p, "rb") as f:
                    out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_mtime, f.read())
    return out


@pytest.fixture
def stores(tmp_path):
    a = LocalStore(str(tmp_path / "A"), STORE_DIR)
    b = LocalStore(str(tmp_path / "B"), STORE_DIR)
    yield a, b
    a.close()
    b.close()


def populate(store, tmp_path):
    tree = store.add_path(str(make_tree(tmp_path / "src")), "tree")
    single = tmp_path / "single.bin"
    single.write_bytes(os.urandom(700_000))
    one = store.add_path(str(single))
    top = store.add_text("top.txt", f"{store.logical(tree.path)} {store.logical(one.path)}".encode(),
                         [tree.path, one.path])
    return tree, one, top


def test_push_then_substitute_is_bit_identical(cache, stores, tmp_path):
    a, b = stores
    tree, one, top = populate(a, tmp_path)
    sk, pk = make_keys()
    stats = Pusher(a, cache.writer(), [sk]).push([top.path])
    assert stats.paths == stats.paths_sent == 3
    with SubstituterSet(b, [cache.read_url], [pk], config=None) as subs:
        got = subs.substitute([top.path])
    assert got == {top.path}
    for info in (tree, one, top):
        assert b.is_valid(info.path)
        assert snapshot(b.physical(info.path)) == snapshot(a.physical(info.path))
        theirs = b.info(info.path)
        assert (theirs.root, theirs.size, theirs.references, theirs.ca) == (info.root, info.size,
                                                                            info.references, info.ca)
        assert any(s.startswith("test-1:") for s in theirs.signatures)
    assert b.verify(check_contents=True) == []


def test_second_push_sends_nothing(cache, stores, tmp_path):
    a, _ = stores
    _, _, top = populate(a, tmp_path)
    sk, _ = make_keys()
    Pusher(a, cache.writer(), [sk]).push([top.path])
    again = Pusher(a, cache.writer(), [sk]).push([top.path])
    assert (again.paths_sent, again.objects_sent, again.bytes_sent) == (0, 0, 0)


def test_objects_are_never_overwritten(cache):
    w = cache.writer()
    key = "logs/" + "a" * 64 + ".zst"
    assert w.missing([key, "fimio-cache.json"]) >= {key}
    assert w.put(key, b"first") is True
    served = cache.write_url.startswith("http")  # fimio serve answers 200 and keeps the original
    assert w.put(key, b"second") is served
    assert cache.reader().get(key, 100) == b"first"
    assert w.missing([key]) == set()
    assert cache.reader().get("logs/" + "b" * 64 + ".zst", 100) is None


def test_absent_paths_are_not_substituted(cache, stores, tmp_path):
    a, b = stores
    _, _, top = populate(a, tmp_path)
    sk, pk = make_keys()
    Pusher(a, cache.writer(), [sk]).push([top.path])
    ghost = a.add_text("ghost.txt", b"never pushed")
    with SubstituterSet(b, [cache.read_url], [pk]) as subs:
        assert subs.substitute([ghost.path]) == set()
    assert b.all_paths() == []


def test_realisations_travel_with_outputs(cache, stores, tmp_path):
    a, b = stores
    tree, _, _ = populate(a, tmp_path)
    drv_hash = "d" * 64
    r = Realisation(drv_hash, "00000000000000000000000000000000-x.drv", "out", tree.path, tree.root)
    with a.db.write() as txn:
        txn.put(f"{drv_hash}!out".encode(), r.to_local(), db=a.db.dbs["realisations"])
    sk, pk = make_keys()
    stats = Pusher(a, cache.writer(), [sk]).push([tree.path], [r], [drv_hash])
    assert stats.realisations_sent == 1
    with SubstituterSet(b, [cache.read_url], [pk]) as subs:
        assert subs.substitute_outputs([(drv_hash, "out", tree.path)]) == {tree.path}
    with b.db.read() as txn:
        got = Realisation.from_local(bytes(txn.get(f"{drv_hash}!out".encode(), db=b.db.dbs["realisations"])))
    assert (got.path, got.root) == (tree.path, tree.root)
    assert got.signatures and got.signatures[0].startswith("test-1:")


def test_priority_order_and_batched_query(cache, stores, tmp_path):
    """A cache listed first wins; an empty or unknown cache listed before it costs nothing."""
    a, b = stores
    _, _, top = populate(a, tmp_path)
    sk, pk = make_keys()
    Pusher(a, cache.writer(), [sk]).push([top.path])
    empty = f"file://{tmp_path / 'empty-cache'}"
    with SubstituterSet(b, [empty, cache.read_url], [pk]) as subs:
        found = subs.query([top.path])
        assert found[top.path][0].url == cache.reader().url
        assert subs.substitute([top.path]) == {top.path}
    assert cache.reader().missing([info_key(top.path.hash_part)]) == set()


def test_executable_variant_is_made_locally(stores, tmp_path):
    """Content the store already has with the other executable bit is not downloaded."""
    a, b = stores
    src = tmp_path / "exe"
    src.mkdir()
    (src / "tool").write_bytes(b"#!/bin/sh\necho tool\n" * 100)
    os.chmod(src / "tool", 0o755)
    info = a.add_path(str(src))
    plain = tmp_path / "tool.txt"
    plain.write_bytes(b"#!/bin/sh\necho tool\n" * 100)
    b.add_path(str(plain))  # B holds the non-executable variant
    sk, pk = make_keys()
    cache = f"file://{tmp_path / 'c'}"
    Pusher(a, open_backend(cache), [sk]).push([info.path])
    with SubstituterSet(b, [cache], [pk]) as subs:
        assert subs.substitute([info.path]) == {info.path}
        assert subs.stats.objects == 1  # the manifest only
    assert os.stat(os.path.join(b.physical(info.path), "tool")).st_mode & 0o111
    assert b.verify(check_contents=True) == []


def test_concurrent_substitutions_of_the_same_closure(stores, tmp_path):
    """Several processes substituting the same paths into one store: all succeed, each path
    is registered once, the store verifies clean."""
    import subprocess

    from cachefixtures import write_config
    from conftest import fimio_env, fimio_executable

    a, b = stores
    _, _, top = populate(a, tmp_path)
    sk, pk = make_keys()
    cache = f"file://{tmp_path / 'c'}"
    Pusher(a, open_backend(cache), [sk]).push([top.path])
    env = fimio_env(b.root, {"FIMIO_CONFIG": write_config(tmp_path / "cfg.toml", trusted=[pk])})
    procs = [subprocess.Popen([fimio_executable(), "copy", "--from", cache, top.path.logical(STORE_DIR)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert b.is_valid(top.path) and len(b.all_paths()) == 3
    assert b.verify(check_contents=True) == []


def test_register_in_batches_keeps_closures_whole(stores, tmp_path, monkeypatch):
    """A closure larger than one transaction is registered references first."""
    from fimio.store.cache import ingest

    monkeypatch.setattr(ingest, "BATCH", 2)
    a, b = stores
    prev = []
    for i in range(7):
        prev = [a.add_text(f"n{i}", f"{i} {' '.join(p.base for p in prev)}".encode(), prev).path]
    sk, pk = make_keys()
    cache = f"file://{tmp_path / 'c'}"
    Pusher(a, open_backend(cache), [sk]).push(prev)
    with SubstituterSet(b, [cache], [pk]) as subs:
        assert subs.substitute(prev) == set(prev)
    assert len(b.all_paths()) == 7
    assert b.verify() == []
