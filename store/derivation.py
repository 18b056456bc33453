"""Derivations: the TOML file users write, and the canonical ``.drv`` JSON in the store.

``spec/derivation.md`` is normative. A derivation file is validated with ``file:line``
messages, its sources are added to the store, its input derivations are instantiated
recursively, and the canonical JSON is written into the store as ``<name>.drv``. Output
paths are input-addressed: they follow from the derivation hash *modulo fixed-output
inputs*, so a whole graph's outputs are known before anything is built.
"""

from __future__ import annotations

import json
import platform
import re
from dataclasses import dataclass, field

import blake3

from .errors import UsageError
from .fsutil import read_input
from .paths import StorePath, check_name, output_path

DRV_VERSION = 1
DEFAULT_HOST_PATHS = ["/usr", "/bin", "/lib", "/lib64"]
FETCH_BUILDER = "builtin:fetchurl"  # the builder of a fixed-output derivation ([fetch])
RESERVED_ENV = {"HOME", "TMPDIR", "TZ", "LANG", "SOURCE_DATE_EPOCH", "FIMIO_BUILD_CORES", "FIMIO_STORE"}


def _set_by_fimio(name: str) -> bool:
    """A variable fimio sets in every build: no output, input or [env] entry may take it."""
    return name in RESERVED_ENV or name.startswith("FIMIO_")

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OUTPUT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUL = "a NUL character cannot be passed to a program (in its arguments or environment)"
_TOP_KEYS = {"name", "builder", "args", "system", "outputs", "env", "inputs", "sandbox", "fetch"}
_HASH_RE = re.compile(r"(sha256|blake3):([0-9a-f]{64})")


def host_system() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine) + "-linux"


@dataclass(frozen=True)
class Input:
    """One ``[inputs]`` entry after resolution: a source, a store path, or a derivation output."""

    kind: str  # "src" | "store" | "drv"
    path: str  # logical store path (of the source/store path, or of the .drv)
    output: str = "out"

    def to_json(self) -> dict:
        if self.kind == "drv":
            return {"drv": self.path, "output": self.output}
        return {self.kind: self.path}


