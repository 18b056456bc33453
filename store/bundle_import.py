"""Importing a bundle (``spec/bundle.md`` §6): verify everything, then register.

One streaming pass with flat memory. Every record's declared length is checked against its
cap (a blob's against the size its tree declared) *before* its bytes are read. A path's
signed info is checked against the trusted keys when it arrives; its directories are
decoded and checked as they arrive (names, sorting, depth) and the tree they make must
match the signed root digest and size before any of its blobs is read; each blob is hashed
as it streams and must match its digest. Bytes go only under ``tmp/`` meanwhile
(``bundle_stage``). Only after the trailer's digest of the whole file and its signature
verify, and every reference is valid here or in the bundle, are blobs published into
``.links`` and the paths registered in one transaction (``cache.ingest.register``). Any
failure before that leaves the store exactly as it was.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

import blake3

from .bundle import (CHUNK_HEAD, DIGEST, MAX_DIR, MAX_HEADER, MAX_INFO, MAX_LOG,
                     MAX_REALISATION, MAX_RECORD, MAX_TRAILER, RECORD_HEAD, T_BLOB, T_DIR, T_HEADER, T_LOG, T_PATH,
                     T_REALISATION, T_RECORD, VERSION, canonical, trailer_fingerprint)
from .bundle_read import RecordStream, bad, hex32, int_field, load_json, read_exact_raw
from .bundle_stage import SMALL, Staging
from .errors import IntegrityError, NotFound, UsageError
from .paths import StorePath, content_address_error
from .tree import MAX_DEPTH, DirNode, FileNode, SymlinkNode, TreeError, blob_sizes, decode_dir, text_blob, tree_size

_CHUNK = 1 << 20


@dataclass
class BundlePath:
    """A path section's info, as ``cache.ingest.register`` wants it."""

    path: StorePath
    root: bytes
    size: int
    references: list[StorePath]
    deriver: str | None
    ca: str | None
    signatures: list[str]
    node_spec: dict
    dirs: int
    blobs: int
    new: bool = True  # not valid here yet
    node: object = None
    tmp: str | None = None  # where its tree is laid out under tmp/


@dataclass
class ImportResult:
    paths: list[StorePath] = field(default_factory=list)  # every path in the bundle, in order
    imported: list[StorePath] = field(default_factory=list)  # those registered by this import
    realisations: int = 0
    signers: list[str] = field(default_factory=list)


