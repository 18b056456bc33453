"""Commands about derivations and builds: instantiate, realise, log, provenance, why-depends, run."""

from __future__ import annotations

import os
import sys

import click

from fimio.store.errors import BuildError, FimioError, NotFound, UsageError

from .main import emit_json, global_options, info, json_option, pass_options
from .progress import BuildProgress
from .render import human_size, names_json


@click.command()
@click.argument("files", nargs=-1, required=True)
@click.option("--add-root", metavar="PATH",
              help="Make PATH a symlink to the .drv, registered as a GC root (PATH-2, PATH-3... for further files).")
@json_option
@global_options
@pass_options
def instantiate(opts, files, add_root, as_json):
    """Write the derivation graph of FILES into the store; print the .drv store paths.

    The .drv files are garbage to 'fimio gc' unless something keeps them: an out-link of
    their outputs, or --add-root.
    """
    from fimio.store.instantiate import Graph

    store = opts.store(protect=True)  # what we add stays alive until the .drv refers to it
    graph = Graph(store)
    drvs = [graph.from_file(f) for f in files]
    roots = [None] * len(drvs)
    if add_root:
        from fimio.store.roots import add_roots, link_names

        roots = add_roots(store, link_names(add_root, [{"out": d.drv_path} for d in drvs]), flag="--add-root")
    if as_json:
        emit_json([{**_drv_json(store, d), "root": root} for d, root in zip(drvs, roots)])
    else:
        for d in drvs:
            click.echo(store.physical(d.drv_path))


def _drv_json(store, drv) -> dict:
    return {
        "path": store.logical(drv.drv_path),  # {path, physical}, as every command's results
        "drvPath": store.logical(drv.drv_path),  # Nix's name for it
        "physical": store.physical(drv.drv_path),
        "drvHash": drv.drv_hash,
        "outputs": {n: names_json(store, p) for n, p in drv.output_paths().items()},
    }


def _log_sink(drv, line: bytes) -> None:
    sys.stderr.write(f"{drv.name}> {line.decode(errors='replace')}")
    sys.stderr.flush()


def open_substituters(opts, store, urls, no_substitute, offline):
    """The substituters a realise may use (flags win over the config); None when there are none.

    Offline, only ``file://`` caches are used: no network connection is ever attempted.
    """
    if no_substitute:
        return None
    config = opts.config()
    urls = list(urls) or list(config.substituters)
    if offline:
        from fimio.store.cache.url import offline_usable

        urls = offline_usable(urls, lambda message: info(opts, message))
    if not urls:
        return None
    from fimio.store.cache.substitute import SubstituterSet

    return SubstituterSet.from_config(store, config, urls=urls, on_error="skip")


@click.command()
@click.argument("targets", nargs=-1, required=True)
@click.option("-j", "--jobs", type=click.IntRange(min=0),
              help="Parallel builds; 0 = the default [default: config 'jobs' or cores].")
@click.option("--check", is_flag=True, help="Build again and compare bit for bit (exit 3 on a difference).")
@click.option("--rounds", type=click.IntRange(min=2),
              help="Build N times in all (N >= 2; implies --check, whose default is 2) and compare every pair.")
@click.option("--vary", is_flag=True, help="With --check: vary TZ, locale, umask, hostname, uid/gid, cores, env order, build dir, directory order between rounds.")
@click.option("-K", "--keep-failed", is_flag=True, help="Keep the build directory of a failed build.")
@click.option("-k", "--keep-going", is_flag=True,
              help="After a failed build, go on with every build that does not need it.")
@click.option("--cores", type=click.IntRange(min=0), metavar="N",
              help="CPUs each build is told it may use (FIMIO_BUILD_CORES); 0 = all "
                   "[default: config 'cores', else all].")
@click.option("--offline/--no-offline", default=None,
              help="Never touch the network: local store and file:// substituters only "
                   "[default: config 'offline'; --no-offline overrides it].")
@click.option("--substituter", "substituters", multiple=True, metavar="URL", help="A cache to substitute from (repeatable; replaces the config's list).")
@click.option("--no-substitute", is_flag=True, help="Build everything that is not valid locally.")
@click.option("-o", "--out-link", metavar="PATH", help="Out-link name [default: ./result].")
@click.option("--no-out-link", is_flag=True, help="Do not create out-links (nor GC roots).")
@click.option("-n", "--dry-run", is_flag=True,
              help="Print what would be built and what fetched; build nothing and fetch no output (only the "
                   ".drv targets and store inputs that knowing the graph needs).")
