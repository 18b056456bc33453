"""Commands of the shared cache: key, push, copy, serve, challenge (``spec/cache.md``)."""

from __future__ import annotations

import os
import sys

import click

from fimio.store.errors import NotFound, NotReproducible, UsageError

from .main import emit_json, global_options, info, json_option, pass_options
from .progress import ByteProgress
from .render import human_size, names_json

# ---- key ------------------------------------------------------------------------------------


@click.group()
@global_options
def key():
    """Ed25519 signing keys in Nix's name:base64 form."""


@key.command()
@click.argument("name")
@global_options
def generate(name):
    """Print a new secret key named NAME (keep it secret; `fimio key public` derives the public key)."""
    from fimio.store.cache.keys import SecretKey

    click.echo(str(SecretKey.generate(name)))


@key.command()
@global_options
def public():
    """Read a secret key on stdin; print its public key (for trusted-public-keys)."""
    from fimio.store.cache.keys import SecretKey

    text = sys.stdin.read()
    if not text.strip():
        raise UsageError("no secret key on stdin", "pipe one in: fimio key public < team-1.secret")
    click.echo(str(SecretKey.parse(text).public_key()))


# ---- push -----------------------------------------------------------------------------------


def _signing_keys(opts, key_files):
    from fimio.store.cache.keys import load_secret_key_file

    files = list(key_files) or list(opts.config().secret_key_files)
    return [load_secret_key_file(os.path.expanduser(f)) for f in files]


def _push_targets(store, targets):
    """``(paths, realisations, drv hashes)`` for push TARGETs: store paths, or derivations
    (their outputs, which must be valid here, and their realisations)."""
    from fimio.store.cache.layout import Realisation
    from fimio.store.prefetch import is_derivation_target

    paths, realisations, hashes = [], [], []
    for target in targets:
        if not is_derivation_target(store, target):
            paths.append(store.resolve(target)[0])
            continue
        from fimio.store.realise import resolve_outputs

        for drv_hash, output, path in resolve_outputs(store, target):
            if not store.is_valid(path):
                raise NotFound(f"output '{output}' of '{target}' is not valid here", "run 'fimio realise' first")
            paths.append(path)
            hashes.append(drv_hash)
            with store.db.read() as txn:
                data = txn.get(f"{drv_hash}!{output}".encode(), db=store.db.dbs["realisations"])
            if data is not None:
                realisations.append(Realisation.from_local(bytes(data)))
    return paths, realisations, hashes


def _do_push(opts, store, url, paths, realisations=(), hashes=(), key_files=(), jobs=8):
    from fimio.store.cache.push import Pusher
    from fimio.store.cache.url import open_with_config

    keys = _signing_keys(opts, key_files)
    backend = open_with_config(url, opts.config())
    progress = ByteProgress(opts, f"pushing to {backend.url}")
    try:
        stats = Pusher(store, backend, keys, jobs=jobs, progress=progress.callback).push(paths, realisations, hashes)
    finally:
        progress.done()
    if not keys:  # after the push: an error in it is then the one line a failed push prints
        info(opts, "fimio: warning: pushed unsigned (no --key and no secret-key-files); "
                   "clients that require signatures will refuse these paths")
    return backend, stats


@click.command()
@click.argument("cache")
@click.argument("targets", nargs=-1, required=True)
@click.option("--key", "key_files", multiple=True, metavar="FILE", help="Secret key file to sign with (repeatable) "
              "[default: config secret-key-files].")
@click.option("-j", "--jobs", type=click.IntRange(1, 64), default=8, show_default=True, help="Parallel uploads.")
@json_option
@global_options
@pass_options
def push(opts, cache, targets, key_files, jobs, as_json):
    """Upload the closures of TARGETs (store paths, or derivations: their outputs, realisations,
    logs and build records) to CACHE, sending only what it lacks."""
    from fimio.store.cache.url import parse_cache_url

    parse_cache_url(cache)  # a bad URL is exit 2 before any work
    store = opts.store(protect=True, create=False)
    paths, realisations, hashes = _push_targets(store, targets)
    backend, stats = _do_push(opts, store, cache, paths, realisations, hashes, key_files, jobs)
    for path in stats.conflicts:  # always on stderr: a finding about reproducibility
        click.echo(f"fimio: warning: the cache holds other contents for '{path}': its realisation was not "
                   f"pushed (a build that is not reproducible? see 'fimio challenge {path} --cache {cache}')",
                   err=True)
    if as_json:
        emit_json({"cache": backend.url, "paths": stats.paths, "pathsSent": stats.paths_sent,
                   "sent": stats.sent_paths, "objectsSent": stats.objects_sent, "bytesSent": stats.bytes_sent,
                   "rawBytesSent": stats.raw_bytes_sent, "realisationsSent": stats.realisations_sent,
                   "conflicts": stats.conflicts})
    else:
        info(opts, f"pushed {stats.paths_sent} of {stats.paths} paths to {backend.url} "
                   f"({stats.objects_sent} objects, {human_size(stats.bytes_sent)})")


