"""Tests of fimio.store.nar: Nix as an oracle, round trips, properties, hostile archives."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pathlib
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fimio.store import nar
from fimio.store.errors import IntegrityError, NotFound, UsageError
from treecorpus import make_corpus

VECTORS = pathlib.Path(__file__).resolve().parent.parent / "spec" / "vectors" / "nar"


# ------------------------------------------------------------------ helpers


def dump_bytes(path) -> bytes:
    buf = io.BytesIO()
    n = nar.dump(path, buf)
    assert n == len(buf.getvalue())
    return buf.getvalue()


def restore_bytes(data: bytes, dest) -> None:
    nar.restore(io.BytesIO(data), dest)


def S(data: bytes) -> bytes:
    """One NAR string, written independently of the module under test."""
    return len(data).to_bytes(8, "little") + data + b"\0" * (-len(data) % 8)


def T(*tokens: bytes) -> bytes:
    return b"".join(S(t) for t in tokens)


MAGIC = S(b"nix-archive-1")


def reg(data: bytes, executable: bool = False) -> bytes:
    exe = T(b"executable", b"") if executable else b""
    return T(b"(", b"type", b"regular") + exe + T(b"contents", data, b")")


def link(target: bytes) -> bytes:
    return T(b"(", b"type", b"symlink", b"target", target, b")")


def dir_(*entries: tuple[bytes, bytes]) -> bytes:
    body = b"".join(T(b"entry", b"(", b"name", name, b"node") + node + T(b")")
                    for name, node in entries)
    return T(b"(", b"type", b"directory") + body + T(b")")


def listing(path: pathlib.Path) -> list[str]:
    return sorted(os.listdir(path))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[pathlib.Path]:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def nix_store() -> str:
    """The nix-store binary. Absent Nix is a failure unless FIMIO_NO_NIX=1 (then skip)."""
    exe = shutil.which("nix-store")
    if exe is None:
        if os.environ.get("FIMIO_NO_NIX") == "1":
            pytest.skip("nix-store not installed and FIMIO_NO_NIX=1")
        pytest.fail("nix-store not found: install Nix, or set FIMIO_NO_NIX=1 to skip oracle tests")
    return exe


# ------------------------------------------------------------ Nix as oracle


@pytest.mark.nix
def test_dump_matches_nix(corpus, nix_store, tmp_path):
    for tree in corpus:
        theirs = subprocess.run([nix_store, "--dump", tree], capture_output=True, check=True).stdout
        assert dump_bytes(tree) == theirs, tree.name
        # The fd / sendfile path must write the same bytes as the BytesIO path.
        out = tmp_path / "out.nar"
        with open(out, "wb") as f:
            assert nar.dump(tree, f) == len(theirs)
        assert out.read_bytes() == theirs, tree.name


@pytest.mark.nix
def test_nix_restores_our_dump(corpus, nix_store, tmp_path):
    for i, tree in enumerate(corpus):
        ours = dump_bytes(tree)
        dest = tmp_path / f"nix-restored-{i}"
        subprocess.run([nix_store, "--restore", dest], input=ours, check=True)
        redumped = subprocess.run([nix_store, "--dump", dest], capture_output=True, check=True).stdout
        assert redumped == ours, tree.name


@pytest.mark.nix
def test_vectors_match_nix(nix_store):
    nix_hash = shutil.which("nix-hash") or pytest.fail("nix-hash not found")
    for vector in json.loads((VECTORS / "vectors.json").read_text())["good"]:
        out = subprocess.run([nix_hash, "--type", "sha256", "--flat", VECTORS / vector["nar"]],
                             capture_output=True, check=True, text=True).stdout.strip()
        assert out == vector["sha256"], vector["name"]


# --------------------------------------------------------------- vectors


def build_tree(node: dict, path: pathlib.Path) -> None:
    """Materialise a vectors.json tree description."""
    if node["type"] == "regular":
        path.write_bytes(node["contents"].encode())
        path.chmod(0o755 if node["executable"] else 0o644)
    elif node["type"] == "symlink":
        os.symlink(node["target"], path)
    else:
        path.mkdir()
        for name, child in node["entries"].items():
            build_tree(child, path / name)


def test_good_vectors(tmp_path):
    good = json.loads((VECTORS / "vectors.json").read_text())["good"]
    assert {v["name"] for v in good} >= {"hello-file", "tiny-tree"}
    for vector in good:
        data = (VECTORS / vector["nar"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == vector["sha256"], vector["name"]
        tree = tmp_path / vector["name"]
        build_tree(vector["tree"], tree)
        assert dump_bytes(tree) == data, vector["name"]
        restored = tmp_path / (vector["name"] + "-restored")
        restore_bytes(data, restored)
        assert dump_bytes(restored) == data, vector["name"]


def test_bad_vectors(tmp_path):
    bad = json.loads((VECTORS / "vectors.json").read_text())["bad"]
    assert len(bad) >= 10
    for vector in bad:
        dest = tmp_path / vector["name"]
        with pytest.raises(nar.NarError) as exc:
            restore_bytes((VECTORS / vector["nar"]).read_bytes(), dest)
        assert vector["error"] in str(exc.value), vector["name"]
    assert listing(tmp_path) == []


def test_vectors_in_spec():
    """The hex dump and hashes quoted in spec/nar.md are the vector files'."""
    spec = (VECTORS.parent.parent / "nar.md").read_text()
    hexdump = re.findall(r"^    [0-9a-f]{8}: ((?:[0-9a-f]{2,4} )+)", spec, re.M)
    hello = (VECTORS / "hello-file.nar").read_bytes()
    assert bytes.fromhex("".join(hexdump).replace(" ", "")) == hello
    assert hello == MAGIC + reg(b"hello\n")  # and an independent writer agrees
    for vector in json.loads((VECTORS / "vectors.json").read_text())["good"]:
        if vector["name"] in ("hello-file", "tiny-tree"):
            assert vector["sha256"] in spec


