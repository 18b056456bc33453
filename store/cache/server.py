"""``fimio serve``: the cache over HTTP (``spec/cache.md`` §Server).

* ``GET``/``HEAD /<key>``: the same URL space as the static layout. The object's existence
  and size are established before any header is sent, so a 200 is never started that
  cannot be finished; bodies are streamed (``sendfile`` for ``file://`` caches).
* ``POST /_api/v1/missing`` ``{"keys": [...]}`` -> ``{"missing": [...]}`` (at most 100,000 keys).
* ``PUT /<key>`` with a write token: bounded size; content-addressed objects (``trees/``,
  ``chunks/``, ``packs/``) are checked against their address before they are published;
  an ``info/`` file is refused (409) unless its manifest is already there, and is published
  only after everything uploaded before it is durable. Objects are never overwritten: a
  PUT of an existing key answers 200 and changes nothing.
* Tokens file: one ``TOKEN read`` or ``TOKEN write`` per line (``#`` comments); ``write``
  implies ``read``. Without a tokens file the server is read-only for everyone; with one,
  reads need a token unless ``anonymous_read``. 401 = no/unknown token, 403 = wrong scope.
* Slow clients: a connection that has not sent a whole request head within ``idle_timeout``
  seconds of connecting (or of its last response) is closed, and a request body that stalls
  that long is answered 408. A handful of clients trickling bytes can hold no handler.
* SIGTERM/SIGINT: stop accepting, finish requests in flight, exit 0.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import os
import re
import signal
import socket
import stat
import sys

from aiohttp import web

from .. import fsutil
from ..errors import IntegrityError, RemoteError, UsageError
from . import packing
from .layout import MAX_MANIFEST, MAX_OBJECT

_KEY_RE = re.compile(
    r"fimio-cache\.json"
    r"|info/[0-9a-df-np-sv-z]{32}\.json"
    r"|realisations/[0-9a-z]{16,128}![A-Za-z0-9+\-._?=]{1,64}\.json"
    r"|(?:trees|chunks|packs)/[0-9a-f]{2}/[0-9a-f]{64}\.zst"
    r"|logs/[0-9a-z]{16,128}\.zst"
    r"|records/[0-9a-z]{16,128}/[0-9A-Za-z_.-]{1,64}\.json"
)
MAX_KEYS = 100_000
MAX_QUERY_BODY = 16 << 20


def load_tokens(path: str) -> dict[str, str]:
    """Parse a tokens file into ``{token: "read"|"write"}``; UsageError on a bad line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise UsageError(f"cannot read tokens file '{path}': {e.strerror}") from None
    tokens = {}
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or parts[1] not in ("read", "write") or len(parts[0]) < 8:
            raise UsageError(f"{path}:{n}: expected 'TOKEN read' or 'TOKEN write' (tokens of 8+ characters)")
        tokens[parts[0]] = parts[1]
    return tokens


