"""The ``fimio`` command group: global options, lazy command loading, the store context."""

from __future__ import annotations

import importlib

import click

from fimio.store import __version__

from .options import Options, emit_json, info  # noqa: F401 -- the commands' shared helpers

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