@dataclass
class Derivation:
    """A derivation in canonical form (what the ``.drv`` file holds)."""

    name: str
    system: str
    builder: str
    args: list[str]
    env: dict[str, str]
    outputs: dict[str, str]  # output name -> logical output path ("" before hashing)
    inputs: dict[str, Input]
    host_paths: list[str]
    timeout: int
    fetch: dict | None = None
    store_dir: str = "/fimio/store"
    drv_path: StorePath | None = None  # set once written
    drv_hash: str = ""  # hex, hash modulo fixed-output inputs
    source: str | None = None  # the TOML file it came from, for messages

    @property
    def is_fixed_output(self) -> bool:
        return self.fetch is not None

    def to_json_obj(self, outputs: dict[str, str] | None = None, inputs=None) -> dict:
        obj = {
            "fimio": DRV_VERSION,
            "name": self.name,
            "system": self.system,
            "builder": self.builder,
            "args": self.args,
            "env": self.env,
            "outputs": outputs if outputs is not None else self.outputs,
            "inputs": inputs if inputs is not None else {k: v.to_json() for k, v in self.inputs.items()},
            "sandbox": {"hostPaths": self.host_paths, "timeout": self.timeout},
        }
        if self.fetch is not None:
            obj["fetch"] = self.fetch
        return obj

    def canonical(self) -> bytes:
        return canonical_json(self.to_json_obj())

    def input_drvs(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for i in self.inputs.values():
            if i.kind == "drv":
                out.setdefault(i.path, set()).add(i.output)
        return out

    def input_srcs(self) -> set[str]:
        return {i.path for i in self.inputs.values() if i.kind != "drv"}

    def output_paths(self) -> dict[str, StorePath]:
        return {name: StorePath.parse(p.rsplit("/", 1)[1]) for name, p in self.outputs.items()}


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# ---- hashing ------------------------------------------------------------------------------


def fixed_output_hash(drv: Derivation) -> str:
    """The modulo hash of a fixed-output derivation: only what it promises to produce."""
    text = f"fimio-fixed-1:{drv.fetch['hash']}:{drv.name}"
    return blake3.blake3(text.encode()).hexdigest()


def hash_modulo(drv: Derivation, input_hash) -> str:
    """Hash of ``drv`` with output paths blanked and each input ``.drv`` replaced by its own
    modulo hash (``input_hash(drv_logical_path) -> hex``); fixed-output derivations hash
    only their declared content hash, so changing a download URL rebuilds nothing."""
    if drv.is_fixed_output:
        return fixed_output_hash(drv)
    inputs = {}
    for var, i in drv.inputs.items():
        inputs[var] = {"drvHash": input_hash(i.path), "output": i.output} if i.kind == "drv" else i.to_json()
    blank = {name: "" for name in drv.outputs}
    return blake3.blake3(canonical_json(drv.to_json_obj(outputs=blank, inputs=inputs))).hexdigest()


def assign_outputs(drv: Derivation, input_hash) -> None:
    """Compute ``drv_hash`` and the input-addressed output paths."""
    drv.drv_hash = hash_modulo(drv, input_hash)
    drv.outputs = {
        name: output_path(drv.store_dir, drv.name, drv.drv_hash, name).logical(drv.store_dir)
        for name in drv.outputs
    }


def parse_drv_json(data: bytes, where: str, store_dir: str) -> Derivation:
    """Read a canonical ``.drv`` file back. IntegrityError-free: a bad file is a UsageError,
    and so is one that is not byte for byte the canonical form of what it says, or that says
    what the TOML front end refuses (spec/derivation.md §2): another implementation hashing
    the same file must reach the same output paths, and run the same build."""
    drv = _parse_drv_json(data, where, store_dir)
    if drv.canonical() != data:
        raise UsageError(f"{where}: not a valid fimio derivation (not in the canonical form)")
    problem = _drv_problem(drv)
    if problem:
        raise UsageError(f"{where}: not a valid fimio derivation ({problem})")
    return drv


def _drv_problem(drv: Derivation) -> str | None:
    """What a derivation file could not say, if anything (the rules of §1, on the .drv)."""
    return _type_problem(drv) or _rule_problem(drv)


def _strings(xs) -> bool:
    return isinstance(xs, list) and all(isinstance(x, str) for x in xs)


def _type_problem(drv: Derivation) -> str | None:
    if not all(isinstance(x, str) for x in (drv.name, drv.system, drv.builder)):
        return "'name', 'system' and 'builder' must be strings"
    if not _strings(drv.args) or not _strings(drv.host_paths):
        return "'args' and 'hostPaths' must be lists of strings"
    if not all(isinstance(k, str) and _ENV_NAME.fullmatch(k) and isinstance(v, str) for k, v in drv.env.items()):
        return "'env' must map variable names to strings"
    if not drv.outputs or not all(_OUTPUT_NAME.fullmatch(o) for o in drv.outputs):
        return "'outputs' must name one or more outputs like \"out\""
    for var, i in drv.inputs.items():
        if not _ENV_NAME.fullmatch(var) or i.kind not in ("drv", "src", "store") or not isinstance(i.output, str) \
                or not _store_path(i.path, drv.store_dir):
            return f"input '{var}' is malformed"
    if type(drv.timeout) is not int:
        return "'timeout' must be a whole number"
    fetch = drv.fetch
    if fetch is not None and not (isinstance(fetch, dict) and sorted(fetch) == ["hash", "url"]
                                  and _strings(list(fetch.values())) and _HASH_RE.fullmatch(fetch["hash"])
                                  and _fetchable(fetch["url"])):
        return "'fetch' must hold a well-formed 'url' and 'hash'"
    return None


def _store_path(text, store_dir: str) -> bool:
    if not isinstance(text, str) or not text.startswith(store_dir + "/"):
        return False
    try:
        StorePath.parse(text[len(store_dir) + 1:])
        return True
    except UsageError:
        return False


def _rule_problem(drv: Derivation) -> str | None:
    fixed = drv.fetch is not None
    if fixed != (drv.builder == FETCH_BUILDER) or (fixed and (drv.args or drv.inputs)):
        return f"a fixed-output derivation has builder '{FETCH_BUILDER}', no args and no inputs"
    if drv.timeout < 0:
        return "a negative timeout"
    if not all(p.startswith("/") for p in drv.host_paths):
        return "a host path that is not absolute"
    if any("\0" in s for s in (drv.name, drv.system, drv.builder, *drv.args, *drv.env.values(), *drv.host_paths)):
        return "a NUL character"
    names = [*drv.outputs, *drv.env, *drv.inputs]
    if len(set(names)) != len(names):
        return "a name given to more than one of outputs, env and inputs"
    for n in names:
        if _set_by_fimio(n) or (n == "PATH" and n not in drv.env):
            return f"'{n}' is a variable fimio sets"
    return None


def _parse_drv_json(data: bytes, where: str, store_dir: str) -> Derivation:
    try:
        obj = json.loads(data)
        if obj["fimio"] != DRV_VERSION:
            raise UsageError(f"{where}: a derivation of format version {obj['fimio']!r}, not {DRV_VERSION}",
                             "a newer fimio wrote it")
        inputs = {}
        for var, spec in obj["inputs"].items():
            if "drv" in spec:
                inputs[var] = Input("drv", spec["drv"], spec.get("output", "out"))
            else:
                (kind, path), = spec.items()
                inputs[var] = Input(kind, path)
        return Derivation(
            name=obj["name"], system=obj["system"], builder=obj["builder"], args=list(obj["args"]),
            env=dict(obj["env"]), outputs=dict(obj["outputs"]), inputs=inputs,
            host_paths=list(obj["sandbox"]["hostPaths"]), timeout=obj["sandbox"]["timeout"],
            fetch=obj.get("fetch"), store_dir=store_dir,
        )
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise UsageError(f"{where}: not a valid fimio derivation ({e})") from None


# ---- the TOML front end -----------------------------------------------------------------


class DrvFileError(UsageError):
    """A derivation file that cannot be used; the message starts with ``file:line:``."""


def _line_of(text: str, key: str, table: str | None = None) -> int:
    """Best-effort line number of ``key`` in ``[table]`` (None: the top level) of TOML text."""
    pattern = re.compile(rf"^\s*(\"?){re.escape(key)}\1\s*=")
    current, table_line = None, None
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("["):
            current = stripped.strip("[] ")
            if current == table:
                table_line = n
            elif current.replace('"', "").replace(" ", "") == (f"{table}.{key}" if table else key):
                return n  # a table header: [inputs.src] for an input, [inputs] for a top-level key
        elif current == table and pattern.match(line):
            return n
    return table_line or 1


@dataclass
class RawDerivation:
    """A validated derivation file, before its inputs are resolved."""

    file: str
    text: str
    data: dict
    inputs: dict[str, dict] = field(default_factory=dict)

    def error(self, message: str, key: str | None = None, table: str | None = None, hint=None):
        line = _line_of(self.text, key, table) if key else 1
        return DrvFileError(f"{self.file}:{line}: {message}", hint)


def read_toml(path: str) -> RawDerivation:
    """Read and validate a derivation file; DrvFileError (exit 2) with ``file:line`` on any problem."""
    raw = read_input(path, "derivation file")
    import tomllib

    if raw.startswith(b"\xef\xbb\xbf"):  # what some editors write first; TOML has no place for it
        raise DrvFileError(f"{path}:1: starts with a byte order mark (BOM), which a TOML file may not",
                           "save it as UTF-8 without a BOM")
    try:
        text = raw.decode()
        data = tomllib.loads(text)
    except UnicodeDecodeError:
        raise DrvFileError(f"{path}:1: not UTF-8 text") from None
    except RecursionError:
        raise DrvFileError(f"{path}:1: arrays or tables nested too deeply to read") from None
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column \d+\)", str(e))
        line = m.group(1) if m else str(max(1, len(text.splitlines())))  # "at end of document"
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e))
        raise DrvFileError(f"{path}:{line}: invalid TOML: {msg}",
                           "see the derivation format in the README or spec/derivation.md") from None
    rd = RawDerivation(path, text, data)
    _validate(rd)
    return rd