class CacheServer:
    def __init__(self, cache_url: str, tokens: dict[str, str] | None = None, anonymous_read: bool = False,
                 max_upload: int = 256 << 20, idle_timeout: float = 60.0):
        from .url import open_backend, parse_cache_url

        self.url = parse_cache_url(cache_url)
        if self.url.scheme not in ("file", "s3"):
            raise UsageError(f"fimio serve serves file:// and s3:// caches, not '{self.url.text}'",
                             "point clients at that server directly")
        self.root = self.url.location if self.url.scheme == "file" else None
        self.backend = None if self.root else open_backend(self.url)
        self.tokens = tokens
        self.anonymous_read = anonymous_read or tokens is None
        self.max_upload = max_upload
        self.idle_timeout = idle_timeout
        if self.root:
            from .filebackend import clean_tmp

            if "write" not in (tokens or {}).values():
                # read-only: it needs to read the directory, and writes nothing there
                if not os.path.isdir(self.root):  # a mistyped or unmounted directory, not a new cache
                    raise RemoteError(f"cache '{self.url.text}' does not exist (no directory '{self.root}')",
                                      "check the path, and that its file system is mounted; a server with "
                                      "write tokens creates it")
            else:
                try:
                    os.makedirs(os.path.join(self.root, ".tmp"), exist_ok=True)
                    writable = os.access(self.root, os.W_OK | os.X_OK)
                except PermissionError:
                    writable = False
                if not writable:  # else every upload would fail later
                    raise RemoteError(f"cache directory '{self.root}' is not writable, and --tokens grants writes",
                                      "serve it as a user who may write there, or without write tokens")
                clean_tmp(self.root)

    # ---- auth -------------------------------------------------------------------------

    def _scope(self, request) -> str | None:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer ") or not self.tokens:
            return None
        given = header[7:].strip()
        for token, scope in self.tokens.items():
            if hmac.compare_digest(token.encode(), given.encode()):
                return scope
        return None

    def _drop_stalled_reader(self, request) -> None:
        """Let the kernel close this connection when what we send stays unacknowledged for
        ``idle_timeout`` (TCP_USER_TIMEOUT, which also bounds zero-window probing): a client
        that stops reading a response can hold neither its handler nor its memory for long."""
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(self.idle_timeout * 1000))
            except (OSError, AttributeError):
                pass  # a platform without it: the slow-reader bound is then the OS's own

    def _require(self, request, want: str) -> None:
        if want == "read" and self.anonymous_read:
            return
        if self.tokens is None:
            raise web.HTTPForbidden(text="this cache is read-only (the server was started without --tokens)\n")
        scope = self._scope(request)
        if scope is None:
            raise web.HTTPUnauthorized(text="a bearer token is required\n", headers={"WWW-Authenticate": "Bearer"})
        if want == "write" and scope != "write":
            raise web.HTTPForbidden(text="this token may only read\n")

    # ---- handlers ---------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_QUERY_BODY, middlewares=[_errors])
        app.router.add_post("/_api/v1/missing", self.missing)
        app.router.add_get("/{key:.+}", self.get)  # also answers HEAD
        app.router.add_route("PUT", "/{key:.+}", self.put)
        return app

    async def get(self, request):
        self._require(request, "read")
        self._drop_stalled_reader(request)
        key = _key(request)
        if self.root:
            path = os.path.join(self.root, key)
            try:
                st = os.stat(path)
            except (FileNotFoundError, NotADirectoryError):
                raise web.HTTPNotFound() from None
            if not stat.S_ISREG(st.st_mode):  # garbage in the cache directory: no object
                raise web.HTTPNotFound()
            return web.FileResponse(path, headers={"Content-Type": _ctype(key)}) if st.st_size else web.Response(
                body=b"", content_type=_ctype(key))
        import obstore

        try:
            if request.method == "HEAD":
                meta, result = await obstore.head_async(self.backend.store, key), None
            else:
                result = await obstore.get_async(self.backend.store, key)
                meta = result.meta
        except FileNotFoundError:
            raise web.HTTPNotFound() from None
        # the size is known before the status line: a 200 we start, we can finish
        resp = web.StreamResponse(headers={"Content-Type": _ctype(key)})
        resp.content_length = meta["size"]
        await resp.prepare(request)
        if result is not None:
            async for chunk in result.stream(min_chunk_size=1 << 20):
                await resp.write(bytes(chunk))
        await resp.write_eof()
        return resp

    async def missing(self, request):
        self._require(request, "read")
        body = await self._read_body(request, MAX_QUERY_BODY)
        try:
            keys = json.loads(body)["keys"]
            if not isinstance(keys, list) or len(keys) > MAX_KEYS or not all(isinstance(k, str) for k in keys):
                raise ValueError
        except (ValueError, KeyError, TypeError, RecursionError):
            raise web.HTTPBadRequest(text=f'expected {{"keys": [at most {MAX_KEYS} strings]}}\n') from None
        if self.root:
            loop = asyncio.get_running_loop()
            absent = await loop.run_in_executor(None, self._missing_files, keys)
        else:
            absent = await self._missing_remote(keys)
        return web.json_response({"missing": absent})

    def _missing_files(self, keys) -> list[str]:
        root = self.root
        return [k for k in keys if not _KEY_RE.fullmatch(k) or not os.path.isfile(os.path.join(root, k))]

    async def _missing_remote(self, keys) -> list[str]:
        import obstore

        sem = asyncio.Semaphore(32)

        async def absent(k):
            if not _KEY_RE.fullmatch(k):
                return True
            async with sem:
                try:
                    await obstore.head_async(self.backend.store, k)
                    return False
                except FileNotFoundError:
                    return True

        flags = await asyncio.gather(*(absent(k) for k in keys))
        return [k for k, f in zip(keys, flags) if f]

    async def put(self, request):
        self._require(request, "write")
        key = _key(request)
        length = request.content_length
        if length is None:
            raise web.HTTPLengthRequired(text="Content-Length is required\n")
        if length > self.max_upload:
            raise web.HTTPRequestEntityTooLarge(max_size=self.max_upload, actual_size=length)
        data = await self._read_body(request, length)
        loop = asyncio.get_running_loop()
        try:
            created = await loop.run_in_executor(None, self._store_object, key, data)
        except IntegrityError as e:
            raise web.HTTPBadRequest(text=f"{e.message}\n") from None
        return web.Response(status=201 if created else 200)

    async def _read_body(self, request, limit: int) -> bytes:
        """The request body, at most ``limit`` bytes (413 beyond). Each read may wait at most
        ``idle_timeout``: a body that stalls is answered 408, and its handler is freed."""
        body = bytearray()
        while True:
            try:
                async with asyncio.timeout(self.idle_timeout):
                    chunk = await request.content.read(1 << 20)
            except TimeoutError:
                raise web.HTTPRequestTimeout(text="the request body stalled\n",
                                             headers={"Connection": "close"}) from None
            if not chunk:
                break
            body += chunk
            if len(body) > limit:
                raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(body))
        if request.content_length is not None and len(body) != request.content_length:
            raise web.HTTPBadRequest(text="the request body is shorter than its Content-Length\n")
        return bytes(body)

    def _store_object(self, key: str, data: bytes) -> bool:
        """Check and publish one uploaded object (runs in a worker thread)."""
        _check_upload(key, data)
        if key.startswith("info/"):
            manifest = _manifest_key(data)
            if manifest is None:
                raise IntegrityError("an info file needs a manifest digest")
            if not self._exists(manifest):
                raise web.HTTPConflict(text=f"upload '{manifest}' before the info that names it\n")
        if self.root is None:
            return self.backend.put(key, data)
        final = os.path.join(self.root, key)
        if os.path.isfile(final):
            return False
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.makedirs(os.path.join(self.root, ".tmp"), exist_ok=True)  # the directory may have been emptied
        tmp = os.path.join(self.root, ".tmp", f"{os.getpid()}-{os.urandom(8).hex()}")
        try:  # the temp file goes whatever fails (a full disk would otherwise keep it full)
            with open(tmp, "xb") as f:
                f.write(data)
                if key.startswith(("info/", "realisations/")):
                    os.fsync(f.fileno())
            if key.startswith("info/"):
                fsutil.syncfs(self.root)  # every object uploaded before is durable first
            os.link(tmp, final)
            return True
        except FileExistsError:
            if not os.path.isfile(final):
                raise OSError(errno.EEXIST, f"'{key}' is taken by something that is no object") from None
            return False
        finally:
            fsutil.unlink_if_exists(tmp)

    def _exists(self, key: str) -> bool:
        if self.root:
            return os.path.isfile(os.path.join(self.root, key))
        return self.backend.exists(key)


