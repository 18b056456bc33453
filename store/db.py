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

import json
import os
from contextlib import contextmanager

import lmdb

from .errors import IntegrityError, UsageError

SCHEMA = b"1"
_DBS = ("paths", "referrers", "trees", "realisations", "records", "checks", "meta", "statcache", "evalcache")


def dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def loads(data: bytes):
    return json.loads(data)


class Database:
    """A thin wrapper that names the sub-databases and opens transactions."""

    def __init__(self, path: str, store_dir: str):
        os.makedirs(path, exist_ok=True)
        try:
            self.env = lmdb.open(path, max_dbs=len(_DBS) + 1, map_size=1 << 38, subdir=True, sync=True)
        except lmdb.Error as e:
            raise IntegrityError(f"cannot open store database '{path}': {e}", "run 'fimio verify'") from None
        # Reader slots of killed processes would pin old pages (the file then only grows):
        # free them. Cheap (one pass over the small lock table), so done on every open.
        self.env.reader_check()
        self.dbs = {}
        for name in _DBS:
            self.dbs[name] = self.env.open_db(name.encode(), dupsort=(name == "referrers"))
        self._check_meta(store_dir)

    def _check_meta(self, store_dir: str) -> None:
        # Read first: opening an existing store takes no write lock (a read-only command
        # does not queue behind a writer, and works on a full disk).
        with self.env.begin(db=self.dbs["meta"]) as txn:
            existing = txn.get(b"store-dir")
        if existing is None:
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
        with self.env.begin(write=True) as txn:
            yield txn

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
