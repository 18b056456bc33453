"""The ``file:///dir`` backend: the cache layout as plain files.

Written with plain system calls rather than obstore's local store because the commit
point needs durability ordering that obstore cannot express: objects are written to
``.tmp/`` and published with ``link()`` (atomic, and it fails instead of overwriting), and
``barrier()`` is one ``syncfs`` so that every object is on disk before an ``info/`` file
that names it. A static file server (or ``fimio serve``) can serve the same directory.
"""

from __future__ import annotations

import os

from .. import fsutil
from ..errors import IntegrityError, RemoteError
from .backend import Backend, too_big


class FileBackend(Backend):
    def __init__(self, url: str, root: str):
        self.url = url
        self.root = root
        self._tmp = os.path.join(root, ".tmp")
        self._made: set[str] = set()

    def _path(self, key: str) -> str:
        return os.path.join(self.root, key)

    def get(self, key: str, max_size: int) -> bytes | None:
        try:
            with open(self._path(key), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > max_size:
                    raise too_big(self.url, key, size, max_size)
                data = f.read(max_size + 1)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except IsADirectoryError:
            raise IntegrityError(f"'{key}' in cache '{self.url}' is a directory, not an object") from None
        except OSError as e:
            raise RemoteError(f"cannot read '{key}' in cache '{self.url}': {e.strerror}") from None
        if len(data) > max_size:
            raise too_big(self.url, key, len(data), max_size)
        return data

    def exists(self, key: str) -> bool:
        return os.path.isfile(self._path(key))

    def missing(self, keys) -> set[str]:
        return {k for k in keys if not os.path.isfile(self._path(k))}

    def put(self, key: str, data: bytes) -> bool:
        final = self._path(key)
        if os.path.isfile(final):
            return False
        tmp = os.path.join(self._tmp, f"{os.getpid()}-{os.urandom(8).hex()}")
        try:
            self._mkdirs(os.path.dirname(final))
            with open(tmp, "xb") as f:
                f.write(data)
            os.link(tmp, final)
            return True
        except FileExistsError:
            if not os.path.isfile(final):
                raise RemoteError(f"cannot write '{key}' to cache '{self.url}': something else is in "
                                  "its place (remove it)") from None
            return False  # a concurrent writer published the same content-addressed object
        except OSError as e:  # the cache's trouble (full, read-only, a file in a directory's place)
            raise RemoteError(f"cannot write '{key}' to cache '{self.url}': {e.strerror}") from None
        finally:  # whatever failed: a full cache must not fill up with partial uploads
            fsutil.unlink_if_exists(tmp)

    def _mkdirs(self, d: str) -> None:
        if d in self._made:
            return
        if not self._made:
            clean_tmp(self.root)
        os.makedirs(d, exist_ok=True)
        os.makedirs(self._tmp, exist_ok=True)
        self._made.add(d)

    def check_there(self) -> None:
        if not os.path.isdir(self.root):  # an unmounted share is a cache that is down, not an empty one
            raise RemoteError(f"cache '{self.url}' does not exist (no directory '{self.root}')",
                              "check the path, and that its file system is mounted")

    def barrier(self) -> None:
        if os.path.isdir(self.root):
            fsutil.syncfs(self.root)


def clean_tmp(root: str, older_than: float = 3600) -> None:
    """Remove uploads a killed writer left in ``<root>/.tmp`` (old ones only: a live writer
    on another machine sharing the directory may still be writing a recent one)."""
    import time

    tmp = os.path.join(root, ".tmp")
    try:
        entries = list(os.scandir(tmp))
    except FileNotFoundError:
        return
    limit = time.time() - older_than
    for e in entries:
        try:
            if e.stat(follow_symlinks=False).st_mtime < limit:
                os.unlink(e.path)
        except OSError:
            pass