def _key(request) -> str:
    key = request.match_info["key"]
    if not _KEY_RE.fullmatch(key):
        raise web.HTTPNotFound()
    return key


def _ctype(key: str) -> str:
    return "application/json" if key.endswith(".json") else "application/zstd"


def _manifest_key(data: bytes) -> str | None:
    try:
        digest = json.loads(data)["manifest"]["digest"]
        hexpart = digest[7:] if digest.startswith("blake3:") else digest
        bytes.fromhex(hexpart)
        return f"trees/{hexpart[:2]}/{hexpart}.zst" if len(hexpart) == 64 else None
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None


def _check_upload(key: str, data: bytes) -> None:
    """Refuse content that does not match its address (a bad object would stay forever)."""
    if key.endswith(".json"):
        try:
            if not isinstance(json.loads(data), dict):
                raise ValueError
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise IntegrityError(f"'{key}' is not a JSON object") from None
        return
    kind = key.split("/", 1)[0]
    if kind not in ("trees", "chunks", "packs"):
        return
    import zstandard

    try:
        raw_size = zstandard.frame_content_size(data)
    except zstandard.ZstdError:
        raise IntegrityError(f"'{key}' is not a zstd frame") from None
    limit = MAX_MANIFEST if kind == "trees" else MAX_OBJECT
    if raw_size < 0 or raw_size > limit:
        raise IntegrityError(f"'{key}' has no or too large a content size")
    raw = packing.decompress(data, raw_size, key, whole=True)
    digest = bytes.fromhex(key.rsplit("/", 1)[1][:64])
    if kind == "packs":
        blobs = packing.parse_pack(raw, key)
        if packing.pack_id(blobs) != digest:
            raise IntegrityError(f"'{key}' does not match its address")
    else:
        packing.check_digest(raw, digest, key)


@web.middleware
async def _errors(request, handler):
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except (RemoteError, OSError) as e:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise web.HTTPInsufficientStorage(text="the cache is out of space\n") from None
        print(f"fimio serve: {request.method} {request.path}: {e}", file=sys.stderr, flush=True)
        raise web.HTTPBadGateway(text="the cache's storage failed\n") from None
    except Exception as e:  # never leak internals over HTTP
        print(f"fimio serve: {request.method} {request.path}: internal error: {e!r}", file=sys.stderr, flush=True)
        raise web.HTTPInternalServerError(text="internal error\n") from None


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"bad --listen '{text}'", "expected HOST:PORT, e.g. 127.0.0.1:8080 or [::1]:8080")
    return host.strip("[]") or "127.0.0.1", int(port)


def run(server: CacheServer, host: str, port: int, ready=None) -> None:
    """Serve until SIGTERM/SIGINT. ``ready(url)`` is called once the socket listens."""

    import logging

    logging.getLogger("aiohttp.server").addFilter(_drop_client_gone)

    async def main():
        # keepalive_timeout also bounds the wait for a new connection's first request head
        # (aiohttp >= 3.14.4), and nothing the client trickles in meanwhile extends it. After
        # an error answer, the unread rest of a body is drained no longer than that either.
        runner = web.AppRunner(server.app(), handle_signals=False, access_log=None, shutdown_timeout=10,
                               keepalive_timeout=server.idle_timeout,
                               lingering_time=min(10.0, server.idle_timeout))
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True, backlog=512)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}") from None
        bound = site._server.sockets[0].getsockname()[1]
        if ready:
            ready(f"http://{'[' + host + ']' if ':' in host else host}:{bound}")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(main())


def _drop_client_gone(record) -> bool:
    """A logging filter: a client that went away (a reset, or a stalled reader whose
    connection the kernel timed out, see CacheServer._drop_stalled_reader) is no server error
    worth a traceback on stderr."""
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, (ConnectionError, TimeoutError))
