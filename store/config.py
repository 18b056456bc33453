"""Where the store lives and what the config file says.

Precedence (contract): command-line flag > environment variable > config/default.
"""

from __future__ import annotations

import os

from .errors import UsageError

DEFAULT_STORE_DIR = "/fimio/store"

_KEYS = {
    "substituters": list,
    "trusted-public-keys": list,
    "secret-key-files": list,
    "require-sigs": bool,
    "offline": bool,
    "jobs": int,
    "cores": int,
    "tokens": dict,
}


_KIND_NAMES = {list: "a list", bool: "true or false", int: "a whole number", dict: "a table"}


def _xdg(variable: str, fallback: str) -> str:
    """An XDG base directory: a relative value is ignored, as the XDG spec says."""
    value = os.environ.get(variable, "")
    return value if value.startswith("/") else os.path.join(os.path.expanduser("~"), fallback)


def default_root() -> str:
    return os.path.join(_xdg("XDG_DATA_HOME", ".local/share"), "fimio")


def resolve_root(flag: str | None = None) -> str:
    """The physical root, canonical (symlinks resolved): physical paths have one spelling,
    so out-links made through one spelling of the root are roots for every other."""
    if flag == "":
        raise UsageError("--root needs a directory, not ''", "omit it for FIMIO_ROOT or the default")
    return os.path.realpath(flag or os.environ.get("FIMIO_ROOT") or default_root())


def refuse_root_in_a_users_store(root: str) -> None:
    """A store is one user's. Root writing into another user's (``sudo -E``) would leave
    files its owner can neither link (protected hard links) nor lock: every later command
    of the owner's would fail."""
    if os.geteuid() != 0:
        return
    try:
        owner = os.stat(root).st_uid
    except OSError:
        return  # not made yet: whoever makes it owns it
    if owner != 0:
        raise UsageError(f"the store at '{root}' belongs to uid {owner}: root must not write into it",
                         f"run fimio as its owner (sudo -u '#{owner}' ...)")


# what the build sandbox mounts: a store bound at, above or inside one would hide it
_SANDBOX_MOUNTS = ("/usr", "/bin", "/lib", "/lib64", "/build", "/proc", "/dev")


def check_store_dir(store_dir: str) -> str:
    """Normalise and validate a logical store directory (spec/store-paths.md §1)."""
    parts = store_dir.split("/")[1:]
    if not store_dir.startswith("/") or "//" in store_dir or any(p in (".", "..") for p in parts):
        raise UsageError(f"invalid store directory '{store_dir}'", "it must be an absolute, normal path")
    store_dir = store_dir.rstrip("/") or "/"
    for mount in _SANDBOX_MOUNTS:
        if store_dir == "/" or mount == store_dir or mount.startswith(store_dir + "/") or store_dir.startswith(mount + "/"):
            raise UsageError(f"invalid store directory '{store_dir}'",
                             f"builds could not see {mount} through it; use a directory of its own such as /fimio/store")
    return store_dir


def resolve_store_dir(flag: str | None = None) -> str:
    return check_store_dir(flag or os.environ.get("FIMIO_STORE_DIR") or DEFAULT_STORE_DIR)


def config_path() -> str:
    if os.environ.get("FIMIO_CONFIG"):
        return os.environ["FIMIO_CONFIG"]
    return os.path.join(_xdg("XDG_CONFIG_HOME", ".config"), "fimio", "config.toml")


class Config:
    """The config file's settings; attributes are the keys with '-' spelled '_'."""

    def __init__(self):
        self.substituters: list[str] = []
        self.trusted_public_keys: list[str] = []
        self.secret_key_files: list[str] = []
        self.require_sigs = True
        self.offline = False
        self.jobs = 0
        self.cores = 0
        self.tokens: dict[str, str] = {}

    def token_for(self, url: str) -> str | None:
        """The bearer token for an http(s) cache URL: FIMIO_TOKEN, else the ``[tokens]`` entry
        for the same scheme, host and port whose path is the longest prefix of the URL's,
        whole segments only (see :func:`_token_scope`)."""
        if os.environ.get("FIMIO_TOKEN"):
            return os.environ["FIMIO_TOKEN"]
        origin, path = _token_scope(url)
        best = None
        for key, token in self.tokens.items():
            key_origin, key_path = _token_scope(key)
            if key_origin == origin and (path + "/").startswith(key_path + "/"):
                if best is None or len(key_path) > len(best[0]):
                    best = (key_path, token)
        return best[1] if best else None


def _token_scope(url: str) -> tuple[tuple, str]:
    """``((scheme, host, port), path without trailing slashes)`` of a URL: a token is never
    sent to another host or port, nor to ``/cachefoo`` for ``/cache`` (a mere string prefix
    would do both)."""
    import urllib.parse  # only a config file naming a cache needs it (5 ms of every start-up)

    parts = urllib.parse.urlsplit(url.strip())
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    port = port or {"http": 80, "https": 443}.get(scheme)
    return (scheme, (parts.hostname or "").lower(), port), parts.path.rstrip("/")


def load_config(path: str | None = None) -> Config:
    """Read the config file. UsageError on bad TOML, keys, types or values, and when
    ``FIMIO_CONFIG`` names a file that does not exist (a typo there must not silently drop
    the user's keys and caches); a missing default file means the defaults."""
    named = path or os.environ.get("FIMIO_CONFIG")
    path = path or config_path()
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        if named:
            raise UsageError(f"config file '{path}' (FIMIO_CONFIG) does not exist",
                             "fix the name, or set FIMIO_CONFIG=/dev/null for no config file") from None
        return Config()
    except OSError as e:
        raise UsageError(f"cannot read config '{path}': {e.strerror}") from None
    import tomllib  # lazy: costs ~25 ms of start-up

    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: {e}") from None
    except RecursionError:
        raise UsageError(f"{path}: arrays or tables nested absurdly deep") from None
    config = Config()
    for key, value in data.items():
        kind = _KEYS.get(key)
        if kind is None:
            raise UsageError(f"{path}: unknown key '{key}'", "see the README's configuration section")
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UsageError(f"{path}: '{key}' must be {_KIND_NAMES[kind]}")
        if kind is int and value < 0:
            raise UsageError(f"{path}: '{key}' must be 0 (the default) or more, not {value}")
        setattr(config, key.replace("-", "_"), value)
    _check_values(path, config)
    return config


def _check_values(path: str, config: Config) -> None:
    """Refuse malformed values here, so that every command (the no-op fast path too) refuses
    them, not only the command that happens to use them."""
    for key, what in (("substituters", "cache URLs"), ("trusted-public-keys", "public keys"),
                      ("secret-key-files", "file names")):
        if not all(isinstance(v, str) for v in getattr(config, key.replace("-", "_"))):
            raise UsageError(f"{path}: '{key}' must be a list of {what} (strings)")
    if not all(isinstance(v, str) for v in config.tokens.values()):
        raise UsageError(f"{path}: every value under [tokens] must be a token (a string)")
    if config.substituters:
        from .cache.url import parse_cache_url

        for url in config.substituters:
            parse_cache_url(url)
    if config.trusted_public_keys:
        from .cache.keys import PublicKey

        for key in config.trusted_public_keys:
            try:
                PublicKey.parse(key)
            except UsageError as e:
                raise UsageError(f"{path}: 'trusted-public-keys': {e.message}", e.hint) from None