@json_option
@global_options
@pass_options
def realise(opts, targets, jobs, check, rounds, vary, keep_failed, keep_going, cores, offline, substituters,
            no_substitute, out_link, no_out_link, dry_run, as_json):
    """Make every output of each TARGET valid, substituting or building; print the output paths.

    TARGET is a derivation file (.toml), a .drv store path or its hash part.
    """
    from fimio.store.hostfp import HostFingerprinter
    from fimio.store.realise import RealiseOptions, Realiser

    if (rounds or vary) and not check:
        check = True
    try:  # a usage error too gives --json its object: a script reads one on every failure
        if dry_run and check:
            raise click.UsageError("--dry-run and --check (or --rounds, --vary) exclude each other (a check builds)")
        if no_substitute and substituters:
            raise click.UsageError("--no-substitute and --substituter exclude each other")
        if out_link is not None and not out_link:
            raise click.UsageError("the out-link name given to -o/--out-link is empty")
        if no_out_link and out_link:
            raise click.UsageError("--no-out-link and -o/--out-link exclude each other")
        config = opts.config()
        offline = opts.offline(offline)
        store = opts.store()
        progress = BuildProgress(opts)
        options = RealiseOptions(
            jobs=jobs or config.jobs or 0,
            cores=config.cores if cores is None else cores,  # --cores 0 overrides a config's cores = N
            keep_failed=keep_failed,
            keep_going=keep_going,
            offline=offline,
            substituters=open_substituters(opts, store, substituters, no_substitute, offline),
            log_sink=_log_sink if opts.verbosity >= 1 else None,
            progress=progress,
            dry_run=dry_run,
        )
        if options.substituters is not None and progress.enabled:
            options.substituters.stats.progress = progress.substituting
    except (FimioError, OSError, click.UsageError) as e:
        if as_json and not dry_run:
            emit_json(_realise_json(None, None, {}, None, e))
        raise
    realiser = Realiser(store, options, fingerprinter=HostFingerprinter(store.db, hidden=[store.root]))
    warned: set[str] = set()

    def warn(message: str) -> None:  # once each: a refusal met again as the graph is planned further
        if message not in warned:
            warned.add(message)
            info(opts, f"fimio: warning: {message}")

    realiser.warn = warn
    outcome, checks, links = None, None, {}
    try:
        try:
            if dry_run:
                _print_dry_run(store, *realiser.dry_run(list(targets)), as_json)
                return
            failures = []  # with --keep-going: what failed, reported after what succeeded
            try:
                check_links = None if no_out_link else (
                    lambda roots: _check_out_links(store, [d.output_paths() for d in roots], out_link))
                outcome = realiser.realise(list(targets), before_build=check_links)
            except FimioError as e:
                outcome = getattr(e, "partial", None)  # what was done anyway: valid targets, builds
                if not (keep_going and outcome is not None):
                    raise
                failures = [e]  # -k: the targets made valid are linked, printed (and checked)
            if check:
                from fimio.store.check import check_targets

                checks = check_targets(realiser, outcome, rounds or 2, vary, keep_going)
                failures += checks.failures
            # before realiser.close() drops the temp roots: a gc in between would leave ./result dangling
            links = {} if no_out_link else _out_links(store, outcome, out_link)
        except BuildError as e:
            progress.done()
            if options.log_sink is None and opts.verbosity >= 0:
                _print_log_tails(e)
            raise
        finally:
            progress.done()
            realiser.close()
            if options.substituters is not None:
                for err in options.substituters.errors:
                    info(opts, f"fimio: warning: {err.message}")
                options.substituters.close(interrupted=isinstance(sys.exc_info()[1], KeyboardInterrupt))
        where = "the \"checks\" report on stdout" if as_json else "the report above"
        if checks is not None and not checks.ok:
            from fimio.store.errors import NotReproducible

            failures.append(NotReproducible(checks.summary(), f"see {where}; 'fimio diff' explains .check outputs"))
        error = None
        if failures:
            from fimio.store.realise import gravest

            error = gravest(failures, f"{len(failures)} failure(s)", f"see {where}")
    except (FimioError, OSError) as e:
        if as_json and not dry_run:  # a script learns what was done before the failure
            emit_json(_realise_json(store, outcome, links, checks, e))
        raise
    if as_json:
        emit_json(_realise_json(store, outcome, links, checks, error))
    else:
        for _, outs in outcome.targets:
            for name in sorted(outs):  # by output name, as the .drv lists them (and the fast path prints)
                click.echo(store.physical(outs[name]))
        if outcome.built or outcome.substituted:
            info(opts, f"built {len(outcome.built)}, substituted {len(outcome.substituted)}")
        if checks is not None and (opts.verbosity >= 0 or not checks.ok):  # -q: only a difference is shown
            click.echo(checks.render(), err=True)
    if error is not None:
        if opts.verbosity >= 0 and options.log_sink is None:
            for e in failures:
                _print_log_tails(e, named=len(failures) > 1)
        raise error