# ------------------------------------------------------------- round trips


def check_modes(root: pathlib.Path) -> None:
    """Restored modes follow Nix: 0o755 for executables and dirs, 0o644 for files."""
    paths = [root]
    if root.is_dir() and not root.is_symlink():
        paths += [pathlib.Path(d) / n for d, ds, fs in os.walk(root) for n in ds + fs]
    for p in paths:
        st_ = os.lstat(p)
        if stat.S_ISDIR(st_.st_mode):
            assert stat.S_IMODE(st_.st_mode) == 0o755, p
        elif stat.S_ISREG(st_.st_mode):
            assert stat.S_IMODE(st_.st_mode) in (0o755, 0o644), p


def test_round_trip_corpus(corpus, tmp_path):
    for i, tree in enumerate(corpus):
        data = dump_bytes(tree)
        dest = tmp_path / f"restored-{i}"
        restore_bytes(data, dest)
        assert dump_bytes(dest) == data, tree.name
        check_modes(dest)
    assert len(listing(tmp_path)) == len(corpus)  # no temporary siblings left


def test_round_trip_through_real_files(corpus, tmp_path):
    """Dump to a real file (sendfile path), restore from a real file."""
    tree = next(t for t in corpus if t.name == "sizes")
    with open(tmp_path / "a.nar", "wb") as f:
        nar.dump(tree, f)
    with open(tmp_path / "a.nar", "rb") as f:
        nar.restore(f, tmp_path / "restored")
    assert dump_bytes(tmp_path / "restored") == (tmp_path / "a.nar").read_bytes()


def test_corpus_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    trees_a, trees_b = make_corpus(a), make_corpus(b)
    assert [t.name for t in trees_a] == [t.name for t in trees_b]
    for ta, tb in zip(trees_a, trees_b):
        assert dump_bytes(ta) == dump_bytes(tb), ta.name


