"""Crash safety of ``fimio add`` (contract: nothing half-written is ever visible as valid).

A large tree (3000 files, ~150 MB) is added by the real console script, which is
SIGKILLed after a seeded random delay, again and again. After every kill,
``fimio verify --check-contents`` must exit 0, and the tree's store path must be either
valid with the right root digest or absent from the database; no garbage may survive
``verify``. Finally an uninterrupted add succeeds and the store verifies clean.
"""

from __future__ import annotations

import os
import pathlib
import random
import signal
import subprocess
import time

import pytest

from conftest import STORE_DIR, fimio_env, fimio_executable, run_fimio
from fimio.store import fsutil
from fimio.store.local import LocalStore
from fimio.store.paths import source_path
from fimio.store.tree import parse_digest

SEED = 20240601
FILES = 3000
KILLS = 20


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory) -> pathlib.Path:
    """3000 files (~150 MB) in nested directories, some executable, some duplicated."""
    root = tmp_path_factory.mktemp("crash") / "big"
    rnd = random.Random(SEED)
    previous = b""
    for i in range(FILES):
        d = root / f"d{i % 37:02d}" / f"e{i % 5}"
        d.mkdir(parents=True, exist_ok=True)
        if i % 100 == 0:
            data = rnd.randbytes(3 * 1024 * 1024 + i)  # 30 large files: ~90 MB
        elif i % 50 == 7:
            data = previous  # duplicate content
        else:
            data = rnd.randbytes(rnd.randrange(0, 40_000))
        f = d / f"f{i:04d}"
        f.write_bytes(data)
        if i % 9 == 0:
            os.chmod(f, 0o755)
        previous = data
    os.symlink("d00/e0/f0000", root / "link")
    (root / "empty").mkdir()
    return root


def _state(root: pathlib.Path, base: str):
    """(record of the path or None, entries of store/ besides .links, entries of tmp/)."""
    store = LocalStore(str(root), STORE_DIR)
    try:
        info = store.query_hash(base[:32])
        entries = {e for e in os.listdir(store.store) if e != ".links"}
        return info, entries, os.listdir(store.tmp)
    finally:
        store.close()


