"""The object-store interface every cache backend implements, and the obstore-based backends.

A backend is a flat key space of immutable objects (``spec/cache.md`` §Layout). Keys are
relative paths such as ``info/<hash>.json``; callers never see the URL scheme.

Contract of every backend:

* ``get(key, max_size)`` returns the bytes, or None when the object does not exist; an object
  larger than ``max_size`` raises IntegrityError before its body is read.
* ``put(key, data)`` creates the object unless it exists; it never overwrites. Returns True
  when this call wrote it.
* ``missing(keys)`` returns the subset of ``keys`` that do not exist (batched where the
  backend can: one request per 10,000 keys on ``fimio serve``).
* ``barrier()`` makes every object put so far durable before any later put becomes visible
  (the ``info/`` commit point relies on it).
* Transport failures raise RemoteError (exit 6): unreachable, refused, 401/403 (with a hint
  about tokens), bucket missing.
"""

from __future__ import annotations

import json
import re

from ..errors import IntegrityError, RemoteError
from ..threadpool import ThreadPool

_STATUS_RE = re.compile(r"status code: (\d{3})")
_TOKEN_HINT = "set a token for this URL under [tokens] in the config file, or FIMIO_TOKEN"


class Backend:
    """Base class: subclasses implement ``get``, ``put``, ``exists``; the rest has defaults."""

    url: str = ""
    #: True when the backend is a ``fimio serve`` that answers the batched missing query.
    smart = False

    def get(self, key: str, max_size: int) -> bytes | None:
        raise NotImplementedError

    def put(self, key: str, data: bytes) -> bool:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def missing(self, keys) -> set[str]:
        """The keys that do not exist. Default: parallel existence checks."""
        keys = list(dict.fromkeys(keys))
        if len(keys) <= 1:
            return {k for k in keys if not self.exists(k)}
        with ThreadPool(max_workers=16) as pool:
            present = list(pool.map(self.exists, keys))
        return {k for k, p in zip(keys, present) if not p}

    def barrier(self) -> None:
        """Order point: objects put before are durable before objects put after become visible."""

    def check_there(self) -> None:
        """RemoteError if the cache itself is not there (rather than there and empty)."""

    def close(self) -> None:
        pass


def too_big(url: str, key: str, size: int, max_size: int) -> IntegrityError:
    return IntegrityError(f"object '{key}' in cache '{url}' is {size} bytes, more than the {max_size} declared",
                          "the cache is corrupt or hostile", expected=max_size, got=size)


def map_error(url: str, key: str, e: Exception, writing: bool = False, status: int | None = None) -> Exception:
    """Turn an obstore exception (or, with its ``status``, an HTTP error) into a FimioError
    with one line of text."""
    from obstore.exceptions import PermissionDeniedError, UnauthenticatedError

    text = str(e)
    if status is None:
        m = _STATUS_RE.search(text)
        status = int(m.group(1)) if m else None
    verb = "upload" if writing else "read"
    if isinstance(e, (PermissionDeniedError, UnauthenticatedError)) or status in (401, 403):
        if not url.startswith("http"):
            hint = "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        elif status == 403 and writing and "read-only" in text:
            hint = "the server is read-only: start 'fimio serve' with --tokens, and push with a write token"
        elif status == 403 and writing:
            hint = "the token lacks write rights: use one marked 'write' in the server's tokens file"
        else:
            hint = _TOKEN_HINT
        return RemoteError(f"cache '{url}' refused to let us {verb} '{key}' (HTTP {status or 403})", hint)
    if "NoSuchBucket" in text:
        return RemoteError(f"the bucket of cache '{url}' does not exist", "create it first")
    if status is not None:
        hint = {413: "raise the server's --max-upload", 507: "the cache's disk is full"}.get(status, "check the server's log")
        return RemoteError(f"cache '{url}' answered HTTP {status} for '{key}'", hint)
    first = text.splitlines()[0] if text else type(e).__name__
    if "error sending request" in text or "connect" in text.lower():
        return RemoteError(f"cannot reach cache '{url}'", "is the server running and the URL right?")
    return RemoteError(f"cache '{url}' failed: {first[:200]}")


