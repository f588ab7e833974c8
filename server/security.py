"""The edge: who may ask, what a request may be and where its media may come from.

- `Host` (421): bound to a loopback address, the server answers only requests addressed to this machine's own
  names (`localhost`, `127.0.0.1`, `[::1]`, `--host`) and `--allowed-hosts`, so that a web page whose name is made
  to resolve to 127.0.0.1 (DNS rebinding) cannot read its answers.
- `--api-key`: every request but the page, /health and /metrics needs `Authorization: Bearer KEY` (401 otherwise).
- Bodies are `application/json` (415 otherwise: a browser posts `text/plain` to any site without asking first);
  body size (413), the question's bytes, images (or frames) per request, pixels per image and what a request's
  decoding may cost (400, `decoding`: max_tokens, num_beams, top_k): limits checked before the work they bound.
- Media: `data:` URLs always; `file://` URLs and plain paths only with `--media-root DIR`, and only when the path,
  symlinks followed and `..` resolved, lies inside DIR (403 otherwise); http(s) URLs only with
  `--allow-http-urls` (403 otherwise), fetched by server/fetch.py.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request

from configs.decoding import request_limits
from server.errors import APIError, error_response
from server.fetch import Fetcher

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 64 * 2**20
    max_images: int = 32  # image_url parts in one message; frames in a .json frame list
    max_question_bytes: int = 64 * 2**10  # UTF-8 bytes of the question's text
    max_pixels: int = 4096 * 4096  # width x height of one image or frame, read from its header
    decoding: dict = field(default_factory=request_limits)  # {request field: the largest value a request may ask}
    queue_size: int = 256
    request_timeout: float = 600.0
    media_root: Path | None = None  # resolved (realpath) when set
    fetcher: Fetcher | None = None  # http(s) URLs are fetched only with one (--allow-http-urls)
    api_key: str | None = None
    allowed_hosts: frozenset[str] | None = None  # Host names answered (lower case, no port); None: any
    cors_origins: tuple[str, ...] = ()

    @property
    def hidden_folders(self) -> tuple[str, ...]:
        """The server's own folders that error messages must not show (server.errors): the media root."""
        return (str(self.media_root),) if self.media_root else ()


def check_key(request: Request, limits: Limits) -> None:
    """401 unless the request carries `Authorization: Bearer <--api-key>` (when the server has a key)."""
    if limits.api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if not token:
        raise APIError(401, "this server needs an API key: send the header 'Authorization: Bearer KEY'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), limits.api_key.encode()):
        raise APIError(401, "incorrect API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def check_json(request: Request) -> None:
    """415 unless the body is declared JSON: the content types a browser may post to any site without asking it
    first (text/plain, forms) are not parsed."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise APIError(415, f"the body must be JSON sent with 'Content-Type: application/json', got "
                            f"{kind[:100] or 'no content type'!r}", code="unsupported_media_type")


def host_name(host: str) -> str:
    """The name in a Host header: lower case, without the port, the brackets of an IPv6 address or a final dot."""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


class HostCheck:
    """ASGI middleware: 421 for a request whose Host is not one of the names the server answers for."""

    def __init__(self, app, allowed: frozenset[str], metrics=None):
        self.app, self.allowed, self.metrics = app, allowed, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if host_name(host) not in self.allowed:
                error = APIError(421, f"this server does not answer requests for the host {host[:100]!r} "
                                      f"(--allowed-hosts adds names)", code="host_not_allowed")
                return await error_response(error, self.metrics)(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` gets 413, by its Content-Length before it is read, or as soon as
    the bytes received pass the limit."""

    def __init__(self, app, max_bytes: int, metrics=None):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    def too_large(self) -> APIError:
        return APIError(413, f"the request body is over the server's limit of {self.max_bytes} bytes "
                             f"(--max-body-mb)", code="request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await error_response(self.too_large(), self.metrics)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self.too_large()
            return message

        await self.app(scope, counted, send)


@dataclass
class Source:
    """Where one media value comes from: its bytes (a data: or http URL) or a file inside the media root."""

    data: bytes | None = None
    path: str | None = None
    mime: str | None = None


def locate(url: str, limits: Limits, param: str) -> Source:
    """The bytes or the file of a media URL, or APIError (400 malformed, 403 not allowed here)."""
    if url.startswith("data:"):
        return _data_url(url, param)
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        if limits.fetcher is None:
            raise APIError(403, "http(s) URLs are not fetched by this server: send the media as a data: URL "
                                "(or start it with --allow-http-urls)", param)
        return Source(data=limits.fetcher.fetch(url, param))
    if scheme == "file":
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise APIError(400, f"file:// URLs name no host, got {parts.netloc!r}", param)
        return Source(path=inside_media_root(urllib.parse.unquote(parts.path), limits, param))
    if len(scheme) > 1:  # "c:" of a Windows path is not a scheme
        raise APIError(400, f"unsupported URL scheme {scheme!r}: use a data: URL", param)
    return Source(path=inside_media_root(url, limits, param))


def inside_media_root(path: str, limits: Limits, param: str) -> str:
    """The real path of `path` (relative paths: to the media root) if it lies inside the media root."""
    if limits.media_root is None:
        raise APIError(403, "file paths and file:// URLs are refused: this server takes data: URLs (start it with "
                            "--media-root DIR to allow files inside DIR)", param)
    try:
        real = Path(os.path.realpath(limits.media_root / path))
        inside = real.is_relative_to(limits.media_root)
        found = inside and real.is_file()
    except OSError as err:  # a name too long, ...: its message would show the server's own folders
        raise APIError(400, f"not a usable path ({err.strerror or type(err).__name__})", param) from None
    except ValueError as err:  # a NUL byte, an unencodable character
        raise APIError(400, f"not a usable path ({err})", param) from None
    if not inside:
        raise APIError(403, "the path is outside the server's media root", param)
    if not found:
        raise APIError(400, f"no such file in the media root: {path[:200]}", param)
    return str(real)


def _data_url(url: str, param: str) -> Source:
    header, comma, payload = url[len("data:"):].partition(",")
    if not comma or not header.endswith(";base64"):
        raise APIError(400, "a data: URL must be base64, as in data:image/png;base64,...", param)
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise APIError(400, f"the data: URL is not valid base64 ({err})", param) from None
    return Source(data=data, mime=header[:-len(";base64")].split(";")[0].lower() or None)
