"""The evaluation cache: derivation file -> ``.drv`` path, valid while no file it read changed.

Instantiating a TOML target means parsing TOML and hashing every source tree, which is
most of a no-op ``fimio realise``. Each instantiation records the files it read — the
derivation files of the whole graph and every ``path`` input — with a stat signature
(device, inode, size, mtime, ctime of every entry, as git's index and ccache do). A later
realise of the same file in the same store reuses the ``.drv`` path when every signature
still matches; any change, anywhere, means a full instantiation.

This module stays import-light: the fast path of ``fimio realise`` uses it before click.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat


def stat_signature(path: str) -> str:
    """A digest of the lstat of ``path`` and, for a directory, of every entry below it; for
    a ``path`` that is a symlink also of what it points to (a derivation file is read
    through its symlink: an edit of the target must show)."""
    h = hashlib.sha256()
    if os.path.islink(path):
        try:
            h.update(f"->{_stat_line(os.stat(path))}".encode())
        except OSError:
            h.update(b"->missing\n")
    stack = [path]
    while stack:
        p = stack.pop()
        try:
            st = os.lstat(p)
        except OSError:
            h.update(os.fsencode(p) + b"\0missing\n")  # fsencode: names need not be UTF-8
            continue
        h.update(os.fsencode(p) + f"\0{_stat_line(st)}".encode())
        if stat.S_ISDIR(st.st_mode):
            try:
                names = sorted(os.listdir(p))
            except OSError:
                h.update(b"unreadable\n")
                continue
            stack.extend(os.path.join(p, n) for n in reversed(names))
    return h.hexdigest()


def _stat_line(st) -> str:
    return f"{st.st_mode}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}\n"


def cache_key(file: str, store_dir: str) -> bytes:
    return store_dir.encode() + b"\0" + os.fsencode(os.path.abspath(file))  # names need not be UTF-8


def make_entry(drv_base: str, signatures: dict[str, str]) -> bytes:
    """``signatures`` must be taken *before* each file was read, so a change made while
    instantiating invalidates the entry instead of hiding behind it."""
    return json.dumps({"drv": drv_base, "deps": dict(sorted(signatures.items()))}).encode()


def lookup(value: bytes | None) -> str | None:
    """The cached ``.drv`` base name if every recorded file is unchanged, else None."""
    if value is None:
        return None
    entry = json.loads(value)
    for path, sig in entry["deps"].items():
        if stat_signature(path) != sig:
            return None
    return entry["drv"]
