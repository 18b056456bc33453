"""The local store: materialised read-only paths, deduplicated file contents, the database.

Layout under the physical root (``spec/local-store.md``)::

    store/<hashpart>-<name>   materialised, read-only (mtime 1, 0444/0555)
    store/.links/<b3hex>[x]   one inode per distinct (content, executable bit)
    db/                       LMDB (see db.py)
    tmp/                      work in progress (same filesystem: rename is atomic)
    locks/                    per-path and global fcntl locks
    gcroots/ temproots/ logs/
    failed/                   build directories kept by --keep-failed (never removed by fimio)

A path is *valid* exactly when its record is in the database. Anything in ``store/``
without a record is garbage left by a crash; it is never served and is removed by
``verify``/``gc`` or replaced by the next writer of that path.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import time
import queue
import threading
from contextlib import ExitStack, contextmanager

import blake3

from . import fsutil
from .db import Database, dumps, loads
from .errors import FimioError, IntegrityError, NotFound, UsageError
from .paths import StorePath, check_name, content_address_error, is_hash_part, source_path, text_path
from .tree import DirNode, FileNode, Node, SymlinkNode, decode_dir, iter_dirs, scan, text_blob, tree_size
from .blobs import Blobs
from .forkpool import ForkPool
from .values import Value

_WORKERS = 4  # threads linking a large tree (each link releases the GIL)
_BATCH_FILES = 128  # small files handed to a worker at once
_BATCH_BYTES = 8 << 20
_PARALLEL_LINKS = 2048  # trees with more files than this are linked on worker threads


class PathInfo(Value):
    """What the database knows about one valid store path: ``path``; ``root``, its root
    digest; ``size``, bytes of file content; ``references``; ``deriver``, the base name of
    the .drv that produced it; ``registered`` (epoch seconds); ``ca``: "source" / "text"
    when content-addressed, "check" for a kept ``--check`` build, None for outputs;
    ``signatures``."""

    __slots__ = ("path", "root", "size", "references", "deriver", "registered", "ca", "signatures")
    __hash__ = None

    def __init__(self, path: StorePath, root: bytes, size: int, references: list[StorePath] | None = None,
                 deriver: str | None = None, registered: float = 0.0, ca: str | None = None,
                 signatures: list[str] | None = None):
        self.path, self.root, self.size = path, root, size
        self.references = [] if references is None else references
        self.deriver, self.registered, self.ca = deriver, registered, ca
        self.signatures = [] if signatures is None else signatures

    def to_record(self) -> bytes:
        return dumps(
            {
                "path": self.path.base,
                "root": self.root.hex(),
                "size": self.size,
                "references": sorted(r.base for r in self.references),
                "deriver": self.deriver,
                "registered": self.registered,
                "ca": self.ca,
                "signatures": self.signatures,
            }
        )

    @classmethod
    def from_record(cls, data: bytes) -> "PathInfo":
        """Decode a database record; IntegrityError if it is damaged (``verify`` lists those)."""
        try:
            r = loads(data)
            info = cls(
                path=StorePath.parse(r["path"]),
                root=bytes.fromhex(r["root"]),
                size=r["size"],
                references=[StorePath.parse(x) for x in r["references"]],
                deriver=r.get("deriver"),
                registered=r.get("registered", 0.0),
                ca=r.get("ca"),
                signatures=r.get("signatures", []),
            )
        except (ValueError, KeyError, TypeError, AttributeError, FimioError):
            info = None
        if (info is None or len(info.root) != 32 or type(info.size) is not int or info.size < 0
                or info.ca not in (None, "source", "text", "check") or not isinstance(info.signatures, list)):
            raise IntegrityError("a path's record in the database is damaged",
                                 "'fimio verify' lists it")
        return info


DAMAGED_RECORD = "has a damaged record in the database"


class Problem(Value):
    """One finding of ``verify``: the store path, what is wrong, the file inside it (if any)."""

    __slots__ = ("path", "what", "file")
    __hash__ = None

    def __init__(self, path: str, what: str, file: str | None = None):
        self.path, self.what, self.file = path, what, file


class LocalStore:
    """A store on this machine. Open one with :meth:`open`; close it with :meth:`close`."""

    def __init__(self, root: str, store_dir: str):
        root = os.path.realpath(root)  # one spelling of every physical path (see config.resolve_root)
        self.root = root
        self.store_dir = store_dir
        self.store = os.path.join(root, "store")
        self.links = os.path.join(self.store, ".links")
        self.tmp = os.path.join(root, "tmp")
        self.locks = os.path.join(root, "locks")
        self.blobs = Blobs(self.links, self.tmp)
        for d in (self.store, self.links, self.tmp, self.locks, os.path.join(root, "gcroots"),
                  os.path.join(root, "temproots"), os.path.join(root, "logs")):
            os.makedirs(d, exist_ok=True)
        self.db = Database(os.path.join(root, "db"), store_dir, may_start=self._holds_no_paths)
        self.temp_roots = None  # a roots.TempRoots when this process must protect what it adds
        from .recovery import recover

        self.recovered = recover(self)  # leftovers of dead processes (cheap; see recovery.py)

    def _holds_no_paths(self) -> bool:
        with os.scandir(self.store) as it:
            return all(entry.name == ".links" for entry in it)

    @classmethod
    def open(cls, root: str | None = None, store_dir: str | None = None) -> "LocalStore":
        """Open (creating if needed) the store at ``root`` with logical directory ``store_dir``."""
        from .config import refuse_root_in_a_users_store, resolve_root, resolve_store_dir

        root, store_dir = resolve_root(root), resolve_store_dir(store_dir)
        refuse_root_in_a_users_store(root)
        try:
            return cls(root, store_dir)
        except (PermissionError, NotADirectoryError) as e:
            if os.path.isdir(os.path.join(root, "db")):  # there, but another user's
                raise UsageError(f"the store at '{root}' is not yours to use: {e.strerror}",
                                 "a store is one user's: use your own with --root") from None
            raise UsageError(f"cannot create the store at '{root}': {e.strerror}", "use --root") from None
        except FileNotFoundError as e:  # a root under /proc, say: what is missing cannot be made
            if os.path.isdir(root):
                raise
            raise UsageError(f"cannot create the store at '{root}': {e.strerror}", "use --root") from None

    def close(self) -> None:
        self.db.close()

    # ---- names -------------------------------------------------------------------------

    def physical(self, path: StorePath) -> str:
        return os.path.join(self.store, path.base)

    def logical(self, path: StorePath) -> str:
        return path.logical(self.store_dir)

    def logical_base(self, base: str) -> str:
        return f"{self.store_dir}/{base}"

    def resolve(self, text: str, must_be_valid: bool = True) -> tuple[StorePath, str]:
        """Parse a physical path, logical path, base name or bare hash part (each maybe with a
        ``/sub/path`` suffix) into ``(StorePath, sub)``. NotFound if it is not valid here."""
        rest = text
        for prefix in (self.store + "/", self.store_dir + "/"):
            if text.startswith(prefix):
                # names inside the store: ".." is taken by name (A/x/../../B is B; A/.. is no path)
                rest = os.path.normpath(text[len(prefix):])
                if rest == "." or rest.startswith(".."):
                    raise NotFound(f"'{text}' is not in the store", "give a store path or its hash part")
                break
        else:
            if os.path.isabs(text) or os.path.lexists(text.split("/", 1)[0]):
                # a file path (./result/bin/x): its longest existing prefix locates it
                head, missing = text.rstrip("/") or "/", ""
                while not os.path.lexists(head) and "/" in head.strip("/"):
                    head, _, last = head.rpartition("/")
                    missing = f"{last}/{missing}" if missing else last
                real = os.path.normpath(os.path.realpath(head) + (f"/{missing}" if missing else ""))
                if real.startswith(self.store + "/"):
                    rest = real[len(self.store) + 1:]
                elif missing or not os.path.lexists(head):
                    raise NotFound(f"'{text}' does not exist", "give a store path, an out-link or a hash part")
                else:
                    raise NotFound(f"'{text}' is not in the store", "give a store path or its hash part")
        base, _, sub = rest.partition("/")
        if is_hash_part(base):
            info = self.query_hash(base)
            if info is None:
                raise NotFound(f"no valid store path with hash '{base}'", "check the hash, or 'fimio copy' the path")
            return info.path, sub
        path = StorePath.parse(base)
        if must_be_valid and not self.is_valid(path):
            raise NotFound(f"'{self.logical(path)}' is not valid in this store", "realise, add or copy it first")
        return path, sub

    # ---- queries -----------------------------------------------------------------------

    def query_hash(self, hash_part: str) -> PathInfo | None:
        with self.db.read() as txn:
            data = txn.get(hash_part.encode(), db=self.db.dbs["paths"])
        return None if data is None else PathInfo.from_record(data)

    def query(self, path: StorePath) -> PathInfo | None:
        """The info of ``path`` if it is valid, else None."""
        info = self.query_hash(path.hash_part)
        return info if info is not None and info.path == path else None

    def is_valid(self, path: StorePath) -> bool:
        return self.query(path) is not None

    def info(self, path: StorePath) -> PathInfo:
        info = self.query(path)
        if info is None:
            raise NotFound(f"'{self.logical(path)}' is not valid in this store")
        return info

    def all_paths(self) -> list[PathInfo]:
        with self.db.read() as txn:
            return [PathInfo.from_record(v) for _, v in txn.cursor(db=self.db.dbs["paths"])]

    def referrers(self, path: StorePath) -> list[StorePath]:
        out = []
        with self.db.read() as txn:
            cur = txn.cursor(db=self.db.dbs["referrers"])
            if cur.set_key(path.hash_part.encode()):
                for value in cur.iternext_dup():
                    info = self.query_hash(value.decode())
                    if info is not None:
                        out.append(info.path)
        return sorted(out)

    def closure(self, paths) -> list[StorePath]:
        """Every path reachable from ``paths`` through references, ``paths`` included, sorted."""
        seen: dict[str, StorePath] = {}
        stack = list(paths)
        with self.db.read() as txn:
            pdb = self.db.dbs["paths"]
            while stack:
                p = stack.pop()
                if p.hash_part in seen:
                    continue
                data = txn.get(p.hash_part.encode(), db=pdb)
                if data is None:
                    raise NotFound(f"'{self.logical(p)}' is not valid in this store")
                seen[p.hash_part] = p
                stack.extend(StorePath.parse(r) for r in loads(data)["references"])
        return sorted(seen.values())

    def references_first(self, paths: list[StorePath]) -> list[StorePath]:
        """``paths`` ordered references before referrers (ties by base name): deterministic.
        The order bundles are written in and ``query --requisites`` prints."""
        wanted = set(paths)
        refs = {p: [r for r in self.info(p).references if r in wanted and r != p] for p in paths}
        out: list[StorePath] = []
        state: dict[StorePath, int] = {}
        for start in sorted(paths):
            if start in state:
                continue
            stack = [(start, iter(sorted(refs[start])))]
            state[start] = 1
            while stack:
                p, it = stack[-1]
                child = next(it, None)
                if child is None:
                    stack.pop()
                    state[p] = 2
                    out.append(p)
                elif child not in state:
                    state[child] = 1
                    stack.append((child, iter(sorted(refs[child]))))
        return out

    def refuse_local_only(self, paths) -> None:
        """UsageError if a path must not leave this store: a kept ``--check`` build (ca
        "check"), whose address names the original output and no other store can check."""
        for p in paths:
            if self.info(p).ca == "check":
                raise UsageError(f"'{self.logical(p)}' is a kept --check build, which stays in this store",
                                 "compare it here with 'fimio diff', or export the output it was checked against")

    def hold(self, paths) -> None:
        """Keep ``paths`` from a concurrent gc while this process keeps temp roots, and
        confirm they are still valid: a gc may have run since they were looked up."""
        if self.temp_roots is None:
            return
        paths = list(paths)
        self.temp_roots.add(paths)
        with self.db.read() as txn:
            pdb = self.db.dbs["paths"]
            for p in paths:
                if txn.get(p.hash_part.encode(), db=pdb) is None:
                    raise NotFound(f"'{self.logical(p)}' was just deleted by a concurrent gc",
                                   "root what you need (e.g. 'fimio realise -o LINK') and run again")

    def load_tree(self, digest_or_info) -> Node:
        """Rebuild the registered tree of a path (or a directory digest) from the database."""
        if isinstance(digest_or_info, PathInfo):
            return self._registered_root(digest_or_info)
        with self.db.read() as txn:
            return self._load_dir(txn, digest_or_info)

    def _registered_root(self, info: PathInfo) -> Node:
        with self.db.read() as txn:
            if txn.get(info.root, db=self.db.dbs["trees"]) is not None:
                return self._load_dir(txn, info.root)
        # A single file or symlink: its node is recomputed from disk and must match.
        node = scan(self.physical(info.path), on_file=self._hash_only)
        if node.digest != info.root:
            raise IntegrityError(f"'{self.logical(info.path)}' does not match its registered digest")
        return node

    def _load_dir(self, txn, digest: bytes) -> DirNode:
        data = txn.get(digest, db=self.db.dbs["trees"])
        if data is None:
            raise IntegrityError(f"directory object {digest.hex()} is missing from the database")
        node = DirNode()
        for name, child in decode_dir(data, digest).items():
            node.entries[name] = self._load_dir(txn, child) if isinstance(child, bytes) else child
        return node

    # ---- blobs -------------------------------------------------------------------------

    def link_path(self, digest: bytes, executable: bool) -> str:
        """The ``.links`` file of a blob variant (see :class:`blobs.Blobs`)."""
        return self.blobs.path(digest, executable)

    @staticmethod
    def _hash_only(path: bytes, st) -> tuple[bytes, int]:
        from .tree import hash_file

        return hash_file(path)

    def _own_file(self, path: StorePath, rel) -> str:
        """The file at ``rel`` (relative, bytes or str; empty for the root) in store path ``path``."""
        physical = self.physical(path)
        return os.path.join(physical, os.fsdecode(rel)) if rel else physical

    def blob_file(self, path: StorePath, digest: bytes, executable: bool, rel) -> str:
        """A readable file holding a blob: its ``.links`` entry (either variant), else its
        file in the store path (see :meth:`_own_file`)."""
        for x in (executable, not executable):
            p = self.link_path(digest, x)
            if os.path.exists(p):
                return p
        return self._own_file(path, rel)

    def read_blob(self, path: StorePath, digest: bytes, executable: bool, rel, size: int) -> bytes | None:
        """A small blob's bytes (from where :meth:`blob_file` says), or None when they do not
        match ``size`` and ``digest`` (a damaged store). Opens directly rather than checking
        first, and uses no file object: one open per blob on the common path."""
        fd = None
        for x in (executable, not executable):
            try:
                fd = os.open(self.link_path(digest, x), os.O_RDONLY)
                break
            except FileNotFoundError:
                pass
        if fd is None:
            fd = os.open(self._own_file(path, rel), os.O_RDONLY)
        try:
            data = os.read(fd, size + 1)
        finally:
            os.close(fd)
        return data if len(data) == size and blake3.blake3(data).digest() == digest else None

    def _tmp_name(self, tag: str) -> str:
        return os.path.join(self.tmp, f"{tag}-{os.getpid()}-{os.urandom(6).hex()}")

    def ingest_in_place(self, path: bytes, st) -> tuple[bytes, int]:
        """Hash a file already under ``tmp/`` (a build output) and make it a hard link to its blob."""
        digest, size = self._hash_only(path, st)
        self.blobs.adopt(path, digest, bool(st.st_mode & 0o100))
        return digest, size

    # ---- writing paths -----------------------------------------------------------------

    @contextmanager
    def writing(self):
        """Hold the GC lock shared while publishing blobs and registering paths, so a
        concurrent ``gc`` never deletes a blob between its publication and its use."""
        with fsutil.file_lock(os.path.join(self.locks, "gc.lock"), shared=True):
            yield

    def _protect(self, path: StorePath) -> None:
        if self.temp_roots is not None:
            self.temp_roots.add([path])

    @contextmanager
    def lock_path(self, path: StorePath):
        """Hold the per-path writer lock (blocking) for the ``with`` block."""
        with fsutil.file_lock(os.path.join(self.locks, path.hash_part + ".lock")):
            yield

    def add_path(self, src: str, name: str | None = None, progress=None) -> PathInfo:
        """Add a file or tree to the store, content-addressed; return its info.

        Raises UsageError for a missing/unreadable path, special files or an invalid name.
        On a crash or kill, the path is either fully valid or absent. ``progress(done,
        found)``, if given, is called (from another thread) as file contents are stored:
        bytes stored against bytes found so far by the walk of the tree.
        """
        name = check_name(name if name is not None else os.path.basename(os.path.abspath(src)))
        with self.writing():
            return self._add_path(src, name, progress)

    def _add_path(self, src: str, name: str, progress=None) -> PathInfo:
        with fsutil.EarlyFlush(self.root) as flush:
            node = self._scan_parallel(src, flush, progress)
            path = source_path(self.store_dir, name, node.digest)
            self._protect(path)
            with self.lock_path(path):
                existing = self.query(path)
                if existing is not None:
                    return existing
                tmp = self._tmp_name("add")
                try:
                    flush.start()  # the new blobs go to disk while the tree is linked
                    self.materialise(node, tmp)
                    return self.commit(tmp, path, node, ca="source")
                finally:
                    fsutil.remove_tree(tmp)

    def add_text(self, name: str, data: bytes, references=()) -> PathInfo:
        """Add a small text object (a ``.drv``) with the given references; return its info."""
        return self.add_texts([(name, data, references)])[0]

    def add_texts(self, items) -> list[PathInfo]:
        """Add text objects ``(name, data, references)`` in one durable commit (a whole
        derivation graph's ``.drv`` files at once); references among them are allowed."""
        wanted = []
        for name, data, refs in items:
            digest = blake3.blake3(data).digest()
            path = text_path(self.store_dir, name, digest, refs)
            self._protect(path)
            wanted.append((path, data, digest, sorted(refs)))
        if all(self.is_valid(w[0]) for w in wanted):
            return [self.info(w[0]) for w in wanted]
        batch = {w[0] for w in wanted}
        with ExitStack() as stack:
            stack.enter_context(self.writing())
            for path in sorted(batch):
                stack.enter_context(self.lock_path(path))
            for _, _, _, refs in wanted:
                for ref in refs:
                    if ref not in batch and not self.is_valid(ref):
                        raise NotFound(f"'{self.logical(ref)}' vanished before the object referring to it was "
                                       "written (a concurrent gc?)", "run the command again")
            todo, seen, tmps = [], set(), []
            try:
                for path, data, digest, refs in wanted:
                    if path in seen or self.is_valid(path):
                        continue
                    seen.add(path)
                    tmp = self._tmp_name("text")
                    tmps.append(tmp)
                    with open(tmp, "xb") as f:
                        f.write(data)
                    self.blobs.adopt(os.fsencode(tmp), digest, False)
                    todo.append((tmp, path, FileNode(digest, len(data), False), refs, None, "text"))
                self.commit_many(todo)
            finally:
                for tmp in tmps:
                    fsutil.remove_tree(tmp)
        return [self.info(w[0]) for w in wanted]

    def _scan_parallel(self, src: str, flush: fsutil.EarlyFlush, progress=None) -> Node:
        # The main process walks the tree; the files' contents are read, hashed and
        # published in batches, by worker processes once the tree proves large enough to
        # repay starting them (see forkpool).
        self.blobs.prepare_bulk()
        with ExitStack() as stack:
            pool = None
            futures: list = []
            batch: list = []
            batch_bytes = 0
            count = 0
            bytes_found = bytes_stored = 0
            counting = threading.Lock()  # batches complete on the pool's thread (or this one)

            def stored(future, n: int) -> None:
                nonlocal bytes_stored
                flush.wrote(n)  # written now, not when queued: a flush started then finds it
                if progress is None:
                    return
                with counting:  # held while reporting too: the count shown never goes back
                    bytes_stored += n
                    progress(bytes_stored, bytes_found)

            def submit(first: bool = False) -> None:
                nonlocal pool, batch, batch_bytes
                if pool is None:
                    pool = stack.enter_context(ForkPool(self.blobs.ingest_file))
                futures.append(pool.submit(batch, first))
                futures[-1].add_done_callback(functools.partial(stored, n=batch_bytes))
                batch, batch_bytes = [], 0

            def on_file(p, st):
                nonlocal batch_bytes, count, bytes_found
                bytes_found += st.st_size
                if st.st_size >= _BATCH_BYTES:
                    # a large file is a batch of its own, run before the small ones queued:
                    # started last, it would leave the other workers idle at the end
                    if batch:
                        submit()  # results are gathered in submission order: this one first
                    batch.append((p, st.st_size, bool(st.st_mode & 0o100)))
                    batch_bytes = st.st_size
                    submit(first=True)
                else:
                    batch.append((p, st.st_size, bool(st.st_mode & 0o100)))
                    batch_bytes += st.st_size
                    if len(batch) >= _BATCH_FILES or batch_bytes >= _BATCH_BYTES:
                        submit()
                count += 1
                return count - 1, 0

            node = scan(src, on_file=on_file)
            results = [r for f in futures for r in f.result()]
            results += [self.blobs.ingest_file(*item) for item in batch]
        return _resolve_pending(node, results)

    def materialise(self, node: Node, dest: str) -> None:
        """Create ``node`` at ``dest`` from ``.links`` (hard links), normalised (mtime 1, read-only)."""
        dest_b = os.fsencode(dest)
        if not isinstance(node, DirNode):
            self._materialise(node, dest_b)
            return
        # Directories and symlinks first (parents before children), then the hard links --
        # on worker threads for a large tree: each link is a system call that releases the
        # GIL -- and last the directories' mtime and mode, children before parents.
        dirs: list[bytes] = []
        files: list[tuple[str, bytes, bytes]] = []
        self._make_dirs(node, dest_b, dirs, files)
        links = os.open(self.links, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if len(files) < _PARALLEL_LINKS:
                self._link_files(links, files)
            else:
                step = -(-len(files) // (_WORKERS * 4))
                with _Workers(_WORKERS) as pool:
                    for i in range(0, len(files), step):
                        pool.submit(self._link_files, links, files[i:i + step])
                    pool.results()
        finally:
            os.close(links)
        for d in reversed(dirs):
            os.utime(d, (1, 1))
            os.chmod(d, 0o555)

    def _make_dirs(self, node: DirNode, dest: bytes, dirs: list, files: list) -> None:
        os.mkdir(dest, 0o755)
        dirs.append(dest)
        for name, child in node.entries.items():
            path = dest + b"/" + name
            if type(child) is FileNode:
                files.append((child.blob.hex() + ("x" if child.executable else ""), path, child.blob))
            elif type(child) is DirNode:
                self._make_dirs(child, path, dirs, files)
            else:
                self._materialise(child, path)

    def _link_files(self, links: int, files) -> None:
        link = os.link
        for key, path, blob in files:
            try:
                link(key, path, src_dir_fd=links, follow_symlinks=False)
            except OSError as e:
                if e.errno == errno.ENOENT:
                    raise IntegrityError(f"blob {blob.hex()} is missing from the store") from None
                if e.errno != errno.EMLINK:
                    raise
                _copy2(os.fsencode(os.path.join(self.links, key)), path)

    def _materialise(self, node: Node, dest: bytes) -> None:
        if isinstance(node, FileNode):
            key = self.link_path(node.blob, node.executable)
            try:
                os.link(key, dest)
            except OSError as e:
                if e.errno != errno.EMLINK:
                    if e.errno == errno.ENOENT:
                        raise IntegrityError(f"blob {node.blob.hex()} is missing from the store") from None
                    raise
                _copy2(key, dest)
        elif isinstance(node, SymlinkNode):
            os.symlink(node.target, dest)
            os.utime(dest, (1, 1), follow_symlinks=False)
        else:
            os.mkdir(dest, 0o755)
            for name, child in node.entries.items():
                self._materialise(child, dest + b"/" + name)
            os.utime(dest, (1, 1))
            os.chmod(dest, 0o555)

    def commit(self, tmp: str, path: StorePath, node: Node, references=(), deriver=None,
               ca=None, also=None) -> PathInfo:
        """Make the normalised tree at ``tmp`` the valid store path ``path``.

        The caller holds ``lock_path(path)``. Order: flush data, rename into ``store/``,
        flush the directory, then one LMDB transaction registers the path (and runs
        ``also(txn)`` for realisations/records in the same transaction). A kill before the
        commit leaves at most an unregistered directory, which is garbage.
        """
        return self.commit_many([(tmp, path, node, references, deriver, ca)], also=also)[0]

    def commit_many(self, items, also=None) -> list[PathInfo]:
        """Like :meth:`commit` for several paths (a derivation's outputs, which may refer to
        each other) registered in one transaction. ``items``: ``(tmp, path, node, refs,
        deriver[, ca])``. The caller holds every path's lock."""
        self._flush([(item[0], item[2]) for item in items])
        infos = []
        for tmp, path, node, refs, deriver, *ca in items:
            dest = self.physical(path)
            if os.path.lexists(dest):
                fsutil.remove_tree(dest)  # unregistered leftover of a crashed writer
            fsutil.move_tree(tmp, dest)
            info = PathInfo(path, node.digest, tree_size(node), sorted(refs), deriver, time.time(),
                            ca[0] if ca else None)
            infos.append((info, node))
        fsutil.fsync_dir(self.store)
        with self.db.write() as txn:
            for info, node in infos:
                self._put_info(txn, info, node)
            if also is not None:
                also(txn)
        return [info for info, _ in infos]

    def _flush(self, trees) -> None:
        """Make the files of ``trees`` (``(tmp path, node)``) durable before they become valid.

        A few files are fsynced one by one; many at once take one ``syncfs``, whose cost is
        shared with whatever else dirtied the filesystem but is still far cheaper than
        thousands of fsyncs."""
        if sum(_count_entries(node) for _, node in trees) > 64:
            fsutil.syncfs(self.root)
            return
        for tmp, _ in trees:
            for dirpath, dirnames, filenames in os.walk(tmp):
                for name in filenames:
                    p = os.path.join(dirpath, name)
                    if not os.path.islink(p):
                        fd = os.open(p, os.O_RDONLY)
                        try:
                            os.fsync(fd)
                        finally:
                            os.close(fd)
                fsutil.fsync_dir(dirpath)
            if not os.path.isdir(tmp) and not os.path.islink(tmp):
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        # .links needs no fsync: it only indexes inodes that the store path's own
        # (fsynced) names keep alive; a lost index entry costs dedup, never data.

    def _put_info(self, txn, info: PathInfo, node: Node) -> None:
        key = info.path.hash_part.encode()
        txn.put(key, info.to_record(), db=self.db.dbs["paths"])
        for ref in info.references:
            txn.put(ref.hash_part.encode(), key, db=self.db.dbs["referrers"], dupdata=True)
        tdb = self.db.dbs["trees"]
        for d in iter_dirs(node):
            txn.put(d.digest, d.encoding(), db=tdb, overwrite=False)

    def register_existing(self, info: PathInfo, node: Node) -> None:
        """Register an already materialised path (used by substitution and import)."""
        with self.db.write() as txn:
            self._put_info(txn, info, node)

    def invalidate(self, txn, info: PathInfo) -> None:
        """Remove a path's record (inside a write transaction); the caller deletes the files."""
        key = info.path.hash_part.encode()
        txn.delete(key, db=self.db.dbs["paths"])
        for ref in info.references:
            txn.delete(ref.hash_part.encode(), key, db=self.db.dbs["referrers"])
        txn.delete(key, db=self.db.dbs["referrers"])

    # ---- verification ------------------------------------------------------------------

    def verify(self, check_contents: bool = False) -> list[Problem]:
        """Check every valid path; with ``check_contents`` rehash every file.

        Also removes garbage: unregistered entries in ``store/`` and leftovers in ``tmp/``
        of processes that are gone. Returns the problems found (empty = clean).
        """
        problems: list[Problem] = []
        infos = []
        valid = set()  # hash parts with a record, readable or not: their files are no garbage
        with self.db.read() as txn:
            for key, value in txn.cursor(db=self.db.dbs["paths"]):
                valid.add(key.decode(errors="replace"))
                try:
                    infos.append(PathInfo.from_record(value))
                except IntegrityError:
                    problems.append(Problem(f"{self.store_dir}/{key.decode(errors='replace')}…", DAMAGED_RECORD))
        for info in infos:
            logical = self.logical(info.path)
            found = [Problem(logical, f"references '{self.logical(ref)}', which is not valid")
                     for ref in info.references if ref.hash_part not in valid]
            if not os.path.lexists(self.physical(info.path)):
                found.append(Problem(logical, "is registered but missing on disk"))
            else:
                found.extend(self._check_mode(info))
                found.extend(self._check_address(info, check_contents))
                if check_contents:
                    found.extend(self._check_contents(info))
            # A concurrent gc invalidates a path before deleting its files: one that is no
            # longer valid once looked at was collected meanwhile, and is no problem.
            if found and self.is_valid(info.path):
                problems.extend(found)
        self.remove_garbage(valid)
        return problems

    def _check_mode(self, info: PathInfo) -> list[Problem]:
        """A path's top entry must be read-only (0555 or 0444): one left writable was
        changed by hand, or by a writer killed while it lent itself write permission to
        move the directory (``repair``); a writer at work holds the path's lock."""
        wrong = _writable_mode(self.physical(info.path))
        if wrong is None:
            return []
        with fsutil.file_lock(os.path.join(self.locks, info.path.hash_part + ".lock"), blocking=False) as free:
            wrong = _writable_mode(self.physical(info.path)) if free else None  # busy: its writer is at work
        return [Problem(self.logical(info.path), f"has mode {wrong:04o}, not read-only: it was changed")] if wrong else []

    def _check_address(self, info: PathInfo, check_contents: bool) -> list[Problem]:
        """A content-addressed path's registered content must give its name (a forged or
        damaged record would otherwise stand for content it is not). A source path needs
        only its record; a text object's file is read, so only with ``check_contents``."""
        blob = None
        if info.ca == "text":
            if not check_contents:
                return []
            try:
                blob = text_blob(self.load_tree(info))
            except IntegrityError as e:
                return [Problem(self.logical(info.path), e.message)]
        wrong = content_address_error(self.store_dir, info.path, info.ca, info.root, blob, info.references)
        return [Problem(self.logical(info.path), wrong)] if wrong else []

    def _check_contents(self, info: PathInfo) -> list[Problem]:
        logical = self.logical(info.path)
        try:
            actual = scan(self.physical(info.path), on_file=self._hash_only)
        except FimioError as e:
            return [Problem(logical, f"cannot be read: {e.message}")]
        if actual.digest == info.root:
            return []
        if not self._has_tree(info.root):  # a single file or symlink
            return [Problem(logical, "contents do not match the registered digest")]
        try:
            expected = self.load_tree(info.root)
        except IntegrityError as e:
            return [Problem(logical, e.message)]
        return [Problem(logical, what, f) for f, what in compare_trees(expected, actual)]

    def _has_tree(self, digest: bytes) -> bool:
        with self.db.read() as txn:
            return txn.get(digest, db=self.db.dbs["trees"]) is not None

    def remove_garbage(self, valid: set[str]) -> None:
        """Remove what no valid path owns: unregistered entries of ``store/`` (whose lock is
        free) and ``tmp/`` entries of dead processes (``spec/local-store.md`` §6)."""
        for entry in os.scandir(self.store):
            if entry.name == ".links":
                continue
            hash_part = entry.name.partition("-")[0]
            if hash_part in valid:
                continue
            lock = os.path.join(self.locks, hash_part + ".lock")
            with fsutil.file_lock(lock, blocking=False) as taken:
                # a writer holding the lock may be about to register it: leave it alone
                if taken and self.query_hash(hash_part) is None:
                    fsutil.remove_tree(entry.path)
        for entry in os.scandir(self.tmp):
            pid = fsutil.pid_of(entry.name)
            if pid is not None and not fsutil.alive(pid):
                fsutil.remove_tree(entry.path)


class _Workers:
    """A small thread pool: ``submit(fn, *args)``, then ``results()`` in submission order
    (the first exception is raised there). Leaving the ``with`` block stops the threads;
    after an exception, queued tasks are skipped. (``concurrent.futures`` takes longer to
    import than a small ``fimio add`` takes to run.)"""

    def __init__(self, n: int):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._results: dict[int, object] = {}
        self._error: BaseException | None = None
        self._count = 0
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(n)]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            i, fn, args = item
            if self._error is None:
                try:
                    self._results[i] = fn(*args)
                except BaseException as e:  # noqa: BLE001 -- handed to the caller
                    self._error = self._error or e

    def submit(self, fn, *args) -> None:
        self._queue.put((self._count, fn, args))
        self._count += 1

    def _stop(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()
        self._threads = []

    def results(self) -> list:
        self._stop()
        if self._error is not None:
            raise self._error
        return [self._results[i] for i in range(self._count)]

    def __enter__(self) -> "_Workers":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None and self._error is None:
            self._error = value  # skip what is still queued
        self._stop()


def compare_trees(expected: Node, actual: Node, prefix: str = "") -> list[tuple[str, str]]:
    """List ``(relative path, what differs)`` between two trees, cheaply skipping equal subtrees."""
    here = prefix or "."
    if expected.digest == actual.digest:
        return []
    if isinstance(expected, DirNode) and isinstance(actual, DirNode):
        out = []
        for name in sorted(set(expected.entries) | set(actual.entries)):
            sub = (prefix + "/" if prefix else "") + os.fsdecode(name)
            e, a = expected.entries.get(name), actual.entries.get(name)
            if a is None:
                out.append((sub, "is missing"))
            elif e is None:
                out.append((sub, "is unexpected (not in the registered tree)"))
            else:
                out.extend(compare_trees(e, a, sub))
        return out
    if isinstance(expected, FileNode) and isinstance(actual, FileNode):
        if expected.blob != actual.blob or expected.size != actual.size:
            return [(here, f"contents differ (expected {expected.size} bytes blake3:{expected.blob.hex()[:16]}…, "
                           f"found {actual.size} bytes blake3:{actual.blob.hex()[:16]}…)")]
        return [(here, "executable bit differs")]
    if isinstance(expected, SymlinkNode) and isinstance(actual, SymlinkNode):
        return [(here, f"symlink target differs ({expected.target!r} vs {actual.target!r})")]
    return [(here, f"is a {_kind(actual)}, expected a {_kind(expected)}")]


def _copy2(src, dest) -> None:
    """Copy a blob whose inode has too many links (EMLINK) with its mode and mtime."""
    import shutil  # rare: kept out of every command's start-up

    shutil.copy2(src, dest)


def _writable_mode(path: str) -> int | None:
    """The mode of the entry at ``path`` if it is not a store path's (0555 for a directory,
    0444 or 0555 for a file; a symlink has none), else None."""
    st = os.lstat(path)
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode) or mode in ((0o555,) if stat.S_ISDIR(st.st_mode) else (0o444, 0o555)):
        return None
    return mode


def _count_entries(node: Node) -> int:
    if isinstance(node, DirNode):
        return 1 + sum(_count_entries(c) for c in node.entries.values())
    return 1


def _kind(node: Node) -> str:
    return {FileNode: "file", SymlinkNode: "symlink", DirNode: "directory"}[type(node)]


def _resolve_pending(node: Node, results: list[tuple[bytes, int]]) -> Node:
    """Replace the placeholder file nodes of a parallel scan with their real digests."""
    if isinstance(node, FileNode):
        digest, size = results[node.blob]
        return FileNode(digest, size, node.executable)
    if isinstance(node, DirNode):
        for name, child in node.entries.items():
            node.entries[name] = _resolve_pending(child, results)
    return node
