"""Commands that put content into the store and read it back: add, cat, ls, dump, restore, hash."""

from __future__ import annotations

import errno
import os
import stat
import sys

import click

from fimio.store.errors import NotFound, UsageError
from fimio.store.fsutil import widen_pipe

from .fast import add_path
from .main import emit_json, global_options, json_option, pass_options


@click.command()
@click.argument("path", type=click.Path())
@click.option("--name", help="Store path name (default: the file's base name).")
@json_option
@global_options
@pass_options
def add(opts, path, name, as_json):
    """Add a file or directory tree to the store, content-addressed; print its store path."""
    add_path(opts, path, name, as_json)


def _open_sub(store, target, follow: bool = False):
    """The file of TARGET (STOREPATH or STOREPATH/SUB). A sub-path, or (``follow``: the caller
    reads through symlinks) the path itself, must not lead out of the store path."""
    path, sub = store.resolve(target)
    physical = store.physical(path)
    full = os.path.join(physical, sub) if sub else physical
    if sub or follow:
        # measured against where the store path is, not where a symlink at its top points
        base = os.path.join(store.store, path.base)  # the store's root is canonical already
        real = os.path.realpath(full)
        if real != base and not real.startswith(base + "/"):
            raise UsageError(f"'{target}' leaves its store path")
    if not os.path.lexists(full):
        raise NotFound(f"'{target}' does not exist", f"'fimio ls {path.hash_part}' lists what is there")
    return full


@click.command()
@click.argument("target")
@global_options
@pass_options
def cat(opts, target):
    """Print a file of the store (STOREPATH or STOREPATH/SUB) to stdout."""
    full = _open_sub(opts.store(create=False), target, follow=True)
    if os.path.isdir(full):
        raise UsageError(f"'{target}' is a directory", "use 'fimio ls'")
    out = sys.stdout.buffer
    widen_pipe(out)
    try:
        f = open(full, "rb")
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise UsageError(f"'{target}' is a symlink loop", f"'fimio ls -l {os.path.dirname(target)}' shows the links") from None
    with f:
        while chunk := f.read(1 << 20):
            out.write(chunk)
    out.flush()


@click.command()
@click.argument("target")
@click.option("-R", "--recursive", is_flag=True, help="List the whole tree.")
@click.option("-l", "--long", "long_", is_flag=True, help="Show each entry's type and size.")
@json_option
@global_options
@pass_options
def ls(opts, target, recursive, long_, as_json):
    """List a directory of the store."""
    full = _open_sub(opts.store(create=False), target)
    entries = list(_walk(full, "", recursive))
    if as_json:
        emit_json([{"name": n, "type": t, "size": s, "target": tg} for n, t, s, tg in entries])
        return
    for name, kind, size, target_ in entries:
        suffix = f" -> {target_}" if target_ is not None else ""
        if long_:
            click.echo(f"{kind:<10} {size:>12} {name}{suffix}")
        else:
            click.echo(f"{name}{suffix}")


def _walk(path, prefix, recursive):
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        yield _entry(prefix or os.path.basename(path), path, st)
        return
    for name in sorted(os.listdir(path), key=os.fsencode):
        child = os.path.join(path, name)
        rel = f"{prefix}/{name}" if prefix else name
        cst = os.lstat(child)
        yield _entry(rel, child, cst)
        if recursive and stat.S_ISDIR(cst.st_mode):
            yield from _walk(child, rel, True)


def _entry(name, path, st):
    if stat.S_ISLNK(st.st_mode):
        return name, "symlink", 0, os.readlink(path)
    if stat.S_ISDIR(st.st_mode):
        return name, "directory", 0, None
    return name, "executable" if st.st_mode & 0o100 else "regular", st.st_size, None


@click.command()
@click.argument("target")
@global_options
@pass_options
def dump(opts, target):
    """Write the Nix archive (NAR) of a store path to stdout, byte-identical to `nix-store --dump`."""
    from fimio.store import nar

    full = _open_sub(opts.store(create=False), target)
    if sys.stdout.isatty():
        raise UsageError("refusing to write a binary archive to a terminal", "redirect stdout")
    sys.stdout.flush()
    widen_pipe(sys.stdout.buffer)
    nar.dump(full, sys.stdout.buffer)
    sys.stdout.buffer.flush()


@click.command()
@click.argument("dest", type=click.Path())
@global_options
def restore(dest):
    """Unpack a NAR read from stdin into DEST (which must not exist)."""
    from fimio.store import nar

    widen_pipe(sys.stdin.buffer)
    nar.restore(sys.stdin.buffer, dest)


@click.command(name="hash")
@click.argument("path", type=click.Path())
@click.option("--flat", is_flag=True,
              help="The digest of a file's bytes alone, as a [fetch] hash declares it (not the tree digest).")
@click.option("--type", "algo", type=click.Choice(["blake3", "sha256"]),
              help="With --flat: the hash function [default: blake3].")
@json_option
@global_options
def hash_(path, flat, algo, as_json):
    """Print the content digest of a file or tree without adding it.

    With --flat, the hash of a file's bytes: what a derivation's [fetch] hash = "..." takes.
    """
    if algo and not flat:
        raise click.UsageError("--type needs --flat: a tree's digest is always blake3")
    if flat:
        digest, size = _flat_hash(path, algo or "blake3")
    else:
        from fimio.store.tree import format_digest, scan, tree_size

        node = scan(path)
        digest, size = format_digest(node.digest), tree_size(node)
    if as_json:
        emit_json({"path": path, "digest": digest, "size": size})
    else:
        click.echo(digest)


def _flat_hash(path: str, algo: str) -> tuple[str, int]:
    """``("<algo>:<hex>", size)`` of a regular file's bytes."""
    import hashlib

    import blake3

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # before opening: a fifo's open would block
            raise UsageError(f"'{path}' is not a file", "--flat hashes one file's bytes; drop it for a tree")
        with open(path, "rb") as f:
            hasher = hashlib.sha256() if algo == "sha256" else blake3.blake3()
            size = 0
            while chunk := f.read(1 << 20):
                hasher.update(chunk)
                size += len(chunk)
    except FileNotFoundError:
        raise NotFound(f"'{path}' does not exist", "check the name") from None
    except PermissionError:
        raise UsageError(f"cannot read '{path}': permission denied") from None
    return f"{algo}:{hasher.hexdigest()}", size
