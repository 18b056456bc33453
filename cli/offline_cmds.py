"""Commands for offline work and air-gapped transfer: prefetch, export, import
(``spec/offline.md``, ``spec/bundle.md``)."""

from __future__ import annotations

import os
import stat
import sys
from contextlib import contextmanager

import click

from fimio.store.errors import UsageError
from fimio.store.fsutil import open_input, widen_pipe

from .main import emit_json, global_options, info, json_option, pass_options
from .progress import ByteProgress
from .render import names_json


def _signing_keys(opts, key_files):
    from fimio.store.cache.keys import load_secret_key_file

    files = list(key_files) or list(opts.config().secret_key_files)
    return [load_secret_key_file(os.path.expanduser(f)) for f in files]


def _offline(opts, flag) -> tuple[bool, str]:
    """Whether we are offline, and which setting says so (for messages): the flag
    (--offline or --no-offline) wins over the config file."""
    if not opts.offline(flag):
        return False, ""
    return True, "--offline" if flag else "offline = true in the config file"


# ---- prefetch -------------------------------------------------------------------------------


@click.command()
@click.argument("targets", nargs=-1, required=True)
@click.option("--to", "to_url", metavar="URL", help="Also push everything to this cache (e.g. file:///mnt/usb/cache).")
@click.option("--key", "key_files", multiple=True, metavar="FILE",
              help="With --to: secret key file to sign with (repeatable) [default: config secret-key-files].")
@click.option("--offline/--no-offline", default=None,
              help="Take fixed outputs only from file:// substituters; never fetch "
                   "[default: config 'offline'; --no-offline overrides it].")
@click.option("--substituter", "substituters", multiple=True, metavar="URL",
              help="A cache to take .drv files and fixed outputs from (repeatable; replaces the config's list).")
@click.option("--no-substitute", is_flag=True, help="Fetch every fixed output from its URL.")
@click.option("-j", "--jobs", type=click.IntRange(min=0),
              help="Parallel fetches; 0 = the default [default: config 'jobs' or cores].")
@json_option
@global_options
@pass_options
def prefetch(opts, targets, to_url, key_files, offline, substituters, no_substitute, jobs, as_json):
    """Fetch everything a from-scratch offline rebuild of TARGETs needs: every .drv file,
    source and fixed-output (downloaded) result -- but not the regular build outputs --
    into this store, and with --to also into a cache.

    TARGET is a derivation file (.toml), a .drv store path or its hash part. Afterwards,
    `fimio realise --offline` rebuilds TARGETs here (or from --to's cache on another
    machine: `--offline --substituter URL`) without touching the network."""
    from fimio.store.prefetch import prefetch as do_prefetch
    from fimio.store.prefetch import refuse_network

    from .build_cmds import open_substituters

    offline, why = _offline(opts, offline)
    if to_url:
        from fimio.store.cache.url import parse_cache_url

        parse_cache_url(to_url)  # a bad URL is exit 2 before any work
        if offline:
            refuse_network(to_url, why)
    store = opts.store(protect=True)
    subs = open_substituters(opts, store, substituters, no_substitute, offline)
    progress = ByteProgress(opts, "fetching")
    if subs is not None:
        subs.stats.progress = progress.callback
    backend, keys = None, []
    try:
        if to_url:
            from fimio.store.cache.url import open_with_config

            keys = _signing_keys(opts, key_files)
            if not keys:
                info(opts, "fimio: warning: pushing unsigned (no --key and no secret-key-files); "
                           "clients that require signatures will refuse these paths")
            backend = open_with_config(to_url, opts.config())
        result = do_prefetch(store, list(targets), substituters=subs, offline=offline,
                             jobs=jobs or opts.config().jobs or 0, to_backend=backend, keys=keys,
                             warn=lambda m: info(opts, f"fimio: warning: {m}"))
    finally:
        progress.done()
        if subs is not None:
            for err in subs.errors:
                info(opts, f"fimio: warning: {err.message}")
            subs.close(interrupted=isinstance(sys.exc_info()[1], KeyboardInterrupt))
        if backend is not None:
            backend.close()
    rs = result.rebuild
    paths = store.closure(rs.paths)
    if as_json:
        emit_json({
            "targets": [store.logical(d.drv_path) for d in result.targets],
            "derivations": [store.logical(d.drv_path) for d in rs.drvs],
            "fixedOutputs": [store.logical(p) for d in rs.fixed for p in d.output_paths().values()],
            "paths": [names_json(store, p) for p in paths],  # the result: both names, as it prints them
            "fetched": [store.logical_base(b) for b in result.fetched],
            "substituted": result.substituted,
            "to": backend.url if backend is not None else None,
            "pathsSent": result.push.paths_sent if result.push is not None else 0,
        })
    else:
        for p in paths:
            click.echo(store.physical(p))
        where = f" and pushed {result.push.paths_sent} to {backend.url}" if result.push is not None else ""
        info(opts, f"prefetched {len(paths)} paths for {len(rs.drvs)} derivations "
                   f"({len(result.fetched)} fixed outputs fetched){where}")