# ---- copy -----------------------------------------------------------------------------------


def _remote_path(store, subs, text: str):
    from fimio.store.paths import StorePath, is_hash_part

    for prefix in (store.store + "/", store.store_dir + "/"):
        if text.startswith(prefix):
            text = text[len(prefix):]
            break
    else:
        real = os.path.realpath(text) if os.path.lexists(text) else text  # e.g. ./result
        if real.startswith(store.store + "/"):
            text = real[len(store.store) + 1:]
        elif real.startswith("/"):  # a path in another store (another root): its base name
            text = os.path.basename(real.rstrip("/"))
    base = text.split("/", 1)[0]
    if is_hash_part(base):
        valid = store.query_hash(base)
        if valid is not None:
            return valid.path
        path = subs.lookup_hash(base) if subs is not None else None
        if path is None:
            raise NotFound(f"no cache holds a path with hash '{base}'", "check the hash, or push the path first")
        return path
    return StorePath.parse(base)


@click.command()
@click.option("--from", "src", metavar="URL", help="Cache to copy from (into this store, or on to --to).")
@click.option("--to", "dst", metavar="URL", help="Cache to copy to (from this store, or from --from).")
@click.option("--key", "key_files", multiple=True, metavar="FILE", help="With --to: secret key file to sign with "
              "(repeatable) [default: config secret-key-files].")
