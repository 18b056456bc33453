"""Repair of damaged store paths from substituters (``fimio verify --repair``).

Policy (``spec/reliability.md`` §Repair):

* A damaged path (contents that no longer match the registered root digest, files missing
  or unreadable, the path missing on disk, its directory objects missing from the
  database) is fetched again from the substituters, in priority order, with the usual
  checks (signatures by trusted keys when ``require-sigs``, every object against its
  digest). A copy is accepted **only if its root digest equals the registered one**: the
  registered digest is what the path's referrers, realisations and signatures vouch for.
  A cache holding another digest for the path (a non-reproducible rebuild, an attack) is
  refused and named -- unlike ``nix-store --repair-path``, we never silently adopt a new
  hash. The database record is kept as it is.
* The good copy is materialised under ``tmp/``, rehashed, made durable, then swapped with
  the damaged one in one ``renameat2(RENAME_EXCHANGE)``: at every moment the store path
  holds either the damaged copy or the good one, never a mix nor nothing. Local blobs in
  ``.links`` that no longer match their digest (a damaged store file *is* its blob: they
  share the inode) are unlinked first, so the fetch downloads them again.
* A reference that is not valid is substituted like any missing path.
* Without substituters, or when none has the path with the registered digest, the
  problems are returned annotated with the reason; ``fimio verify`` then exits 4.
"""

from __future__ import annotations

import os
from contextlib import ExitStack

from . import fsutil
from .errors import FimioError
from .local import DAMAGED_RECORD, Problem, compare_trees
from .paths import StorePath
from .tree import blob_sizes, format_digest, hash_file, iter_dirs, scan


def _store_path(logical: str) -> StorePath | None:
    try:
        return StorePath.parse(logical.rsplit("/", 1)[-1])
    except Exception:  # noqa: BLE001 -- a problem line we cannot map is reported as is
        return None


def substituter_urls(opts) -> list[str]:
    """``opts.substituters`` (a ``--substituter`` flag), else the config's list."""
    urls = list(getattr(opts, "substituters", None) or ())
    return urls or list(opts.config().substituters)


def repair_paths(store, problems: list[Problem], opts, log=None) -> list[Problem]:
    """Repair what ``problems`` (from :meth:`LocalStore.verify`) describe; return the problems
    that remain (each annotated with why it was not repaired), after checking every
    repaired path again. ``opts``: has ``config()`` (and optionally ``substituters``).
    ``log(message)``: progress lines, e.g. "repaired X from URL". Raises nothing for an
    unobtainable path; RemoteError only for an unusable substituter URL."""
    from .cache.substitute import SubstituterSet

    log = log or (lambda message: None)
    config = opts.config()
    urls = substituter_urls(opts)
    if config.offline:
        from .cache.url import offline_usable

        urls = offline_usable(urls, log)
    damaged: dict[StorePath, list[Problem]] = {}
    dangling: dict[StorePath, list[Problem]] = {}
    other: list[Problem] = []
    for p in problems:
        path = _store_path(p.path)
        info = store.query(path) if path is not None else None
        if info is None:
            other.append(_annotate(p, "not repaired: repair fetches files, not database records; restore the "
                                      "database from a backup") if p.what == DAMAGED_RECORD else p)
        elif p.what.startswith("references '"):
            for ref in info.references:
                if not store.is_valid(ref):
                    dangling.setdefault(ref, []).append(p)
        else:
            damaged.setdefault(path, []).append(p)
    if not urls:
        return other + [_annotate(p, "not repaired: no substituter configured (see 'substituters' in the "
                                     "config file)") for ps in (*damaged.values(), *dangling.values()) for p in ps]
    subs = [SubstituterSet.from_config(store, config, urls=[u], on_error="skip") for u in dict.fromkeys(urls)]
    remaining = list(other)
    try:
        if dangling:
            got: set[StorePath] = set()
            for s in subs:
                want = [r for r in dangling if r not in got and not store.is_valid(r)]
                if want:
                    got |= s.substitute(want)
            for ref, ps in sorted(dangling.items()):
                if store.is_valid(ref):
                    log(f"substituted the missing reference '{store.logical(ref)}'")
                else:
                    remaining += [_annotate(p, f"not repaired: no substituter has '{store.logical(ref)}'") for p in ps]
        down: dict = {}  # a cache dropped as unreachable -> why: the reason for every path after
        for path, ps in sorted(damaged.items()):
            reasons = []
            fixed = False
            for s in subs:
                if s in down:
                    reasons.append(down[s])
                    continue
                try:
                    fixed = _repair_one(store, path, s, reasons)
                except FimioError as e:
                    reasons.append(f"{s.subs[0].url if s.subs else '?'}: {e.message}")
                if fixed:
                    log(f"repaired '{store.logical(path)}' from {s.subs[0].url}")
                    break
            for s in subs:
                reasons += [f"{e.message}" for e in s.errors]
                if s.errors and not s.subs:
                    down[s] = s.errors[-1].message
                s.errors.clear()
            if not fixed:
                why = "; ".join(dict.fromkeys(reasons)) or "no substituter has it"
                remaining += [_annotate(p, f"not repaired: {why}") for p in ps]
                continue
            info = store.query(path)
            if info is not None:
                again = ([Problem(store.logical(path), "is registered but missing on disk")]
                         if not os.path.lexists(store.physical(path)) else store._check_contents(info))
                remaining += again
    finally:
        for s in subs:
            s.close()
    return remaining


