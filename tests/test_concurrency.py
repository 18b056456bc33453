"""Deterministic versions of races the soaks and fault tests found (each failed before its fix).

* ``verify`` running while ``gc`` collects paths reported the collected paths as damaged
  ("registered but missing on disk", "vanished while reading") and exited 4 -- and
  ``verify --repair`` would then try to repair them. A path that is no longer valid when
  its check ends is not a problem.
"""

from __future__ import annotations

import os
import subprocess

from conftest import STORE_DIR
from fimio.store import fsutil
from fimio.store.local import LocalStore


def collect(store: LocalStore, info) -> None:
    """What gc does to one dead path: invalidate it, then delete its files."""
    with store.db.write() as txn:
        store.invalidate(txn, info)
    fsutil.remove_tree(store.physical(info.path))


def two_paths(store, tmp_path):
    out = []
    for name in ("a", "b"):
        d = tmp_path / name
        (d / "sub").mkdir(parents=True)
        for k in range(5):
            (d / "sub" / f"f{k}").write_bytes(os.urandom(1000))
        out.append(store.add_path(str(d)))
    return out


def test_verify_ignores_a_path_collected_while_it_was_being_read(store, tmp_path):
    a, b = two_paths(store, tmp_path)
    original = store._check_contents

    def racing(info):
        if info.path == a.path:
            collect(store, info)  # gc deletes it while verify rehashes it
        return original(info)

    store._check_contents = racing
    assert store.verify(check_contents=True) == []
    assert not store.is_valid(a.path) and store.is_valid(b.path)


def test_verify_ignores_a_path_collected_after_the_listing(store, tmp_path):
    a, b = two_paths(store, tmp_path)
    listing = store.all_paths()

    def listed_then_collected():
        collect(store, store.info(a.path))  # gc runs between the listing and the checks
        return listing

    store.all_paths = listed_then_collected
    assert store.verify(check_contents=False) == []


def test_verify_still_reports_a_valid_path_that_is_missing(store, tmp_path):
    a, _ = two_paths(store, tmp_path)
    fsutil.remove_tree(store.physical(a.path))
    problems = store.verify()
    assert [p.what for p in problems] == ["is registered but missing on disk"]


def test_cli_verify_during_gc_exits_0(tmp_path):
    """The race through the console script: verify --check-contents in a loop while gc runs."""
    from conftest import fimio_env, fimio_executable

    root = tmp_path / "root"
    store = LocalStore(str(root), STORE_DIR)
    try:
        for i in range(120):
            d = tmp_path / "src" / f"d{i}"
            (d / "a").mkdir(parents=True)
            for k in range(10):
                (d / "a" / f"f{k}").write_bytes(os.urandom(20_000))
            store.add_path(str(d))
    finally:
        store.close()
    env = fimio_env(root)
    gc = subprocess.Popen([fimio_executable(), "gc"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    runs = 0
    while gc.poll() is None or runs == 0:
        p = subprocess.run([fimio_executable(), "verify", "--check-contents"], env=env, capture_output=True, text=True)
        runs += 1
        assert p.returncode == 0, f"run {runs}: {p.stdout}{p.stderr}"
    assert gc.wait() == 0