def test_names_sorted_by_bytes_not_str(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    for name in (b"\xff", b"\xee\x80\x80", b"B", b"a"):
        (pathlib.Path(os.fsdecode(bytes(d) + b"/" + name))).write_bytes(b"")
    names = [e.path[-1] for e in nar.iter_entries(io.BytesIO(dump_bytes(d))) if len(e.path) == 1
             and e.kind == nar.REGULAR]
    assert names == [b"B", b"a", b"\xee\x80\x80", b"\xff"]


# ------------------------------------------------------------ output objects


@pytest.fixture
def sizes_tree(corpus) -> pathlib.Path:
    return next(t for t in corpus if t.name == "sizes")


def test_dump_to_unbuffered_and_prefixed_file(sizes_tree, tmp_path):
    expected = dump_bytes(sizes_tree)
    with open(tmp_path / "raw", "wb", buffering=0) as f:
        assert nar.dump(sizes_tree, f) == len(expected)
    assert (tmp_path / "raw").read_bytes() == expected
    # Bytes buffered in ``out`` before dump come first; tell() is right afterwards.
    with open(tmp_path / "prefixed", "wb") as f:
        f.write(b"prefix")
        nar.dump(sizes_tree, f)
        assert f.tell() == 6 + len(expected)
        f.write(b"suffix")
    assert (tmp_path / "prefixed").read_bytes() == b"prefix" + expected + b"suffix"


def test_dump_to_append_mode_falls_back(sizes_tree, tmp_path):
    """sendfile refuses O_APPEND outputs; dump must fall back to read/write."""
    expected = dump_bytes(sizes_tree)
    (tmp_path / "app").write_bytes(b"x")
    with open(tmp_path / "app", "ab") as f:
        assert nar.dump(sizes_tree, f) == len(expected)
    assert (tmp_path / "app").read_bytes() == b"x" + expected


def test_dump_to_pipe(sizes_tree):
    expected = dump_bytes(sizes_tree)
    proc = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()))
    reader.start()
    nar.dump(sizes_tree, proc.stdin)
    proc.stdin.close()
    reader.join()
    proc.wait()
    assert chunks[0] == expected


def test_dump_to_gzip_is_not_bypassed(sizes_tree, tmp_path):
    """GzipFile has a fileno() (the compressed file's): writing to it directly would be wrong."""
    expected = dump_bytes(sizes_tree)
    with gzip.open(tmp_path / "x.nar.gz", "wb") as f:
        nar.dump(sizes_tree, f)
    assert gzip.decompress((tmp_path / "x.nar.gz").read_bytes()) == expected


def test_dump_to_raw_writer_with_short_writes(sizes_tree):
    expected = dump_bytes(sizes_tree)

    class Dribble(io.RawIOBase):
        def __init__(self):
            self.data = bytearray()

        def writable(self):
            return True

        def write(self, b):
            n = min(len(b), 1000)
            self.data += bytes(b[:n])
            return n

    out = Dribble()
    assert nar.dump(sizes_tree, out) == len(expected)
    assert bytes(out.data) == expected


class NullWriter:
    """A writable that keeps nothing: memory measurements see only dump's own use."""

    def __init__(self):
        self.count = 0

    def write(self, b):
        self.count += len(b)
        return len(b)


def test_memory_is_flat(tmp_path):
    big = tmp_path / "sparse"
    with open(big, "wb") as f:
        f.truncate(64 << 20)  # 64 MiB, sparse: costs no disk
    nar_size = len(MAGIC + T(b"(", b"type", b"regular", b"contents")) + 8 + (64 << 20) + len(T(b")"))

    tracemalloc.start()
    try:
        out = NullWriter()
        nar.dump(big, out)
        _, peak = tracemalloc.get_traced_memory()
        assert out.count == nar_size
        assert peak < 8 << 20, f"dump peak {peak}"

        class ZeroNar(io.RawIOBase):
            """The NAR of the 64 MiB zero file, generated on the fly."""

            def __init__(self):
                self.head = MAGIC + T(b"(", b"type", b"regular", b"contents") + (64 << 20).to_bytes(8, "little")
                self.zeros, self.tail = 64 << 20, T(b")")

            def readable(self):
                return True

            def readinto(self, b):
                if self.head:
                    n = min(len(b), len(self.head))
                    b[:n], self.head = self.head[:n], self.head[n:]
                elif self.zeros:
                    n = min(len(b), self.zeros)
                    b[:n] = bytes(n)
                    self.zeros -= n
                else:
                    n = min(len(b), len(self.tail))
                    b[:n], self.tail = self.tail[:n], self.tail[n:]
                return n

        tracemalloc.reset_peak()
        nar.restore(io.BufferedReader(ZeroNar()), tmp_path / "restored")
        _, peak = tracemalloc.get_traced_memory()
        assert peak < 8 << 20, f"restore peak {peak}"
    finally:
        tracemalloc.stop()
    assert os.path.getsize(tmp_path / "restored") == 64 << 20