def test_sigkill_during_add_never_leaves_a_half_valid_path(big_tree, tmp_path):
    digest = parse_digest(run_fimio(["hash", big_tree], tmp_path / "unused", check=0).stdout.strip())
    base = source_path(STORE_DIR, big_tree.name, digest).base

    # calibrate: one uninterrupted add into a fresh root
    start = time.monotonic()
    out = run_fimio(["add", big_tree], tmp_path / "calibrate", check=0).stdout.strip()
    typical = time.monotonic() - start
    assert os.path.basename(out) == base
    fsutil.remove_tree(str(tmp_path / "calibrate"))

    rnd = random.Random(SEED)
    outcomes = {"valid": 0, "absent": 0, "killed-running": 0, "store-garbage": 0, "tmp-garbage": 0}
    generation = 0
    root = tmp_path / f"root{generation}"
    for i in range(KILLS):
        # half the delays anywhere in the add, half near its end (the commit window)
        if i % 2 == 0:
            delay = rnd.uniform(0.005, typical)
        else:
            delay = rnd.uniform(0.7 * typical, 1.1 * typical)
        proc = subprocess.Popen([fimio_executable(), "add", str(big_tree)], env=fimio_env(root),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            outcomes["killed-running"] += 1
        else:  # it finished first (a calibration slowed by a busy machine, or blobs kept from
            typical = min(typical, delay)  # earlier kills): draw the next delays within what it took
        _, err = proc.communicate(timeout=60)
        assert proc.returncode in (0, -signal.SIGKILL), err.decode(errors="replace")

        info, entries, tmp_left = _state(root, base)
        outcomes["store-garbage"] += bool(entries - ({base} if info is not None else set()))
        outcomes["tmp-garbage"] += bool(tmp_left)
        check = run_fimio(["verify", "--check-contents"], root)
        assert check.returncode == 0, f"kill {i} after {delay:.3f}s: {check.stdout}{check.stderr}"

        info, entries, tmp_left = _state(root, base)
        assert tmp_left == [], f"kill {i}: verify left {tmp_left} in tmp/"
        if info is None:
            outcomes["absent"] += 1
            assert entries == set(), f"kill {i}: unregistered {entries} survived verify"
        else:
            outcomes["valid"] += 1
            assert info.path.base == base and info.root == digest
            assert entries == {base}
            # a valid result ends this root's life: the next kill starts from scratch
            fsutil.remove_tree(str(root))
            generation += 1
            root = tmp_path / f"root{generation}"

    print(f"calibrated add: {typical:.2f}s; outcomes: {outcomes}")
    assert outcomes["killed-running"] >= KILLS // 2, outcomes
    assert outcomes["absent"] >= 1, outcomes

    # finally, an uninterrupted add over whatever the kills left behind
    out = run_fimio(["add", big_tree], root, check=0).stdout.strip()
    assert os.path.basename(out) == base
    run_fimio(["verify", "--check-contents"], root, check=0)
    info, entries, _ = _state(root, base)
    assert info is not None and info.root == digest and entries == {base}


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _add_with_workers(tree, root) -> tuple[subprocess.Popen, list[int]]:
    """Start ``fimio add tree`` and return once its worker processes exist."""
    proc = subprocess.Popen([fimio_executable(), "add", str(tree)], env=fimio_env(root),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    workers: list[int] = []
    while time.monotonic() < deadline and proc.poll() is None and not workers:
        workers = _children(proc.pid)
        time.sleep(0.002)
    assert workers, "the add finished (or failed) before its workers were seen"
    return proc, workers


def test_sigkill_of_add_takes_its_worker_processes_with_it(big_tree, tmp_path):
    """A large add reads files in forked workers; killing the add must not leave them
    running (still writing, and holding the store's GC lock, which would block a gc)."""
    root = tmp_path / "root"
    proc, workers = _add_with_workers(big_tree, root)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{w}") for w in workers):
        time.sleep(0.01)
    assert not any(os.path.exists(f"/proc/{w}") for w in workers), "workers outlived the killed add"
    gc = subprocess.run([fimio_executable(), "gc"], env=fimio_env(root), capture_output=True, timeout=30)
    assert gc.returncode == 0, gc.stderr.decode(errors="replace")


def test_a_killed_worker_fails_the_add_cleanly(big_tree, tmp_path):
    """A worker killed by the system (the OOM killer, an operator) fails the add with the
    documented one-line error and exit 1; nothing is registered, verify stays clean."""
    from conftest import assert_one_error_line

    root = tmp_path / "root"
    proc, workers = _add_with_workers(big_tree, root)
    os.kill(workers[0], signal.SIGKILL)
    proc.stdout, proc.stderr = proc.communicate(timeout=60)
    line = assert_one_error_line(proc, 1, "worker process died")
    assert "free space" not in line  # not a disk in trouble: the message says what to suspect
    _, entries, _ = _state(root, "x" * 40)
    assert entries == set()
    assert run_fimio(["verify", "--check-contents"], root).returncode == 0


def test_add_works_without_worker_processes(tmp_path, monkeypatch):
    """Where no process can be forked (a process limit), a large add does the work itself."""
    src = tmp_path / "src"
    for i in range(300):
        (src / f"d{i % 7}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 7}" / f"f{i}").write_bytes(os.urandom(i * 37))

    def no_fork():
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    store = LocalStore(str(tmp_path / "root"), STORE_DIR)
    try:
        info = store.add_path(str(src))
        from fimio.store.tree import scan

        assert info.root == scan(str(src)).digest
        assert store.verify(check_contents=True) == []
    finally:
        store.close()