def _fetchable(url: str) -> bool:
    """A well-formed http(s) URL with a host, or a file:// URL (what the fetcher can open)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # raises ValueError for a bad port
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return False
    if parts.scheme == "file":
        return bool(parts.path)
    return parts.scheme in ("http", "https") and bool(parts.hostname) and not any(c.isspace() for c in url)


def _expect(rd: RawDerivation, value, kind, key: str, table: str | None = None, what: str | None = None):
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        name = what or {str: "a string", int: "an integer", list: "a list", dict: "a table"}[kind]
        raise rd.error(f"'{key}' must be {name}", key, table)
    return value


def _validate(rd: RawDerivation) -> None:
    d = rd.data
    for key in d:
        if key not in _TOP_KEYS:
            raise rd.error(f"unknown key '{key}'", key, hint="allowed: " + ", ".join(sorted(_TOP_KEYS)))
    if "name" not in d:
        raise rd.error("missing required key 'name'")
    _expect(rd, d["name"], str, "name")
    try:
        check_name(d["name"])
    except UsageError as e:
        raise rd.error(e.message, "name", hint=e.hint) from None
    if "fetch" in d:
        fetch = _expect(rd, d["fetch"], dict, "fetch")
        for key in fetch:
            if key not in ("url", "hash"):
                raise rd.error(f"unknown key '{key}' in [fetch]", key, "fetch")
        for key in ("url", "hash"):
            if key not in fetch:
                raise rd.error(f"[fetch] needs '{key}'", table="fetch", key="fetch")
            _expect(rd, fetch[key], str, key, "fetch")
        if not _HASH_RE.fullmatch(fetch["hash"]):
            raise rd.error("[fetch] hash must be 'sha256:<64 hex>' or 'blake3:<64 hex>'", "hash", "fetch")
        if not _fetchable(fetch["url"]):
            raise rd.error("[fetch] url must be a well-formed http://, https:// or file:// URL", "url", "fetch")
        for key in ("builder", "args", "inputs", "outputs"):
            if key in d:
                raise rd.error(f"a fixed-output derivation ([fetch]) cannot have '{key}'", key)
    elif "builder" not in d:
        raise rd.error("missing required key 'builder' (or a [fetch] table)")
    elif d["builder"] == FETCH_BUILDER:
        raise rd.error(f"'{FETCH_BUILDER}' is the builder of fixed-output derivations: give a [fetch] table instead",
                       "builder")
    else:
        _expect(rd, d["builder"], str, "builder")
        if not d["builder"]:
            raise rd.error("'builder' must not be empty", "builder")
        if "\0" in d["builder"]:
            raise rd.error(_NUL, "builder")
    args = _expect(rd, d.get("args", []), list, "args")
    if not all(isinstance(a, str) for a in args):
        raise rd.error("'args' must be a list of strings", "args")
    if any("\0" in a for a in args):
        raise rd.error(_NUL, "args")
    _expect(rd, d.get("system", ""), str, "system")
    outputs = _expect(rd, d.get("outputs", ["out"]), list, "outputs")
    if not outputs or len(set(outputs)) != len(outputs) or not all(
        isinstance(o, str) and _OUTPUT_NAME.fullmatch(o) for o in outputs
    ):
        raise rd.error("'outputs' must be a non-empty list of distinct names like \"out\", \"bin\"", "outputs")
    for o in outputs:  # each output is an environment variable of the build: $out, $bin
        if _set_by_fimio(o) or o == "PATH":
            raise rd.error(f"output name '{o}' is a variable fimio sets (or PATH) and cannot name an output",
                           "outputs")
    # the names the derivation gives its store paths: <name>.drv and <name>-<output>
    longest = max([len(".drv")] + [len(o) + 1 for o in outputs if o != "out"])
    if len(d["name"]) + longest > 211:
        raise rd.error(f"name of {len(d['name'])} characters is too long: with "
                       f"'{'.drv' if longest == 4 else '-' + max(outputs, key=len)}' it must fit the 211 "
                       "characters of a store name", "name", hint="shorten the name")
    env = _expect(rd, d.get("env", {}), dict, "env")
    for key, value in env.items():
        if not _ENV_NAME.fullmatch(key):
            raise rd.error(f"invalid environment variable name '{key}'", key, "env")
        if _set_by_fimio(key) or key in outputs:
            raise rd.error(f"'{key}' is set by fimio and cannot be overridden", key, "env")
        _expect(rd, value, str, key, "env", "a string (environment values are strings only)")
        if "\0" in value:
            raise rd.error(_NUL, key, "env")
    inputs = _expect(rd, d.get("inputs", {}), dict, "inputs")
    for var, spec in inputs.items():
        _validate_input(rd, var, spec, outputs, env)
    sandbox = _expect(rd, d.get("sandbox", {}), dict, "sandbox")
    for key, value in sandbox.items():
        if key == "host_paths":
            if not isinstance(value, list) or not all(isinstance(p, str) and p.startswith("/") and "\0" not in p
                                                      for p in value):
                raise rd.error("'host_paths' must be a list of absolute paths", key, "sandbox")
        elif key == "timeout":
            if _expect(rd, value, int, key, "sandbox") < 0:
                raise rd.error("'timeout' must be >= 0 seconds", key, "sandbox")
        else:
            raise rd.error(f"unknown key '{key}' in [sandbox]", key, "sandbox")


def _validate_input(rd, var, spec, outputs, env) -> None:
    if not _ENV_NAME.fullmatch(var):
        raise rd.error(f"input name '{var}' is not a valid environment variable name", var, "inputs")
    if _set_by_fimio(var) or var in outputs or var in env or var == "PATH":
        raise rd.error(f"input '{var}' clashes with an output, [env] or a variable fimio sets", var, "inputs")
    if not isinstance(spec, dict):
        raise rd.error(f"input '{var}' must be a table like {{ path = \"...\" }}", var, "inputs")
    kinds = [k for k in ("path", "drv", "store") if k in spec]
    extra = set(spec) - {"path", "drv", "store", "output"}
    if len(kinds) != 1 or extra or ("output" in spec and kinds != ["drv"]):
        raise rd.error(f"input '{var}' needs exactly one of path/drv/store (and 'output' only with drv)", var, "inputs")
    for key, value in spec.items():
        if not isinstance(value, str) or not value:
            raise rd.error(f"input '{var}': '{key}' must be a non-empty string", var, "inputs")
    rd.inputs[var] = spec