def _realise_json(store, outcome, links: dict, checks, error) -> dict:
    """The ``--json`` result of realise, printed whether it succeeded or not: ``ok``, and on
    failure ``error`` (exit code, message, details) beside what was done before it."""
    return {
        "ok": error is None,
        "error": None if error is None else _error_json(error),
        "targets": [_drv_json(store, d) for d, _ in outcome.targets] if outcome else [],
        "built": [store.logical_base(b) for b in outcome.built] if outcome else [],
        "substituted": outcome.substituted if outcome else [],
        "outLinks": links,
        "checks": checks.to_json() if checks is not None else None,
    }


def _error_json(error) -> dict:
    if isinstance(error, OSError):  # the system failed (a full disk): exit 1, as the error line says
        where = f" '{os.fsdecode(error.filename)}'" if error.filename else ""
        return {"exitCode": 1, "message": f"{error.strerror or error}{where}", "details": []}
    return {"exitCode": error.exit_code, "message": error.message, "details": getattr(error, "details", [])}


def _print_log_tails(e, named: bool = False) -> None:
    """The last lines of a failed build's log, or of each one's after ``--keep-going``
    (nothing for an error without a log); ``named``: headed by the derivation's name."""
    drv = getattr(e, "drv", None) if named else None
    tails = getattr(e, "log_tails", None) or [(drv.drv_path.base if drv else None, getattr(e, "log_tail", ""))]
    for name, tail in tails:
        if tail:
            of = f" of {name}" if name else ""
            n = len(tail.splitlines())
            click.echo(f"last {'log line' if n == 1 else f'{n} log lines'}{of}:", err=True)
            click.echo("\n".join("  > " + line for line in tail.splitlines()), err=True)


def _print_dry_run(store, roots, build, fetch, as_json) -> None:
    if as_json:
        emit_json({
            "targets": [_drv_json(store, d) for d in roots],
            "build": [names_json(store, d.drv_path) for d in build],
            "fetch": [{**names_json(store, p), "cache": sub.url, "size": remote.size}
                      for p, (sub, remote) in sorted(fetch.items())],
        })
        return
    if build:
        click.echo(f"{len(build)} derivation(s) would be built:")
        for d in build:
            click.echo(f"  {store.physical(d.drv_path)}")
    if fetch:
        total = human_size(sum(remote.size for _, remote in fetch.values()))
        click.echo(f"{len(fetch)} path(s) would be fetched ({total} unpacked):")
        for p, (sub, remote) in sorted(fetch.items()):
            click.echo(f"  {store.physical(p)}  {human_size(remote.size)}  from {sub.url}")
    if not build and not fetch:
        click.echo("nothing to do: every output is valid")


def _check_out_links(store, outputs: list[dict], out_link) -> None:
    """Before building: refuse an out-link name in the way now, not after a long build."""
    from fimio.store.roots import check_links, link_names

    check_links(store, link_names(out_link or "result", outputs))


def _out_links(store, outcome, out_link) -> dict:
    from fimio.store.roots import add_roots, link_names

    wanted = link_names(out_link or "result", [outs for _, outs in outcome.targets], outcome.positions)
    made = add_roots(store, wanted)
    return {link: store.logical(path) for link, (_, path) in zip(made, wanted)}


