"""Commands run without click: ``fimio add``, and ``fimio realise`` when every requested
output is already valid.

These are the commands a CI loop runs most, and interpreter start-up plus click already
cost most of a budget measured against ``nix-store --add`` or ``--realise`` (click alone
is 40-50 ms of a 150 ms add). So before importing click, their plain argument lists are
parsed here. Anything these paths do not handle -- an option they do not know, a form
click would refuse, ``--help`` -- returns None and the click command runs instead.

``add`` runs here exactly as through click: the same function (:func:`add_path`) with
the same errors and exit codes (``fimio.cli.run`` maps them for both).

A no-op ``realise`` reads the ``.drv`` (or the evaluation cache for a derivation file),
checks each output's validity in the database, prints the paths and refreshes the
out-links. Anything else -- a cache miss, an invalid output, any error -- returns None
and the full command runs instead, with its complete checks and messages. It never
writes to the store except the GC-root registration of out-links. The GC lock is held
shared from the validity check until the out-links are registered, as the full path does
with its temp roots: otherwise a collection could delete an output between the check and
its new root, leaving ``./result`` dangling.
"""

from __future__ import annotations

import json
import os
import sys

_GLOBAL_VALUE_FLAGS = {"--root", "--store-dir"}
_REALISE_FLAGS = ({"-o", "--out-link"}, {"--no-out-link", "-q", "--quiet"})
_ADD_FLAGS = ({"--name"}, {"--json", "-q", "--quiet", "-v", "--verbose"})


def _parse(args: list[str], value_flags: set[str], bool_flags: set[str]):
    """``(options, operands)`` of a plain argument list: value options (``--x V`` or
    ``--x=V``; the last one given wins, as with click), flags (counted) and operands not
    starting with '-'. None for anything else."""
    value_flags = value_flags | _GLOBAL_VALUE_FLAGS
    opts: dict[str, object] = {}
    operands: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a in value_flags and i + 1 < len(args):
            opts[a] = args[i + 1]
            i += 2
        elif "=" in a and a.split("=", 1)[0] in value_flags:
            key, value = a.split("=", 1)
            opts[key] = value
            i += 1
        elif a in bool_flags:
            opts[a] = opts.get(a, 0) + 1
            i += 1
        elif a.startswith("-"):
            return None
        else:
            operands.append(a)
            i += 1
    return (opts, operands) if operands else None


def try_add(argv: list[str]) -> int | None:
    """Run ``fimio add PATH`` with plain options; None when click must parse them."""
    parsed = _parse(argv[1:], *_ADD_FLAGS)
    if parsed is None or len(parsed[1]) != 1 or os.environ.get("FIMIO_NO_FAST_PATH"):
        return None
    flags, (path,) = parsed
    if os.path.exists(path) and not os.access(path, os.R_OK):
        return None  # click's own check of its PATH argument says this one
    from .options import Options

    opts = Options()
    opts.root, opts.store_dir = flags.get("--root"), flags.get("--store-dir")
    opts.verbosity = (flags.get("-v", 0) + flags.get("--verbose", 0)
                      - flags.get("-q", 0) - flags.get("--quiet", 0))
    add_path(opts, path, flags.get("--name"), bool(flags.get("--json")))
    return 0


def add_path(opts, path: str, name: str | None, as_json: bool) -> None:
    """``fimio add``: store PATH (a file or a tree) and print its store path, or its record."""
    from fimio.store.errors import UsageError

    from .progress import ByteProgress

    store = opts.store()
    progress = ByteProgress(opts, f"adding {os.path.basename(os.path.abspath(path))}")
    try:
        info = store.add_path(path, name, progress.callback)
    except UsageError as e:
        if name is None and e.message.startswith("invalid store path name"):
            raise UsageError(e.message, f"{e.hint}; give one with --name") from None
        raise
    except PermissionError as e:
        # files are read on worker threads, outside scan()'s own PermissionError mapping
        where = os.fsdecode(e.filename) if e.filename is not None else path
        raise UsageError(f"cannot read '{where}': permission denied") from None
    finally:
        progress.done()
    if as_json:
        from .options import emit_json
        from .render import path_json

        emit_json(path_json(store, info))
    else:
        sys.stdout.write(store.physical(info.path) + "\n")
    sys.stdout.flush()  # here, where a closed pipe is caught and said as click's echo would


def try_realise(argv: list[str]) -> int | None:
    """Run a no-op realise; None when the full command must run instead."""
    parsed = _parse(argv[1:], *_REALISE_FLAGS)
    if parsed is None or os.environ.get("FIMIO_NO_FAST_PATH"):
        return None
    opts, targets = parsed
    try:
        return _realise(opts, targets)
    except Exception:
        return None  # the full path will explain whatever went wrong


