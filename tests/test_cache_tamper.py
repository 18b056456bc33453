"""A hostile or damaged cache: every kind of tampering is refused with exit 4 and nothing is
registered (spec/cache.md §Verification). Also: a substitution killed at any moment leaves
nothing half-valid."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time

import pytest
import zstandard

from cachefixtures import StaticServer, make_keys, write_config
from conftest import assert_one_error_line, fimio_env, fimio_executable, run_fimio
from fimio.store.cache.push import Pusher
from fimio.store.cache.url import open_backend
from fimio.store.local import LocalStore
from test_cache_contract import make_tree

STORE_DIR = "/fimio/store"


class Setup:
    def __init__(self, tmp_path, key=True, small=60, large=(2 << 20,), more=0):
        """A cache holding a tree, a one-file path and ``more`` other one-file paths (all
        copied by :meth:`copy`)."""
        self.tmp = tmp_path
        self.cache = tmp_path / "cache"
        self.url = f"file://{self.cache}"
        a = LocalStore(str(tmp_path / "A"), STORE_DIR)
        self.tree = a.add_path(str(make_tree(tmp_path / "src", small=small, large=large)), "tree")
        (tmp_path / "one.txt").write_bytes(b"one\n")
        self.one = a.add_path(str(tmp_path / "one.txt"))
        self.more = []
        for i in range(more):
            (tmp_path / f"more{i}.txt").write_text(f"more {i}\n")
            self.more.append(a.add_path(str(tmp_path / f"more{i}.txt")))
        self.sk, self.pk = make_keys()
        Pusher(a, open_backend(self.url), [self.sk] if key else []).push(
            [self.tree.path, self.one.path, *(p.path for p in self.more)])
        a.close()
        self.config = write_config(tmp_path / "config.toml", trusted=[self.pk])
        self.b = tmp_path / "B"
        self.n = 0

    def copy(self, path=None, url=None, *extra):
        """Copy into a fresh store (a store that already holds some blobs would not need
        to download, and so would never see, a damaged object that holds only those)."""
        paths = [path] if path else [self.tree.path, self.one.path, *(p.path for p in self.more)]
        self.n += 1
        self.b = self.tmp / f"B{self.n}"
        return run_fimio(["copy", "--from", url or self.url, *extra, *(f"{STORE_DIR}/{p.base}" for p in paths)],
                         self.b, env={"FIMIO_CONFIG": self.config})

    def objects(self, kind):
        d = self.cache / kind
        return sorted(str(p) for p in d.rglob("*.zst"))

    def info_file(self, path=None):
        return self.cache / "info" / f"{(path or self.tree.path).hash_part}.json"

    def assert_nothing_registered(self):
        s = LocalStore(str(self.b), STORE_DIR)
        try:
            assert s.all_paths() == []
            assert [e for e in os.listdir(s.store) if e != ".links"] == []
            assert os.listdir(s.tmp) == []
        finally:
            s.close()


@pytest.fixture
def setup(tmp_path):
    return Setup(tmp_path)


def _flip(path, offset=None):
    data = bytearray(open(path, "rb").read())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x40
    with open(path, "wb") as f:
        f.write(data)


def _same_content(original: bytes, damaged: bytes) -> bool:
    """True when a flipped bit is immaterial: the frame still decodes to the same bytes."""
    try:
        return zstandard.ZstdDecompressor().decompress(damaged, max_output_size=64 << 20) == \
            zstandard.ZstdDecompressor().decompress(original)
    except zstandard.ZstdError:
        return False


@pytest.mark.parametrize("kind", ["packs", "chunks", "trees"])
def test_flipped_byte_in_any_object(setup, kind):
    objects = setup.objects(kind)
    assert objects
    refused = 0
    for offset in (None, 5, -1):  # middle, frame header, last byte
        for obj in objects:
            original = open(obj, "rb").read()
            _flip(obj, offset if offset is None or offset >= 0 else len(original) - 1)
            proc = setup.copy()
            if proc.returncode == 0:
                # only acceptable when the flip did not change a byte of content (a don't-care
                # bit of the zstd frame): every byte that reaches the store was checked
                assert _same_content(original, open(obj, "rb").read()), proc.stderr
                s = LocalStore(str(setup.b), STORE_DIR)
                assert s.verify(check_contents=True) == []
                s.close()
            else:
                assert_one_error_line(proc, 4)
                setup.assert_nothing_registered()
                refused += 1
            with open(obj, "wb") as f:
                f.write(original)
    assert refused >= 2 * len(objects)
    assert setup.copy().returncode == 0


def test_flipped_byte_in_info(setup):
    info = setup.info_file()
    text = info.read_text()
    record = json.loads(text)
    record["size"] += 1
    info.write_text(json.dumps(record))
    assert_one_error_line(setup.copy(), 4, "no signature by a trusted key")
    setup.assert_nothing_registered()
    info.write_text(text.replace('"ca":"source"', '"ca":"sourcX"'))
    assert_one_error_line(setup.copy(), 4)
    setup.assert_nothing_registered()


def test_swapped_info(setup):
    setup.info_file().write_bytes(setup.info_file(setup.one.path).read_bytes())
    assert_one_error_line(setup.copy(), 4, "not the path asked for")
    setup.assert_nothing_registered()


def test_manifest_of_another_path(setup):
    """The manifest digest is not signed; a swapped one must still be caught (Merkle root)."""
    info, other = json.loads(setup.info_file().read_text()), json.loads(setup.info_file(setup.one.path).read_text())
    info["manifest"] = other["manifest"]
    setup.info_file().write_text(json.dumps(info))
    assert_one_error_line(setup.copy(), 4, "does not match the signed root digest")
    setup.assert_nothing_registered()


def test_untrusted_signer(tmp_path):
    s = Setup(tmp_path)
    write_config(tmp_path / "config.toml", trusted=[make_keys("other-1")[1]])
    assert_one_error_line(s.copy(), 4, "no signature by a trusted key")
    s.assert_nothing_registered()


def test_unsigned_refused_unless_sigs_not_required(tmp_path):
    s = Setup(tmp_path, key=False)
    assert_one_error_line(s.copy(), 4, "no signature")
    s.assert_nothing_registered()
    assert s.copy(None, None, "--no-check-sigs").returncode == 0
    write_config(tmp_path / "config.toml", require_sigs=False)
    assert s.copy().returncode == 0


def test_truncated_objects(setup):
    for obj in setup.objects("packs") + setup.objects("chunks") + setup.objects("trees"):
        original = open(obj, "rb").read()
        with open(obj, "wb") as f:
            f.write(original[: len(original) // 2])
        assert_one_error_line(setup.copy(), 4)
        setup.assert_nothing_registered()
        with open(obj, "wb") as f:
            f.write(original)


def test_truncated_object_through_http(setup):
    srv = StaticServer(setup.cache)
    try:
        pack = setup.objects("packs")[0]
        with open(pack, "r+b") as f:
            f.truncate(os.path.getsize(pack) - 10)
        assert_one_error_line(setup.copy(None, srv.url), 4)
        setup.assert_nothing_registered()
    finally:
        srv.stop()


def test_lying_manifest_size(setup):
    info = json.loads(setup.info_file().read_text())
    for lie in (info["manifest"]["size"] - 1, info["manifest"]["size"] * 1000):
        info["manifest"]["size"] = lie
        setup.info_file().write_text(json.dumps(info))
        assert_one_error_line(setup.copy(), 4)
        setup.assert_nothing_registered()


def test_decompression_bomb_is_refused_before_allocating(setup):
    """A frame declaring far more than the manifest implies is refused unread."""
    pack = setup.objects("packs")[0]
    with open(pack, "wb") as f:
        f.write(zstandard.ZstdCompressor(level=19).compress(b"\0" * (256 << 20)))
    proc = setup.copy()
    assert_one_error_line(proc, 4, "declares")
    setup.assert_nothing_registered()


def test_oversized_object_is_refused_unread(setup):
    chunk = setup.objects("chunks")[0]
    with open(chunk, "ab") as f:
        f.write(os.urandom(1 << 20))
    assert_one_error_line(setup.copy(), 4, "more than")
    setup.assert_nothing_registered()


def test_missing_object_is_an_integrity_failure(setup):
    os.unlink(setup.objects("packs")[-1])
    assert_one_error_line(setup.copy(), 4, "lacks")
    setup.assert_nothing_registered()


def test_missing_reference_means_not_obtainable(tmp_path):
    s = Setup(tmp_path)
    a = LocalStore(str(tmp_path / "A"), STORE_DIR)
    top = a.add_text("top", s.tree.path.logical(STORE_DIR).encode(), [s.tree.path])
    Pusher(a, open_backend(s.url), [s.sk]).push([top.path])
    a.close()
    os.unlink(s.info_file())  # the reference's commit point is gone: top is not obtainable
    assert_one_error_line(s.copy(top.path), 5, "without what it refers to", s.tree.path.logical(STORE_DIR))
    s.assert_nothing_registered()


def test_kill_during_substitution_leaves_nothing_half_valid(tmp_path):
    s = Setup(tmp_path, small=400, large=(6 << 20, 3 << 20))
    rnd = random.Random(7)
    for i in range(6):
        root = tmp_path / f"K{i}"
        env = fimio_env(root, {"FIMIO_CONFIG": s.config})
        proc = subprocess.Popen([fimio_executable(), "copy", "--from", s.url, f"{STORE_DIR}/{s.tree.path.base}"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rnd.uniform(0.05, 0.8))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        store = LocalStore(str(root), STORE_DIR)
        try:
            for info in store.all_paths():
                store.closure([info.path])  # every valid path has its whole closure
            assert store.verify(check_contents=True) == []
        finally:
            store.close()


@pytest.mark.parametrize("forked", [False, True], ids=["in-process", "worker-processes"])
def test_packs_are_checked_whether_unpacked_here_or_in_workers(setup, monkeypatch, forked):
    """Large substitutions unpack packs in forked workers (store/forkpool.py); a damaged
    pack must be refused there exactly as in-process, and a good one give the same tree."""
    from fimio.store.cache import fetch
    from fimio.store.cache.substitute import SubstituterSet
    from fimio.store.errors import IntegrityError

    monkeypatch.setattr(fetch, "_FORK_MIN_BYTES", 0 if forked else 1 << 62)
    started = []
    real_pool = fetch.ForkPool
    monkeypatch.setattr(fetch, "ForkPool", lambda fn: started.append(fn) or real_pool(fn))

    def substitute(label):
        store = LocalStore(str(setup.tmp / label), STORE_DIR)
        try:
            with SubstituterSet(store, [setup.url], [setup.pk]) as subs:
                return store, subs.substitute([setup.tree.path])
        except BaseException:
            store.close()
            raise

    (pack,) = setup.objects("packs")[:1]
    original = open(pack, "rb").read()
    _flip(pack)
    assert not _same_content(original, open(pack, "rb").read())
    with pytest.raises(IntegrityError):
        substitute("bad")
    bad = LocalStore(str(setup.tmp / "bad"), STORE_DIR)
    assert bad.all_paths() == [] and os.listdir(bad.tmp) == []
    bad.close()
    with open(pack, "wb") as f:
        f.write(original)

    store, got = substitute("good")
    try:
        assert got == {setup.tree.path}
        assert store.info(setup.tree.path).root == setup.tree.root
        assert store.verify(check_contents=True) == []
    finally:
        store.close()
    assert bool(started) == forked


@pytest.mark.parametrize("name", ["lib/deep/f001.txt", "big0.bin", "run.sh"])
def test_a_torn_blob_in_the_local_store_is_fetched_again(setup, name):
    """A ``.links`` name left short by a power cut must not stand for the blob: substitution
    downloads (or copies from the other variant) the right bytes instead."""
    from fimio.store.tree import iter_files

    a = LocalStore(str(setup.tmp / "A"), STORE_DIR)
    try:
        node = dict(iter_files(a.load_tree(setup.tree)))[name.encode()]
    finally:
        a.close()
    b = setup.tmp / "B1"  # the store the next setup.copy() fills
    (setup.tmp / "other.txt").write_bytes(b"so that the store is not empty\n")
    run_fimio(["add", setup.tmp / "other.txt"], b, check=0)
    (b / "store" / ".links" / (node.blob.hex() + ("x" if node.executable else ""))).write_bytes(b"to")
    assert setup.copy().returncode == 0
    assert (b / "store" / setup.tree.path.base / name).read_bytes() == (setup.tmp / "src" / name).read_bytes()
    assert run_fimio(["verify", "--check-contents"], b).returncode == 0


class _LyingQueryServer:
    """Serves a cache directory for GET/HEAD, but answers the batched existence query
    (POST) with ``answer``, raw bytes on the socket."""

    def __init__(self, directory, answer: bytes):
        import functools
        import http.server
        import threading

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.wfile.write(answer)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                     functools.partial(Handler, directory=str(directory)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("answer,code", [
    (b"GARBAGE LINE\r\n\r\n", 6),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{\"missing\":", 6),
    # entries that are no keys are ignored: nothing is missing, so everything is fetched
    (b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 28\r\n\r\n{"missing":[[1],{"a":1},2]}', 0),
], ids=["status-line", "cut-chunked", "not-strings"])
def test_a_bad_answer_to_the_existence_query_is_one_line(tmp_path, answer, code):
    setup = Setup(tmp_path, more=8)  # ten paths: asked about in one batched query, not fetched at once
    server = _LyingQueryServer(setup.cache, answer)
    try:
        proc = setup.copy(None, server.url)
    finally:
        server.stop()
    if code:
        assert_one_error_line(proc, code, "malformed answer")
        setup.assert_nothing_registered()
    else:
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr


def test_a_few_records_are_fetched_without_asking_first(setup):
    """Two paths: their records are fetched at once (a 404 means absent), with no batched
    existence query -- one round trip less; a server that garbles that query is not asked."""
    server = _LyingQueryServer(setup.cache, b"GARBAGE LINE\r\n\r\n")
    try:
        proc = setup.copy(None, server.url)
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stderr


class _StallingServer:
    """Serves a cache directory, but every object body stops after its first KiB until
    :meth:`stop`: a download that hangs mid-transfer. ``stalled`` is set once one does."""

    def __init__(self, directory):
        import functools
        import http.server
        import threading

        self.stalled, self.release = threading.Event(), threading.Event()
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def copyfile(self, source, outputfile):
                if not self.path.endswith(".zst"):
                    return super().copyfile(source, outputfile)
                outputfile.write(source.read(1024))
                outputfile.flush()
                outer.stalled.set()
                outer.release.wait(60)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                     functools.partial(Handler, directory=str(directory)))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def assert_ctrl_c_ends(self, args: list, env: dict) -> None:
        """Run ``fimio ARGS`` until a download from this server stalls, then Ctrl-C it: it must
        end within 5 s, exit 130, ``interrupted`` its last line."""
        # as at a terminal: SIGINT handled, whatever this test run inherited
        proc = subprocess.Popen([fimio_executable(), *map(str, args)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        assert self.stalled.wait(30), proc.communicate()
        time.sleep(0.3)
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert time.monotonic() - start < 5, f"fimio {args[0]} went on after Ctrl-C"
        assert proc.returncode == 130 and err.strip().splitlines()[-1] == "fimio: error: interrupted", err


def test_ctrl_c_during_a_download_stops_at_once_and_registers_nothing(setup):
    server = _StallingServer(setup.cache)
    try:
        server.assert_ctrl_c_ends(["copy", "--from", server.url, f"{STORE_DIR}/{setup.tree.path.base}"],
                                  fimio_env(setup.tmp / "B-int", {"FIMIO_CONFIG": setup.config}))
        setup.b = setup.tmp / "B-int"
        setup.assert_nothing_registered()
    finally:
        server.stop()


def test_a_large_blob_given_up_takes_no_late_chunk(tmp_path):
    """A failed fetch closes its large-blob files while other threads may still be writing
    chunks: a late write must fail, not land in the file that reused the descriptor."""
    from fimio.store.cache.ingest import LargeBlobFile
    from fimio.store.errors import IntegrityError

    store = LocalStore.open(str(tmp_path / "root"))
    try:
        blob = LargeBlobFile(store, b"\x01" * 32, 10)
        fd = blob.fd
        blob.close()
        other = tmp_path / "other"
        with open(other, "wb") as f:
            assert f.fileno() == fd  # the lowest free number: the one just closed
            with pytest.raises(IntegrityError):
                blob.write_at(0, b"late chunk")
            with pytest.raises(IntegrityError):
                blob.publish([False])
        assert other.read_bytes() == b""
    finally:
        store.close()


def test_a_forged_manifest_size_above_the_cap_is_refused_before_anything_is_fetched(tmp_path):
    """The manifest's size is not signed: an info claiming more than 256 MiB (MAX_MANIFEST) is
    refused as it is parsed, before a reader would allocate it."""
    import json

    from fimio.store.cache.layout import RemoteInfo
    from fimio.store.errors import IntegrityError
    from fimio.store.paths import StorePath

    path = StorePath.parse("0" * 32 + "-x")
    info = json.loads(RemoteInfo(path, b"\xaa" * 32, 1, [], b"\xbb" * 32, 100, None, None, []).to_json("/fimio/store"))
    RemoteInfo.parse(json.dumps(info).encode(), "/fimio/store", path.hash_part, "test")  # as written: fine
    info["manifest"]["size"] = 512 << 20  # a manifest of half a GiB: millions of files, or a forgery
    with pytest.raises(IntegrityError, match="manifest size"):
        RemoteInfo.parse(json.dumps(info).encode(), "/fimio/store", path.hash_part, "test")