def _drv_of(store, target: str):
    """The derivation behind TARGET: a derivation file, a .drv path, or an output path."""
    from fimio.store.instantiate import Graph

    graph = Graph(store)
    if target.endswith(".toml") or (os.path.isfile(target) and not os.path.realpath(target).startswith(store.store + "/")):
        return graph.from_file(target)
    path, _ = store.resolve(target)
    if path.name.endswith(".drv"):
        return graph.load(store.logical(path))
    from fimio.store.paths import StorePath
    from fimio.store.realise import realisation_of_output

    deriver = store.info(path).deriver
    if deriver is not None and store.is_valid(StorePath.parse(deriver)):
        return graph.load(store.logical_base(deriver))
    record = realisation_of_output(store, path)  # the .drv may have been collected
    if record is None:
        raise NotFound(f"'{store.logical(path)}' was not built by a derivation here")
    return _DrvRef(store, record)


class _DrvRef:
    """What log/provenance need of a derivation whose .drv is gone: its hash and outputs."""

    def __init__(self, store, record):
        from fimio.store.paths import StorePath

        self.drv_hash = record["drvHash"]
        self.drv_path = StorePath.parse(record["drv"])
        self.name = self.drv_path.name.removesuffix(".drv")
        from fimio.store.realise import realisations_of

        self._outputs = {r["output"]: StorePath.parse(r["path"]) for r in realisations_of(store, self.drv_hash)}

    def output_paths(self):
        return dict(self._outputs)


@click.command()
@click.argument("target")
@global_options
@pass_options
def log(opts, target):
    """Print the build log of TARGET (a derivation file, .drv path or output path)."""
    from fimio.store.realise import read_log

    store = opts.store(create=False)
    drv = _drv_of(store, target)
    sys.stdout.buffer.write(read_log(store, drv.drv_hash))


@click.command()
@click.argument("target")
@json_option
@global_options
@pass_options
def provenance(opts, target, as_json):
    """Show the build records of TARGET: host, kernel, CPU, versions, host fingerprints, times, result."""
    from fimio.store.provenance import provenance_report

    store = opts.store(create=False)
    drv = _drv_of(store, target)
    report = provenance_report(store, drv)
    if as_json:
        emit_json(report.to_json())
    else:
        click.echo(report.render())


@click.command(name="why-depends")
@click.argument("a")
@click.argument("b")
@json_option
@global_options
@pass_options
def why_depends(opts, a, b, as_json):
    """Show the reference chain from store path A to store path B."""
    store = opts.store(create=False)
    pa, _ = store.resolve(a)
    pb, _ = store.resolve(b)
    parents = {pa: None}
    queue = [pa]
    while queue and pb not in parents:
        cur = queue.pop(0)
        for ref in store.info(cur).references:
            if ref not in parents:
                parents[ref] = cur
                queue.append(ref)
    if pb not in parents:
        raise NotFound(f"'{store.logical(pa)}' does not depend on '{store.logical(pb)}'")
    chain = [pb]
    while parents[chain[-1]] is not None:
        chain.append(parents[chain[-1]])
    chain.reverse()
    if as_json:
        emit_json([names_json(store, p) for p in chain])
        return
    for depth, p in enumerate(chain):
        click.echo(("    " * (depth - 1) + "└───" if depth else "") + store.physical(p))


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("target")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@global_options
@pass_options
def run(opts, target, command):
    """Run COMMAND with the store visible at its logical path (STOREPATH/bin first on PATH).

    Example: fimio run <path> -- hello --version
    """
    import shutil

    from fimio.store.sandbox import bwrap_path, host_view

    store = opts.store(create=False)
    path, _ = store.resolve(target)
    logical = store.logical(path)
    env = dict(os.environ)
    env["PATH"] = f"{logical}/bin:" + env.get("PATH", "")
    env["FIMIO_STORE"] = store.store_dir
    argv = [bwrap_path(), *host_view(store.store_dir), "--ro-bind", store.store, store.store_dir,
            "--chdir", os.getcwd(), "--die-with-parent", "--", *command]
    name = command[0]
    # an absolute name is looked up as itself (lexists: a symlink into the logical store
    # resolves only inside); a logical store path at its physical place here
    if name.startswith(store.store_dir + "/"):
        found = os.path.lexists(store.store + name[len(store.store_dir):])
    elif name.startswith("/"):
        found = os.path.lexists(name)
    else:
        found = shutil.which(name) is not None or os.path.exists(os.path.join(store.physical(path), "bin", name))
    if not found:
        raise UsageError(f"command '{name}' not found in {logical}/bin or on PATH")
    store.close()  # the command must not inherit the database's descriptors (LMDB opens them inheritable)
    os.execvpe(argv[0], argv, env)
