"""The global options every command takes, and the helpers commands share to write.

Nothing here imports click: ``fimio add`` runs without it (see :mod:`fimio.cli.fast`).
"""

from __future__ import annotations

import json
import os
import sys


# The physical store directories this command opened: a file there that cannot be read is
# a damaged store (exit 4), not a file system in trouble (see fimio.cli.run).
opened_stores: list[str] = []


class Options:
    """Global options, settable on the group or on any command (the command wins)."""

    def __init__(self):
        self.root = None
        self.store_dir = None
        self.verbosity = 0
        self._store = None
        self._config = None

    def config(self):
        """The config file's settings (FIMIO_CONFIG or XDG), read once."""
        if self._config is None:
            from fimio.store.config import load_config

            self._config = load_config()
        return self._config

    def offline(self, flag: bool | None) -> bool:
        """Whether this command is offline: ``flag`` (--offline/--no-offline) if given, else
        the config file. The answer is kept in the config, where every cache this command
        opens (``open_with_config``) reads it."""
        config = self.config()
        if flag is not None:
            config.offline = flag
        return config.offline

    def store(self, protect: bool = False, create: bool = True):
        """Open the store once per command. ``protect``: give it temp roots for the rest of
        the command, so the paths it reads or adds survive a concurrent ``gc``. ``create``:
        false for commands that only read: a store root that does not exist (a mistyped
        --root) is then "no store there", not a new empty store."""
        if self._store is None:
            from fimio.store.config import resolve_root
            from fimio.store.errors import NotFound
            from fimio.store.local import LocalStore

            root = resolve_root(self.root)
            if not create and not os.path.isdir(os.path.join(root, "db")):
                raise NotFound(f"no store at '{root}'",
                               "check --root or FIMIO_ROOT; 'fimio add' or 'fimio realise' creates a store")
            self._store = LocalStore.open(self.root, self.store_dir)
            opened_stores.append(self._store.store)
        if protect and self._store.temp_roots is None:
            from fimio.store.roots import TempRoots

            self._store.temp_roots = TempRoots(self._store)
            import click  # only commands run through click protect their paths

            click.get_current_context().call_on_close(self._release_temp_roots)
        return self._store

    def _release_temp_roots(self) -> None:
        self._store.temp_roots.close()
        self._store.temp_roots = None


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def info(opts: Options, message: str) -> None:
    """A progress/status message on stderr, silenced by -q (above a progress bar, if one is drawn)."""
    if opts.verbosity >= 0:
        from .progress import say

        say(message)