@click.option("--no-check-sigs", is_flag=True, help="With --from: accept unsigned paths (contents are still verified).")
@click.option("-j", "--jobs", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Parallel downloads and uploads.")
@click.argument("paths", nargs=-1, required=True)
@json_option
@global_options
@pass_options
def copy(opts, src, dst, key_files, no_check_sigs, jobs, paths, as_json):
    """Copy the closures of PATHs between caches and this store.

    --from URL fetches them into this store (verified); --to URL uploads them from this
    store; both together go through this store."""
    from fimio.store.cache.url import parse_cache_url

    if not src and not dst:
        raise UsageError("give --from URL, --to URL or both", "see 'fimio copy --help'")
    for u in (src, dst):
        if u:
            parse_cache_url(u)
    store = opts.store(protect=True)
    if src:
        from fimio.store.cache.substitute import SubstituterSet

        config = opts.config()
        with SubstituterSet(store, [src], config.trusted_public_keys, jobs=jobs,
                            require_sigs=config.require_sigs and not no_check_sigs, config=config) as subs:
            subs.subs[0].backend.check_there()  # a cache that is down is not one lacking the paths
            wanted = [_remote_path(store, subs, p) for p in paths]
            progress = ByteProgress(opts, f"copying from {src}")
            subs.stats.progress = progress.callback
            try:
                got = subs.substitute(wanted)
            finally:
                progress.done()
            missing = [p for p in wanted if p not in got]
            if missing:
                raise NotFound("; ".join(_not_in_cache(store, subs, p, src) for p in missing),
                               "push the paths with their closures first")
            # closures included; 0 when all were here, or another process registered them meanwhile
            info(opts, f"copied {subs.stats.paths} path(s) from {src} ({subs.stats.objects} objects, "
                       f"{human_size(subs.stats.bytes)} downloaded)")
    else:
        wanted = [store.resolve(p)[0] for p in paths]
    if dst:
        _, stats = _do_push(opts, store, dst, wanted, key_files=key_files, jobs=jobs)
        info(opts, f"copied {stats.paths_sent} of {stats.paths} paths to {dst}")
    if as_json:
        emit_json([names_json(store, p) for p in wanted])
    else:
        for p in wanted:
            click.echo(store.physical(p))


def _not_in_cache(store, subs, path, src: str) -> str:
    """Why ``path`` could not be copied from ``src``: absent, or held without part of its closure."""
    lacking = subs.incomplete.get(path)
    if lacking:
        return (f"'{store.logical(path)}' is in cache '{src}' without what it refers to: "
                + ", ".join(store.logical(r) for r in lacking))
    return f"'{store.logical(path)}' is not in cache '{src}'"


# ---- serve ----------------------------------------------------------------------------------


@click.command()
@click.option("--cache", "cache_url", required=True, metavar="URL", help="The cache to serve (file:// or s3://).")
@click.option("--listen", default="127.0.0.1:8080", show_default=True, metavar="HOST:PORT",
              help="Address to listen on (port 0: any free port, printed on stderr).")
@click.option("--tokens", "tokens_file", metavar="FILE", help="Bearer tokens, one 'TOKEN read|write' per line.")
@click.option("--anonymous-read", is_flag=True, help="With --tokens: let anyone read.")
@click.option("--max-upload", default=256 << 20, show_default=True, metavar="BYTES", type=click.IntRange(min=1),
              help="Largest accepted PUT.")
@click.option("--idle-timeout", default=60.0, show_default=True, metavar="SECONDS",
              type=click.FloatRange(min=0.1, max=86400),
              help="Close a connection that takes longer to send a request head; answer 408 to a body "
                   "that stalls this long.")
@global_options
@pass_options
def serve(opts, cache_url, listen, tokens_file, anonymous_read, max_upload, idle_timeout):
    """Serve a cache over HTTP: reads for everyone (or token holders), uploads with a write token.

    Runs until SIGTERM or SIGINT, then finishes the requests in flight and exits 0."""
    from fimio.store.cache.server import CacheServer, load_tokens, parse_listen, run

    if anonymous_read and not tokens_file:
        raise click.UsageError("--anonymous-read needs --tokens: without tokens, reads are open to anyone already "
                               "and nothing can be written")
    host, port = parse_listen(listen)
    tokens = load_tokens(tokens_file) if tokens_file else None
    server = CacheServer(cache_url, tokens, anonymous_read, max_upload, idle_timeout)

    def ready(url):
        mode = "read-only" if tokens is None else ("reads open, writes need a token" if anonymous_read
                                                   else "reads and writes need a token")
        print(f"fimio serve: serving {server.url} on {url} ({mode})", file=sys.stderr, flush=True)

    run(server, host, port, ready)


# ---- challenge ------------------------------------------------------------------------------


@click.command()
@click.argument("target")
@click.option("--cache", "caches", multiple=True, required=True, metavar="URL", help="A cache to ask (repeatable).")
@json_option
@global_options
@pass_options
def challenge(opts, target, caches, as_json):
    """Compare the output digests that caches and this store hold for TARGET (a derivation,
    or a store path). Exit 3 when two trusted claims disagree."""
    from fimio.store.cache.challenge import compare
    from fimio.store.cache.push import cache_params
    from fimio.store.cache.substitute import SubstituterSet
    from fimio.store.cache.url import open_with_config, parse_cache_url
    from fimio.store.prefetch import is_derivation_target

    for u in caches:
        parse_cache_url(u)
    store, config = opts.store(), opts.config()
    backends = [open_with_config(u, config) for u in caches]
    for b in backends:  # a cache down or for another store directory must not read as "absent"
        b.check_there()
        cache_params(b, store.store_dir, create=False)
    if is_derivation_target(store, target):
        from fimio.store.realise import resolve_outputs

        items = [(h, o, p) for h, o, p in resolve_outputs(store, target)]
    else:
        with SubstituterSet(store, caches, config.trusted_public_keys, config.require_sigs, config) as subs:
            items = [(None, None, _remote_path(store, subs, target))]
    comparisons = compare(store, backends, config.trusted_public_keys, items, config.require_sigs)
    if as_json:
        emit_json([{"output": c.what, "path": store.logical(c.path), "agree": c.agree,
                    "claims": [{"source": x.source, "digest": "blake3:" + x.root.hex() if x.root else None,
                                "trusted": x.trusted, "error": x.error} for x in c.claims]}
                   for c in comparisons])
    else:
        for c in comparisons:
            status = "agree" if c.agree else "DIFFER"
            if len(c.roots) == 0:
                status = "no trusted claims"
            elif len(c.roots) == 1 and sum(1 for x in c.claims if x.trusted and x.root) < 2:
                status = "only one trusted claim"
            click.echo(f"{store.physical(c.path)}: {status}")
            for x in c.claims:
                digest = "blake3:" + x.root.hex() if x.root else "absent"
                note = "" if x.trusted or x.root is None else " (untrusted)"
                if x.error:
                    note += f" ({x.error})"
                click.echo(f"  {x.source}: {digest}{note}")
    bad = [c for c in comparisons if not c.agree]
    if bad:
        raise NotReproducible(f"{len(bad)} output(s) differ between caches",
                              "a build is not reproducible, or a cache is lying; compare with 'fimio diff'")