# ------------------------------------------------------------ dump refusals


def test_dump_refuses_fifo_and_socket(tmp_path):
    tree = tmp_path / "t"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "file").write_bytes(b"x")
    os.mkfifo(tree / "sub" / "fifo")
    with pytest.raises(UsageError, match="fifo") as exc:
        nar.dump(tree, io.BytesIO())
    assert str(tree / "sub" / "fifo") in str(exc.value)
    with pytest.raises(UsageError, match="fifo"):
        nar.dump(tree / "sub" / "fifo", io.BytesIO())

    os.unlink(tree / "sub" / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tree / "sub" / "sock"))
        with pytest.raises(UsageError, match="socket") as exc:
            nar.dump(tree, io.BytesIO())
        assert str(tree / "sub" / "sock") in str(exc.value)
    finally:
        sock.close()


def test_dump_missing_path(tmp_path):
    with pytest.raises(NotFound):
        nar.dump(tmp_path / "nope", io.BytesIO())


def test_dump_root_symlink_not_followed(tmp_path):
    (tmp_path / "dir").mkdir()
    os.symlink("dir", tmp_path / "l")
    assert dump_bytes(tmp_path / "l") == MAGIC + link(b"dir")


# --------------------------------------------------------- hostile archives


def assert_refused(data: bytes, tmp_path: pathlib.Path, match: str) -> None:
    """restore must raise NarError and leave nothing behind, in or outside its sandbox."""
    sandbox, outside = tmp_path / "sandbox", tmp_path / "outside"
    sandbox.mkdir(exist_ok=True)
    outside.mkdir(exist_ok=True)
    with pytest.raises(nar.NarError, match=match):
        restore_bytes(data, sandbox / "dest")
    assert listing(sandbox) == []
    assert listing(outside) == []
    assert listing(tmp_path) == ["outside", "sandbox"]


