"""The local store through the library (spec/local-store.md)."""

from __future__ import annotations

import multiprocessing
import os
import pathlib
import socket
import stat
import subprocess
import sys

import pytest

from fimio.store.errors import NotFound, UsageError
from fimio.store.local import LocalStore
from fimio.store.paths import StorePath, source_path
from fimio.store.tree import DirNode, scan

STORE_DIR = "/fimio/store"


def make_tree(path: pathlib.Path, seed: str = "") -> pathlib.Path:
    (path / "bin").mkdir(parents=True)
    (path / "share" / "doc").mkdir(parents=True)
    (path / "empty").mkdir()
    (path / "bin" / "tool").write_bytes(b"#!/bin/sh\necho tool" + seed.encode() + b"\n")
    os.chmod(path / "bin" / "tool", 0o755)
    (path / "share" / "doc" / "README").write_bytes(b"read me\n")
    (path / "data").write_bytes(bytes(range(256)) * 100)
    os.symlink("share/doc/README", path / "README")
    return path


def store_entries(store: LocalStore) -> set[str]:
    return {e for e in os.listdir(store.store) if e != ".links"}


def test_add_file(store, tmp_path):
    f = tmp_path / "hello.txt"
    f.write_bytes(b"hello\n")
    info = store.add_path(str(f))
    assert info.path.name == "hello.txt"
    assert info.path == source_path(STORE_DIR, "hello.txt", scan(f).digest)
    assert info.root == scan(f).digest and info.size == 6 and info.ca == "source"
    phys = store.physical(info.path)
    assert phys == os.path.join(store.root, "store", info.path.base)
    assert store.logical(info.path) == f"{STORE_DIR}/{info.path.base}"
    assert open(phys, "rb").read() == b"hello\n"
    st = os.lstat(phys)
    assert stat.S_IMODE(st.st_mode) == 0o444 and st.st_mtime == 1
    link = store.link_path(scan(f).blob, False)
    assert os.stat(link).st_ino == st.st_ino
    assert store.is_valid(info.path) and store.query(info.path) == info


def test_add_tree_is_normalised(store, tmp_path):
    src = make_tree(tmp_path / "pkg")
    info = store.add_path(str(src))
    phys = pathlib.Path(store.physical(info.path))
    assert scan(phys).digest == info.root == scan(src).digest
    assert info.size == len(b"#!/bin/sh\necho tool\n") + 8 + 25600
    for dirpath, dirnames, filenames in os.walk(phys):
        for name in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
            st = os.lstat(name)
            assert st.st_mtime == 1, name
            if stat.S_ISDIR(st.st_mode):
                assert stat.S_IMODE(st.st_mode) == 0o555, name
            elif stat.S_ISREG(st.st_mode):
                want = 0o555 if name.endswith("tool") else 0o444
                assert stat.S_IMODE(st.st_mode) == want, name
    assert os.readlink(phys / "README") == "share/doc/README"
    assert (phys / "empty").is_dir() and not os.listdir(phys / "empty")
    # the registered tree can be rebuilt from the database alone
    assert store.load_tree(info).digest == info.root
    assert isinstance(store.load_tree(info.root), DirNode)


def test_add_empty_dir_and_symlink_root(store, tmp_path):
    (tmp_path / "nothing").mkdir()
    info = store.add_path(str(tmp_path / "nothing"))
    assert os.listdir(store.physical(info.path)) == [] and info.size == 0
    assert stat.S_IMODE(os.stat(store.physical(info.path)).st_mode) == 0o555

    os.symlink("/does/not/exist", tmp_path / "link")
    info = store.add_path(str(tmp_path / "link"))
    phys = store.physical(info.path)
    assert os.path.islink(phys) and os.readlink(phys) == "/does/not/exist"
    assert os.lstat(phys).st_mtime == 1
    assert info.root == scan(tmp_path / "link").digest
    assert store.verify(check_contents=True) == []


