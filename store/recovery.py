"""Recovery when a store is opened: what a kill, crash or power cut can leave behind.

:func:`recover` runs on every :class:`LocalStore` open. It is cheap -- it reads two tiny
files and lists ``tmp/`` and ``temproots/``, which hold only work in progress -- and never
scans ``store/`` or ``.links`` except once after a reboot. What it does
(``spec/reliability.md`` §Recovery):

1. ``tmp/<tag>-<pid>-<random>`` entries whose process is gone are removed (a killed
   writer's half-materialised tree, download or build directory). After a reboot every
   entry older than the boot is removed too, whatever its pid says (pids are reused).
2. ``temproots/<pid>`` files nobody holds locked any more are removed (their process is
   gone; the lock died with it).
3. After a reboot (``/proc/sys/kernel/random/boot_id`` differs from the one recorded in
   ``$ROOT/boot-id``), under the exclusive GC lock: every ``.links`` blob no store path
   links to (link count 1) is removed. Blobs are published without an fsync of their own
   (a path's files are made durable when it is committed); after a power cut an
   unreferenced blob may have lost its contents, and the next ``add`` of the same bytes
   would otherwise link to it. Then the new boot id is recorded (durably).

Nothing else needs recovering: a path is valid only through its LMDB record, which is
committed durably after its files (so a crash leaves at most unregistered entries in
``store/``, which are never served and are removed by ``verify``/``gc`` or replaced by the
next writer), and locks are ``flock`` locks, which the kernel drops with their process --
a stale lock cannot exist. LMDB's reader slots of dead processes are cleared on open
(``db.py``); its writer lock is a robust mutex.
"""

from __future__ import annotations

import os
import time

from . import fsutil
from .roots import clean_temp_roots

BOOT_ID = "/proc/sys/kernel/random/boot_id"
MARKER = "boot-id"


def boot_id() -> str | None:
    try:
        with open(BOOT_ID) as f:
            return f.read().strip() or None
    except OSError:
        return None


def boot_time() -> float:
    """Seconds since the epoch at which this boot began (0.0 if unknown)."""
    try:
        with open("/proc/uptime") as f:
            return time.time() - float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0






def recover(store) -> dict:
    """Clean up after dead processes (and, after a reboot, possibly unwritten blobs).
    Returns counts of what was removed, for tests and ``-v`` output. Never raises for
    garbage it cannot remove (a read-only store, a busy lock): the next open tries again."""
    done = {"tmp": 0, "temproots": 0, "blobs": 0, "rebooted": False}
    current = boot_id()
    marker = os.path.join(store.root, MARKER)
    recorded = None
    if current is not None:
        try:
            with open(marker) as f:
                recorded = f.read().strip()
        except FileNotFoundError:
            recorded = ""  # a new store, or one written before markers: treat as after a reboot
        except OSError:
            recorded = current
    rebooted = current is not None and recorded != current
    done["rebooted"] = rebooted
    try:
        done["tmp"] = clean_tmp(store, boot_time() if rebooted else None)
        done["temproots"] = clean_temp_roots(store)
        if rebooted:
            _after_reboot(store, marker, current, done)
    except OSError:
        pass  # e.g. a store we may only read: nothing to clean as far as we are concerned
    return done


def clean_tmp(store, older_than: float | None = None) -> int:
    """Remove ``tmp/`` entries of processes that are gone (or, with ``older_than``, any
    entry whose last change is before that time: the previous boot's)."""
    removed = 0
    with os.scandir(store.tmp) as it:
        entries = list(it)
    for entry in entries:
        pid = fsutil.pid_of(entry.name)
        stale = pid is not None and pid != os.getpid() and not fsutil.alive(pid)
        if not stale and older_than is not None:
            try:
                stale = entry.stat(follow_symlinks=False).st_ctime < older_than
            except FileNotFoundError:
                continue
        if stale:
            fsutil.remove_tree(entry.path)
            removed += 1
    return removed


def _after_reboot(store, marker: str, current: str, done: dict) -> None:
    lock = os.path.join(store.locks, "gc.lock")
    deadline = time.monotonic() + 1.0
    while True:
        with fsutil.file_lock(lock, shared=False, blocking=False) as taken:
            if taken:
                try:
                    with open(marker) as f:
                        if f.read().strip() == current:
                            return  # another process of this boot recovered first
                except FileNotFoundError:
                    pass
                done["blobs"] = remove_unlinked_blobs(store)
                fsutil.write_atomic(marker, (current + "\n").encode())
                return
        if time.monotonic() > deadline:
            return  # busy (a gc, or writers of this boot): the next open tries again
        time.sleep(0.02)


def remove_unlinked_blobs(store) -> int:
    """Remove every ``.links`` blob no store path links to. The caller holds the GC lock
    exclusively (no writer is between publishing a blob and linking it)."""
    removed = 0
    with os.scandir(store.links) as it:
        for entry in it:
            try:
                if entry.stat(follow_symlinks=False).st_nlink == 1:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
    return removed