HOSTILE = {
    "dotdot": (MAGIC + dir_((b"..", reg(b"x"))), r"entry name '\.\.' .*not allowed"),
    "dot": (MAGIC + dir_((b".", reg(b"x"))), r"entry name '\.' .*not allowed"),
    "slash": (MAGIC + dir_((b"/", reg(b"x"))), "entry name '/' .*not allowed"),
    "a/b": (MAGIC + dir_((b"a/b", reg(b"x"))), "entry name 'a/b' .*not allowed"),
    "nul": (MAGIC + dir_((b"a\0b", reg(b"x"))), r"entry name 'a\\x00b' .*not allowed"),
    "empty-name": (MAGIC + dir_((b"", reg(b"x"))), "entry name '' .*not allowed"),
    "long-name": (MAGIC + dir_((b"n" * 256, reg(b"x"))), "entry name length 256 .* limit of 255"),
    "duplicate": (MAGIC + dir_((b"a", reg(b"x")), (b"a", reg(b"y"))), "duplicate entry name 'a'"),
    "unsorted": (MAGIC + dir_((b"b", reg(b"x")), (b"a", reg(b"y"))), "unsorted entry name 'a'"),
    "unsorted-prefix": (MAGIC + dir_((b"ab", reg(b"x")), (b"a", reg(b"y"))), "unsorted"),
    "nested-duplicate": (MAGIC + dir_((b"d", dir_((b"a", reg(b"x")), (b"a", reg(b"x"))))), "duplicate"),
    "truncated-length": ((MAGIC + reg(b"hello"))[:len(MAGIC) + 8 * 3 + 4], "truncated"),
    "truncated-contents": ((MAGIC + reg(b"hello world"))[:-24], "truncated"),
    "truncated-end": ((MAGIC + dir_((b"a", reg(b"x"))))[:-8], "truncated"),
    "huge-name-length": (MAGIC + T(b"(", b"type", b"directory", b"entry", b"(", b"name")
                         + (2**63).to_bytes(8, "little") + b"a" * 64, "length 9223372036854775808"),
    "huge-token-length": (MAGIC + (2**64 - 1).to_bytes(8, "little"), "token length"),
    "huge-contents-length": (MAGIC + T(b"(", b"type", b"regular", b"contents")
                             + (2**63).to_bytes(8, "little") + b"x" * 8, "absurd"),
    "contents-beyond-data": (MAGIC + T(b"(", b"type", b"regular", b"contents")
                             + (2**40).to_bytes(8, "little") + b"x" * 100, "truncated"),
    "huge-target-length": (MAGIC + T(b"(", b"type", b"symlink", b"target")
                           + (2**62).to_bytes(8, "little"), "symlink target length"),
    "long-target": (MAGIC + link(b"t" * 4096), "symlink target length 4096"),
    "empty-target": (MAGIC + link(b""), "symlink target .* empty"),
    "nul-target": (MAGIC + link(b"a\0b"), "NUL"),
    "trailing-garbage": (MAGIC + reg(b"x") + b"garbage!", "trailing data"),
    "trailing-byte": (MAGIC + reg(b"x") + b"\0", "trailing data"),
    "bad-padding-contents": (MAGIC + T(b"(", b"type", b"regular", b"contents")
                             + (1).to_bytes(8, "little") + b"x\0\0\0\0\0\0\x01" + T(b")"), "non-zero padding"),
    "bad-padding-name": (MAGIC + T(b"(", b"type", b"directory", b"entry", b"(", b"name")
                         + (1).to_bytes(8, "little") + b"a\0\0\0\0\0\0\x01", "non-zero padding"),
    "bad-magic": (S(b"nix-archive-2") + reg(b"x"), "bad magic"),
    "no-magic": (reg(b"x"), "bad magic"),
    "empty": (b"", "truncated"),
    "unknown-type": (MAGIC + T(b"(", b"type", b"fifo", b")"), "unknown node type 'fifo'"),
    "unknown-field": (MAGIC + T(b"(", b"type", b"regular", b"size", b"1", b")"), "expected 'contents'"),
    "exec-after-contents": (MAGIC + T(b"(", b"type", b"regular", b"contents", b"x", b"executable", b"", b")"),
                            "expected '\\)'"),
    "exec-twice": (MAGIC + T(b"(", b"type", b"regular", b"executable", b"", b"executable", b"", b"contents",
                             b"x", b")"), "expected 'contents'"),
    "exec-non-empty": (MAGIC + T(b"(", b"type", b"regular", b"executable", b"yes", b"contents", b"x", b")"),
                       "empty string"),
    "contents-twice": (MAGIC + T(b"(", b"type", b"regular", b"contents", b"x", b"contents", b"y", b")"),
                       "expected '\\)'"),
    "entry-in-file": (MAGIC + T(b"(", b"type", b"regular", b"contents", b"x", b"entry"), "expected '\\)'"),
    "missing-close": (MAGIC + T(b"(", b"type", b"directory"), "truncated"),
    "two-roots": (MAGIC + reg(b"x") + reg(b"y"), "trailing data"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive(case, tmp_path):
    data, match = HOSTILE[case]
    assert_refused(data, tmp_path, match)


def test_symlink_then_directory_trick(tmp_path):
    """A symlink 'x' -> outside followed by a directory 'x' holding a file: must not write outside."""
    outside = tmp_path / "outside"
    outside.mkdir()
    data = MAGIC + dir_((b"x", link(str(outside).encode())), (b"x", dir_((b"pwned", reg(b"gotcha")))))
    assert_refused(data, tmp_path, "duplicate entry name 'x'")
    # Same trick with a file entry, and with the symlink as a later, unsorted entry.
    data = MAGIC + dir_((b"x", link(str(outside / "pwned").encode())), (b"x", reg(b"gotcha")))
    assert_refused(data, tmp_path, "duplicate entry name 'x'")


def test_symlinks_to_outside_are_restored_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    data = MAGIC + dir_((b"a", link(str(outside).encode())), (b"b", link(b"../../outside")),
                        (b"c", reg(b"fine")))
    restore_bytes(data, tmp_path / "dest")
    assert os.readlink(tmp_path / "dest" / "a") == str(outside)
    assert listing(outside) == []
    assert dump_bytes(tmp_path / "dest") == data


def test_too_deep(tmp_path):
    def nested(depth: int) -> bytes:
        node = reg(b"x")
        for _ in range(depth):
            node = dir_((b"d", node))
        return node

    assert_refused(MAGIC + nested(nar.MAX_DEPTH + 1), tmp_path, "deeper than")
    # The deepest archive restore accepts is one dump writes; one level more, it refuses.
    data = MAGIC + nested(nar.MAX_DEPTH)
    restore_bytes(data, tmp_path / "ok")
    assert dump_bytes(tmp_path / "ok") == data
    deepest = os.path.join(tmp_path / "ok", *["d"] * (nar.MAX_DEPTH - 1))
    os.mkdir(os.path.join(deepest, "e"))  # an empty dir at the deepest level is fine
    dump_bytes(tmp_path / "ok")
    os.mkdir(os.path.join(deepest, "e", "f"))
    with pytest.raises(UsageError, match="deeper than"):
        nar.dump(tmp_path / "ok", io.BytesIO())


def test_restore_refuses_existing_dest(tmp_path):
    data = MAGIC + reg(b"x")
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_bytes(b"")
    os.symlink("nowhere", tmp_path / "dangling")
    for name in ("dir", "file", "dangling"):
        with pytest.raises(UsageError, match="already exists"):
            restore_bytes(data, tmp_path / name)
    with pytest.raises(UsageError, match="not a directory"):
        restore_bytes(data, tmp_path / "missing-parent" / "dest")
    assert listing(tmp_path) == ["dangling", "dir", "file"]
    assert listing(tmp_path / "dir") == []


def test_error_classes():
    assert issubclass(nar.NarError, IntegrityError)
    assert nar.NarError("x").exit_code == 4


def test_short_reads(tmp_path, corpus):
    """A stream that returns a few bytes per read (pipes, raw sockets) restores fine."""
    tree = next(t for t in corpus if t.name == "mixed")
    data = dump_bytes(tree)

    class Trickle(io.RawIOBase):
        def __init__(self, data):
            self.data = memoryview(data)

        def readable(self):
            return True

        def readinto(self, b):
            n = min(len(b), 3, len(self.data))
            b[:n], self.data = self.data[:n], self.data[n:]
            return n

    nar.restore(Trickle(data), tmp_path / "dest")
    assert dump_bytes(tmp_path / "dest") == data


def test_iter_entries_events():
    data = MAGIC + dir_((b"a", reg(b"hi", True)), (b"d", dir_()), (b"l", link(b"a")))
    events = []
    for e in nar.iter_entries(io.BytesIO(data)):
        contents = b"".join(e.chunks) if e.chunks else None
        events.append((e.kind, e.path, e.executable, contents, e.target))
    assert events == [
        (nar.DIRECTORY, (), False, None, b""),
        (nar.REGULAR, (b"a",), True, b"hi", b""),
        (nar.DIRECTORY, (b"d",), False, None, b""),
        (nar.END_DIRECTORY, (b"d",), False, None, b""),
        (nar.SYMLINK, (b"l",), False, None, b"a"),
        (nar.END_DIRECTORY, (), False, None, b""),
    ]
    # Unconsumed contents are skipped (and still checked).
    kinds = [e.kind for e in nar.iter_entries(io.BytesIO(data))]
    assert len(kinds) == 6


# ------------------------------------------------------------ properties

NAME = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"),
             min_size=1, max_size=12).map(lambda s: s.encode()),
    st.binary(min_size=1, max_size=12),
).filter(lambda b: b not in (b".", b"..") and b"/" not in b and b"\0" not in b and len(b) <= 255)