def test_same_content_twice_is_stored_once(store, tmp_path):
    a = make_tree(tmp_path / "a" / "pkg")
    b = make_tree(tmp_path / "b" / "pkg")
    first = store.add_path(str(a))
    links_before = sorted(os.listdir(store.links))
    again = store.add_path(str(b))
    assert again.path == first.path and again.registered == first.registered
    assert sorted(os.listdir(store.links)) == links_before
    assert len(store.all_paths()) == 1
    # another path sharing a file shares its inode
    other = make_tree(tmp_path / "c" / "other", seed="different")
    info = store.add_path(str(other))
    assert info.path != first.path
    p1, p2 = pathlib.Path(store.physical(first.path)), pathlib.Path(store.physical(info.path))
    assert os.stat(p1 / "data").st_ino == os.stat(p2 / "data").st_ino
    assert os.stat(p1 / "share/doc/README").st_ino == os.stat(p2 / "share/doc/README").st_ino
    assert os.stat(p1 / "bin/tool").st_ino != os.stat(p2 / "bin/tool").st_ino
    assert os.stat(p1 / "data").st_ino == os.stat(store.link_path(scan(a / "data").blob, False)).st_ino


def test_exec_and_plain_identical_contents_use_two_link_files(store, tmp_path):
    t = tmp_path / "t"
    t.mkdir()
    (t / "plain").write_bytes(b"same\n")
    (t / "exec").write_bytes(b"same\n")
    os.chmod(t / "exec", 0o755)
    info = store.add_path(str(t))
    blob = scan(t / "plain").blob
    plain_link, exec_link = store.link_path(blob, False), store.link_path(blob, True)
    assert plain_link != exec_link and exec_link.endswith("x")
    assert stat.S_IMODE(os.stat(plain_link).st_mode) == 0o444
    assert stat.S_IMODE(os.stat(exec_link).st_mode) == 0o555
    phys = pathlib.Path(store.physical(info.path))
    assert os.stat(phys / "plain").st_ino == os.stat(plain_link).st_ino
    assert os.stat(phys / "exec").st_ino == os.stat(exec_link).st_ino
    assert os.stat(plain_link).st_ino != os.stat(exec_link).st_ino


def test_references_closure_and_referrers(store, tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "f").write_bytes(b"lib\n")
    lib = store.add_path(str(tmp_path / "lib")).path
    mid = store.add_text("mid.txt", b"uses " + store.logical(lib).encode(), [lib]).path
    top = store.add_text("top.drv", b"uses mid", [mid, lib]).path
    alone = store.add_text("alone", b"nothing").path
    assert store.info(top).references == sorted([mid, lib])
    assert store.closure([top]) == sorted([top, mid, lib])
    assert store.closure([mid]) == sorted([mid, lib])
    assert store.closure([alone]) == [alone]
    assert store.referrers(lib) == sorted([mid, top])
    assert store.referrers(mid) == [top]
    assert store.referrers(top) == []
    # references are part of a text path's identity
    assert store.add_text("mid.txt", b"uses " + store.logical(lib).encode()).path != mid
    # the same text twice is the same path
    assert store.add_text("top.drv", b"uses mid", [lib, mid]).path == top
    assert open(store.physical(top), "rb").read() == b"uses mid"
    with pytest.raises(NotFound):
        store.closure([StorePath.parse("0" * 32 + "-missing")])
    assert store.verify(check_contents=True) == []


def test_resolve_forms(store, tmp_path):
    src = make_tree(tmp_path / "pkg")
    path = store.add_path(str(src)).path
    phys, logical = store.physical(path), store.logical(path)
    assert store.resolve(phys) == (path, "")
    assert store.resolve(logical) == (path, "")
    assert store.resolve(path.base) == (path, "")
    assert store.resolve(path.hash_part) == (path, "")
    assert store.resolve(phys + "/share/doc/README") == (path, "share/doc/README")
    assert store.resolve(logical + "/bin/tool") == (path, "bin/tool")
    assert store.resolve(path.hash_part + "/data") == (path, "data")
    assert store.resolve(path.base + "/share") == (path, "share")
    # an out-link style symlink to a store path
    os.symlink(phys, tmp_path / "result")
    assert store.resolve(str(tmp_path / "result")) == (path, "")
    # not valid, not in the store, not a store path
    with pytest.raises(NotFound):
        store.resolve("0" * 32)
    with pytest.raises(NotFound):
        store.resolve(f"{STORE_DIR}/{'0' * 32}-pkg")
    with pytest.raises(NotFound):
        store.resolve(str(src))
    with pytest.raises(UsageError):
        store.resolve("not-a-store-path")
    assert store.resolve(f"{'0' * 32}-pkg", must_be_valid=False)[0].hash_part == "0" * 32


