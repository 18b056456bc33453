"""Garbage collection: delete every valid path not reachable from a root.

Roots are the registered roots (out-links, ``gcroots/``) and the temp roots of running
processes (``roots.py``); a live path keeps what it refers to and the ``.drv`` that built
it. Writers hold the GC lock shared while they publish blobs and register paths, and GC
holds it exclusively for its whole run, so a collection never races a registration. Paths
are invalidated referrers-first (so no valid path ever refers to an invalid one, even if
GC is killed) and their files deleted after; unreferenced blobs in ``.links`` go last.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field

from . import fsutil
from .paths import StorePath, is_hash_part
from .roots import gc_lock, list_roots, live_temp_roots


@dataclass
class GcResult:
    deleted: list[str] = field(default_factory=list)  # logical paths
    freed: int = 0  # bytes of file content no longer stored
    kept: int = 0  # valid paths left: reachable ones, and those --max-freed spared


def reachable(store, roots) -> set[str]:
    """Hash parts of every valid path reachable from ``roots`` (base names or StorePaths):
    through references, and from a live output to the ``.drv`` that built it (as Nix's
    ``keep-derivations``: ``fimio realise --check``, ``diff`` and ``provenance`` of a live
    output need its derivation, whose own references then keep its sources)."""
    seen: set[str] = set()
    stack = [r if isinstance(r, str) else r.base for r in roots]
    while stack:
        base = stack.pop()
        hash_part = base.partition("-")[0]
        if hash_part in seen:
            continue
        info = store.query_hash(hash_part)
        if info is None:
            continue
        seen.add(hash_part)
        stack.extend(r.base for r in info.references)
        if info.deriver:
            stack.append(info.deriver)
    return seen


def collect(store, dry_run: bool = False, max_freed: int | None = None, on_wait=None) -> GcResult:
    """Delete unreachable paths (or, with ``dry_run``, only list them). ``on_wait()`` is
    called when the GC lock is busy (a writer holds it), before waiting for it."""
    result = GcResult()
    with _exclusive_lock(store, on_wait):
        roots = list(list_roots(store, prune=not dry_run).values()) + list(live_temp_roots(store))
        alive = reachable(store, roots)
        infos = {i.path.hash_part: i for i in store.all_paths()}
        dead = {h: i for h, i in infos.items() if h not in alive}
        gone: set[str] = set()  # hash parts deleted
        for info in _referrers_first(dead):
            if max_freed is not None and result.freed >= max_freed:
                break
            result.deleted.append(store.logical(info.path))
            result.freed += info.size
            if dry_run:
                continue
            with store.db.write() as txn:
                store.invalidate(txn, info)
            gone.add(info.path.hash_part)
            fsutil.remove_tree(store.physical(info.path))
        result.kept = len(infos) - len(result.deleted)  # reachable, and (--max-freed) left for later
        if not dry_run:
            # what a crashed writer or a killed gc left half-deleted goes too, then the blobs
            # only it linked to
            store.remove_garbage(set(infos) - gone)
            _remove_unused_blobs(store)
            _remove_unheld_locks(store)
    return result


def _remove_unheld_locks(store) -> None:
    """Delete the per-path lock files no writer holds: every add leaves one, and a store
    that lives long would pile them up (the next writer of a path makes its file again)."""
    for entry in os.scandir(store.locks):
        if entry.name.endswith(".lock") and is_hash_part(entry.name[:-5]):
            fsutil.remove_lock_file(entry.path)


@contextmanager
def _exclusive_lock(store, on_wait):
    with gc_lock(store, exclusive=True, blocking=False) as taken:
        if taken:
            yield
            return
    if on_wait is not None:
        on_wait()
    with gc_lock(store, exclusive=True):
        yield


def _referrers_first(dead: dict) -> list:
    """Order dead paths so every path comes after all (dead) paths that refer to it."""
    order, done = [], set()
    referrers: dict[str, list[str]] = {h: [] for h in dead}
    for h, info in dead.items():
        for ref in info.references:
            if ref.hash_part in referrers and ref.hash_part != h:
                referrers[ref.hash_part].append(h)

    for start in sorted(dead):  # depth first without recursion: a chain may be any length
        if start in done:
            continue
        stack, open_ = [(start, iter(referrers[start]))], {start}
        while stack:
            h, rest = stack[-1]
            r = next((r for r in rest if r not in done and r not in open_), None)
            if r is not None:
                stack.append((r, iter(referrers[r])))
                open_.add(r)
                continue
            stack.pop()
            open_.discard(h)
            done.add(h)
            order.append(dead[h])
    return order


def _remove_unused_blobs(store) -> int:
    freed = 0
    with os.scandir(store.links) as it:
        for entry in it:
            st = entry.stat(follow_symlinks=False)
            if st.st_nlink == 1:
                os.unlink(entry.path)
                freed += st.st_size
    return freed


def roots_report(store) -> dict[str, StorePath]:
    """Registered roots and live temp roots, for ``fimio roots``."""
    out = dict(list_roots(store))
    for base in sorted(live_temp_roots(store)):
        try:
            out[f"(temp) {base}"] = StorePath.parse(base)
        except Exception:
            continue
    return out
