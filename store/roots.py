"""GC roots: out-links, registered roots, and temporary roots of running processes.

* ``$ROOT/gcroots/<name>``: symlinks. A link into ``store/`` roots that path; a link to
  anything else (an out-link such as ``./result``) roots whatever that link points at,
  as long as it still does (Nix's indirect roots).
* ``$ROOT/temproots/<pid>``: one file per running process, listing (one base name per
  line) the store paths it uses or is about to create, and flock-ed by that process for
  its lifetime. GC honours the files whose lock is held.

The GC lock (``locks/gc.lock``) makes "add a temp root, then check validity" atomic with
respect to a collection: writers take it shared for that moment, GC takes it exclusive
for its whole run, so a path is either seen as a temp root or found invalid afterwards.
"""

from __future__ import annotations

import errno
import fcntl
import os

from . import fsutil
from .errors import UsageError
from .paths import StorePath


def gc_lock(store, exclusive: bool = False, blocking: bool = True):
    return fsutil.file_lock(os.path.join(store.locks, "gc.lock"), shared=not exclusive, blocking=blocking)


_kept_here: set[str] = set()  # temp-roots files this process holds


class TempRoots:
    """This process's temp-roots file. Open once per process; paths are appended, never removed."""

    def __init__(self, store):
        self.store = store
        self.path = os.path.join(store.root, "temproots", str(os.getpid()))
        if self.path in _kept_here:
            # A second file object would wait forever for the lock of the first.
            raise RuntimeError("this process already keeps temp roots in this store")
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)  # a gc may hold it a moment, looking for stale files
        _kept_here.add(self.path)
        self.added: set[str] = set()

    def add(self, paths) -> None:
        """Record ``paths`` as in use (under the shared GC lock, so a running GC sees them)."""
        new = [p.base for p in paths if p.base not in self.added]
        if not new:
            return
        with gc_lock(self.store):
            os.write(self.fd, ("\n".join(new) + "\n").encode())
        self.added.update(new)

    def close(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        _kept_here.discard(self.path)


def _other_temp_roots(store):
    """Yield ``(name, path, fd)`` for the temp-roots file of every other process (the fd,
    read-only, is closed when the iteration moves on)."""
    directory = os.path.join(store.root, "temproots")
    for name in os.listdir(directory):
        if name == str(os.getpid()):
            continue
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            yield name, path, fd
        finally:
            os.close(fd)


def live_temp_roots(store) -> set[str]:
    """Base names listed by every process whose temp-roots file is still locked; removes stale files."""
    out: set[str] = set()
    for name, path, fd in _other_temp_roots(store):
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            # Nobody holds it. Either its process is gone, or it has created the file
            # and not locked it yet (TempRoots.__init__): only the first is stale.
            # Unlinking the second's file would hide every root it is about to record.
            if not name.isdigit() or not fsutil.alive(int(name)):
                os.unlink(path)
                continue
        except BlockingIOError:
            pass
        with os.fdopen(os.dup(fd)) as f:
            out.update(line.strip() for line in f if line.strip())
    return out


def clean_temp_roots(store) -> int:
    """Remove temp-roots files whose owner is gone (nobody holds their lock); return how many."""
    removed = 0
    for name, path, fd in _other_temp_roots(store):
        if not name.isdigit():
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its process is alive
        # Unlink only the file we locked: its owner may have replaced it meanwhile.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same and not fsutil.alive(int(name)):
            os.unlink(path)
            removed += 1
    return removed


def link_names(base: str, targets: list[dict], positions: list[int] | None = None) -> list[tuple[str, object]]:
    """``(link, target)`` for the outputs ``{name: target}`` of each target, named as Nix
    names out-links: BASE, BASE-2, ... per target, and BASE-NAME for an output not "out".
    ``positions``: each target's place among those asked for, when some are left out."""
    links = []
    for n, outputs in zip(positions if positions is not None else range(len(targets)), targets):
        stem = base if n == 0 else f"{base}-{n + 1}"
        links += [(stem if name == "out" else f"{stem}-{name}", t) for name, t in outputs.items()]
    return links


def add_roots(store, links: list[tuple[str, StorePath]], flag: str = "-o") -> list[str]:
    """Point each symlink ``link`` (e.g. ``./result``) at its ``target`` and register it as
    a root; return the links, absolute. Every link is checked before any is made: one in
    the way leaves all of them as they were. ``flag`` is the option that named the links
    (for the hint of an error)."""
    links = check_links(store, links, flag)
    # under the shared GC lock: a gc prunes a registration whose link is missing or points
    # elsewhere, which it would be between the two steps of _make_root
    with gc_lock(store):
        return [_make_root(store, link, target, flag) for link, target in links]


def check_links(store, links: list[tuple[str, StorePath]], flag: str = "-o") -> list[tuple[str, StorePath]]:
    """Refuse (UsageError, exit 2) if any ``link`` could not become an out-link: what is
    there is not an earlier link into the store. Returns the links made absolute. Also
    called before a build, so that a name in the way fails at once, not after the build."""
    links = [(os.path.abspath(link), target) for link, target in links]
    for link, target in links:
        _check_link(store, link, target, flag)
    return links


def _make_root(store, link: str, target: StorePath, flag: str) -> str:
    """Register ``link`` as a root, then make it. Both durable before we return: a root lost
    to a power cut would let gc delete an output the user was told is there. In this order a
    kill in between leaves a registration without its link, which gc prunes; the other order
    would leave a link that roots nothing, dangling after the next gc."""
    import hashlib  # here: OpenSSL's start-up is not paid by the commands that make no out-link

    reg = os.path.join(store.root, "gcroots", "auto-" + hashlib.sha256(link.encode()).hexdigest()[:32])
    try:
        registered = os.readlink(reg) == link
    except OSError:
        registered = False
    if not registered:
        tmp = f"{reg}.tmp-{os.getpid()}"
        try:
            fsutil.unlink_if_exists(tmp)
            os.symlink(link, tmp)
            os.replace(tmp, reg)
            fsutil.fsync_dir(os.path.dirname(reg))
        except BaseException:
            fsutil.unlink_if_exists(tmp)
            raise
    physical = store.physical(target)
    try:
        if os.readlink(link) == physical:
            return link  # there already (a no-op realise): nothing to make, nor to sweep
    except OSError:
        pass
    tmp = fsutil.sibling_tmp(link, sweep=True)  # sweep: what killed realises left here
    try:
        os.symlink(physical, tmp)
        os.replace(tmp, link)
    except OSError as e:  # a missing or read-only directory, a file as a parent...
        try:
            fsutil.unlink_if_exists(tmp)
        except OSError:
            pass  # it was never made
        raise UsageError(f"cannot make the link '{link}': {e.strerror}", f"choose another name with {flag}") from None
    fsutil.fsync_dir(os.path.dirname(link))
    return link


def _check_link(store, link: str, target: StorePath, flag: str) -> None:
    parent = os.path.dirname(link)
    if not os.path.isdir(parent):
        what = f"'{parent}' is not a directory" if os.path.lexists(parent) else "its directory does not exist"
        raise UsageError(f"cannot make the link '{link}': {what}", f"choose another name with {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):  # (a read-only checkout): say so before a long build
        raise UsageError(f"cannot make the link '{link}': its directory is not writable",
                         f"choose another name with {flag}, or --no-out-link")
    in_the_way = _in_the_way(link, (os.path.dirname(store.physical(target)), store.store_dir))
    if in_the_way:
        raise UsageError(f"cannot make the link '{link}': {in_the_way} is in the way "
                         "(only an earlier link into the store is replaced)",
                         f"remove it, or choose another name with {flag}")


def _in_the_way(link: str, store_dirs) -> str | None:
    """What at ``link`` an out-link must not replace: as in Nix, an earlier link to a path
    in the store is replaced; anything else there is the user's, and kept."""
    if not os.path.lexists(link):
        return None
    if not os.path.islink(link):
        return "a directory" if os.path.isdir(link) else "a file"
    target = os.readlink(link)
    # normalised: "store/../../etc" is no path in the store, nor "store/" the store itself
    if any(os.path.normpath(target).startswith(d.rstrip("/") + "/") for d in store_dirs):
        return None
    return f"a link to '{target}'"


def list_roots(store, prune: bool = False) -> dict[str, StorePath]:
    """``{root link: store path}`` for every live root: a link in ``gcroots/`` to a store
    path (by its physical or logical name), or to an out-link that points to one. With
    ``prune`` (gc, under the exclusive lock), fimio's own registrations (``auto-*``) whose
    out-link is gone or now points outside this store are removed; a link the user put
    there is never removed."""
    roots = {}
    directory = os.path.join(store.root, "gcroots")
    stores = (os.path.realpath(store.store), store.store_dir)
    for name in sorted(os.listdir(directory)):
        reg = os.path.join(directory, name)
        if not os.path.islink(reg):
            continue
        link = os.path.join(directory, os.readlink(reg))  # (a relative target is relative to its link)
        base = _base_in_store(link, *stores)
        shown = reg
        if base is None:  # an indirect root: the out-link it names
            try:
                base = _base_in_store(os.path.join(os.path.dirname(link), os.readlink(link)), *stores)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.EINVAL):
                    # unreadable (a directory of mode 000): not gone. What it roots is unknown,
                    # so nothing may be collected on the guess that it roots nothing
                    raise UsageError(f"cannot read the out-link '{link}' ({e.strerror}), a GC root",
                                     "make its directory readable, or remove the link; gc deletes "
                                     "nothing until it knows what every root keeps") from None
                base = None
            if base is None:
                if prune and name.startswith("auto-"):
                    os.unlink(reg)  # the out-link is gone, or was pointed elsewhere: so is the root
                continue
            shown = link
        try:
            roots[shown] = StorePath.parse(base)
        except Exception:
            continue
    return roots


def _base_in_store(target: str, real_store: str, store_dir: str) -> str | None:
    """The base name of the store path that the absolute ``target`` (the path, or a path
    inside it) names, by its logical name or physically however the store's root is spelled
    (a symlinked root, ``..``); None if not in this store. Only the parent is resolved: the
    store path itself may be a symlink."""
    logical = os.path.normpath(target)
    if logical.startswith(store_dir.rstrip("/") + "/"):
        base = logical[len(store_dir.rstrip("/")) + 1:].split("/", 1)[0]
        try:
            StorePath.parse(base)
            return base
        except UsageError:
            pass  # not a store path's name (an out-link kept under the store directory's parent?)
    parent = os.path.realpath(os.path.dirname(target.rstrip("/")))
    if parent == real_store:
        return os.path.basename(target.rstrip("/"))
    if parent.startswith(real_store + "/"):
        return parent[len(real_store) + 1:].split("/", 1)[0]
    return None