# ---- export ---------------------------------------------------------------------------------


@click.command()
@click.argument("targets", nargs=-1, required=True)
@click.option("-o", "--output", "output", required=True, metavar="FILE", help="The bundle file to write ('-': stdout).")
@click.option("--closure", is_flag=True, help="Include the full runtime closures of the paths.")
@click.option("--with-sources", is_flag=True,
              help="Also include every .drv, source and fixed-output result needed to rebuild offline.")
@click.option("--sources-only", is_flag=True, help="Like --with-sources, without the targets' outputs.")
@click.option("--with-logs", is_flag=True, help="Include build logs and build records of included outputs.")
@click.option("--key", "key_files", multiple=True, metavar="FILE",
              help="Secret key file to sign with (repeatable) [default: config secret-key-files].")
@click.option("--level", type=click.IntRange(-7, 19), default=2, show_default=True,
              help="zstd level, -7 (fastest) to 19 (2: about half the NAR size at nearly level 1 speed).")
@json_option
@global_options
@pass_options
def export(opts, targets, output, closure, with_sources, sources_only, with_logs, key_files, level, as_json):
    """Write TARGETs to one signed, compressed bundle FILE for another (air-gapped) machine.

    TARGET is a store path, or a derivation (.toml file, .drv path or hash part): then its
    outputs. Import it there with `fimio import FILE`."""
    from fimio.store.bundle_export import export_bundle, plan_export

    if output == "-" and sys.stdout.isatty():
        raise UsageError("refusing to write a binary bundle to a terminal", "redirect stdout, or give -o FILE")
    if output == "-" and as_json:  # the JSON would follow the bundle on stdout and spoil it
        raise UsageError("--json and -o - both write to stdout", "give -o FILE with --json")
    store = opts.store(protect=True, create=False)
    keys = _signing_keys(opts, key_files)
    plan = plan_export(store, list(targets), closure=closure, with_sources=with_sources,
                       sources_only=sources_only, with_logs=with_logs)
    if not keys:
        info(opts, "fimio: warning: exporting unsigned (no --key and no secret-key-files); "
                   "importers that require signatures will refuse the bundle")
    progress = ByteProgress(opts, f"exporting {len(plan.paths)} path(s)")
    try:
        if output == "-":
            out = sys.stdout.buffer
            widen_pipe(out)
            stats = export_bundle(store, plan, out, keys, level, progress.callback)
            out.flush()
        else:
            stats = _export_atomic(store, plan, output, keys, level, progress.callback)
    finally:
        progress.done()
    if as_json:
        emit_json({"file": os.path.abspath(output),
                   "paths": [names_json(store, p) for p in plan.paths], "realisations": len(plan.realisations),
                   "blobs": stats.blobs, "bytes": stats.bytes, "digest": "blake3:" + stats.digest.hex(),
                   "signedBy": [k.name for k in keys]})
    elif output != "-":
        from .render import human_size

        info(opts, f"exported {len(plan.paths)} paths ({human_size(stats.bytes)} uncompressed, "
                   f"{human_size(os.path.getsize(output))} in {output})")


