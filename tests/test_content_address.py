"""A content-addressed path (``ca`` source or text) is accepted only under the name its
content gives (spec/store-paths.md §3), whoever signed it and whether or not signatures are
required: otherwise a bundle or cache could plant other bytes under the path that ``fimio
add`` of the genuine content computes, and every later ``add`` would return them."""

from __future__ import annotations

import os
import time

import pytest

from cachefixtures import make_keys, write_config
from conftest import assert_one_error_line, run_fimio
from fimio.store.local import LocalStore, PathInfo
from fimio.store.paths import source_path, text_path
from fimio.store.tree import scan

STORE_DIR = "/fimio/store"


def forge(store: LocalStore, real: PathInfo, forged_path) -> None:
    """Register ``real``'s content (already in ``store``) under ``forged_path`` as well."""
    node = store.load_tree(real)
    tmp = os.path.join(store.tmp, "forge")
    store.materialise(node, tmp)
    os.rename(tmp, store.physical(forged_path))
    store.register_existing(PathInfo(forged_path, real.root, real.size, [], None, time.time(), real.ca), node)


@pytest.fixture
def world(tmp_path):
    """Store A holds two forgeries: a source path and a text path, each naming content it
    does not hold. A's key signs them (on export and push); B and C trust that key."""
    genuine = tmp_path / "genuine"
    genuine.mkdir()
    (genuine / "a").write_text("genuine\n")
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "a").write_text("evil\n")
    a = LocalStore(str(tmp_path / "A"), STORE_DIR)
    try:
        source = source_path(STORE_DIR, "genuine", scan(genuine).digest)
        forge(a, a.add_path(str(evil), "genuine"), source)
        import blake3

        text = text_path(STORE_DIR, "notes.txt", blake3.blake3(b"genuine text").digest())
        forge(a, a.add_text("notes.txt", b"evil text"), text)
    finally:
        a.close()
    sk, pk = make_keys("a-1")
    (tmp_path / "sk").write_text(str(sk) + "\n")
    env = {"FIMIO_CONFIG": write_config(tmp_path / "config.toml", trusted=[pk])}
    return {"tmp": tmp_path, "genuine": genuine, "source": source, "text": text, "sk": tmp_path / "sk", "env": env}


def assert_empty(root) -> None:
    store = LocalStore(str(root), STORE_DIR)
    try:
        assert store.all_paths() == []
        assert [e for e in os.listdir(store.store) if e != ".links"] == os.listdir(store.tmp) == []
    finally:
        store.close()


def test_verify_names_each_forged_path(world):
    """A source path's address needs only its record; a text object's file is read, so it is
    checked with --check-contents."""
    store = str(world["tmp"] / "A" / "store")  # stdout names physical paths
    proc = run_fimio(["verify"], world["tmp"] / "A", env=world["env"])
    assert proc.returncode == 4 and world["text"].logical(store) not in proc.stdout
    assert f"{world['source'].logical(store)}: is not the" in proc.stdout
    proc = run_fimio(["verify", "--check-contents"], world["tmp"] / "A", env=world["env"])
    assert proc.returncode == 4, proc.stderr
    for path in (world["source"], world["text"]):
        assert f"{path.logical(store)}: is not the" in proc.stdout + proc.stderr


@pytest.mark.parametrize("kind", ["source", "text"])
@pytest.mark.parametrize("sigs", ["required", "not checked"])
def test_import_refuses_a_signed_forgery(world, kind, sigs):
    bundle = world["tmp"] / f"{kind}.bundle"
    run_fimio(["export", world[kind].logical(STORE_DIR), "-o", bundle, "--key", world["sk"]],
              world["tmp"] / "A", env=world["env"], check=0)
    b = world["tmp"] / f"B-{kind}-{sigs.replace(' ', '-')}"
    extra = ["--no-check-sigs"] if sigs == "not checked" else []
    assert_one_error_line(run_fimio(["import", *extra, bundle], b, env=world["env"]), 4, "is not the")
    assert_empty(b)


@pytest.mark.parametrize("kind", ["source", "text"])
def test_substitution_refuses_a_signed_forgery(world, kind):
    cache = f"file://{world['tmp'] / 'cache'}"
    run_fimio(["push", cache, world[kind].logical(STORE_DIR), "--key", world["sk"]],
              world["tmp"] / "A", env=world["env"], check=0)
    c = world["tmp"] / f"C-{kind}"
    proc = run_fimio(["copy", "--from", cache, world[kind].logical(STORE_DIR)], c, env=world["env"])
    assert_one_error_line(proc, 4, "is not the")
    assert_empty(c)
    # the genuine content still gets its path, with its own bytes
    added = run_fimio(["add", world["genuine"]], c, env=world["env"], check=0).stdout.strip()
    assert added.endswith(world["source"].base)
    assert (c / "store" / world["source"].base / "a").read_text() == "genuine\n"
