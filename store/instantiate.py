"""Instantiation: derivation files -> sources in the store -> ``.drv`` files in the store.

:class:`Graph` loads derivations from TOML files or from ``.drv`` store paths, memoises
them by logical ``.drv`` path, and computes hashes modulo fixed-output inputs.
"""

from __future__ import annotations

import os

import blake3

from . import evalcache
from .derivation import (
    DEFAULT_HOST_PATHS,
    FETCH_BUILDER,
    Derivation,
    Input,
    assign_outputs,
    host_system,
    parse_drv_json,
    read_toml,
)
from .errors import IntegrityError, NotFound, RemoteError, UsageError
from .paths import StorePath, check_name, is_hash_part, text_path


def is_derivation_file(store, text: str) -> bool:
    """Whether a TARGET names a derivation file (not a store path): a name ending in
    ``.toml``, or any file or directory that exists, outside the store (its physical or
    logical directory, or through a symlink such as ``./result``). A missing ``.toml`` is
    then not found (exit 5), a directory bad input (exit 2), as ``spec/derivation.md`` says."""
    if text.startswith((store.store + "/", store.store_dir + "/")):
        return False
    if os.path.lexists(text):
        real = os.path.realpath(text)
        if real.startswith(store.store + "/"):
            return False
        # a .toml file anywhere else is one, even inside another store's path (a checkout
        # in /nix/store); another store's path itself is "not in this store"
        return (text.endswith(".toml") and os.path.isfile(real)) or not _in_another_store(real)
    return text.endswith(".toml")


def _in_another_store(real: str) -> bool:
    """Whether a real path is (inside) a path of another fimio store, such as an out-link
    made with another root: that is "not in this store", not a broken derivation file."""
    parts = real.split("/")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i - 1] == "store" and not parts[i].endswith(".toml"):
            try:
                StorePath.parse(parts[i])
                return True
            except UsageError:
                continue
    return False


def note_lack(lines: dict[str, str], hash_part: str, line: str) -> None:
    """Record ``line`` as what is said of the missing path ``hash_part``: one line per path,
    and a line naming the whole path wins over one naming only its hash part."""
    if hash_part not in lines or lines[hash_part].startswith(hash_part):
        lines[hash_part] = line


class _Frame:
    """A derivation file being instantiated: its inputs still to resolve (the next one
    last) and those resolved."""

    def __init__(self, file: str, rd):
        self.file, self.rd = file, rd
        self.todo = list(rd.inputs.items())[::-1]
        self.inputs: dict[str, Input] = {}