def _export_atomic(store, plan, output, keys, level, progress):
    """Write the bundle next to ``output`` and rename it into place: never a half bundle."""
    from fimio.store import fsutil
    from fimio.store.bundle_export import export_bundle

    directory = os.path.dirname(os.path.abspath(output))
    if os.path.isdir(output):
        raise UsageError(f"cannot write '{output}': it is a directory", "name a file with -o")
    if not os.path.isdir(directory):
        raise UsageError(f"cannot write '{output}': '{directory}' is not a directory")
    tmp = fsutil.sibling_tmp(output, sweep=True)
    try:
        # written back while the export goes on, so that the fsync finds little left
        with open(tmp, "wb") as f, fsutil.EarlyFlush(directory, every=64 << 20) as early:
            stats = export_bundle(store, plan, early.writer(f), keys, level, progress)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, output)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        if e.filename not in (None, tmp, output):  # a file of the store, not the bundle
            from fimio.store.errors import IntegrityError

            raise IntegrityError(f"cannot read '{os.fsdecode(e.filename)}' of the store: {e.strerror}",
                                 "run 'fimio verify --check-contents --repair'") from None
        raise UsageError(f"cannot write '{output}': {e.strerror}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return stats


# ---- import ---------------------------------------------------------------------------------


@contextmanager
def _bundle_source(file: str):
    """The bundle FILE opened for reading ('-': stdin), with one-line errors."""
    if file == "-":
        widen_pipe(sys.stdin.buffer)
        yield sys.stdin.buffer
        return
    with open_input(file, "bundle") as f:
        yield f


class _Counted:
    """A bundle being read, with the bytes read so far reported to ``progress(done, total)``
    (total: the file's size, None for a pipe)."""

    def __init__(self, f, progress):
        self.f, self.progress, self.done = f, progress, 0
        try:
            st = os.fstat(f.fileno())
            self.total = st.st_size if stat.S_ISREG(st.st_mode) else None
        except (OSError, ValueError):
            self.total = None

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self._advance(len(data))
        return data

    def readinto(self, b) -> int | None:
        k = self.f.readinto(b)
        self._advance(k or 0)
        return k

    def _advance(self, k: int) -> None:
        self.done += k
        self.progress(self.done, self.total)


@click.command(name="import")
@click.argument("file")
@click.option("--no-check-sigs", is_flag=True, help="Accept unsigned or untrusted bundles (contents are still verified).")
@json_option
@global_options
@pass_options
def import_(opts, file, no_check_sigs, as_json):
    """Import a bundle written by `fimio export` (FILE, or '-' for stdin): every signature and
    digest is verified before anything is registered; importing twice changes nothing."""
    from fimio.store.bundle_import import import_bundle
    from fimio.store.cache.keys import TrustedKeys

    config = opts.config()
    store = opts.store()
    trusted = TrustedKeys(config.trusted_public_keys)
    require = config.require_sigs and not no_check_sigs
    progress = ByteProgress(opts, "importing")
    with _bundle_source(file) as f:
        try:
            result = import_bundle(store, _Counted(f, progress) if progress.enabled else f, trusted, require,
                                   warn=lambda m: info(opts, f"fimio: warning: {m}"))
        finally:
            progress.done()
    imported = set(result.imported)
    if as_json:
        emit_json({"paths": [{**names_json(store, p), "imported": p in imported}
                             for p in result.paths],
                   "imported": len(imported), "realisations": result.realisations, "signedBy": result.signers})
    else:
        for p in result.paths:
            click.echo(store.physical(p))
        info(opts, f"imported {len(imported)} of {len(result.paths)} paths"
                   + (f" (signed by {', '.join(result.signers)})" if result.signers else ""))