def _realise(opts, targets) -> int | None:
    from fimio.store.config import load_config, refuse_root_in_a_users_store, resolve_root

    load_config()  # a bad config file is bad usage whatever the outputs' state: the full path says so
    root = resolve_root(opts.get("--root"))
    locks = os.path.join(root, "locks")
    if not os.path.isdir(os.path.join(root, "db")) or not os.path.isdir(locks):
        return None
    refuse_root_in_a_users_store(root)  # (any error: the full path says it)
    out_link = opts.get("-o", opts.get("--out-link"))
    if out_link == "" or (out_link and opts.get("--no-out-link")):
        return None  # flags the full command refuses, with its message
    if opts.get("--no-out-link"):
        return _realise_locked(opts, targets, root)
    from fimio.store.fsutil import file_lock

    with file_lock(os.path.join(locks, "gc.lock"), shared=True):
        return _realise_locked(opts, targets, root)


def _realise_locked(opts, targets, root) -> int | None:
    import lmdb

    from fimio.store.config import resolve_store_dir
    from fimio.store.db import refuse_truncated

    store_dir = resolve_store_dir(opts.get("--store-dir"))
    store = os.path.join(root, "store")
    db_path = os.path.join(root, "db")
    refuse_truncated(os.path.join(db_path, "data.mdb"))  # mapped, a short file would be a SIGBUS
    env = lmdb.open(db_path, max_dbs=16, readonly=True, lock=True, subdir=True)
    try:
        with env.begin() as txn:
            meta = env.open_db(b"meta", txn=txn, create=False)
            if txn.get(b"store-dir", db=meta) != store_dir.encode():
                return None
            paths_db = env.open_db(b"paths", txn=txn, create=False)
            cache_db = env.open_db(b"evalcache", txn=txn, create=False)
            results = []
            for target in targets:
                drv_base = _drv_base(txn, cache_db, paths_db, target, store, store_dir)
                if drv_base is None or not _is_derivation(txn.get(drv_base[:32].encode(), db=paths_db), drv_base):
                    return None
                with open(os.path.join(store, drv_base), "rb") as f:
                    outputs = json.loads(f.read())["outputs"]
                for name, logical in outputs.items():
                    # valid, and made from this very .drv: the full path checks that a .drv's
                    # outputs are the paths its contents hash to; this one trusts only what it did
                    base = logical.rsplit("/", 1)[1]
                    record = txn.get(base[:32].encode(), db=paths_db)
                    if record is None:
                        return None
                    record = json.loads(record)
                    if record["path"] != base or record.get("deriver") != drv_base:
                        return None
                results.append(outputs)
    finally:
        env.close()
    if not opts.get("--no-out-link"):
        from fimio.store.roots import add_roots, link_names

        class _Store:  # the attributes add_roots needs
            pass

        s = _Store()
        s.root, s.store, s.store_dir, s.locks = root, store, store_dir, os.path.join(root, "locks")
        s.physical = lambda p: os.path.join(store, p.base)
        from fimio.store.paths import StorePath

        base = opts.get("--out-link") or opts.get("-o") or "result"
        add_roots(s, link_names(base, [{name: StorePath.parse(logical.rsplit("/", 1)[1]) for name, logical in o.items()}
                                       for o in results]))
    out = sys.stdout
    for outputs in results:
        for name in sorted(outputs):  # by output name, as the full path prints them
            out.write(os.path.join(store, outputs[name].rsplit("/", 1)[1]) + "\n")
    out.flush()
    return 0


def _is_derivation(record: bytes | None, base: str) -> bool:
    """Whether a path record is a valid ``.drv`` written as one (a text object), not any
    file that happens to be named so."""
    if record is None or not base.endswith(".drv"):
        return False
    record = json.loads(record)
    return record["path"] == base and record.get("ca") == "text"


def _drv_base(txn, cache_db, paths_db, target, store, store_dir) -> str | None:
    if target.endswith(".toml"):
        from fimio.store import evalcache

        return evalcache.lookup(txn.get(evalcache.cache_key(target, store_dir), db=cache_db))
    for prefix in (store + "/", store_dir + "/"):
        if target.startswith(prefix):
            target = target[len(prefix):]
            break
    if len(target) == 32:
        record = txn.get(target.encode(), db=paths_db)
        return json.loads(record)["path"] if record is not None else None
    if target.endswith(".drv") and "/" not in target and txn.get(target[:32].encode(), db=paths_db) is not None:
        return target
    return None