class ObstoreBackend(Backend):
    """A backend over an ``obstore`` store (S3, HTTP)."""

    def __init__(self, url: str, store):
        self.url = url
        self.store = store

    def get(self, key: str, max_size: int) -> bytes | None:
        import obstore

        try:
            result = obstore.get(self.store, key)
            size = result.meta["size"]
            if size > max_size:
                raise too_big(self.url, key, size, max_size)
            data = bytes(result.bytes())
        except FileNotFoundError as e:
            if "NoSuchBucket" in str(e):
                raise map_error(self.url, key, e) from None
            return None
        except obstore.exceptions.BaseError as e:
            raise map_error(self.url, key, e) from None
        if len(data) > max_size:
            raise too_big(self.url, key, len(data), max_size)
        return data

    def exists(self, key: str) -> bool:
        import obstore

        try:
            obstore.head(self.store, key)
            return True
        except FileNotFoundError as e:
            if "NoSuchBucket" in str(e):
                raise map_error(self.url, key, e) from None
            return False
        except obstore.exceptions.BaseError as e:
            raise map_error(self.url, key, e) from None

    def put(self, key: str, data: bytes) -> bool:
        import obstore

        try:
            obstore.put(self.store, key, data, mode="create")
            return True
        except obstore.exceptions.AlreadyExistsError:
            return False
        except obstore.exceptions.PreconditionError:
            return False
        except obstore.exceptions.NotSupportedError:
            # an S3 lookalike without conditional PUT: check, then write (a race can at
            # worst rewrite identical content-addressed bytes)
            if self.exists(key):
                return False
            try:
                obstore.put(self.store, key, data)
                return True
            except (obstore.exceptions.BaseError, FileNotFoundError) as e:
                raise map_error(self.url, key, e, writing=True) from None
        except (obstore.exceptions.BaseError, FileNotFoundError) as e:
            raise map_error(self.url, key, e, writing=True) from None


