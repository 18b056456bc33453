"""What an offline rebuild needs, and getting it while online (``spec/offline.md``).

A from-scratch rebuild of a derivation graph needs, besides the host paths of the sandbox:
every ``.drv`` file of the graph, every source and ``store`` input (the closures of the
``.drv`` files hold both), and the result of every fixed-output derivation (the only
builds that use the network) with its realisation. It does not need the outputs of the
regular derivations: those are rebuilt. :func:`rebuild_set` computes that set,
:func:`prefetch` makes it valid locally (fetching fixed outputs through the
:class:`~fimio.store.realise.Realiser`) and optionally pushes it to a cache, and
:func:`substitute_drv_targets` lets ``realise`` of a ``.drv`` path that is not valid here
take it (with its closure) from the substituters.

Offline mode never opens a network connection: only ``file://`` caches are used, and an
online-only request is refused up front by :func:`refuse_network`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .errors import NotFound, RemoteError, UsageError
from .instantiate import is_derivation_file
from .paths import StorePath, is_hash_part


# ---- offline policy -------------------------------------------------------------------------


def is_network_url(url: str) -> bool:
    """True for cache URLs that need the network (everything but ``file://``)."""
    return not url.startswith("file://")


def refuse_network(url: str, why: str = "--offline") -> None:
    """Raise RemoteError (exit 6) for a network cache ``url`` while offline; ``why`` names the
    setting that made us offline. No connection is attempted."""
    if is_network_url(url):
        raise RemoteError(f"fimio is offline ({why}): not connecting to cache '{url}'",
                          "use a file:// cache, or drop --offline" if why == "--offline" else
                          "use a file:// cache, or set offline = false in the config file "
                          "(realise and prefetch also take --no-offline)")


# ---- targets ----------------------------------------------------------------------------------


def is_derivation_target(store, target: str) -> bool:
    """True if TARGET names a derivation: a derivation file, or a ``.drv`` store path or hash
    part (valid here or not). Store paths that are not ``.drv`` files are not."""
    if is_derivation_file(store, target):
        return True
    base = _store_base(store, target)
    if base is None and os.path.lexists(target):  # ./result, a symlink, another spelling of the root
        try:
            path, sub = store.resolve(target, must_be_valid=False)
        except (UsageError, NotFound):
            return False
        return not sub and path.name.endswith(".drv")
    if base is None:
        return False
    if is_hash_part(base):
        info = store.query_hash(base)
        return info is not None and info.path.name.endswith(".drv")
    return base.endswith(".drv")


def _store_base(store, text: str) -> str | None:
    """The first component after the store directory (physical or logical), or a bare name."""
    for prefix in (store.store + "/", store.store_dir + "/"):
        if text.startswith(prefix):
            return text[len(prefix):].split("/", 1)[0]
    if "/" in text:
        return None
    return text


def _target_path(store, target: str) -> tuple[str | None, StorePath | None]:
    """``(hash part, StorePath)`` of a store-path TARGET (a path, physical or logical, or a
    bare hash part: no StorePath then); ``(None, None)`` for anything else."""
    base = _store_base(store, target)
    if base is None:
        return None, None
    if is_hash_part(base):
        return base, None
    try:
        path = StorePath.parse(base)
    except UsageError:
        return None, None
    return path.hash_part, path


def target_hash_part(store, target: str) -> str | None:
    """The hash part of a store-path TARGET, or None for anything else."""
    return _target_path(store, target)[0]


def absent_target_line(store, target: str) -> str | None:
    """The line naming a store-path TARGET that is not valid here, in the form of the
    others (``<logical path or hash part>: <why>``); None if TARGET is no store path."""
    hash_part, path = _target_path(store, target)
    if path is not None:
        logical = path.logical(store.store_dir)
        if not path.name.endswith(".drv"):  # realise takes derivations; a plain path is copied
            return f"{logical}: not in this store, and no derivation ('fimio copy --from URL {logical}' fetches it)"
        return f"{logical}: not in this store"
    return f"{hash_part}: no store path with this hash here" if hash_part else None


def substitute_drv_targets(store, substituters, targets) -> dict[str, str]:
    """Make each ``.drv`` TARGET that is not valid here valid from ``substituters`` (with its
    closure: input derivations, sources, ``store`` inputs). Targets that are derivation files
    or already valid are left alone. Returns what cannot be had, complete: ``{target: line}``
    for every target no substituter holds (whole), the line naming it and why."""
    wanted: dict[StorePath, list[str]] = {}  # path -> the targets naming it
    lacking: dict[str, str] = {}
    for target in targets:
        if is_derivation_file(store, target):
            continue
        hash_part, path = _target_path(store, target)
        if hash_part is None:
            continue
        if path is None:  # a bare hash part
            if store.query_hash(hash_part) is not None:
                continue
            path = substituters.lookup_hash(hash_part)
            if path is None:
                lacking[target] = f"{hash_part}: no store path with this hash here or in any substituter"
                continue
        if path.name.endswith(".drv") and not store.is_valid(path):
            wanted.setdefault(path, []).append(target)
    if store.temp_roots is not None:
        store.temp_roots.add(list(wanted))
    got = substituters.substitute(list(wanted)) if wanted else set()
    for p, names in wanted.items():
        if p in got:
            continue
        lack = substituters.incomplete.get(p)
        line = (f"{store.logical(p)}: held by a substituter, but not what it refers to: "
                + ", ".join(store.logical(r) for r in lack) if lack
                else f"{store.logical(p)}: derivation not obtainable")
        lacking.update((target, line) for target in names)
    fetched = [p for p in wanted if p in got]
    if fetched and store.temp_roots is not None:
        store.temp_roots.add(store.closure(fetched))
    return lacking


# ---- the rebuild set -----------------------------------------------------------------------


@dataclass
class RebuildSet:
    """Everything a from-scratch rebuild of some derivations needs (see the module doc)."""

    drvs: list = field(default_factory=list)  # every Derivation of the graph, dependencies first
    fixed: list = field(default_factory=list)  # the fixed-output ones
    paths: list[StorePath] = field(default_factory=list)  # .drv files and fixed outputs (take closures)
    realisations: list = field(default_factory=list)  # cache.layout.Realisation of the fixed outputs


def local_realisation(store, drv, output: str):
    """The realisation of ``drv``'s ``output`` as this store knows it, or None if the output
    is not valid. Made from the path's info when the database has no record of it (e.g. a
    path that came without one); signatures are those recorded locally."""
    from .cache.layout import Realisation

    path = drv.output_paths()[output]
    info = store.query(path)
    if info is None:
        return None
    with store.db.read() as txn:
        data = txn.get(f"{drv.drv_hash}!{output}".encode(), db=store.db.dbs["realisations"])
    if data is not None:
        r = Realisation.from_local(bytes(data))
        if r.path == path and r.root == info.root:
            return r
    return Realisation(drv.drv_hash, drv.drv_path.base, output, path, info.root, [])


def rebuild_set(store, graph, roots) -> RebuildSet:
    """The :class:`RebuildSet` of derivations ``roots``. Raises NotFound naming every fixed
    output that is not valid here (fetch them first: :func:`prefetch`)."""
    rs = RebuildSet(drvs=graph.closure(list(roots)))
    missing = []
    for drv in rs.drvs:
        rs.paths.append(drv.drv_path)
        if not drv.is_fixed_output:
            continue
        rs.fixed.append(drv)
        for name, p in drv.output_paths().items():
            r = local_realisation(store, drv, name)
            if r is None:
                missing.append(f"{store.logical(p)}: fixed-output derivation {drv.drv_path.base} was never fetched "
                               f"({drv.fetch['url']})")
                continue
            rs.paths.append(p)
            rs.realisations.append(r)
    if missing:
        raise NotFound(f"{len(missing)} fixed-output result(s) are not in this store", "run 'fimio prefetch' first",
                       details=missing)
    return rs


# ---- prefetch -----------------------------------------------------------------------------


@dataclass
class PrefetchResult:
    targets: list = field(default_factory=list)  # Derivation
    rebuild: RebuildSet = field(default_factory=RebuildSet)
    fetched: list[str] = field(default_factory=list)  # .drv bases of fixed outputs fetched now
    substituted: list[str] = field(default_factory=list)  # logical paths taken from substituters
    push: object = None  # cache.push.PushStats when pushed


def prefetch(store, targets, *, substituters=None, offline: bool = False, jobs: int = 0,
             to_backend=None, keys=(), warn=None) -> PrefetchResult:
    """Make everything a from-scratch offline rebuild of ``targets`` needs valid here: the
    ``.drv`` files and sources (instantiating derivation files; ``.drv`` targets not valid
    here come from ``substituters``) and every fixed-output result (from ``substituters``,
    else fetched -- never when ``offline``). Regular derivations are not built.

    With ``to_backend``, then push the closure of all that, and the fixed outputs'
    realisations, signed by ``keys``, so that the cache alone serves an offline rebuild.
    Raises NotFound (naming each item) when something cannot be had, IntegrityError on a
    hash mismatch of a fetch, RemoteError from the cache."""
    from .realise import RealiseOptions, Realiser

    options = RealiseOptions(jobs=jobs, offline=offline, substituters=substituters or [])
    realiser = Realiser(store, options)
    if warn is not None:
        realiser.warn = warn
    try:
        roots = realiser.load_targets(list(targets))
        fixed = [d for d in realiser.graph.closure(roots) if d.is_fixed_output and realiser.missing_outputs(d)]
        if not fixed:
            realiser.check_obtainable([])  # names what load_targets found lacking, if anything
        built = realiser.realise_drvs(fixed) if fixed else []
        result = PrefetchResult(roots, rebuild_set(store, realiser.graph, roots), built, list(realiser.substituted))
        if to_backend is not None:
            from .cache.push import Pusher

            rs = result.rebuild
            result.push = Pusher(store, to_backend, keys).push(rs.paths, rs.realisations, [d.drv_hash for d in rs.fixed])
        return result
    finally:
        realiser.close()
