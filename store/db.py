"""The store database: one LMDB environment under ``$ROOT/db``.

Sub-databases (keys and values are bytes; records are compact JSON):

``paths``        hash part -> path info record (the validity table)
``referrers``    hash part -> hash parts of the paths that reference it (dupsort)
``trees``        directory digest -> canonical directory encoding
``realisations`` ``<drv hash>!<output>`` -> realisation record
``records``      ``<drv hash>!<time ns>`` -> build record
``checks``       ``<output hash part>!<time ns>`` -> reproducibility check record
``meta``         small settings (store directory, schema)
``statcache``    host file stat signature -> content digest (host fingerprints)
``evalcache``    derivation file -> its ``.drv`` and the stat signatures of what it read

LMDB commits are durable (fsync) by default; a path becomes valid exactly when the write
transaction that puts its ``paths`` record commits.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from contextlib import contextmanager

import lmdb

from .errors import IntegrityError, UsageError

SCHEMA = b"1"
_DBS = ("paths", "referrers", "trees", "realisations", "records", "checks", "meta", "statcache", "evalcache")


_SYSTEM_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOMEM)


def _errno(e: lmdb.Error) -> int | None:
    """The system errno behind an LMDB error, if it is one. py-lmdb's C binding gives only
    a message (``"mdb_txn_commit: No space left on device"``), its cffi binding
    ``(what, rc)``; ENOSPC has its own class."""
    if isinstance(e, lmdb.DiskError):
        return errno.ENOSPC
    if len(e.args) > 1 and isinstance(e.args[1], int) and 0 < e.args[1] < 4096:
        return e.args[1]
    text = str(e)
    for code in _SYSTEM_ERRORS:
        if os.strerror(code) in text:
            return code
    return None


def _os_error(e: lmdb.Error, path: str) -> OSError:
    code = _errno(e)
    if code == errno.EIO and _nearly_full(path):
        code = errno.ENOSPC  # LMDB reports a short write to its data file as EIO
    return OSError(code, os.strerror(code), path)


def _nearly_full(path: str) -> bool:
    """Whether the file system of ``path`` has less than 16 MiB (or 1% of its inodes) left
    for an unprivileged writer: an I/O error there is far more likely a full disk (a commit
    of a large transaction writes megabytes at once, so "a little left" is no proof of room)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (16 << 20) or (st.f_files > 0 and st.f_favail < st.f_files // 100)


def _translate(e: lmdb.Error, path: str) -> Exception:
    if _errno(e) is not None:
        return _os_error(e, path)
    return IntegrityError(f"store database '{path}': {e}", "run 'fimio verify'")


def dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def loads(data: bytes):
    return json.loads(data)


_LMDB_MAGIC = 0xBEEFC0DE
_META_END = 152  # a meta page's bytes up to its transaction id


def refuse_truncated(data_file: str) -> None:
    """IntegrityError for an LMDB file shorter than its newest meta page says it is. LMDB maps
    the file and would read past its end: SIGBUS, a crash of every command, no error line.
    Layout (lmdb.h, 64-bit): the first two pages each hold a meta record at byte 16 (magic,
    version, address, map size, two 48-byte db records, the first of which starts with the
    page size), then the last page number and the transaction id (bytes 136 and 144)."""
    try:
        with open(data_file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return  # a new database
            first = f.read(_META_END)
            if len(first) < _META_END:
                raise _truncated(data_file, f"{size} bytes")
            if struct.unpack_from("<I", first, 16)[0] != _LMDB_MAGIC:
                return  # not a file LMDB would map: its own check reports it
            psize = struct.unpack_from("<I", first, 40)[0]
            f.seek(psize)
            metas = [m for m in (first, f.read(_META_END))
                     if len(m) == _META_END and struct.unpack_from("<I", m, 16)[0] == _LMDB_MAGIC]
    except FileNotFoundError:
        return
    last_pg, _ = max((struct.unpack_from("<QQ", m, 136) for m in metas), key=lambda meta: meta[1])
    need = max((last_pg + 1) * psize, 2 * psize)
    if size < need:
        raise _truncated(data_file, f"{size} bytes of the {need} its last commit wrote")


def _truncated(data_file: str, what: str) -> IntegrityError:
    return IntegrityError(f"store database '{data_file}' is truncated: {what}", "restore the database from a backup")


class Database:
    """A thin wrapper that names the sub-databases and opens transactions."""

    def __init__(self, path: str, store_dir: str, may_start=lambda: True):
        """``may_start()``: whether a database found empty may be started afresh (not when the
        store already holds paths: they would all look unregistered, and be collected)."""
        self._may_start = may_start
        os.makedirs(path, exist_ok=True)
        refuse_truncated(os.path.join(path, "data.mdb"))
        try:
            self.env = lmdb.open(path, max_dbs=len(_DBS) + 1, map_size=1 << 38, subdir=True, sync=True)
        except lmdb.Error as e:
            if _errno(e) is not None:
                raise _os_error(e, path) from None
            raise IntegrityError(f"cannot open store database '{path}': {e}", "run 'fimio verify'") from None
        # Reader slots of killed processes would pin old pages (the file then only grows):
        # free them. Cheap (one pass over the small lock table), so done on every open.
        self.env.reader_check()
        self.path = path
        self.dbs = {}
        try:
            for name in _DBS:
                self.dbs[name] = self.env.open_db(name.encode(), dupsort=(name == "referrers"))
            self._check_meta(store_dir)
        except lmdb.Error as e:
            self.env.close()
            raise _translate(e, path) from None
        except BaseException:
            self.env.close()
            raise

    def _check_meta(self, store_dir: str) -> None:
        # Read first: opening an existing store takes no write lock (a read-only command
        # does not queue behind a writer, and works on a full disk).
        with self.env.begin(db=self.dbs["meta"]) as txn:
            existing = txn.get(b"store-dir")
        if existing is None:
            if not self._may_start():
                raise IntegrityError(f"the store database '{self.path}' is missing or empty, but the store holds paths",
                                     "restore the database from a backup, or move store/ aside to start an empty "
                                     "store; nothing in store/ was touched")
            with self.env.begin(write=True, db=self.dbs["meta"]) as txn:
                existing = txn.get(b"store-dir")
                if existing is None:
                    txn.put(b"store-dir", store_dir.encode())
                    txn.put(b"schema", SCHEMA)
                    return
        if bytes(existing).decode() != store_dir:
            raise UsageError(
                f"this store's logical directory is '{bytes(existing).decode()}', not '{store_dir}'",
                "use --store-dir to match, or another --root",
            )

    def read(self):
        return self.env.begin(write=False)

    @contextmanager
    def write(self):
        """A write transaction, committed when the block ends (aborted on an exception).

        LMDB's own failures become ordinary errors: a system error (a full disk at commit,
        EIO, a quota) an OSError -- the CLI's one-line "check free space" message, exit 1 --
        anything else an IntegrityError (exit 4). The transaction is then aborted: the
        database is as it was before it."""
        try:
            with self.env.begin(write=True) as txn:
                yield txn
        except lmdb.Error as e:
            raise _translate(e, self.path) from None

    def scan_prefix(self, db: str, prefix: bytes) -> list:
        """Every JSON record of sub-database ``db`` whose key starts with ``prefix``, in key order."""
        out = []
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.dbs[db])
            if cur.set_range(prefix):
                for key, value in cur:
                    if not key.startswith(prefix):
                        break
                    out.append(loads(value))
        return out

    def get(self, txn, db: str, key: bytes):
        value = txn.get(key, db=self.dbs[db])
        return None if value is None else value

    def close(self) -> None:
        self.env.close()