LEAF = st.one_of(
    st.tuples(st.just("file"), st.binary(max_size=300), st.booleans()),
    st.tuples(st.just("symlink"), st.binary(min_size=1, max_size=40).filter(lambda b: b"\0" not in b)),
)
TREE = st.recursive(LEAF, lambda children: st.dictionaries(NAME, children, max_size=5), max_leaves=25)


def materialise(node, path: bytes) -> None:
    if isinstance(node, dict):
        os.mkdir(path)
        for name, child in node.items():
            materialise(child, path + b"/" + name)
    elif node[0] == "file":
        with open(path, "wb") as f:
            f.write(node[1])
        os.chmod(path, 0o755 if node[2] else 0o644)
    else:
        os.symlink(node[1], path)


def read_back(path: bytes):
    st_ = os.lstat(path)
    if stat.S_ISLNK(st_.st_mode):
        return ("symlink", os.readlink(path))
    if stat.S_ISDIR(st_.st_mode):
        return {name: read_back(path + b"/" + name) for name in os.listdir(path)}
    with open(path, "rb") as f:
        return ("file", f.read(), bool(st_.st_mode & 0o100))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(TREE)
def test_property_round_trip(tree):
    with tempfile.TemporaryDirectory() as tmp:
        src, dest = os.fsencode(tmp) + b"/src", os.fsencode(tmp) + b"/dest"
        materialise(tree, src)
        data = dump_bytes(src)
        nar.restore(io.BytesIO(data), dest)
        assert dump_bytes(dest) == data
        assert read_back(dest) == read_back(src) == tree
        assert sorted(os.listdir(tmp)) == ["dest", "src"]