class Graph:
    """The derivations reachable from some targets, by logical ``.drv`` path."""

    def __init__(self, store):
        self.store = store
        self.drvs: dict[str, Derivation] = {}
        self._by_file: dict[str, str] = {}
        self._hashes: dict[str, str] = {}
        self._sigs: dict[str, str] = {}  # file -> stat signature taken before reading it
        self._deps: dict[str, set[str]] = {}  # derivation file -> every file its graph read
        self._pending: list[tuple[str, bytes, list]] = []  # .drv files to write, dependencies first
        # ``store`` inputs not valid here: taken from the substituters if ``substitute``
        # (callable([StorePath]) -> set of those made valid) is set, else listed when the
        # graph is complete (every one named, not only the first). With ``defer_missing``
        # they are kept in ``unavailable`` instead, for the caller to name with whatever
        # else it finds lacking; the graph's ``.drv`` files are then not written (they would
        # refer to invalid paths) and the caller must refuse to go on.
        self.substitute = None
        self.defer_missing = False
        self.unavailable: dict[str, str] = {}  # hash part -> the line naming it (see note_lack)
        self._missing: list[tuple[StorePath, str]] = []

    # ---- loading ---------------------------------------------------------------------

    def target(self, text: str) -> Derivation:
        """A TARGET of `realise`: a derivation file, a ``.drv`` store path or its hash part."""
        if is_derivation_file(self.store, text):
            cached = self._cached(text)
            return cached if cached is not None else self.from_file(text)
        path, _ = self.store.resolve(text)
        if not path.name.endswith(".drv"):
            raise UsageError(f"'{text}' is not a derivation", "give a .toml file or a .drv store path")
        return self.load(self.store.logical(path))

    def _cached(self, file: str) -> Derivation | None:
        with self.store.db.read() as txn:
            value = txn.get(evalcache.cache_key(file, self.store.store_dir), db=self.store.db.dbs["evalcache"])
        base = evalcache.lookup(value)
        if base is None:
            return None
        if self.store.temp_roots is not None:  # protect first, then judge validity
            self.store.temp_roots.add([StorePath.parse(base)])
        if not self.store.is_valid(StorePath.parse(base)):
            return None
        return self.load(self.store.logical_base(base))

    def _remember(self, file: str, drv: Derivation) -> None:
        sigs = {p: self._sigs[p] for p in self._deps[file]}
        with self.store.db.write() as txn:
            txn.put(evalcache.cache_key(file, self.store.store_dir), evalcache.make_entry(drv.drv_path.base, sigs),
                    db=self.store.db.dbs["evalcache"])

    def _signature(self, path: str) -> None:
        self._sigs.setdefault(path, evalcache.stat_signature(path))

    def load(self, drv_logical: str) -> Derivation:
        """Read a ``.drv`` from the store, and the ``.drv`` files it needs, inputs first
        (memoised; without recursion, so a chain may be any length)."""
        stack = [] if drv_logical in self.drvs else [(drv_logical, self._read_drv(drv_logical))]
        loading = {drv_logical}
        while stack:
            logical, drv = stack[-1]
            unread = next((p for p in drv.input_drvs() if p not in self.drvs), None)
            if unread is not None:
                if unread in loading:
                    raise IntegrityError(f"derivation '{logical}' depends on itself", "the .drv file was forged")
                stack.append((unread, self._read_drv(unread)))
                loading.add(unread)
                continue
            stack.pop()
            claimed = dict(drv.outputs)
            assign_outputs(drv, self.drv_hash)  # sets drv_hash and the outputs it implies
            if claimed != drv.outputs:
                # a .drv from elsewhere (a cache, a bundle) must not claim another build's outputs
                raise IntegrityError(f"derivation '{logical}' names output paths its contents do not hash to",
                                     "the .drv file was forged or corrupted", expected=drv.outputs, got=claimed)
            self.drvs[logical] = drv
        return self.drvs[drv_logical]

    def _read_drv(self, drv_logical: str) -> Derivation:
        path = StorePath.parse(drv_logical.rsplit("/", 1)[1])
        if not self.store.is_valid(path):
            raise NotFound(f"derivation '{drv_logical}' is not in this store")
        with open(self.store.physical(path), "rb") as f:
            drv = parse_drv_json(f.read(), drv_logical, self.store.store_dir)
        if path.name != drv.name + ".drv":
            raise UsageError(f"{drv_logical}: not a valid fimio derivation (it names itself '{drv.name}')")
        drv.drv_path = path
        return drv

    def drv_hash(self, drv_logical: str) -> str:
        if drv_logical not in self._hashes:
            self._hashes[drv_logical] = self.load(drv_logical).drv_hash
        return self._hashes[drv_logical]

    def from_file(self, file: str) -> Derivation:
        """Instantiate a derivation file and everything it depends on.

        Depth first with an explicit stack, not recursion: a chain of derivations may be
        any length. ``stack`` holds the files being instantiated, outermost first."""
        top = os.path.abspath(file)
        if top in self._by_file:
            return self.drvs[self._by_file[top]]
        stack = [_Frame(top, self._read(top))]
        open_files = {top}
        while True:
            frame = stack[-1]
            if frame.todo:
                var, spec = frame.todo[-1]
                dep_file = self._unmade_dependency(frame, var, spec, stack, open_files)
                if dep_file is not None:
                    stack.append(_Frame(dep_file, self._read(dep_file)))
                    open_files.add(dep_file)
                    continue
                frame.todo.pop()
                frame.inputs[var] = self._resolve_input(frame, var, spec)
                continue
            stack.pop()
            open_files.discard(frame.file)
            drv = self._make(frame)
            if not stack:
                break
        # the whole graph is known: write every new .drv in one commit
        self._refuse_missing_store_inputs()
        if not self.unavailable:
            self.store.add_texts(self._pending)
            self._pending.clear()
            self._remember(top, drv)
        return drv

    def _read(self, file: str):
        self._signature(file)
        self._deps[file] = {file}
        return read_toml(file)

    def _unmade_dependency(self, frame: _Frame, var: str, spec: dict, stack: list, open_files: set) -> str | None:
        """The derivation file input ``var`` names, if it still has to be instantiated first."""
        if "drv" not in spec:
            return None
        dep_file = os.path.abspath(os.path.join(os.path.dirname(frame.file), spec["drv"]))
        if not os.path.exists(dep_file):
            raise frame.rd.error(f"input '{var}': derivation file '{spec['drv']}' does not exist", var, "inputs")
        if dep_file in self._by_file:
            return None
        if dep_file in open_files:
            files = [f.file for f in stack]
            chain = files[files.index(dep_file):] + [dep_file]
            raise frame.rd.error("dependency cycle: " + " -> ".join(os.path.basename(f) for f in chain), var, "inputs")
        return dep_file

    def _make(self, frame: _Frame) -> Derivation:
        """The derivation of a file whose inputs are all resolved; queued to be written."""
        d = frame.rd.data
        fetch = d.get("fetch")
        inputs = {var: frame.inputs[var] for var in frame.rd.inputs}  # the file's order
        drv = Derivation(
            name=d["name"],
            system=d.get("system") or host_system(),
            builder=FETCH_BUILDER if fetch else d["builder"],
            args=list(d.get("args", [])),
            env=dict(d.get("env", {})),
            outputs={name: "" for name in (["out"] if fetch else d.get("outputs", ["out"]))},
            inputs=inputs,
            host_paths=list(d.get("sandbox", {}).get("host_paths", DEFAULT_HOST_PATHS)),
            timeout=int(d.get("sandbox", {}).get("timeout", 0)),
            fetch=dict(fetch) if fetch else None,
            store_dir=self.store.store_dir,
            source=frame.file,
        )
        assign_outputs(drv, self.drv_hash)
        refs = sorted(StorePath.parse(p.rsplit("/", 1)[1]) for p in {i.path for i in inputs.values()})
        data = drv.canonical()
        drv.drv_path = text_path(self.store.store_dir, drv.name + ".drv", blake3.blake3(data).digest(), refs)
        self._pending.append((drv.name + ".drv", data, refs))
        logical = self.store.logical(drv.drv_path)
        self.drvs[logical] = drv
        self._hashes[logical] = drv.drv_hash
        self._by_file[frame.file] = logical
        return drv

    def _resolve_input(self, frame: _Frame, var: str, spec: dict) -> Input:
        rd, base = frame.rd, os.path.dirname(frame.file)
        if "drv" in spec:
            dep_file = os.path.abspath(os.path.join(base, spec["drv"]))
            dep = self.drvs[self._by_file[dep_file]]
            self._deps[frame.file] |= self._deps[dep_file]
            output = spec.get("output", "out")
            if output not in dep.outputs:
                raise rd.error(f"input '{var}': '{spec['drv']}' has no output '{output}'", var, "inputs",
                               hint="outputs: " + ", ".join(dep.outputs))
            return Input("drv", self.store.logical(dep.drv_path), output)
        if "path" in spec:
            src = os.path.join(base, spec["path"])
            if not os.path.lexists(src):
                raise rd.error(f"input '{var}': '{spec['path']}' does not exist", var, "inputs")
            name = os.path.basename(os.path.normpath(src))
            try:
                check_name(name)
            except UsageError:
                name = "source"
            src = os.path.abspath(src)
            self._signature(src)
            self._deps[frame.file].add(src)
            try:
                info = self.store.add_path(src, name)
            except UsageError as e:
                raise rd.error(f"input '{var}': {e.message}", var, "inputs") from None
            return Input("src", self.store.logical(info.path))
        text = spec["store"]
        try:
            path, sub = self.store.resolve(text, must_be_valid=False)
        except UsageError as e:
            raise rd.error(f"input '{var}': {e.message}", var, "inputs") from None
        except NotFound as e:
            where = rd.error(f"input '{var}': {e.message}", var, "inputs")
            if not is_hash_part(text):
                raise where from None  # not a store path at all: bad input
            # a bare hash part nothing here has: not found, nothing to fetch
            if not self.defer_missing:
                raise NotFound(where.message) from None
            # a stand-in path, so that the rest of the graph can be planned (and its lacks named)
            stand_in = StorePath(text, "unknown")
            note_lack(self.unavailable, text, f"{text}: input '{var}' of {rd.file}: no store path with this hash here")
            return Input("store", self.store.logical(stand_in))
        if sub:
            raise rd.error(f"input '{var}': give a store path, not a file inside one", var, "inputs")
        if self.store.temp_roots is not None:
            self.store.temp_roots.add([path])  # protected before it is judged valid (or fetched)
        if not self.store.is_valid(path):
            why = self._fetch(path)
            if why is not None:
                self._missing.append((path, f"input '{var}' of {rd.file}{why}"))
        return Input("store", self.store.logical(path))

    def _fetch(self, path: StorePath) -> str | None:
        """Take a ``store`` input from the substituters; None once it is valid, else why not
        (a cache that fails is like one that lacks it, as for a realise's outputs)."""
        if self.substitute is None:
            return ""
        try:
            return None if path in self.substitute([path]) else ""
        except (IntegrityError, RemoteError) as e:
            return f" ({e.message})"

    def _refuse_missing_store_inputs(self) -> None:
        missing, self._missing = self._missing, []
        if missing and self.defer_missing:
            for p, where in missing:
                note_lack(self.unavailable, p.hash_part, f"{self.store.logical(p)}: {where}")
        elif missing:
            raise NotFound(f"{len(missing)} store input(s) of the derivation graph are not valid here",
                           "realise or copy them first, or give a --substituter that has them",
                           details=[f"{self.store.logical(p)}: {where}" for p, where in missing])

    # ---- walking ---------------------------------------------------------------------

    def closure(self, roots: list[Derivation]) -> list[Derivation]:
        """All derivations reachable from ``roots``, dependencies before dependents
        (depth-first post-order, without recursion)."""
        order: list[Derivation] = []
        seen: set[str] = set()
        for root in roots:
            stack = [(root, None)]
            while stack:
                drv, deps = stack.pop()
                if deps is None:
                    key = self.store.logical(drv.drv_path)
                    if key in seen:
                        continue
                    seen.add(key)
                    deps = iter(drv.input_drvs())
                dep = next(deps, None)
                if dep is None:
                    order.append(drv)
                    continue
                stack.append((drv, deps))
                stack.append((self.load(dep), None))
        return order
