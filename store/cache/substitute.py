"""Substitution: obtain store paths (with their closures) from caches, verified.

Use::

    subs = SubstituterSet.from_config(store, config)            # or SubstituterSet(store, urls, keys)
    got = subs.substitute(paths)                                 # set of StorePath now valid
    got = subs.substitute_outputs([(drv_hash, "out", path), …])  # + realisations recorded
    plan = subs.plan_outputs([...]); got = subs.fetch(plan)      # the same in two steps
    subs.close()

:meth:`SubstituterSet.substitute` takes the paths not yet valid, asks every substituter
in parallel (one batched query per substituter and closure level), takes each path from
the first substituter in priority order that holds a correctly signed record, fetches
the whole closure (content checked against digests, sizes capped), materialises it under
``tmp/`` and registers it references first (one transaction per 256 paths, after one
``syncfs``; see ``ingest.register``). It returns the requested paths
that are valid afterwards (already valid ones included); paths no substituter holds
(or whose closure is incomplete everywhere) are simply absent from the result, so the
caller builds them.

Errors: IntegrityError (exit 4) when the only copies of a needed path are wrongly signed,
unsigned while ``require_sigs``, or corrupt -- nothing is registered then. RemoteError
(exit 6) when a substituter cannot be reached or refuses us (with ``on_error="skip"`` such
a substituter is dropped and the error kept in ``errors`` instead). UsageError when a
cache holds another store directory. The caller must not hold the per-path locks of the
paths (pass ``locks_held`` for those it does hold).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import fsutil
from ..errors import FimioError, IntegrityError, RemoteError
from ..paths import StorePath
from ..threadpool import ThreadPool
from .fetch import FetchStats, fetch_paths
from .ingest import register
from .keys import TrustedKeys
from .layout import MAX_INFO, MAX_REALISATION, Realisation, RemoteInfo, info_key, realisation_key
from .push import cache_params
from .url import open_with_config

_DIRECT_GETS = 8  # queries of up to this many records skip the batched existence check


@dataclass
class FetchPlan:
    """Paths a substitution would fetch (``{path: (Substituter, RemoteInfo)}``, closures
    complete) and the realisations it would record; plans of several queries merge."""

    paths: dict = field(default_factory=dict)
    realisations: list = field(default_factory=list)

    def merge(self, other: "FetchPlan") -> None:
        self.paths.update(other.paths)
        self.realisations.extend(other.realisations)


class Substituter:
    """One cache as a source: its backend and, once read, its parameters."""

    def __init__(self, url: str, backend, priority: int):
        self.url, self.backend, self.priority = url, backend, priority
        self._checked = False
        self.empty = False

    def check(self, store_dir: str) -> None:
        if not self._checked:
            self.empty = cache_params(self.backend, store_dir, create=False) is None
            self._checked = True


class SubstituterSet:
    """Several substituters in priority order (see the module docstring for the contract).

    ``store``: the LocalStore to fill. ``urls``: cache URLs, highest priority first (bad
    URLs: UsageError at construction). ``trusted_keys``: public keys (``name:base64`` strings
    or a TrustedKeys). ``require_sigs``: refuse unsigned/untrusted records (content is
    checked either way). ``config``: a Config, for http(s) tokens. ``jobs``: download
    threads. ``on_error``: ``"raise"`` (RemoteError propagates) or ``"skip"`` (the
    substituter is dropped for the rest of this set's life; the error is kept in
    ``errors``). ``stats``: objects and bytes downloaded so far. Use as a context manager
    or call :meth:`close`. Methods: :meth:`substitute`, :meth:`substitute_outputs` (or
    :meth:`plan_outputs` then :meth:`fetch`), :meth:`query`, :meth:`lookup_hash`,
    :meth:`realisations`.
    """

    def __init__(self, store, urls, trusted_keys=(), require_sigs: bool = True, config=None,
                 jobs: int = 8, on_error: str = "raise"):
        self.store = store
        self.trusted = trusted_keys if isinstance(trusted_keys, TrustedKeys) else TrustedKeys(trusted_keys)
        self.require_sigs = require_sigs
        self.on_error = on_error
        self.errors: list[FimioError] = []
        self.subs = [Substituter(u, open_with_config(u, config), i) for i, u in enumerate(dict.fromkeys(urls))]
        self.pool = ThreadPool(max_workers=max(2, jobs))
        self.stats = FetchStats()
        # wanted paths of the last substitution that a substituter holds but could not give
        # whole: what of their closure no substituter (nor this store) has
        self.incomplete: dict[StorePath, list[StorePath]] = {}

    @classmethod
    def from_config(cls, store, config, urls=None, **kw) -> "SubstituterSet":
        """Substituters ``urls`` (default: the config's), trusting the config's keys."""
        return cls(store, config.substituters if urls is None else urls, config.trusted_public_keys,
                   config.require_sigs, config, **kw)

    def close(self, interrupted: bool = False) -> None:
        self.pool.close(interrupted)
        for s in self.subs:
            s.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(interrupted=isinstance(exc, KeyboardInterrupt))

    # ---- querying ----------------------------------------------------------------------

    def _live(self) -> list[Substituter]:
        live = []
        for s in list(self.subs):
            try:
                s.check(self.store.store_dir)
            except RemoteError as e:
                self._fail(s, e)
                continue
            if not s.empty:
                live.append(s)
        return live

    def drop(self, url: str) -> None:
        """Stop using the substituter at ``url`` (one that failed while its objects were
        downloaded) for the rest of this set's life."""
        self.subs = [s for s in self.subs if s.url != url]

    def _fail(self, sub: Substituter, e: FimioError) -> None:
        if self.on_error != "skip":
            raise e
        self.errors.append(e)
        if sub in self.subs:
            self.subs.remove(sub)

    def _get_verified(self, sub: Substituter, key: str, cap: int, parse, fingerprint_of):
        """GET and parse one record; returns the record, None if absent, or an IntegrityError.

        ``parse(key, data, where)`` raises IntegrityError for a malformed or mismatched record."""
        data = sub.backend.get(key, cap)
        if data is None:
            return None
        where = f"{sub.url}/{key}"
        try:
            record = parse(key, data, where)
        except IntegrityError as e:
            return e
        if self.require_sigs and self.trusted.verify(fingerprint_of(record), record.signatures) is None:
            what = "no signature by a trusted key" if record.signatures else "no signature"
            return IntegrityError(f"'{where}' has {what}",
                                  "add the signer's public key to trusted-public-keys, or push with --key")
        return record

    def _query_sub(self, sub: Substituter, keys: list[str], cap: int, parse, fingerprint_of) -> dict:
        try:
            # a few keys are cheaper to GET at once (404: absent) than to ask about first
            if len(keys) > _DIRECT_GETS and sub.backend.smart:
                absent = sub.backend.missing(keys)
                keys = [k for k in keys if k not in absent]
            results = self.pool.map(lambda k: self._get_verified(sub, k, cap, parse, fingerprint_of), keys)
            return {k: r for k, r in zip(keys, results) if r is not None}
        except RemoteError as e:
            self._fail(sub, e)
            return {}

    def _query(self, keys: list[str], cap: int, parse, fingerprint_of) -> tuple[dict, dict]:
        """Ask every live substituter for ``keys`` at once; ``({key: (sub, record)}, {key: error})``
        where each key is taken from the first substituter, in priority order, with a good record."""
        live = self._live()
        if not keys or not live:
            return {}, {}
        with ThreadPool(max_workers=len(live)) as outer:
            answers = list(outer.map(lambda s: self._query_sub(s, keys, cap, parse, fingerprint_of), live))
        found, refused = {}, {}
        for key in keys:
            for sub, answer in zip(live, answers):
                r = answer.get(key)
                if isinstance(r, IntegrityError):
                    refused.setdefault(key, r)
                elif r is not None:
                    found[key] = (sub, r)
                    break
        return found, {k: e for k, e in refused.items() if k not in found}

    def _parse_info(self, key: str, data: bytes, where: str) -> RemoteInfo:
        return RemoteInfo.parse(data, self.store.store_dir, key[len("info/"):-len(".json")], where)

    def _parse_realisation(self, key: str, data: bytes, where: str) -> Realisation:
        drv_hash, _, output = key[len("realisations/"):-len(".json")].partition("!")
        return Realisation.parse(data, self.store.store_dir, drv_hash, output, where)

    def query(self, paths) -> dict[StorePath, tuple[Substituter, RemoteInfo]]:
        """For each of ``paths``, the best substituter holding a valid signed info (closures
        not checked); paths absent or only wrongly signed are left out."""
        return self._query_infos(list(paths))[0]

    def _query_infos(self, paths: list[StorePath]):
        store_dir = self.store.store_dir
        keys = {info_key(p.hash_part): p for p in paths}
        found, refused = self._query(list(keys), MAX_INFO, self._parse_info, lambda r: r.fingerprint(store_dir))
        return ({keys[k]: v for k, v in found.items()}, {keys[k]: e for k, e in refused.items()})

    # ---- substituting ------------------------------------------------------------------

    def substitute(self, paths, locks_held=()) -> set[StorePath]:
        """Make ``paths`` valid from the substituters where possible; see the module docstring."""
        wanted = list(dict.fromkeys(paths))
        self.fetch(FetchPlan(self._choose(wanted)), locks_held)
        return {p for p in wanted if self.store.is_valid(p)}

    def substitute_outputs(self, outputs, locks_held=()) -> set[StorePath]:
        """Like :meth:`substitute` for derivation outputs ``[(drv hash, output, StorePath)]``:
        the realisations are fetched (signed, and they must name these paths and agree
        with the fetched root digests) and recorded in the local database with the paths."""
        self.fetch(self.plan_outputs(outputs), locks_held)
        return {p for _, _, p in outputs if self.store.is_valid(p)}

    def plan_outputs(self, outputs) -> FetchPlan:
        """What :meth:`substitute_outputs` would fetch, without fetching it: each output it
        would make valid and each path of their closures not valid here, with the
        realisations it would record. Records are verified as for a substitution (the
        refusals raise alike); :meth:`fetch` then fetches the plan."""
        realisations = self._realisations_of(outputs)
        plan = FetchPlan(self._choose(list(dict.fromkeys(p for _, _, p in outputs))))
        plan.realisations = _agreeing(self.store, realisations, {p: info.root for p, (_, info) in plan.paths.items()})
        return plan

    def fetch(self, plan: FetchPlan, locks_held=()) -> set[StorePath]:
        """Fetch and register what :meth:`plan_outputs` planned; return the paths now valid."""
        pairs = [(sub.backend, info) for _, (sub, info) in sorted(plan.paths.items())]
        if pairs or plan.realisations:
            with _writing(self.store):
                self._fetch_and_register(pairs, plan.realisations, locks_held)
        return {p for p in plan.paths if self.store.is_valid(p)}

    def _realisations_of(self, outputs) -> list[Realisation]:
        store_dir = self.store.store_dir
        want = {realisation_key(h, o): (h, o, p) for h, o, p in outputs}
        found, refused = self._query(list(want), MAX_REALISATION, self._parse_realisation,
                                     lambda r: r.fingerprint(store_dir))
        realisations = []
        for key, (sub, r) in found.items():
            if r.path != want[key][2]:
                raise IntegrityError(f"cache '{sub.url}' claims output '{r.output}' of {r.drv_hash} is "
                                     f"'{r.path.logical(store_dir)}', not '{want[key][2].logical(store_dir)}'",
                                     "the cache is corrupt or hostile")
            realisations.append(r)
        return realisations

    def _choose(self, wanted: list[StorePath]) -> dict:
        """Find ``wanted`` and their closures in the substituters: ``{path: (substituter,
        info)}`` for each path found whose whole closure is valid here or found. Sets
        :attr:`incomplete`; raises the refusal of a needed path only wrongly signed or corrupt."""
        store = self.store
        chosen: dict[StorePath, tuple] = {}
        visited: set[StorePath] = set(wanted)
        frontier = [p for p in _held(store, wanted) if not store.is_valid(p)]
        refused_all: dict[StorePath, IntegrityError] = {}
        while frontier:
            found, refused = self._query_infos(frontier)
            refused_all.update(refused)
            refs = []
            for p in frontier:
                if p in found:
                    chosen[p] = found[p]
                    refs += [r for r in found[p][1].references if r not in visited]
                    visited.update(refs)
            frontier = [r for r in _held(store, refs) if not store.is_valid(r)]
        complete = _complete(store, chosen)
        self.incomplete = {p: _lacking(store, chosen, p) for p in wanted if p in chosen and p not in complete}
        # a needed path that only exists wrongly signed or corrupt is an alarm, not a miss
        for p, e in refused_all.items():
            if p not in chosen and _needed(p, wanted, chosen):
                raise e
        return {p: chosen[p] for p in complete}

    def _fetch_and_register(self, pairs, realisations, locks_held) -> None:
        store = self.store
        items = fetch_paths(store, pairs, self.pool, self.stats) if pairs else []
        try:
            # checked again: a path valid here when the plan was made may have been collected since
            good = _agreeing(store, realisations, {info.path: info.root for _, info, _ in items})
            self.stats.paths += len(register(store, items, good, locks_held))
        except BaseException:
            for tmp, _, _ in items:
                fsutil.remove_tree(tmp)
            raise

    def lookup_hash(self, hash_part: str) -> StorePath | None:
        """The store path with this hash part that the first substituter holding it names."""
        found, refused = self._query_infos([StorePath(hash_part, "x")])
        for (sub, info) in found.values():
            return info.path
        for e in refused.values():
            raise e
        return None

    # ---- realisations (for challenge) -------------------------------------------------

    def realisations(self, drv_hash: str, output: str) -> list[tuple[str, Realisation | IntegrityError | None]]:
        """What each substituter claims for one derivation output, in priority order:
        ``(url, Realisation | IntegrityError (bad/untrusted record) | None (absent))``."""
        store_dir = self.store.store_dir
        key = realisation_key(drv_hash, output)
        out = []
        for sub in list(self.subs):
            try:
                sub.check(store_dir)
                r = None if sub.empty else self._get_verified(
                    sub, key, MAX_REALISATION, self._parse_realisation, lambda x: x.fingerprint(store_dir))
            except RemoteError as e:
                self._fail(sub, e)
                continue
            out.append((sub.url, r))
        return out


def _agreeing(store, realisations: list[Realisation], roots: dict) -> list[Realisation]:
    """The realisations whose path is fetched (``roots``: path -> root digest) or valid here.
    Raises IntegrityError for one whose root digest is not that path's."""
    good = []
    for r in realisations:
        root = roots.get(r.path)
        if root is None:
            local = store.query(r.path)
            root = local.root if local is not None else None
        if root is not None and root != r.root:
            raise IntegrityError(f"realisation of {r.drv_hash}!{r.output} disagrees with the fetched "
                                 "path's digest", "the cache is inconsistent; try 'fimio challenge'")
        if root is not None:
            good.append(r)
    return good


def _writing(store):
    """The store's shared GC lock (a concurrent ``gc`` must not delete fresh blobs), if any."""
    import contextlib

    writing = getattr(store, "writing", None)
    return writing() if writing is not None else contextlib.nullcontext()


def _held(store, paths: list) -> list:
    """``paths``, recorded as temp roots (when the store keeps them) before their validity is
    judged: a path found valid here is not fetched, so a concurrent gc must not take it."""
    if getattr(store, "temp_roots", None) is not None and paths:
        store.temp_roots.add(paths)
    return paths


def _complete(store, chosen: dict) -> set[StorePath]:
    """The chosen paths whose whole closure is valid locally or chosen: all but those that
    reach, through chosen paths, a reference neither valid here nor chosen (found walking
    back from such references, without recursion: a closure may be a chain of any length)."""
    referrers: dict[StorePath, list[StorePath]] = {}
    incomplete: list[StorePath] = []
    for p, (_, info) in chosen.items():
        for r in info.references:
            if r in chosen:
                referrers.setdefault(r, []).append(p)
            elif not store.is_valid(r):
                incomplete.append(p)
    seen = set(incomplete)
    while incomplete:
        for q in referrers.get(incomplete.pop(), ()):
            if q not in seen:
                seen.add(q)
                incomplete.append(q)
    return set(chosen) - seen


def _lacking(store, chosen: dict, top: StorePath) -> list[StorePath]:
    """The paths of ``top``'s closure that are neither valid here nor chosen (held by a substituter)."""
    lacking, seen, todo = [], {top}, [top]
    while todo:
        for r in chosen[todo.pop()][1].references:
            if r in seen:
                continue
            seen.add(r)
            if r in chosen:
                todo.append(r)
            elif not store.is_valid(r):
                lacking.append(r)
    return sorted(lacking)


def _needed(p: StorePath, wanted, chosen) -> bool:
    if p in wanted:
        return True
    return any(p in info.references for _, info in chosen.values())
