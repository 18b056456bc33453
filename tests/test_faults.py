"""Fault injection: SIGKILL at random moments during every writing command (``faults.py``).

For each operation -- ``add`` of a big tree, ``realise`` of a 31-derivation graph,
``push`` to a file:// cache and to ``fimio serve``, substitution (``realise
--substituter``), ``import`` of a bundle, ``gc`` -- the command is killed at seeded random
moments (calibrated from one uninterrupted run); after each kill ``fimio verify
--check-contents`` exits 0 and leaves no garbage, the operation's own invariants hold
(e.g. a cache never shows an ``info/`` whose objects are missing, and a reader
substituting from a killed push's cache gets each path whole or not at all; gc never
loses a rooted path), and rerunning the command completes with the same result.

Quick mode (the default run): a few kills per operation. Long mode (``-m slow``): at least
``FIMIO_FAULT_KILLS`` (200) SIGKILLs of a running command per operation.
"""

from __future__ import annotations

import os

import pytest

import faults

QUICK = {"add": 3, "realise": 2, "substitute": 2, "import": 2, "push-file": 2, "push-serve": 2, "gc": 2}
LONG = int(os.environ.get("FIMIO_FAULT_KILLS", "200"))
OPS = {"add": faults.AddOp, "realise": faults.RealiseOp, "substitute": faults.SubstituteOp,
       "import": faults.ImportOp, "push-file": faults.PushOp, "push-serve": faults.ServePushOp, "gc": faults.GcOp}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return faults.build_world(tmp_path_factory.mktemp("faults"))


def _run(world, tmp_path, name, kills, min_kills=0):
    op = OPS[name](world, tmp_path / name)
    # the world's own realise and push are calibration runs of those operations
    calibration = {"realise": (world.realise_seconds, world.top_outputs),
                   "push-file": (world.push_seconds, faults.PushOp.cache_result(world.cache))}.get(name)
    try:
        tally = faults.run_kills(op, kills, calibration=calibration, min_kills=min_kills)
    finally:
        if hasattr(op, "close"):
            op.close()
    assert tally.attempts >= kills
    return tally


@pytest.mark.parametrize("name", list(QUICK))
def test_kill_quick(world, tmp_path, name):
    _run(world, tmp_path, name, QUICK[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(QUICK))
def test_kill_long(world, tmp_path, name):
    tally = _run(world, tmp_path, name, LONG, min_kills=LONG)
    # the kills must land while the command runs, or the test proves little
    assert tally.kills >= LONG, tally.line()


def test_kill_server_during_push(world, tmp_path):
    """SIGKILL ``fimio serve`` while a push uploads through it: the client fails cleanly
    (exit 6, one line), the cache never shows an info whose objects are missing, a server
    restarted on the same cache serves what was completed, and the push rerun completes."""
    import random
    import signal
    import subprocess
    import time

    from cachefixtures import WRITE_TOKEN, Serve, write_config
    from conftest import fimio_env, fimio_executable

    rnd = random.Random(f"{faults.SEED}:serve-kill")
    cache = tmp_path / "cache"
    cache.mkdir()
    outcomes = []
    for i in range(2):
        server = Serve(f"file://{cache}", tmp_path, tokens={WRITE_TOKEN: "write"})
        cfg = write_config(tmp_path / f"c{i}.toml", trusted=[world.public], tokens={server.url: WRITE_TOKEN})
        payload = faults.make_tree(tmp_path / f"p{i}", seed=1000 + i, files=200, large=4, large_size=3_000_000)
        path = faults.fim(["add", payload], world.source, cfg, check=0).stdout.strip()
        push = subprocess.Popen([fimio_executable(), "push", server.url, path, "--key", world.secret],
                                env=fimio_env(world.source, {"FIMIO_CONFIG": cfg}),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        before = sum(1 for _ in cache.rglob("*.zst"))
        deadline = time.monotonic() + 30
        while push.poll() is None and time.monotonic() < deadline and sum(1 for _ in cache.rglob("*.zst")) == before:
            time.sleep(0.005)  # kill once uploads have begun...
        time.sleep(rnd.uniform(0.0, 0.3))  # ...at a random moment of them
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        _, err = push.communicate(timeout=120)
        if push.returncode != 0:
            assert push.returncode == 6 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        outcomes.append(push.returncode)
        assert faults.cache_problems(cache, deep=True) == []
        server = Serve(f"file://{cache}", tmp_path, tokens={WRITE_TOKEN: "write"})
        try:
            cfg = write_config(tmp_path / f"d{i}.toml", trusted=[world.public], tokens={server.url: WRITE_TOKEN})
            faults.fim(["push", server.url, path, "--key", world.secret], world.source, cfg, check=0)
            reader = tmp_path / f"reader{i}"
            faults.fim(["copy", "--from", server.url, "/fimio/store/" + os.path.basename(path)], reader, cfg, check=0)
            faults.assert_verify_clean(reader, f"server kill {i}", cfg)
        finally:
            server.stop()
        assert faults.cache_problems(cache, deep=True) == []
    print(f"push exit codes when the server was killed: {outcomes}")


@pytest.mark.parametrize("how", ["killed-import-leftovers", "shared-with-a-valid-path"])
def test_import_when_its_blobs_are_already_here(world, tmp_path, how):
    """A rerun of a killed import finds the blobs the killed one published (its paths are not
    valid); an import into a store holding the same big files in other paths finds them too.
    Both must import normally."""
    from fimio.store import fsutil

    root = tmp_path / "root"
    s = faults.open_store(root)
    try:
        info = s.add_path(str(world.tree), name="other" if how == "shared-with-a-valid-path" else None)
        if how == "killed-import-leftovers":  # the path never committed; its blobs are in .links
            with s.db.write() as txn:
                s.invalidate(txn, info)
            fsutil.remove_tree(s.physical(info.path))
    finally:
        s.close()
    p = faults.fim(["import", world.bundle], root, world.config)
    assert p.returncode == 0, p.stderr[-2000:]
    faults.assert_verify_clean(root, how, world.config)