class Importer:
    """Import one bundle into ``store``. ``trusted``: a cache.keys.TrustedKeys; with
    ``require_sigs`` every path, realisation and the trailer must carry a valid signature by
    one of them. ``warn(message)`` receives non-fatal notes."""

    def __init__(self, store, trusted, require_sigs: bool = True, warn=None):
        self.store = store
        self.trusted = trusted
        self.require_sigs = require_sigs
        self.warn = warn or (lambda message: None)
        self.sections: list[BundlePath] = []
        self.by_path: dict[StorePath, BundlePath] = {}
        self.blob_sizes: dict[bytes, int] = {}  # every blob declared so far -> its size
        self.received: set[bytes] = set()
        self.realisations: list = []
        self.logs: list[str] = []
        self.records = 0  # build records, kept in the staging's records file until the commit
        self.side_bytes = 0  # bytes of logs and build records: covered by the trailer's signature only
        self.signers: set[str] = set()
        self.staging = None

    # ---- entry point ----------------------------------------------------------------------

    def run(self, f) -> ImportResult:
        """Read, verify and import the bundle from binary file ``f``. IntegrityError (exit 4)
        for anything corrupt, hostile, unsigned or untrusted; NotFound (exit 5) when a
        reference is neither in the bundle nor valid here; nothing is registered then."""
        # the shared GC lock for the whole import: blobs seen in .links stay there
        with self.store.writing(), Staging(self.store) as self.staging:
            self._read_all(f)
            self.staging.drain()
            self._check_closure()
            return self._commit()

    # ---- reading ----------------------------------------------------------------------------

    def _read_all(self, f) -> None:
        s = RecordStream(f)
        rtype, length = self._next(s)
        if rtype != T_HEADER:
            raise bad("does not start with a header record")
        self._header(self._payload(s, length, MAX_HEADER, "header"))
        records = 1
        while not s.at_end():
            rtype, length = self._next(s)
            records += 1
            if rtype == T_PATH:
                records += self._section(s, self._info(self._payload(s, length, MAX_INFO, "path info")))
            elif rtype == T_REALISATION:
                self._realisation(self._payload(s, length, MAX_REALISATION, "realisation"))
            elif rtype == T_LOG:
                self._log(s, length)
            elif rtype == T_RECORD:
                if length <= MAX_RECORD:
                    self._within_side_allowance(s, length)
                self._record(self._payload(s, length, MAX_RECORD, "build record"))
            elif rtype in (T_DIR, T_BLOB):
                raise bad("directory or blob record outside a path section")
            else:
                raise bad(f"unknown record type {rtype:#04x}")
        if not s.raw.done:
            raise bad("data after the end of the compressed stream")
        self._trailer(f, s.raw.hash.digest(), records)

    @staticmethod
    def _next(s: RecordStream) -> tuple[int, int]:
        return RECORD_HEAD.unpack(s.read(RECORD_HEAD.size))

    @staticmethod
    def _payload(s: RecordStream, length: int, cap: int, what: str) -> bytes:
        if length > cap:
            raise bad(f"{what} record declares {length} bytes, more than the {cap} allowed")
        return s.read(length)

    def _header(self, data: bytes) -> None:
        h = load_json(data, "header")
        if h.get("format") != "fimio-bundle" or h.get("version") != VERSION:
            raise bad(f"unsupported bundle version {h.get('version')!r}")
        if h.get("storeDir") != self.store.store_dir:
            raise UsageError(f"the bundle holds store directory '{h.get('storeDir')}', not '{self.store.store_dir}'",
                             "import it into a store with that --store-dir")
        self.declared_paths = int_field(h.get("paths"), "path count")

    def _store_path(self, text) -> StorePath:
        prefix = self.store.store_dir + "/"
        if not isinstance(text, str) or not text.startswith(prefix):
            raise bad(f"path '{str(text)[:80]}' outside the store directory")
        try:
            return StorePath.parse(text[len(prefix):])
        except UsageError:
            raise bad(f"bad store path '{text[:80]}'") from None

    def _info(self, data: bytes) -> BundlePath:
        from .cache.keys import path_fingerprint

        o = load_json(data, "path info")
        path = self._store_path(o.get("path"))
        refs = o.get("references")
        sigs = o.get("signatures")
        node = o.get("node")
        if not isinstance(refs, list) or not isinstance(sigs, list) or not all(isinstance(x, str) for x in sigs):
            raise bad(f"bad references or signatures of '{o.get('path')}'")
        if not isinstance(node, dict) or node.get("type") not in ("directory", "file", "symlink"):
            raise bad(f"bad root node of '{o.get('path')}'")
        deriver, ca = o.get("deriver"), o.get("ca")
        if deriver is not None:
            try:
                StorePath.parse(deriver)
            except (UsageError, AttributeError, TypeError):
                raise bad("bad deriver") from None
        if ca not in (None, "source", "text"):
            raise bad("bad ca")
        bp = BundlePath(path, hex32(o.get("root"), "root digest"), int_field(o.get("size"), "size"),
                        sorted({self._store_path(r) for r in refs}), deriver, ca, sorted(sigs), node,
                        int_field(o.get("dirs"), "directory count"), int_field(o.get("blobs"), "blob count"))
        if path in self.by_path:
            raise bad(f"'{o['path']}' appears twice")
        if len(self.sections) >= self.declared_paths:
            raise bad("more path sections than the header declares")
        if self.require_sigs:
            sd = self.store.store_dir
            fp = path_fingerprint(path.logical(sd), bp.root, bp.size, [r.logical(sd) for r in bp.references])
            signer = self.trusted.verify(fp, bp.signatures)
            if signer is None:
                what = "no signature by a trusted key" if bp.signatures else "no signature"
                raise IntegrityError(f"bundle path '{path.logical(sd)}' has {what}",
                                     "add the signer's public key to trusted-public-keys, or export with --key")
            self.signers.add(signer)
        local = self.store.query(path)
        bp.new = local is None
        if local is not None and local.root != bp.root:
            self.warn(f"'{path.logical(self.store.store_dir)}' is already valid here with other contents, "
                      "which are kept (a build that is not reproducible?)")
        return bp

    def _section(self, s: RecordStream, bp: BundlePath) -> int:
        """Read a path section's directory and blob records; return how many there were."""
        spec = bp.node_spec
        decoded: dict[bytes, dict] = {}
        pending: set[bytes] = set()  # directory digests declared but not yet received
        if spec["type"] == "directory":
            pending.add(bp.root)
        else:
            root = self._leaf_root(bp, spec)
            if root.digest != bp.root:
                raise bad(f"root node of '{bp.path}' does not match its root digest")
            self._declare(bp, root)
        for _ in range(bp.dirs):
            rtype, length = self._next(s)
            if rtype != T_DIR:
                raise bad(f"'{bp.path}' declares {bp.dirs} directories but has fewer")
            data = self._payload(s, length, MAX_DIR, "directory")
            digest = blake3.blake3(data).digest()
            if digest not in pending:
                raise bad(f"directory object {digest.hex()[:16]}… is not part of '{bp.path}'")
            pending.discard(digest)
            try:
                entries = decode_dir(data)
            except TreeError as e:
                raise bad(f"in '{bp.path}': {e.message}") from None
            decoded[digest] = entries
            for child in entries.values():
                if isinstance(child, bytes):
                    if child not in decoded:  # depth and size: _check_dag, once all have come
                        pending.add(child)
                else:
                    self._declare(bp, child)
        if pending:
            raise bad(f"'{bp.path}' lacks {len(pending)} of its directory objects")
        if spec["type"] == "directory":
            _check_dag(bp, decoded)
        # the tree is complete before its blobs: check it against the signed info, lay it out
        node = self._assemble(bp.root, decoded) if spec["type"] == "directory" else self._leaf_root(bp, spec)
        if node.digest != bp.root or tree_size(node) != bp.size:
            raise bad(f"the tree of '{bp.path}' does not match its signed root digest and size")
        wrong = content_address_error(self.store.store_dir, bp.path, bp.ca, node.digest, text_blob(node), bp.references)
        if wrong:
            raise bad(f"'{bp.path}' {wrong}")
        if bp.new:
            bp.tmp = self.staging.lay_out(node)
        for _ in range(bp.blobs):
            rtype, length = self._next(s)
            if rtype != T_BLOB:
                raise bad(f"'{bp.path}' declares {bp.blobs} blobs but has fewer")
            self._blob(s, bp, length)
        missing = [d for d in blob_sizes(node) if d not in self.received]
        if missing:
            raise bad(f"'{bp.path}' needs {len(missing)} blob(s) the bundle does not hold")
        bp.node = node
        self.sections.append(bp)
        self.by_path[bp.path] = bp
        return bp.dirs + bp.blobs

    def _leaf_root(self, bp: BundlePath, spec: dict):
        if spec["type"] == "file":
            if not isinstance(spec.get("executable"), bool):
                raise bad(f"bad root node of '{bp.path}'")
            return FileNode(hex32(spec.get("blob"), "blob digest"), int_field(spec.get("size"), "file size"),
                            spec["executable"])
        try:
            target = bytes.fromhex(spec.get("target"))
        except (TypeError, ValueError):
            raise bad(f"bad symlink target of '{bp.path}'") from None
        if not target or len(target) > 4095 or b"\0" in target:
            raise bad(f"bad symlink target of '{bp.path}'")
        return SymlinkNode(target)

    def _declare(self, bp: BundlePath, node) -> None:
        """Note a file node: its blob's size must agree everywhere."""
        if not isinstance(node, FileNode):
            return
        size = self.blob_sizes.setdefault(node.blob, node.size)
        if size != node.size:
            raise bad(f"blob {node.blob.hex()[:16]}… is declared with two sizes ({size} and {node.size})")

    def _blob(self, s: RecordStream, bp: BundlePath, length: int) -> None:
        if length < DIGEST:
            raise bad("blob record too short")
        digest = s.read(DIGEST)
        size = self.blob_sizes.get(digest)
        if size is None:
            raise bad(f"blob {digest.hex()[:16]}… is not declared by any directory of '{bp.path}'")
        if length - DIGEST != size:
            raise bad(f"blob {digest.hex()[:16]}… record holds {length - DIGEST} bytes, its tree says {size}")
        if digest in self.received:
            raise bad(f"blob {digest.hex()[:16]}… appears twice")
        if size <= SMALL:
            self.staging.add_small(digest, s.read(size))
        else:
            self.staging.add_stream(digest, size, s.read)
        self.received.add(digest)

    def _assemble(self, digest: bytes, decoded: dict, made: dict | None = None) -> DirNode:
        """The tree of directory ``digest``; a directory named twice is one shared node."""
        made = {} if made is None else made
        node = made.get(digest)
        if node is None:
            node = made[digest] = DirNode()
            for name, child in decoded[digest].items():
                node.entries[name] = self._assemble(child, decoded, made) if isinstance(child, bytes) else child
        return node

    def _realisation(self, data: bytes) -> None:
        from .cache.layout import Realisation, check_drv_hash, check_output

        o = load_json(data, "realisation")
        try:
            drv_hash, output = check_drv_hash(o.get("drvHash")), check_output(o.get("output"))
        except UsageError:
            raise bad("bad realisation") from None
        try:
            r = Realisation.parse(data, self.store.store_dir, drv_hash, output, "bundle")
        except IntegrityError as e:
            raise bad(e.message) from None
        if self.require_sigs:
            signer = self.trusted.verify(r.fingerprint(self.store.store_dir), r.signatures)
            if signer is None:
                raise IntegrityError(f"bundle realisation {drv_hash}!{output} has no signature by a trusted key",
                                     "add the signer's public key to trusted-public-keys, or export with --key")
            self.signers.add(signer)
        self.realisations.append(r)

    def _within_side_allowance(self, s: RecordStream, length: int) -> None:
        """Logs and build records are signed by the trailer alone, which comes last: before
        that, an untrusted bundle could make us write far more than it is (a decompression
        bomb). Their bytes are kept within SIDE_FLOOR plus SIDE_RATIO times the bundle's bytes
        read so far (honest ones are far below: a log travels zstd-compressed already)."""
        self.side_bytes += length
        allowed = SIDE_FLOOR + SIDE_RATIO * s.raw.consumed
        if self.side_bytes > allowed:
            raise bad(f"its logs and build records expand to more than {allowed} bytes, "
                      f"{SIDE_RATIO} times the bundle's {s.raw.consumed} bytes read so far")

    def _log(self, s: RecordStream, length: int) -> None:
        from .cache.layout import check_drv_hash

        if length > MAX_LOG or length < 2:
            raise bad(f"log record declares {length} bytes")
        self._within_side_allowance(s, length)
        head = s.read(2)
        (n,) = struct.unpack("<H", head)
        if n + 2 > length:
            raise bad("bad log record")
        name = s.read(n)
        try:
            drv_hash = check_drv_hash(name.decode("ascii"))
        except (UnicodeDecodeError, UsageError):
            raise bad("bad log record") from None
        left = length - 2 - n
        with open(self.staging.log_path(drv_hash), "wb") as out:
            while left:
                chunk = s.read(min(_CHUNK, left))
                out.write(chunk)
                left -= len(chunk)
        self.logs.append(drv_hash)

    def _record(self, data: bytes) -> None:
        from .cache.layout import check_drv_hash

        o = load_json(data, "build record")
        rid, record = o.get("id"), o.get("record")
        try:
            drv_hash = check_drv_hash(o.get("drvHash"))
        except UsageError:
            raise bad("bad build record") from None
        if not isinstance(rid, str) or not rid.isdigit() or len(rid) > 32 or not isinstance(record, dict):
            raise bad("bad build record")
        from .db import dumps

        self.staging.keep_record(f"{drv_hash}!{rid}".encode(), dumps(record))
        self.records += 1

    def _trailer(self, f, digest: bytes, records: int) -> None:
        head = read_exact_raw(f, CHUNK_HEAD.size)
        if len(head) != CHUNK_HEAD.size:
            raise bad("truncated (no trailer)")
        (n,) = CHUNK_HEAD.unpack(head)
        if n > MAX_TRAILER:
            raise bad(f"trailer of {n} bytes, more than the {MAX_TRAILER} allowed")
        data = read_exact_raw(f, n)
        if len(data) != n:
            raise bad("truncated trailer")
        t = load_json(data, "trailer")
        if hex32(t.get("digest"), "trailer digest") != digest or t.get("records") != records:
            raise bad("the trailer does not match the bundle's contents")
        sigs = t.get("signatures")
        if not isinstance(sigs, list):
            raise bad("bad trailer signatures")
        if canonical({"digest": t["digest"], "records": records, "signatures": sorted(map(str, sigs))}) != data:
            raise bad("the trailer is not in canonical form")  # the trailer is not hashed: no slack in it
        if self.require_sigs:
            signer = self.trusted.verify(trailer_fingerprint(digest), sigs)
            if signer is None:
                raise IntegrityError("the bundle is not signed by a trusted key",
                                     "add the signer's public key to trusted-public-keys, or export with --key")
            self.signers.add(signer)
        if len(self.sections) != self.declared_paths:
            raise bad("fewer path sections than the header declares")
        if f.read(1):
            raise bad("data after the trailer")

    # ---- committing -------------------------------------------------------------------------

    def _check_closure(self) -> None:
        missing = []
        for bp in self.sections:
            if not bp.new:
                continue
            for r in bp.references:
                if r not in self.by_path and not self.store.is_valid(r):
                    missing.append(f"{self.store.logical(r)}: referenced by {bp.path}, not in the bundle nor here")
        if missing:
            raise NotFound(f"{len(missing)} reference(s) of the bundle's paths are missing",
                           "export with --closure, or import the bundle holding them first", details=missing)

    def _commit(self) -> ImportResult:
        from .cache.ingest import register

        store = self.store
        result = ImportResult([bp.path for bp in self.sections], realisations=0, signers=sorted(self.signers))
        realisations = self._good_realisations()
        self.staging.publish()
        items = [(bp.tmp, bp, bp.node) for bp in self.sections if bp.new]
        result.imported = register(store, items, realisations)  # leftovers: removed with the staging
        result.realisations = len(realisations)
        self._commit_logs_and_records()
        return result

    def _good_realisations(self) -> list:
        """The realisations to record: each must agree with its path as the bundle carries it
        (else the bundle is corrupt) and as this store holds it, when it already does (else
        it is left out, with a warning: two builds of one derivation that differ)."""
        good = []
        for r in self.realisations:
            bp = self.by_path.get(r.path)
            if bp is not None and bp.root != r.root:
                raise bad(f"realisation {r.drv_hash}!{r.output} disagrees with the digest of its path")
            local = self.store.query(r.path)
            if local is None and bp is None:
                raise NotFound(f"realisation {r.drv_hash}!{r.output} names '{self.store.logical(r.path)}', "
                               "which is neither in the bundle nor here")
            if local is not None and local.root != r.root:
                self.warn(f"realisation {r.drv_hash}!{r.output} not recorded: this store holds "
                          f"'{self.store.logical(r.path)}' with other contents (a build that is not reproducible?)")
                continue
            good.append(r)
        return good

    def _commit_logs_and_records(self) -> None:
        store = self.store
        for drv_hash in self.logs:
            dest = os.path.join(store.root, "logs", f"{drv_hash}.log.zst")
            if not os.path.exists(dest):
                os.rename(self.staging.log_path(drv_hash), dest)
        if self.records:
            with store.db.write() as txn:
                for key, data in self.staging.kept_records():
                    txn.put(key, data, db=store.db.dbs["records"], overwrite=False)


