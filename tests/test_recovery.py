"""Recovery on open (``store/recovery.py``): leftovers of dead processes are removed on every
open, cheaply; after a reboot, unreferenced blobs (possibly never written back) are removed
once, before anyone can link to them; temp roots of a process that has not locked its file
yet are not mistaken for stale ones; LMDB reader slots of killed processes are freed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import blake3
import pytest

from conftest import STORE_DIR, run_fimio
from fimio.store import recovery
from fimio.store.local import LocalStore
from fimio.store.roots import TempRoots, clean_temp_roots, live_temp_roots


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def open_store(root) -> LocalStore:
    return LocalStore(str(root), STORE_DIR)


def test_leftovers_of_dead_processes_go_on_open_and_live_ones_stay(tmp_path):
    root = tmp_path / "root"
    open_store(root).close()
    dead, me = dead_pid(), os.getpid()
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        for name in (f"add-{dead}-aaaa", f"build-{dead}-bbbb", f"blob-{dead}-cccc"):
            (root / "tmp" / name).mkdir() if name.startswith(("add", "build")) else (root / "tmp" / name).write_bytes(b"x")
        (root / "tmp" / f"add-{dead}-aaaa" / "f").write_bytes(b"half")
        os.chmod(root / "tmp" / f"add-{dead}-aaaa", 0o555)  # normalised trees are read-only
        (root / "tmp" / f"sub-{sleeper.pid}-dddd").mkdir()  # a live process's work
        (root / "tmp" / f"text-{me}-eeee").write_bytes(b"mine")
        (root / "tmp" / "unrelated").mkdir()  # not ours to judge
        (root / "temproots" / str(dead)).write_text("x\n")
        store = open_store(root)
        try:
            assert store.recovered["tmp"] == 3 and store.recovered["temproots"] == 1
        finally:
            store.close()
        assert sorted(os.listdir(root / "tmp")) == sorted([f"sub-{sleeper.pid}-dddd", f"text-{me}-eeee", "unrelated"])
        assert os.listdir(root / "temproots") == []
    finally:
        sleeper.kill()
        sleeper.wait()


def test_ordinary_open_scans_nothing_big(tmp_path, monkeypatch):
    root = tmp_path / "root"
    open_store(root).close()  # first open: records the boot id
    calls = []
    monkeypatch.setattr(recovery, "remove_unlinked_blobs", lambda store: calls.append(1) or 0)
    real_scandir = os.scandir
    scanned = []

    def spy(path="."):
        scanned.append(os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(recovery.os, "scandir", spy)
    for _ in range(3):
        open_store(root).close()
    assert calls == []
    assert all(p.endswith("/tmp") for p in scanned), scanned  # only tmp/, never store/ or .links


def simulate_reboot(root) -> None:
    (root / recovery.MARKER).write_text("00000000-previous-boot\n")


def test_after_a_power_cut_an_unwritten_blob_is_never_linked(tmp_path):
    """A blob published without its own fsync may come back empty after a power cut. The
    first open after the reboot removes unreferenced blobs, so an add of the same bytes
    writes them again instead of linking to the empty file."""
    root = tmp_path / "root"
    store = open_store(root)
    content = b"precious bytes\n" * 1000
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(content)
    (src / "b").write_bytes(b"kept")
    kept = store.add_path(str(tmp_path / "src" / "b"), name="b")
    digest = blake3.blake3(content).digest()
    store.close()
    # what the power cut left: the blob's name, not its data (ext4 delayed allocation)
    lost = root / "store" / ".links" / digest.hex()
    lost.write_bytes(b"")
    simulate_reboot(root)
    store = open_store(root)
    try:
        assert store.recovered["rebooted"] and store.recovered["blobs"] >= 1
        assert not lost.exists()
        assert store.is_valid(kept.path)  # a linked blob stays
        info = store.add_path(str(src), name="src")
        assert store.verify(check_contents=True) == []
        assert (root / "store" / info.path.base / "a").read_bytes() == content
    finally:
        store.close()
    assert (root / recovery.MARKER).read_text().strip() == recovery.boot_id()
    # and only once per boot
    store = open_store(root)
    try:
        assert not store.recovered["rebooted"]
    finally:
        store.close()


def test_reboot_recovery_waits_for_nobody_and_retries_later(tmp_path):
    """A busy GC lock (a gc, or writers of this boot) postpones the blob sweep to a later open."""
    root = tmp_path / "root"
    open_store(root).close()
    simulate_reboot(root)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(root / 'locks' / 'gc.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_SH)\nprint('locked', flush=True)\ntime.sleep(30)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.monotonic()
        store = open_store(root)
        store.close()
        assert time.monotonic() - start < 5
        assert (root / recovery.MARKER).read_text().startswith("00000000")  # not done yet
    finally:
        holder.kill()
        holder.wait()
    store = open_store(root)
    store.close()
    assert (root / recovery.MARKER).read_text().strip() == recovery.boot_id()


def test_gc_does_not_drop_temp_roots_of_a_process_that_has_not_locked_them_yet(tmp_path):
    """TempRoots creates its file, then locks it. GC (and recovery) must not take an unlocked
    file of a live process for a stale one: the roots it records next would be invisible."""
    root = tmp_path / "root"
    store = open_store(root)
    try:
        sleeper = subprocess.Popen(["sleep", "30"])
        try:
            f = root / "temproots" / str(sleeper.pid)
            f.write_text("abc-not-locked-yet\n")  # created, not locked: the window
            assert "abc-not-locked-yet" in live_temp_roots(store)
            assert f.exists()
            assert clean_temp_roots(store) == 0 and f.exists()
        finally:
            sleeper.kill()
            sleeper.wait()
        assert "abc-not-locked-yet" not in live_temp_roots(store)  # now it is stale
        assert not f.exists()
        tr = TempRoots(store)  # a locked file of a live process is honoured
        tr.close()
    finally:
        store.close()


def test_killed_readers_do_not_pin_the_database(tmp_path):
    """A process killed inside a read transaction leaves a reader slot; the next open frees it."""
    root = tmp_path / "root"
    open_store(root).close()
    code = ("import sys, time\nfrom fimio.store.local import LocalStore\n"
            f"s = LocalStore({str(root)!r}, {STORE_DIR!r})\ntxn = s.db.read()\ntxn.get(b'x')\n"
            "print('reading', flush=True)\ntime.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "reading"
    store = open_store(root)
    try:
        readers_before = store.db.env.readers()
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert str(p.pid) in readers_before
        freed = store.db.env.reader_check()
        assert freed == 1 and str(p.pid) not in store.db.env.readers()
    finally:
        store.close()


@pytest.mark.parametrize("command", [["verify"], ["roots"]])
def test_commands_on_a_store_after_kills_need_no_manual_step(tmp_path, command):
    """Every command opens a store left by killed writers without help (no stale locks)."""
    root = tmp_path / "root"
    open_store(root).close()
    dead = dead_pid()
    (root / "tmp" / f"add-{dead}-ffff").mkdir()
    (root / "locks" / "deadbeef.lock").write_text("")  # a lock file is not a lock
    run_fimio(command, root, check=0)
    assert os.listdir(root / "tmp") == []