def _annotate(p: Problem, why: str) -> Problem:
    return Problem(p.path, f"{p.what} ({why})", p.file)


def _repair_one(store, path: StorePath, subs, reasons: list[str]) -> bool:
    """Try one substituter (a single-URL SubstituterSet) for one damaged path; True when the
    path now holds a verified copy."""
    from .cache.fetch import fetch_paths

    if not subs.subs:
        return False  # dropped: unreachable
    url = subs.subs[0].url
    found = subs.query([path])
    if path not in found:
        if subs.errors or not subs.subs:
            return False  # unreachable or broken: its error is the reason, not "does not have it"
        reasons.append(f"{url} does not have it (or not signed by a trusted key)")
        return False
    sub, remote = found[path]
    with ExitStack() as stack:
        stack.enter_context(store.writing())  # gc must not delete the path nor fresh blobs meanwhile
        stack.enter_context(store.lock_path(path))
        info = store.query(path)
        if info is None:
            return False  # collected meanwhile: nothing left to repair
        if remote.root != info.root:
            reasons.append(f"{url} has {format_digest(remote.root)} for it, not the registered "
                           f"{format_digest(info.root)}: refused")
            return False
        manifest = _manifest(sub.backend, remote)
        _purge_damaged_blobs(store, manifest.root)
        items = fetch_paths(store, [(sub.backend, remote)], subs.pool, subs.stats)
        (tmp, _, node), = items
        try:
            actual = scan(tmp, on_file=store._hash_only)
            if actual.digest != info.root:
                diff = compare_trees(node, actual)
                first = f"{diff[0][0]}: {diff[0][1]}" if diff else "its digest differs"
                reasons.append(f"the copy from {url} did not come out whole ({first})")
                return False
            fsutil.syncfs(store.root)  # the new files are durable before they replace the old
            _replace(store, tmp, store.physical(path))
            with store.db.write() as txn:  # restore directory objects the database lost
                tdb = store.db.dbs["trees"]
                for d in iter_dirs(node):
                    txn.put(d.digest, d.encoding(), db=tdb, overwrite=False)
        finally:
            fsutil.remove_tree(tmp)
    return True


def _manifest(backend, remote):
    """The path's manifest from the cache, checked against the (signed) root digest."""
    from .cache import manifest, packing
    from .cache.layout import object_key
    from .errors import IntegrityError

    key = object_key("trees", remote.manifest)
    data = backend.get(key, packing.compress_bound(remote.manifest_size))
    if data is None:
        raise IntegrityError(f"cache '{backend.url}' lacks '{key}'")
    raw = packing.decompress(data, remote.manifest_size, key)
    packing.check_digest(raw, remote.manifest, key)
    return manifest.decode(raw, remote.root, remote.size, key)


def _purge_damaged_blobs(store, root) -> int:
    """Unlink the ``.links`` entries of ``root``'s blobs whose contents no longer match their
    digest (so the fetch downloads them again); return how many."""
    purged = 0
    for digest, size in blob_sizes(root).items():
        for executable in (False, True):
            key = store.link_path(digest, executable)
            try:
                got, n = hash_file(key)
            except FileNotFoundError:
                continue
            if got != digest or n != size:
                try:
                    os.unlink(key)
                    purged += 1
                except FileNotFoundError:
                    pass
    return purged


def _replace(store, new: str, dest: str) -> None:
    """Put the tree ``new`` at ``dest`` atomically (swapping with what is there), then remove
    the old one. Without ``RENAME_EXCHANGE`` the old one is first moved aside (a short
    moment in which ``dest`` is missing; a kill then leaves it missing, which ``verify``
    reports and ``--repair`` fixes)."""
    if not os.path.lexists(dest):
        fsutil.move_tree(new, dest)
        fsutil.fsync_dir(os.path.dirname(dest))
        return
    if fsutil.exchange_trees(new, dest):
        fsutil.fsync_dir(os.path.dirname(dest))
        fsutil.remove_tree(new)  # now the damaged copy
        return
    aside = new + ".old"
    fsutil.move_tree(dest, aside)
    fsutil.move_tree(new, dest)
    fsutil.fsync_dir(os.path.dirname(dest))
    fsutil.remove_tree(aside)
