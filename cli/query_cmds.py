"""Commands that read the reference graph and check the store: path-info, query, verify."""

from __future__ import annotations

import click

from fimio.store.errors import IntegrityError

from .main import emit_json, global_options, info, json_option, pass_options
from .render import human_size, names_json, path_json


@click.command(name="path-info")
@click.argument("paths", nargs=-1, required=True)
@click.option("-r", "--recursive", is_flag=True, help="Include the closure of every path.")
@click.option("-S", "--closure-size", is_flag=True, help="Show the closure size.")
@click.option("-h", "--human-readable", is_flag=True, help="Sizes in KiB/MiB/GiB.")
@json_option
@global_options
@pass_options
def path_info(opts, paths, recursive, closure_size, human_readable, as_json):
    """Show digest, size, closure size, references, deriver and signatures of store paths."""
    store = opts.store(create=False)
    targets = [store.resolve(p)[0] for p in paths]
    if recursive:
        targets = store.closure(targets)
    from fimio.store.check import repro_status

    records = []
    for path in targets:
        i = store.info(path)
        csize = sum(store.info(p).size for p in store.closure([path])) if closure_size else None
        record = path_json(store, i, csize)
        record["reproducibility"] = repro_status(store, path)
        records.append(record)
    if as_json:
        emit_json(records)
        return
    fmt = human_size if human_readable else str
    for r in records:
        line = f"{r['physical']}\t{fmt(r['size'])}"
        if closure_size:
            line += f"\t{fmt(r['closureSize'])}"
        repro = r["reproducibility"]
        if repro is not None:
            if repro["bitIdentical"]:  # the variations tried are the evidence
                varied = f" under {', '.join(repro['variations'])}" if repro.get("variations") else ""
                line += f"\tchecked {repro['checked']}x: bit-identical{varied}"
            else:  # the cause found is the news (a variation tried need not be one)
                cause = f" ({repro['causes'][-1]})" if repro.get("causes") else ""
                line += f"\tchecked {repro['checked']}x: NOT reproducible{cause}"
        click.echo(line)


@click.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--references", is_flag=True, help="Direct references.")
@click.option("--referrers", is_flag=True, help="Valid paths that refer to it.")
@click.option("--requisites", "-R", is_flag=True, help="The closure.")
@click.option("--tree", is_flag=True, help="The closure as a tree.")
@json_option
@global_options
@pass_options
def query(opts, paths, references, referrers, requisites, tree, as_json):
    """Query the reference graph of store paths."""
    modes = [name for name, on in (("references", references), ("referrers", referrers),
                                   ("requisites", requisites), ("tree", tree)) if on]
    if len(modes) != 1:
        raise click.UsageError("give exactly one of --references, --referrers, --requisites, --tree")
    (mode,) = modes
    store = opts.store(create=False)
    targets = [store.resolve(p)[0] for p in paths]
    if mode == "tree":
        if as_json:
            emit_json([_tree_json(store, t) for t in targets])
        else:
            for t in targets:
                _print_tree(store, t, "", True, set(), top=True)
        return
    if mode == "requisites":  # as nix-store -qR: what a path refers to comes before it
        result = store.references_first(store.closure(targets))
    else:
        seen = {}
        for t in targets:
            found = store.info(t).references if mode == "references" else store.referrers(t)
            seen.update((p.hash_part, p) for p in found)
        result = sorted(seen.values())
    if as_json:
        emit_json([names_json(store, p) for p in result])
    else:
        for p in result:
            click.echo(store.physical(p))


def _print_tree(store, path, indent, last, seen, top=False):
    branch = "" if top else ("└───" if last else "├───")
    repeated = path.hash_part in seen
    click.echo(f"{indent}{branch}{store.physical(path)}{' [...]' if repeated else ''}")
    if repeated:
        return
    seen.add(path.hash_part)
    refs = [r for r in store.info(path).references if r != path]
    child_indent = indent if top else indent + ("    " if last else "│   ")
    for i, ref in enumerate(refs):
        _print_tree(store, ref, child_indent, i == len(refs) - 1, seen)


def _tree_json(store, path, stack=()):
    refs = [r for r in store.info(path).references if r != path and r not in stack]
    return {**names_json(store, path), "references": [_tree_json(store, r, stack + (path,)) for r in refs]}


@click.command()
@click.option("--check-contents", is_flag=True, help="Rehash every file of every valid path.")
@click.option("--repair", is_flag=True, help="Fetch damaged paths again from substituters.")
@click.option("--substituter", "substituters", multiple=True, metavar="URL",
              help="With --repair: a cache to fetch from (repeatable; replaces the config's list).")
@json_option
@global_options
@pass_options
def verify(opts, check_contents, repair, substituters, as_json):
    """Check the database and (with --check-contents) every file; exit 4 on any problem."""
    from fimio.store.cache.url import parse_cache_url

    for url in substituters:  # a bad URL is bad usage even when nothing needs repair
        parse_cache_url(url)
    store = opts.store()
    problems = store.verify(check_contents=check_contents)
    if repair and problems:
        from fimio.store.repair import repair_paths

        opts.substituters = list(substituters)
        problems = repair_paths(store, problems, opts, log=lambda m: info(opts, m))
    def physical(p) -> str:
        return store.store + p.path[len(store.store_dir):]

    if as_json:
        emit_json({"ok": not problems, "problems": [{"path": p.path, "what": p.what, "file": p.file, "physical": physical(p)}
                                                          for p in problems]})
    else:
        from fimio.store.treediff import shown

        for p in problems:  # physical paths on stdout, as every command prints them; one line each
            where = f"{physical(p)}/{shown(p.file)}" if p.file and p.file != "." else physical(p)
            click.echo(f"{where}: {p.what}")
        if not problems:
            info(opts, f"verified {len(store.all_paths())} paths: no problems")
    if problems:
        raise IntegrityError(f"{len(problems)} problem(s) found in the store",
                             "run 'fimio verify --check-contents --repair' with a substituter" if not repair else None)