def _base_nar() -> bytes:
    return MAGIC + dir_(
        (b"bin", dir_((b"run", reg(b"#!/bin/sh\n", True)))),
        (b"data", reg(b"0123456789abcdefghij")),
        (b"empty", dir_()),
        (b"link", link(b"../etc/passwd")),
        (b"z", reg(b"")),
    )


BASE_NAR = _base_nar()
MUTATION = st.one_of(
    st.tuples(st.just("set"), st.integers(0, len(BASE_NAR) - 1), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, len(BASE_NAR) - 1), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, len(BASE_NAR)), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, len(BASE_NAR) - 1), st.just(0)),
    st.tuples(st.just("length"), st.integers(0, len(BASE_NAR) // 8 - 1), st.integers(0, 2**64 - 1)),
)


def mutate(data: bytes, mutations) -> bytes:
    b = bytearray(data)
    for op, pos, val in mutations:
        pos = min(pos, len(b))
        if op == "set" and pos < len(b):
            b[pos] = val
        elif op == "truncate":
            del b[pos:]
        elif op == "insert":
            b.insert(pos, val)
        elif op == "delete" and pos < len(b):
            del b[pos]
        elif op == "length" and pos * 8 + 8 <= len(b):
            b[pos * 8:pos * 8 + 8] = val.to_bytes(8, "little")  # a word, as a length field
    return bytes(b)


@settings(max_examples=300, deadline=None)
@given(st.lists(MUTATION, min_size=1, max_size=4))
def test_property_mutations_only_raise_nar_error(mutations):
    data = mutate(BASE_NAR, mutations)
    with tempfile.TemporaryDirectory() as tmp:
        dest = os.path.join(tmp, "dest")
        try:
            nar.restore(io.BytesIO(data), dest)
        except nar.NarError:
            assert os.listdir(tmp) == []  # neither dest nor a temporary sibling
        else:
            # Only canonical archives are accepted, so the re-dump is the input.
            assert dump_bytes(dest) == data
            assert os.listdir(tmp) == ["dest"]


def test_mutations_are_mostly_refused():
    """Sanity check for the property above: truncations of a valid NAR are all refused."""
    for n in range(len(BASE_NAR)):
        with pytest.raises(nar.NarError):
            list(nar.iter_entries(io.BytesIO(BASE_NAR[:n])))
    assert len(list(nar.iter_entries(io.BytesIO(BASE_NAR)))) > 0
