"""A full disk: ``add``, ``realise`` (a builder writing a big output) and substitution into a
store on a small tmpfs (mounted in a private mount namespace: nothing leaks to the host).

Whatever the moment the disk fills up -- blob writes, materialisation, the rename, the LMDB
commit, inside the build, out of inodes -- the command exits cleanly (exit 1, or what the
error maps to) with one ``fimio: error:`` line and no traceback (a failed build may show
its log tail before that line), nothing half-written is registered, ``verify
--check-contents`` is clean and leaves no garbage, and after space is freed (``gc``
removes the blobs of the failed command) a small ``add`` works. ``diskfull.py`` runs the
scenarios and records; this file judges.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _can_mount() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    p = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                        "mount -t tmpfs -o size=1m tmpfs /mnt && umount /mnt"], capture_output=True)
    return p.returncode == 0


needs_mount = pytest.mark.skipif(not _can_mount(), reason="needs root and unshare -m to mount a private tmpfs")


def run_scenario(tmp_path, name: str, options: str = "size=8m") -> list[dict]:
    mnt = tmp_path / "mnt"
    work = tmp_path / "work"
    mnt.mkdir()
    work.mkdir()
    script = (f"mount -t tmpfs -o {options} tmpfs {mnt} && "
              f"exec {sys.executable} {HERE}/diskfull.py {name} {mnt} {work}")
    p = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    steps = json.loads(p.stdout)
    crash = [s for s in steps if s["case"] == "driver"]
    assert not crash, crash[0]["stderr"]
    assert not os.listdir(mnt), "the tmpfs leaked out of its mount namespace"
    return steps


def judge(steps: list[dict], build: bool = False) -> dict:
    """Check every case; return {case: exit code of its command}."""
    outcomes = {}
    for s in steps:
        where = f"{s['case']} / {s['step']}: exit {s['rc']}\n{s['stderr']}"
        assert "Traceback" not in s["stderr"], where
        if s["step"] == "command":
            outcomes[s["case"]] = s["rc"]
            assert s["rc"] != "hung", where
            # LMDB says "Input/output error" for a short write; a full disk is named as such
            assert "Input/output error" not in s["stderr"], where
            if s["rc"] != 0:
                assert s["rc"] in (1, 5, 6), where
                lines = s["stderr"].strip().splitlines()
                assert lines and lines[-1].startswith("fimio: error: "), where
                if not (build and "builder for" in lines[-1]):
                    assert len(lines) == 1, where
            continue
        assert s["rc"] == 0, where
        if "state" in s:
            assert s["state"]["garbage"] == [] and s["state"]["tmp"] == [], where
    by_case = {}
    for s in steps:
        by_case.setdefault(s["case"], {})[s["step"]] = s
    for case, st in by_case.items():
        if outcomes.get(case, 0) != 0 and "verify" in st:
            valid = st["verify"]["state"]["valid"]
            # a failed command registered nothing (a realise's .drv files are its own commit)
            assert all(v.endswith(".drv") for v in valid), f"{case}: a failed command left {valid} valid"
    return outcomes


@needs_mount
def test_add_on_a_full_disk(tmp_path):
    outcomes = judge(run_scenario(tmp_path, "add"))
    assert outcomes["add-big"] == 1  # 12 MB cannot fit in 8 MB
    assert any(rc == 1 for c, rc in outcomes.items() if c.startswith("add-free"))
    print(outcomes)


@needs_mount
def test_realise_of_a_big_output_on_a_full_disk(tmp_path):
    outcomes = judge(run_scenario(tmp_path, "realise"), build=True)
    assert outcomes["realise-2000kb"] == 0 and outcomes["realise-12000kb"] == 1, outcomes
    # some fills fail after the build (log, blobs, rename or commit), some succeed
    assert {rc for c, rc in outcomes.items() if c.startswith("realise-full")} == {0, 1}, outcomes
    assert outcomes["realise-chatty-v"] == 1, outcomes  # not hung, no traceback from the log writer
    print(outcomes)


@needs_mount
def test_substitution_on_a_full_disk(tmp_path):
    outcomes = judge(run_scenario(tmp_path, "substitute"))
    assert outcomes["substitute-2mb"] == 0 and outcomes["substitute-12mb"] != 0, outcomes
    print(outcomes)


@needs_mount
def test_push_to_a_full_cache(tmp_path):
    outcomes = judge(run_scenario(tmp_path, "push"))
    assert outcomes["push-2mb"] == 0 and outcomes["push-12mb"] == 6, outcomes


@needs_mount
def test_out_of_inodes(tmp_path):
    outcomes = judge(run_scenario(tmp_path, "inodes", "size=64m,nr_inodes=400"))
    assert outcomes["add-inodes"] == 1, outcomes
