"""The depth limit (spec/tree.md §3): a tree whose deepest object is 512 names below its
root goes through every command that walks trees; one level more is refused by ``add``
and ``hash`` with one line, exit 2, nothing registered."""

from __future__ import annotations

import os
import pathlib

import pytest

from fimio.store.local import LocalStore

from cachefixtures import make_keys, write_config
from conftest import assert_one_error_line, run_fimio

LIMIT = 512


def nested(root: pathlib.Path, depth: int) -> pathlib.Path:
    """A tree whose deepest object, a file, is ``depth`` names below ``root``."""
    deepest = root.joinpath(*["d"] * (depth - 1))
    deepest.mkdir(parents=True)
    (deepest / "f").write_text("at the bottom\n")
    (root / "top").write_text("at the top\n")
    return root


@pytest.fixture
def env(tmp_path):
    sk, pk = make_keys("deep-1")
    (tmp_path / "sk").write_text(str(sk) + "\n")
    return {"FIMIO_CONFIG": write_config(tmp_path / "config.toml", trusted=[pk],
                                         secret_key_files=[tmp_path / "sk"])}


def test_a_tree_at_the_limit_goes_through_every_command(tmp_path, env):
    tree = nested(tmp_path / "deep", LIMIT)
    a, b, c = (tmp_path / n for n in ("A", "B", "C"))
    path = run_fimio(["add", tree], a, env=env, check=0).stdout.strip()
    assert run_fimio(["hash", tree], a, env=env, check=0).stdout.strip()
    assert run_fimio(["verify", "--check-contents"], a, env=env).returncode == 0
    assert run_fimio(["ls", "-R", path], a, env=env, check=0).stdout.count("\n") > LIMIT

    nar = run_fimio(["dump", path], a, env=env, text=False, check=0).stdout
    restored = tmp_path / "restored"
    run_fimio(["restore", restored], a, input=nar, check=0)
    assert (restored.joinpath(*["d"] * (LIMIT - 1)) / "f").read_text() == "at the bottom\n"

    bundle = tmp_path / "deep.bundle"
    run_fimio(["export", path, "-o", bundle], a, env=env, check=0)
    assert run_fimio(["import", bundle], b, env=env, check=0).stdout.strip().endswith(os.path.basename(path))
    assert run_fimio(["verify", "--check-contents"], b, env=env).returncode == 0

    cache = f"file://{tmp_path / 'cache'}"
    run_fimio(["push", cache, path], a, env=env, check=0)
    logical = run_fimio(["path-info", "--json", path], a, env=env, check=0).stdout
    got = run_fimio(["copy", "--from", cache, os.path.basename(path)[:32]], c, env=env, check=0).stdout.strip()
    assert got.endswith(os.path.basename(path)), logical
    assert run_fimio(["verify", "--check-contents"], c, env=env).returncode == 0


def test_one_level_deeper_is_refused_with_one_line(tmp_path, env):
    tree = nested(tmp_path / "deeper", LIMIT + 1)
    root = tmp_path / "A"
    assert_one_error_line(run_fimio(["add", tree], root, env=env), 2, "deeper than 512")
    assert_one_error_line(run_fimio(["hash", tree], root, env=env), 2, "deeper than 512")
    store = LocalStore(str(root), "/fimio/store")
    try:
        assert store.all_paths() == []
        assert [e for e in os.listdir(store.store) if e != ".links"] == os.listdir(store.tmp) == []
    finally:
        store.close()
