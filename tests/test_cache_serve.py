"""``fimio serve``: tokens and scopes, checked uploads, the missing query, clean shutdown."""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request

import blake3
import pytest
import zstandard

from cachefixtures import READ_TOKEN, WRITE_TOKEN, Serve, make_keys, write_config, moto_s3  # noqa: F401
from conftest import assert_one_error_line, run_fimio

STORE_DIR = "/fimio/store"


def http(method, url, data=None, token=None):
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture
def world(tmp_path):
    """A store with one added path, a signing key, and a config trusting it."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello\n")
    (src / "b.bin").write_bytes(os.urandom(200_000))
    sk, pk = make_keys()
    (tmp_path / "sk").write_text(str(sk))
    cfg = write_config(tmp_path / "config.toml", trusted=[pk])
    a = tmp_path / "A"
    path = run_fimio(["add", src], a, check=0).stdout.strip()
    return {"tmp": tmp_path, "A": a, "path": path, "key": str(tmp_path / "sk"), "cfg": cfg,
            "logical": f"{STORE_DIR}/{os.path.basename(path)}"}


def push(w, url, token=None):
    env = {"FIMIO_CONFIG": w["cfg"]}
    if token:
        env["FIMIO_TOKEN"] = token
    return run_fimio(["push", url, w["path"], "--key", w["key"]], w["A"], env=env)


def copy(w, url, root, token=None):
    env = {"FIMIO_CONFIG": w["cfg"]}
    if token:
        env["FIMIO_TOKEN"] = token
    return run_fimio(["copy", "--from", url, w["logical"]], w["tmp"] / root, env=env)


def test_tokens_and_scopes(world, tmp_path):
    srv = Serve(f"file://{tmp_path / 'cache'}", tmp_path, tokens={WRITE_TOKEN: "write", READ_TOKEN: "read"})
    try:
        assert_one_error_line(push(world, srv.url), 6, "HTTP 401", "token")
        assert_one_error_line(push(world, srv.url, READ_TOKEN), 6, "HTTP 403", "lacks write rights")
        assert_one_error_line(push(world, srv.url, "wrong-token-123456"), 6, "HTTP 401")
        assert push(world, srv.url, WRITE_TOKEN).returncode == 0
        assert_one_error_line(copy(world, srv.url, "B0"), 6, "HTTP 401")
        assert copy(world, srv.url, "B1", READ_TOKEN).returncode == 0
        assert copy(world, srv.url, "B2", WRITE_TOKEN).returncode == 0  # write implies read
    finally:
        assert srv.stop() == 0


def test_token_from_config_by_url_prefix(world, tmp_path):
    srv = Serve(f"file://{tmp_path / 'cache'}", tmp_path, tokens={WRITE_TOKEN: "write"})
    try:
        sk = open(world["key"]).read()
        from fimio.store.cache.keys import SecretKey

        write_config(world["cfg"], trusted=[str(SecretKey.parse(sk).public_key())], tokens={srv.url: WRITE_TOKEN})
        assert push(world, srv.url).returncode == 0
        assert copy(world, srv.url, "B").returncode == 0
    finally:
        srv.stop()


@pytest.mark.parametrize("key, url, sent", [
    ("http://127.0.0.1:8080", "http://127.0.0.1:8080", True),
    ("http://127.0.0.1:8080/", "http://127.0.0.1:8080", True),  # trailing slashes are no part of it
    ("http://127.0.0.1:8080", "http://127.0.0.1:8080/team/cache/", True),
    ("HTTP://Cache.Example.com/team", "http://cache.example.com/team/cache", True),
    ("http://cache.example.com:80", "http://cache.example.com", True),  # the default port
    ("http://127.0.0.1:808", "http://127.0.0.1:8080", False),  # another port
    ("http://127.0.0.1", "http://127.0.0.1:8080", False),
    ("https://cache.example.com", "https://cache.example.com.evil.org", False),  # another host
    ("http://cache.example.com/team", "http://cache.example.com/teamwork", False),  # whole segments
    ("http://cache.example.com", "https://cache.example.com", False),  # another scheme
])
def test_a_config_token_goes_to_its_own_server_only(key, url, sent, monkeypatch):
    from fimio.store.config import Config

    monkeypatch.delenv("FIMIO_TOKEN", raising=False)
    config = Config()
    config.tokens = {key: "secret-token", "http://other.example.com": "other-token"}
    assert config.token_for(url) == ("secret-token" if sent else None)


def test_the_longest_config_token_path_wins(monkeypatch):
    from fimio.store.config import Config

    monkeypatch.delenv("FIMIO_TOKEN", raising=False)
    config = Config()
    config.tokens = {"http://h:1": "host", "http://h:1/team": "team", "http://h:1/team/cache": "cache"}
    assert [config.token_for(u) for u in ("http://h:1/x", "http://h:1/team/y", "http://h:1/team/cache")] == \
        ["host", "team", "cache"]


def test_anonymous_read(world, tmp_path):
    srv = Serve(f"file://{tmp_path / 'cache'}", tmp_path, tokens={WRITE_TOKEN: "write"}, anonymous_read=True)
    try:
        assert_one_error_line(push(world, srv.url), 6)
        assert push(world, srv.url, WRITE_TOKEN).returncode == 0
        assert copy(world, srv.url, "B").returncode == 0
    finally:
        srv.stop()


def test_without_tokens_the_server_is_read_only(world, tmp_path):
    cache = tmp_path / "cache"
    assert run_fimio(["push", f"file://{cache}", world["path"], "--key", world["key"]], world["A"],
                     env={"FIMIO_CONFIG": world["cfg"]}).returncode == 0
    (tmp_path / "empty").mkdir()
    srv, empty = Serve(f"file://{cache}", tmp_path), Serve(f"file://{tmp_path / 'empty'}", tmp_path)
    try:
        assert_one_error_line(push(world, empty.url, WRITE_TOKEN), 6, "HTTP 403", "the server is read-only")
        assert http("PUT", srv.url + "/logs/" + "a" * 64 + ".zst", b"x")[0] == 403
        assert copy(world, srv.url, "B").returncode == 0
    finally:
        srv.stop()
        empty.stop()


def test_uploads_are_checked_and_never_overwrite(tmp_path):
    cache = tmp_path / "cache"
    srv = Serve(f"file://{cache}", tmp_path, tokens={WRITE_TOKEN: "write"})
    try:
        raw = os.urandom(5000)
        digest = blake3.blake3(raw).hexdigest()
        good = zstandard.ZstdCompressor().compress(raw)
        key = f"chunks/{digest[:2]}/{digest}.zst"
        wrong = f"chunks/{'0' * 2}/{'0' * 64}.zst"
        assert http("PUT", f"{srv.url}/{wrong}", good, WRITE_TOKEN)[0] == 400
        assert not (cache / wrong).exists()
        assert http("PUT", f"{srv.url}/{key}", b"not zstd", WRITE_TOKEN)[0] == 400
        # the right frame with more after it would be unreadable to clients forever
        for extra in (b"junk", good, os.urandom(1 << 20)):
            assert http("PUT", f"{srv.url}/{key}", good + extra, WRITE_TOKEN)[0] == 400
        assert not (cache / key).exists()
        assert http("PUT", f"{srv.url}/{key}", good, WRITE_TOKEN)[0] == 201
        assert http("PUT", f"{srv.url}/{key}", good, WRITE_TOKEN)[0] == 200
        assert (cache / key).read_bytes() == good
        # an info whose manifest is not there yet is refused: readers never see it half-done
        info = {"version": 1, "manifest": {"digest": "blake3:" + "1" * 64, "size": 1}}
        status, _ = http("PUT", f"{srv.url}/info/{'0' * 32}.json", json.dumps(info).encode(), WRITE_TOKEN)
        assert status == 409
        # keys outside the layout do not exist
        assert http("PUT", f"{srv.url}/../etc/passwd", b"x", WRITE_TOKEN)[0] in (400, 404)
        assert http("GET", f"{srv.url}/.tmp/x")[0] in (401, 404)
        assert http("GET", f"{srv.url}/{key}", token=WRITE_TOKEN) == (200, good)
        status, body = http("POST", f"{srv.url}/_api/v1/missing",
                            json.dumps({"keys": [key, wrong, "nonsense"]}).encode(), WRITE_TOKEN)
        assert status == 200 and json.loads(body)["missing"] == [wrong, "nonsense"]
        assert http("POST", f"{srv.url}/_api/v1/missing", b"[1,2]", WRITE_TOKEN)[0] == 400
        deep = b'{"keys":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        assert http("POST", f"{srv.url}/_api/v1/missing", deep, WRITE_TOKEN)[0] == 400
    finally:
        assert srv.stop() == 0


def test_batched_existence_check_of_10000_paths(tmp_path):
    """10,000 info lookups are one request, well under a second on loopback."""
    import time

    from fimio.store.cache.url import open_backend

    cache = tmp_path / "cache"
    (cache / "info").mkdir(parents=True)
    alphabet = "0123456789abcdfghijklmnpqrsvwxyz"
    keys = [f"info/{''.join(alphabet[(i >> (5 * k)) % 32] for k in range(32))}.json" for i in range(10_000)]
    for k in keys[::2]:
        (cache / k).write_text("{}")
    srv = Serve(f"file://{cache}", tmp_path)
    try:
        backend = open_backend(srv.url)
        backend.missing(keys[:1])  # connection set up, server detected as fimio serve
        t = time.perf_counter()
        missing = backend.missing(keys)
        elapsed = time.perf_counter() - t
        assert missing == set(keys[1::2])
        assert backend.smart
        assert elapsed < 1.0, elapsed  # the benchmark holds it to 0.2 s on a quiet machine
    finally:
        srv.stop()


def test_bad_tokens_file_and_listen(tmp_path):
    bad = tmp_path / "tokens"
    bad.write_text("short read\n")
    proc = run_fimio(["serve", "--cache", f"file://{tmp_path}/c", "--tokens", bad], tmp_path / "R")
    assert_one_error_line(proc, 2, "TOKEN read")
    proc = run_fimio(["serve", "--cache", f"file://{tmp_path}/c", "--listen", "nonsense"], tmp_path / "R")
    assert_one_error_line(proc, 2, "--listen")
    proc = run_fimio(["serve", "--cache", "ftp://x"], tmp_path / "R")
    assert_one_error_line(proc, 2, "bad cache URL")
    proc = run_fimio(["serve", "--cache", "http://127.0.0.1:9"], tmp_path / "R")  # not a cache it can serve
    assert_one_error_line(proc, 2, "serves file:// and s3://")


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    """A write that fails (a full disk) must not leave its temporary file to keep it full."""
    import errno

    from fimio.store.cache.server import CacheServer

    server = CacheServer(f"file://{tmp_path / 'cache'}", tokens={WRITE_TOKEN: "write"})

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        server._store_object(f"realisations/{'a' * 32}!out.json", b"{}")
    assert os.listdir(tmp_path / "cache" / ".tmp") == []


def _recv_all(sock, deadline_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes (or ``deadline_s`` passes), and when."""
    start = time.monotonic()
    sock.settimeout(0.2)
    got = b""
    while time.monotonic() - start < deadline_s:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        got += chunk
    return got, time.monotonic() - start


