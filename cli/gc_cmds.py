"""Garbage collection commands: gc, roots."""

from __future__ import annotations

import re

import click

from fimio.store.errors import UsageError

from .main import emit_json, global_options, info, json_option, pass_options
from .render import human_size, names_json

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if not m:
        raise UsageError(f"invalid size '{text}'", "e.g. 500M, 2G, 1048576")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@click.command()
@click.option("--dry-run", is_flag=True, help="Only list what would be deleted.")
@click.option("--max-freed", metavar="SIZE", help="Stop after freeing SIZE (e.g. 2G).")
@json_option
@global_options
@pass_options
def gc(opts, dry_run, max_freed, as_json):
    """Delete every store path not reachable from a root (out-links, registered and temp roots)."""
    from fimio.store.gc import collect
    from fimio.store.paths import StorePath

    store = opts.store()
    result = collect(store, dry_run=dry_run, max_freed=parse_size(max_freed) if max_freed is not None else None,
                     on_wait=lambda: info(opts, "waiting for the GC lock: a build, import or fetch is writing "
                                                "to this store"))
    deleted = [StorePath.parse(logical.rsplit("/", 1)[1]) for logical in result.deleted]
    if as_json:
        emit_json({"deleted": [names_json(store, p) for p in deleted], "freed": result.freed,
                   "kept": result.kept, "dryRun": dry_run})
        return
    for p in deleted:
        click.echo(store.physical(p))
    verb = "would delete" if dry_run else "deleted"
    info(opts, f"{verb} {len(result.deleted)} paths ({human_size(result.freed)}), kept {result.kept}")


@click.command()
@json_option
@global_options
@pass_options
def roots(opts, as_json):
    """List the GC roots: out-links, registered roots and temp roots of running processes."""
    from fimio.store.gc import roots_report

    store = opts.store(create=False)
    report = roots_report(store)
    if as_json:
        emit_json({k: names_json(store, v) for k, v in report.items()})
        return
    for link, path in report.items():
        click.echo(f"{link} -> {store.physical(path)}")
