"""Fault injection: SIGKILL at random moments during every writing command (``faults.py``).

For each operation -- ``add`` of a big tree, ``realise`` of a 31-derivation graph,
``push`` to a file:// cache and to ``fimio serve``, substitution (``realise
--substituter``), ``import`` of a bundle, ``gc`` -- the command is killed at seeded random
moments (calibrated from one uninterrupted run); after each kill ``fimio verify
--check-contents`` exits 0 and leaves no garbage, the operation's own invariants hold
(e.g. a cache never shows an ``info/`` whose objects are missing, and a reader
substituting from a killed push's cache gets each path whole or not at all; gc never
loses a rooted path), and rerunning the command completes with the same result.

Quick mode (the default run): a few kills per operation. Long mode (``-m slow``):
``FIMIO_FAULT_KILLS`` kills per operation, 200 by default.
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


def _run(world, tmp_path, name, kills):
    op = OPS[name](world, tmp_path / name)
    # the world's own realise and push are calibration runs of those operations
    calibration = {"realise": (world.realise_seconds, world.top_outputs),
                   "push-file": (world.push_seconds, faults.PushOp.cache_result(world.cache))}.get(name)
    try:
        tally = faults.run_kills(op, kills, calibration=calibration)
    finally:
        if hasattr(op, "close"):
            op.close()
    assert tally.attempts == kills
    return tally


@pytest.mark.parametrize("name", list(QUICK))
def test_kill_quick(world, tmp_path, name):
    _run(world, tmp_path, name, QUICK[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(QUICK))
def test_kill_long(world, tmp_path, name):
    tally = _run(world, tmp_path, name, LONG)
    # most kills must land while the command runs, or the test proves little
    assert tally.kills >= LONG // 2, tally.line()
