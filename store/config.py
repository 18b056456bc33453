"""Where the store lives and what the config file says.

Precedence (contract): command-line flag > environment variable > config/default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .errors import UsageError
from .paths import DEFAULT_STORE_DIR, check_store_dir

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


def default_root() -> str:
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data, "fimio")


def resolve_root(flag: str | None = None) -> str:
    return os.path.abspath(flag or os.environ.get("FIMIO_ROOT") or default_root())


def resolve_store_dir(flag: str | None = None) -> str:
    return check_store_dir(flag or os.environ.get("FIMIO_STORE_DIR") or DEFAULT_STORE_DIR)


def config_path() -> str:
    if os.environ.get("FIMIO_CONFIG"):
        return os.environ["FIMIO_CONFIG"]
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "fimio", "config.toml")


@dataclass
class Config:
    substituters: list[str] = field(default_factory=list)
    trusted_public_keys: list[str] = field(default_factory=list)
    secret_key_files: list[str] = field(default_factory=list)
    require_sigs: bool = True
    offline: bool = False
    jobs: int = 0
    cores: int = 0
    tokens: dict[str, str] = field(default_factory=dict)

    def token_for(self, url: str) -> str | None:
        """The bearer token for an http(s) cache URL: FIMIO_TOKEN, else the longest matching prefix."""
        if os.environ.get("FIMIO_TOKEN"):
            return os.environ["FIMIO_TOKEN"]
        matches = [p for p in self.tokens if url.startswith(p)]
        return self.tokens[max(matches, key=len)] if matches else None


def load_config(path: str | None = None) -> Config:
    """Read the config file (missing file = defaults). UsageError on bad TOML, keys or types."""
    path = path or config_path()
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return Config()
    except OSError as e:
        raise UsageError(f"cannot read config '{path}': {e.strerror}") from None
    import tomllib  # lazy: costs ~25 ms of start-up

    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: {e}") from None
    config = Config()
    for key, value in data.items():
        kind = _KEYS.get(key)
        if kind is None:
            raise UsageError(f"{path}: unknown key '{key}'", "see the README's configuration section")
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UsageError(f"{path}: '{key}' must be a {kind.__name__}")
        setattr(config, key.replace("-", "_"), value)
    return config
