"""The ``fimio`` command group: global options, lazy command loading, the store context."""

from __future__ import annotations

import importlib
import json
import os
import sys

import click

from fimio.store import __version__

# command name -> "module:function"; modules are imported only when their command runs,
# so `fimio realise` never pays for the HTTP, S3 or crypto imports of other commands.
COMMANDS = {
    "add": "store_cmds:add",
    "cat": "store_cmds:cat",
    "ls": "store_cmds:ls",
    "dump": "store_cmds:dump",
    "restore": "store_cmds:restore",
    "hash": "store_cmds:hash_",
    "path-info": "query_cmds:path_info",
    "query": "query_cmds:query",
    "verify": "query_cmds:verify",
    "instantiate": "build_cmds:instantiate",
    "realise": "build_cmds:realise",
    "log": "build_cmds:log",
    "provenance": "build_cmds:provenance",
    "why-depends": "build_cmds:why_depends",
    "run": "build_cmds:run",
    "gc": "gc_cmds:gc",
    "roots": "gc_cmds:roots",
    "diff": "diff_cmds:diff",
    "key": "cache_cmds:key",
    "push": "cache_cmds:push",
    "copy": "cache_cmds:copy",
    "serve": "cache_cmds:serve",
    "challenge": "cache_cmds:challenge",
    "prefetch": "offline_cmds:prefetch",
    "export": "offline_cmds:export",
    "import": "offline_cmds:import_",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(name for name in COMMANDS if self.get_command(ctx, name) is not None)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, _, attr = target.partition(":")
        try:
            return getattr(importlib.import_module(f"fimio.cli.{module}"), attr)
        except (ImportError, AttributeError):
            return None  # a command whose module is not part of this build


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
        if protect and self._store.temp_roots is None:
            from fimio.store.roots import TempRoots

            self._store.temp_roots = TempRoots(self._store)
            click.get_current_context().call_on_close(self._release_temp_roots)
        return self._store

    def _release_temp_roots(self) -> None:
        self._store.temp_roots.close()
        self._store.temp_roots = None


def _set(attr):
    def callback(ctx, param, value):
        opts = ctx.ensure_object(Options)
        if value is not None and value != ():
            setattr(opts, attr, value)
        return value

    return callback


def _verbosity(sign):
    def callback(ctx, param, value):
        ctx.ensure_object(Options).verbosity += sign * value
        return value

    return callback


def global_options(f):
    """Add --root, --store-dir, -v and -q to a command."""
    f = click.option("--root", metavar="DIR", expose_value=False, callback=_set("root"),
                     help="Physical store root [env FIMIO_ROOT; default $XDG_DATA_HOME/fimio, "
                          "or ~/.local/share/fimio].")(f)
    f = click.option("--store-dir", metavar="DIR", expose_value=False, callback=_set("store_dir"),
                     help="Logical store directory [env FIMIO_STORE_DIR; default /fimio/store].")(f)
    f = click.option("-v", "--verbose", count=True, expose_value=False, callback=_verbosity(1),
                     help="More output (repeatable).")(f)
    f = click.option("-q", "--quiet", count=True, expose_value=False, callback=_verbosity(-1),
                     help="Less output.")(f)
    return f


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")(f)


pass_options = click.make_pass_decorator(Options, ensure=True)


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def info(opts: Options, message: str) -> None:
    """A progress/status message on stderr, silenced by -q (above a progress bar, if one is drawn)."""
    if opts.verbosity >= 0:
        from .progress import say

        say(message)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@global_options
@click.version_option(__version__, prog_name="fimio")
def cli():
    """fimio: a reproducible, content-addressed artifact store.

    Every input and output is stored by its hash; derivations state exactly how outputs
    are built; `fimio realise` builds them in a hermetic sandbox or fetches them from a
    signed shared cache, and checks rebuilds are bit-identical.

    Store paths may be given as physical paths, logical paths (/fimio/store/...) or
    bare hash parts. See README.md for a tour.
    """