class HttpBackend(ObstoreBackend):
    """An http(s) cache: ``fimio serve`` (batched queries, authenticated PUT) or any static server.

    Whether the server is ``fimio serve`` is found out on the first ``missing`` call: a
    static server answers the POST with 404/405/501 and we fall back to HEAD requests.
    """

    def __init__(self, url: str, token: str | None = None):
        from obstore.store import HTTPStore

        self.base = url.rstrip("/") + "/"
        self.token = token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        store = HTTPStore(self.base, client_options=_client_options(url, headers), retry_config=_RETRY)
        super().__init__(url, store)
        self._smart: bool | None = None

    def put(self, key: str, data: bytes) -> bool:
        # fimio serve refuses overwrites itself (200 for an object it has, 201 for a new one);
        # HTTPStore cannot send If-None-Match nor tell 200 from 201. Where it matters -- the
        # commit points, whose "already there" means another machine published the path or
        # the realisation first -- the PUT is sent here, to read the status.
        if key.startswith(_EXACT_PUT_PREFIXES):
            return self._put_exact(key, data)
        import obstore

        try:
            obstore.put(self.store, key, data)
            return True
        except (obstore.exceptions.BaseError, FileNotFoundError) as e:
            raise map_error(self.url, key, e, writing=True) from None

    def _put_exact(self, key: str, data: bytes) -> bool:
        import http.client
        import urllib.error

        try:
            with self._open(key, data, "PUT", "application/octet-stream") as resp:
                return resp.status == 201
        except urllib.error.HTTPError as e:
            raise map_error(self.url, key, e, writing=True, status=e.code) from None
        except OSError as e:
            raise RemoteError(f"cannot reach cache '{self.url}'", f"{getattr(e, 'reason', e)}") from None
        except http.client.HTTPException as e:
            raise RemoteError(f"cache '{self.url}' sent a malformed answer to the upload of '{key}' "
                              f"({type(e).__name__})") from None

    def _open(self, key: str, data: bytes, method: str, content_type: str):
        """One request with our token, never following a redirect: a token goes to no other
        server (spec/cache.md §1), and a redirect is answered as the HTTP error it is."""
        import urllib.request

        req = urllib.request.Request(self.base + key, data=data, method=method, headers={"Content-Type": content_type})
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        return _no_redirects().open(req, timeout=60)

    def missing(self, keys) -> set[str]:
        keys = list(dict.fromkeys(keys))
        if not keys:
            return set()
        if self._smart is not False:
            out: set[str] = set()
            for i in range(0, len(keys), 10_000):
                batch = self._post_missing(keys[i:i + 10_000])
                if batch is None:
                    break
                out |= batch
            else:
                return out
        return super().missing(keys)

    @property
    def smart(self) -> bool:  # type: ignore[override]
        if self._smart is None:
            self.missing(["fimio-cache.json"])
        return bool(self._smart)

    def _post_missing(self, keys: list[str]) -> set[str] | None:
        import http.client
        import urllib.error

        body = json.dumps({"keys": keys}).encode()
        try:
            with self._open("_api/v1/missing", body, "POST", "application/json") as resp:
                answer = json.loads(resp.read(64 << 20))
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise RemoteError(f"cache '{self.url}' refused the query (HTTP {e.code})", _TOKEN_HINT) from None
            if e.code in (400, 404, 405, 501) or 300 <= e.code < 400:
                self._smart = False  # a static file server (maybe behind a redirect, which HEADs follow)
                return None
            raise RemoteError(f"cache '{self.url}' answered HTTP {e.code} to the missing-objects query") from None
        except (urllib.error.URLError, OSError) as e:
            raise RemoteError(f"cannot reach cache '{self.url}'", f"{getattr(e, 'reason', e)}") from None
        except (ValueError, RecursionError, http.client.HTTPException):
            raise RemoteError(f"cache '{self.url}' sent a malformed answer to the missing-objects query") from None
        missing = answer.get("missing") if isinstance(answer, dict) else None
        if not isinstance(missing, list):
            raise RemoteError(f"cache '{self.url}' sent a malformed answer to the missing-objects query")
        self._smart = True
        wanted = set(keys)
        return {k for k in missing if isinstance(k, str) and k in wanted}


_EXACT_PUT_PREFIXES = ("info/", "realisations/")


def _no_redirects():
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None  # urllib then raises the 3xx as an HTTPError

    return urllib.request.build_opener(NoRedirect)


# Retries hide flaky networks but make "unreachable" take minutes; two quick retries.
_RETRY = {"max_retries": 2, "retry_timeout": __import__("datetime").timedelta(seconds=10)}


def _client_options(url: str, headers: dict | None = None) -> dict:
    opts = {"allow_http": url.startswith("http:"), "connect_timeout": "5s", "timeout": "300s",
            "pool_max_idle_per_host": "32"}
    if headers:
        opts["default_headers"] = headers
    return opts


def s3_backend(url: str, bucket: str, prefix: str, params: dict) -> ObstoreBackend:
    """An ``s3://bucket/prefix?endpoint=…&region=…`` backend. Credentials come from the usual
    AWS_* environment variables; with none set, requests are unsigned (public buckets)."""
    import os

    from obstore.store import S3Store

    kwargs = {}
    if params.get("endpoint"):
        # S3 lookalikes (MinIO, moto, Ceph) expect path-style requests
        kwargs["endpoint"] = params["endpoint"]
        kwargs["virtual_hosted_style_request"] = False
    kwargs["region"] = params.get("region") or os.environ.get("AWS_REGION") or os.environ.get(
        "AWS_DEFAULT_REGION") or "us-east-1"
    if not (os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE")
            or os.environ.get("AWS_WEB_IDENTITY_TOKEN_FILE") or os.environ.get("AWS_CONTAINER_CREDENTIALS_FULL_URI")):
        kwargs["skip_signature"] = True
    store = S3Store(bucket, prefix=prefix or None, client_options=_client_options(params.get("endpoint") or "https:"),
                    retry_config=_RETRY, **kwargs)
    return ObstoreBackend(url, store)