def test_slow_clients_are_cut_off_after_the_idle_timeout(tmp_path):
    cache = tmp_path / "cache"
    srv = Serve(f"file://{cache}", tmp_path, tokens={WRITE_TOKEN: "write"}, extra=("--idle-timeout", "1"))
    host, port = srv.url.removeprefix("http://").split(":")
    try:
        # a request head trickled a byte at a time never completes: closed after ~1 s anyway
        with socket.create_connection((host, int(port))) as s:
            start = time.monotonic()
            head = b"GET /fimio-cache.json HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
            closed = False
            for byte in head:
                try:
                    s.send(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                time.sleep(0.05)
                if time.monotonic() - start > 8:
                    break
            got, _ = _recv_all(s, 8 - (time.monotonic() - start)) if not closed else (b"", 0)
            assert time.monotonic() - start < 6, "the trickling connection was never closed"
            assert not got.startswith(b"HTTP/1.1 200")
        # a connection that says nothing at all is closed too
        with socket.create_connection((host, int(port))) as s:
            got, took = _recv_all(s, 8)
            assert took < 6 and got == b""
        # an upload whose body stalls gets 408, and the object is not stored
        raw = os.urandom(1000)
        digest = blake3.blake3(raw).hexdigest()
        key = f"chunks/{digest[:2]}/{digest}.zst"
        frame = zstandard.ZstdCompressor().compress(raw)
        with socket.create_connection((host, int(port))) as s:
            s.sendall(f"PUT /{key} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {WRITE_TOKEN}\r\n"
                      f"Content-Length: {len(frame)}\r\n\r\n".encode() + frame[:10])
            got, took = _recv_all(s, 8)
            assert got.startswith(b"HTTP/1.1 408") and took < 6
        assert not (cache / key).exists()
        # a prompt client is served as before
        assert http("PUT", f"{srv.url}/{key}", frame, WRITE_TOKEN)[0] == 201
        assert http("GET", f"{srv.url}/{key}")[0] == 401  # reads need a token here
    finally:
        srv.stop()


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_a_client_that_stops_reading_is_cut_off_too(tmp_path, kind, request):
    """Readers that ask for a large object and never read it: their connections are closed
    about the idle timeout after their data stops being acknowledged, so they hold neither
    a handler, a descriptor nor memory for long."""
    if kind == "s3":
        s3 = request.getfixturevalue("moto_s3")
        url = s3.url(f"stall-{os.urandom(3).hex()}")
        from fimio.store.cache.url import open_backend

        put = open_backend(url).put
    else:
        cache = tmp_path / "cache"
        url = f"file://{cache}"

        def put(key, data):
            (cache / key).parent.mkdir(parents=True, exist_ok=True)
            (cache / key).write_bytes(data)
    raw = os.urandom(8 << 20)
    digest = blake3.blake3(raw).hexdigest()
    key = f"chunks/{digest[:2]}/{digest}.zst"
    put(key, zstandard.ZstdCompressor(level=1).compress(raw))
    srv = Serve(url, tmp_path, anonymous_read=True, tokens={WRITE_TOKEN: "write"}, extra=("--idle-timeout", "2"))
    host, port = srv.url.removeprefix("http://").split(":")
    readers = []
    try:
        for _ in range(5):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect((host, int(port)))
            s.sendall(f"GET /{key} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            readers.append(s)
        time.sleep(10)
        still_open = 0
        for s in readers:
            s.setblocking(False)
            try:
                while s.recv(1 << 20):
                    pass
            except BlockingIOError:
                still_open += 1  # nothing more, yet no end: the server holds it open
            except OSError:
                pass  # reset or timed out by the server
        assert still_open == 0, f"{still_open} stalled readers still held open"
        assert http("GET", f"{srv.url}/fimio-cache.json")[0] in (200, 404)  # and the server still serves
    finally:
        for s in readers:
            s.close()
        srv.stop()


def test_a_token_never_follows_a_redirect_to_another_server(monkeypatch):
    """spec/cache.md §1: a client sends its token to no other server. A cache that answers
    every request with a redirect elsewhere: the other server never sees the token."""
    import http.server
    import threading

    from fimio.store.cache.backend import HttpBackend

    seen = []

    class Elsewhere(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            seen.append(self.headers.get("Authorization"))
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = do_POST = do_PUT = _answer

        def log_message(self, *args):
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere)

    class Redirecting(Elsewhere):
        def _answer(self):
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{other.server_port}{self.path}")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = do_POST = do_PUT = _answer

    cache = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirecting)
    for srv in (other, cache):
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.delenv("FIMIO_TOKEN", raising=False)
    try:
        backend = HttpBackend(f"http://127.0.0.1:{cache.server_port}", "secret-token-abcdef")
        try:
            backend.missing([f"info/{c * 32}.json" for c in "abcdefghij"])
        except Exception:
            pass  # however it ends, the token stays here
        try:
            backend.put(f"info/{'a' * 32}.json", b"{}")
        except Exception:
            pass
        assert seen and all(h is None or "secret-token" not in h for h in seen), seen
    finally:
        for srv in (other, cache):
            srv.shutdown()


def test_a_malformed_answer_to_an_upload_is_one_error_not_a_traceback(monkeypatch):
    import socketserver
    import threading

    from fimio.store.cache.backend import HttpBackend
    from fimio.store.errors import RemoteError

    class Garbage(socketserver.BaseRequestHandler):
        def handle(self):
            self.request.recv(65536)
            self.request.sendall(b"garbage\r\n\r\n")

    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Garbage)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        backend = HttpBackend(f"http://127.0.0.1:{srv.server_address[1]}", "secret-token-abcdef")
        with pytest.raises(RemoteError, match="malformed answer"):
            backend.put(f"info/{'a' * 32}.json", b"{}")
    finally:
        srv.shutdown()
        srv.server_close()
