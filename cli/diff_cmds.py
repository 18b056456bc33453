"""``fimio diff A B``: explain why two derivations, outputs or build records differ."""

from __future__ import annotations

import click

from .main import emit_json, global_options, json_option, pass_options


@click.command()
@click.argument("a")
@click.argument("b")
@json_option
@global_options
@pass_options
def diff(opts, a, b, as_json):
    """Explain why A and B differ, recursively (like nix-diff).

    A and B are both derivations (a .toml file, a .drv store path or its hash part), both
    outputs (store paths, .check paths included), or both build records
    (<drv hash part>@<n>, numbered as 'fimio provenance' shows them; @-1 is the newest).
    Exit 0 whether they differ or not; 'identical' is printed when they do not.
    """
    from fimio.store.diff import diff as explain
    from fimio.store.diff import resolve
    from fimio.store.instantiate import Graph

    store = opts.store()
    graph = Graph(store)
    report = explain(store, graph, resolve(store, graph, a), resolve(store, graph, b))
    if as_json:
        from .render import names_json

        data = report.to_json()
        for side, operand in (("a", report.a), ("b", report.b)):
            # the store path behind each operand, by both names: the output, or the .drv
            path = operand.info.path if operand.info is not None else getattr(operand.drv, "drv_path", None)
            if path is not None:
                data[side].update(names_json(store, path))
        emit_json(data)
    else:
        click.echo(report.render())