def test_unregistered_directory_is_not_valid_and_is_garbage(store, tmp_path):
    fake = StorePath("0" * 32, "fake")
    os.mkdir(store.physical(fake))
    with pytest.raises(NotFound):
        store.resolve(store.physical(fake))
    leftover = os.path.join(store.tmp, "add-999999999-abcdef")
    os.makedirs(os.path.join(leftover, "x"))
    os.chmod(leftover, 0o555)
    assert store.verify() == []
    assert not os.path.exists(store.physical(fake))
    assert not os.path.exists(leftover)


def test_bad_input_registers_nothing(store, tmp_path):
    t = make_tree(tmp_path / "t")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(t / "share" / "sock"))
    try:
        with pytest.raises(UsageError, match="sock"):
            store.add_path(str(t))
    finally:
        sock.close()
    with pytest.raises(NotFound):
        store.add_path(str(tmp_path / "missing"))
    with pytest.raises(UsageError):
        store.add_path(str(make_tree(tmp_path / "ok")), name=".hidden")
    with pytest.raises(UsageError):
        store.add_path(str(tmp_path / "ok"), name="a b")
    assert store.all_paths() == [] and store_entries(store) == set()


def test_verify_reports_corruption_and_missing_files(store, tmp_path):
    info = store.add_path(str(make_tree(tmp_path / "pkg")))
    phys = pathlib.Path(store.physical(info.path))
    assert store.verify(check_contents=True) == []
    target = phys / "share" / "doc" / "README"
    os.chmod(target, 0o644)
    with open(target, "r+b") as f:
        f.write(b"R")
    os.chmod(target, 0o444)
    assert store.verify() == []  # without --check-contents nothing is rehashed
    problems = store.verify(check_contents=True)
    assert [(p.file, "contents differ" in p.what) for p in problems] == [("share/doc/README", True)]
    os.chmod(phys / "bin", 0o755)
    os.unlink(phys / "bin" / "tool")
    os.chmod(phys / "bin", 0o555)
    files = {p.file: p.what for p in store.verify(check_contents=True)}
    assert files["bin/tool"] == "is missing" and "share/doc/README" in files
    # the registered tree still comes from the database, not from the damaged files
    assert store.load_tree(info).digest == info.root


def _add_worker(root: str, src: str, barrier, results) -> None:
    store = LocalStore(root, STORE_DIR)
    try:
        barrier.wait(timeout=60)
        info = store.add_path(src)
        results.put((info.path.base, info.root.hex(), info.registered))
    except BaseException as e:  # report, never hang the parent
        results.put(("error", repr(e), 0))
    finally:
        store.close()


