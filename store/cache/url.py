"""Cache URLs and the backend registry.

Accepted forms (``spec/cache.md`` §URLs); anything else is a UsageError (exit 2):

* ``file:///absolute/dir`` (``file://localhost/dir`` too)
* ``http://host[:port][/prefix]``, ``https://…`` -- ``fimio serve`` or any static file server
* ``s3://bucket[/prefix][?endpoint=URL&region=NAME]`` -- any S3-compatible service

Each scheme has one parser that rejects what it does not own; :func:`open_backend` picks
the backend by scheme, importing its library only then.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field

from ..errors import UsageError

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class CacheURL:
    """A parsed cache URL. ``text`` is the normalised form used in messages and token lookup."""

    scheme: str
    text: str
    location: str  # file: the directory; http(s): the base URL; s3: the key prefix
    bucket: str | None = None
    params: dict = field(default_factory=dict, compare=False)

    def __str__(self) -> str:
        return self.text


def _bad(text: str, why: str) -> UsageError:
    return UsageError(f"bad cache URL '{_without_credentials(text)}': {why}",
                      "use file:///dir, http(s)://host:port or s3://bucket/prefix?endpoint=…&region=…")


def _without_credentials(text: str) -> str:
    """``text`` with any ``user:password@`` of its authority shown as ``…@``: an error line
    ends up in CI logs."""
    scheme, sep, rest = text.partition("://")
    authority, slash, path = rest.partition("/")
    if not sep or "@" not in authority:
        return text
    return f"{scheme}://…@{authority.rpartition('@')[2]}{slash}{path}"


def _parse_file(text: str, u) -> CacheURL:
    if u.netloc not in ("", "localhost") or not u.path.startswith("/"):
        raise _bad(text, "a file URL needs an absolute path (file:///dir)")
    if u.query or u.fragment:
        raise _bad(text, "file URLs take no parameters")
    path = urllib.parse.unquote(u.path).rstrip("/") or "/"
    if "/../" in path + "/" or "/./" in path + "/":
        raise _bad(text, "the path must be normalised")
    return CacheURL("file", f"file://{path}", path)


def _parse_http(text: str, u) -> CacheURL:
    if not u.hostname:
        raise _bad(text, "no host")
    try:
        u.port  # noqa: B018 -- raises on a bad port
    except ValueError:
        raise _bad(text, "bad port") from None
    if u.query or u.fragment or u.username or u.password:
        raise _bad(text, "put tokens in the config file, not in the URL; no query or fragment")
    base = f"{u.scheme}://{u.netloc}{u.path.rstrip('/')}"
    return CacheURL(u.scheme, base, base)


_S3_PARAMS = {"endpoint", "region"}


def _parse_s3(text: str, u) -> CacheURL:
    bucket = u.netloc
    if "@" in bucket:
        raise _bad(text, "credentials go in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
                         "not in the URL")
    if not _BUCKET_RE.fullmatch(bucket or ""):
        raise _bad(text, f"'{bucket}' is not a valid bucket name")
    params = {}
    for key, values in urllib.parse.parse_qs(u.query, keep_blank_values=True, strict_parsing=False).items():
        if key not in _S3_PARAMS:
            raise _bad(text, f"unknown parameter '{key}'")
        if len(values) != 1 or not values[0]:
            raise _bad(text, f"parameter '{key}' needs exactly one value")
        params[key] = values[0]
    if "endpoint" in params:
        e = urllib.parse.urlsplit(params["endpoint"])
        if e.scheme not in ("http", "https") or not e.hostname:
            raise _bad(text, "endpoint must be an http(s) URL")
    prefix = u.path.strip("/")
    if "//" in prefix or ".." in prefix.split("/"):
        raise _bad(text, "bad key prefix")
    return CacheURL("s3", text, prefix, bucket, params)


_PARSERS = {"file": _parse_file, "http": _parse_http, "https": _parse_http, "s3": _parse_s3}


def parse_cache_url(text: str) -> CacheURL:
    """Parse and validate a cache URL; UsageError (exit 2) when it is not one we accept."""
    if not isinstance(text, str) or not text or any(c.isspace() for c in text):
        raise _bad(str(text), "empty or contains spaces")
    u = urllib.parse.urlsplit(text)
    parser = _PARSERS.get(u.scheme.lower())
    if parser is None:
        raise _bad(text, f"unknown scheme '{u.scheme}'" if u.scheme else "no scheme")
    return parser(text, u)


def open_backend(url: str | CacheURL, token: str | None = None):
    """The backend for ``url``. ``token``: the bearer token for http(s) caches (else ignored)."""
    cu = url if isinstance(url, CacheURL) else parse_cache_url(url)
    if cu.scheme == "file":
        from .filebackend import FileBackend

        return FileBackend(cu.text, cu.location)
    if cu.scheme in ("http", "https"):
        from .backend import HttpBackend

        return HttpBackend(cu.text, token)
    from .backend import s3_backend

    return s3_backend(cu.text, cu.bucket, cu.location, cu.params)


def offline_usable(urls, note) -> list[str]:
    """The caches an offline command may read (``file://``, in any letter case); the others,
    which it must not even connect to (spec/offline.md), are named to ``note(message)``.
    UsageError for a URL that is no cache URL at all."""
    local = {u: parse_cache_url(u).scheme == "file" for u in urls}  # a malformed URL: exit 2, as online
    dropped = [u for u, ok in local.items() if not ok]
    if dropped:
        note(f"offline: not using {', '.join(dropped)}")
    return [u for u, ok in local.items() if ok]


def open_with_config(url: str, config=None):
    """:func:`open_backend` with the token the config (or FIMIO_TOKEN) gives for ``url``."""
    cu = parse_cache_url(url)
    if config is not None and getattr(config, "offline", False) and cu.scheme != "file":
        from ..prefetch import refuse_network

        refuse_network(cu.text, "offline = true in the config file")
    token = config.token_for(cu.text) if config is not None and cu.scheme in ("http", "https") else None
    if token is None and cu.scheme in ("http", "https"):
        import os

        token = os.environ.get("FIMIO_TOKEN") or None
    return open_backend(cu, token)