# Entries of a tree once every shared directory is counted where it appears: what laying
# the tree out creates. Directories are sent once, so a small bundle could otherwise name
# an astronomically large tree (each level naming the next twice).
MAX_ENTRIES = 20_000_000

# see Importer._within_side_allowance
SIDE_FLOOR = 64 << 20
SIDE_RATIO = 16


def _check_dag(bp: BundlePath, decoded: dict) -> None:
    """Refuse a section whose directories, as a tree, nest deeper than the store allows or
    expand to more than MAX_ENTRIES entries. Both follow the longest and the widest ways
    down the directory graph (a directory reached by several ways counts on each); computed
    bottom-up once per directory, without recursion."""
    height: dict[bytes, int] = {}  # names from this directory down to its deepest object
    size: dict[bytes, int] = {}  # entries below it, shared directories counted each time
    stack = [(bp.root, False)]
    while stack:
        digest, expanded = stack.pop()
        if digest in height:
            continue
        children = [c for c in decoded[digest].values() if isinstance(c, bytes)]
        if not expanded:
            stack.append((digest, True))
            stack.extend((c, False) for c in children if c not in height)
            continue
        entries = decoded[digest]
        # every entry is one name down; a directory adds what lies below it
        height[digest] = max((1 + height[c] if isinstance(c, bytes) else 1 for c in entries.values()), default=0)
        size[digest] = len(entries) + sum(size[c] for c in children)
        if height[digest] > MAX_DEPTH:
            raise bad(f"'{bp.path}' nests deeper than {MAX_DEPTH} levels")
        if size[digest] > MAX_ENTRIES:
            raise bad(f"'{bp.path}' expands to more than {MAX_ENTRIES:,} entries")


def import_bundle(store, f, trusted, require_sigs: bool = True, warn=None) -> ImportResult:
    """Import the bundle read from binary file ``f`` (see :class:`Importer`)."""
    try:
        return Importer(store, trusted, require_sigs, warn).run(f)
    except RecursionError:  # _check_dag bounds every walk of a tree; this is a last guard
        raise bad("tree too deep") from None