def test_concurrent_adds_of_the_same_tree(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(300):
        (src / f"f{i:03d}").write_bytes(os.urandom(100) * (i % 20 + 1))
    make_tree(src / "nested")
    root = str(tmp_path / "root")
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_add_worker, args=(root, str(src), barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert all(g[0] != "error" for g in got), got
    assert len({(g[0], g[1]) for g in got}) == 1
    assert len({g[2] for g in got}) == 1  # registered once, the others found it valid
    store = LocalStore(root, STORE_DIR)
    try:
        [info] = store.all_paths()
        assert info.path.base == got[0][0] and info.root == scan(src).digest
        assert store_entries(store) == {info.path.base}
        assert store.verify(check_contents=True) == []
        assert os.listdir(store.tmp) == []
    finally:
        store.close()


def test_store_dir_is_fixed_per_database(tmp_path):
    s = LocalStore(str(tmp_path / "r"), STORE_DIR)
    s.close()
    with pytest.raises(UsageError, match="logical directory"):
        LocalStore(str(tmp_path / "r"), "/other/store")


def test_a_torn_blob_is_replaced_not_trusted(store, tmp_path):
    """A blob name left empty by a power cut (published, never flushed) must not be reused."""
    import blake3

    src = tmp_path / "f.txt"
    src.write_bytes(b"content that a power cut tore\n" * 10)
    key = store.link_path(blake3.blake3(src.read_bytes()).digest(), False)
    with open(key, "wb"):
        pass  # the torn blob: the right name, no data
    info = store.add_path(str(src))
    assert pathlib.Path(store.physical(info.path)).read_bytes() == src.read_bytes()
    assert store.verify(check_contents=True) == []


def test_large_add_after_multithreaded_hashing_in_the_same_process(tmp_path):
    """A large add forks worker processes. blake3's own thread pool, once the process has
    used it, does not survive a fork: a worker hashing a large file with it would wait
    forever. The add must finish (it runs in a child interpreter with a timeout)."""
    src = tmp_path / "src"
    for i in range(3):
        (src / f"d{i}").mkdir(parents=True)
        (src / f"d{i}" / "large").write_bytes(os.urandom(9 << 20))
        for j in range(100):
            (src / f"d{i}" / f"small{j}").write_bytes(b"%d %d\n" % (i, j))
    program = (
        "import sys, blake3\n"
        "from fimio.store.local import LocalStore\n"
        "blake3.blake3(bytes(32 << 20), max_threads=blake3.blake3.AUTO).digest()  # starts its pool\n"
        "store = LocalStore(sys.argv[1], '/fimio/store')\n"
        "print(store.add_path(sys.argv[2]).path.base)\n"
    )
    out = subprocess.run([sys.executable, "-c", program, str(tmp_path / "root"), str(src)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("-src")



def test_large_files_among_small_ones_keep_their_own_contents(store, tmp_path):
    # a file of 8 MiB or more is a batch of its own that runs before the small files queued
    # ahead of it; each file's digest must still come back to its own name
    src = tmp_path / "src"
    src.mkdir()
    sizes = {}
    for i in range(600):
        size = (8 << 20) + i if i in (5, 300, 599) else 100 + i
        (src / f"f{i:03}").write_bytes(os.urandom(size))
        sizes[f"f{i:03}"] = size
    info = store.add_path(str(src))
    assert info.root == scan(src).digest
    node = store.load_tree(info)
    assert {name.decode(): child.size for name, child in node.entries.items()} == sizes

def test_early_flush_syncs_in_the_background_only_when_worth_it(monkeypatch, tmp_path):
    from fimio.store import fsutil

    calls = []
    monkeypatch.setattr(fsutil, "syncfs", calls.append)
    with fsutil.EarlyFlush(str(tmp_path), every=100, minimum=50) as flush:
        flush.start()
        flush.join()
        assert calls == []  # nothing written: the final syncfs alone is cheaper
        flush.wrote(60)
        flush.join()
        assert calls == []  # below `every`
        flush.start()
        flush.join()
        assert calls == [str(tmp_path)]
        flush.wrote(100)  # crosses `every`
    assert calls == [str(tmp_path)] * 2


def test_widen_pipe_grows_a_pipe_and_leaves_anything_else_alone(tmp_path):
    import fcntl
    import io

    from fimio.store import fsutil

    r, w = os.pipe()
    with os.fdopen(r, "rb") as reader, os.fdopen(w, "wb") as writer:
        assert fcntl.fcntl(r, fcntl.F_GETPIPE_SZ) == 64 << 10  # Linux's default
        fsutil.widen_pipe(reader, 256 << 10)
        assert fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) == 256 << 10  # one buffer, both ends
        fsutil.widen_pipe(reader, 128 << 10)
        assert fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) == 256 << 10  # never shrunk
        with open(tmp_path / "f", "wb") as f:
            fsutil.widen_pipe(f)  # a file: nothing to do, no error
        fsutil.widen_pipe(io.BytesIO())  # no descriptor at all: the same
        fsutil.widen_pipe(None)
        closed = open(tmp_path / "f", "rb")
        closed.close()
        fsutil.widen_pipe(closed)
        writer.write(b"x")


def test_early_flush_writer_reports_what_it_writes(tmp_path, monkeypatch):
    import io

    from fimio.store import fsutil

    calls = []
    monkeypatch.setattr(fsutil, "syncfs", lambda path: calls.append(path))
    out = io.BytesIO()
    with fsutil.EarlyFlush(str(tmp_path), every=100, minimum=50) as flush:
        w = flush.writer(out)
        w.write(b"x" * 60)
        w.write(memoryview(b"y" * 60))  # 120 bytes: crosses `every`
    assert out.getvalue() == b"x" * 60 + b"y" * 60
    assert flush.written == 120 and calls == [str(tmp_path)]
