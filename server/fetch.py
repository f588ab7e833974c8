"""Fetching http(s) media URLs (only with --allow-http-urls), so that a URL can neither hold the server up nor make
it reach what it should not:

- one deadline per fetch (`--url-timeout`): resolving, connecting, every redirect and every read share it, so a
  server that trickles its answer a byte at a time is cut off like one that never answers;
- its own bounded pool (`--url-fetch-workers` threads): when every thread is fetching, a request gets 503 at once,
  so slow URLs never hold the threads that read other requests' media; a fetch keeps its thread until it ends;
- every address is checked before it is connected to, on the first request and on every redirect: private,
  loopback, link-local, shared, reserved, unspecified and multicast addresses are refused unless
  `--allow-private-urls`; the connection goes to the very address that was checked, so a name that answers
  differently the second time it is resolved cannot slip by;
- one message for every failure to fetch (refused, reset or timed-out connections, an HTTP error status, a bad
  redirect), so that errors do not tell which ports of a host are open; the server's log says why.

`resolve` and `connect` are the system's (`socket.getaddrinfo`, `socket.create_connection`); tests pass stand-ins.
"""
from __future__ import annotations

import http.client
import ipaddress
import logging
import socket
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable

from server.errors import APIError

log = logging.getLogger("lynx.server")

REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5
READ_SIZE = 64 * 1024


def system_resolve(host: str, port: int) -> list[str]:
    return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def is_public(address: str) -> bool:
    """True for an address on the public internet: not private, loopback, link-local, shared (100.64/10), reserved,
    unspecified or multicast."""
    ip = ipaddress.ip_address(address.split("%")[0])
    return ip.is_global and not ip.is_multicast


class FetchFailed(Exception):
    """Why a fetch failed, for the server's log; the client sees one message for every cause."""


class Fetcher:
    def __init__(self, timeout: float, workers: int, max_bytes: int, allow_private: bool = False,
                 resolve: Callable[[str, int], list[str]] = system_resolve,
                 connect: Callable[..., socket.socket] = socket.create_connection):
        self.timeout, self.max_bytes, self.allow_private = timeout, max_bytes, allow_private
        self.resolve, self.connect = resolve, connect
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lynx-fetch")
        self.slots = threading.BoundedSemaphore(workers)
        self.workers = workers

    def fetch(self, url: str, param: str) -> bytes:
        """The body of `url` (status 200, at most max_bytes), or APIError: 403 refused address, 413 too large,
        503 every fetch thread busy, 400 anything else (one message)."""
        if not self.slots.acquire(blocking=False):
            raise APIError(503, f"the server is already fetching {self.workers} URLs (--url-fetch-workers); "
                                f"try again shortly", param, code="fetch_busy", headers={"Retry-After": "1"})
        deadline = time.monotonic() + self.timeout
        try:
            future = self.pool.submit(self._fetch_in_slot, url, param, deadline)
        except BaseException:
            self.slots.release()
            raise
        try:
            return future.result(timeout=self.timeout + 1)  # the thread keeps the deadline; this is a backstop
        except (FetchFailed, FutureTimeout, OSError, ValueError, http.client.HTTPException) as err:
            log.info("could not fetch %s: %s", shown(url), err or type(err).__name__)
            raise APIError(400, f"cannot fetch {shown(url)} (no 200 answer within --url-timeout {self.timeout:g} s; "
                                f"the server's log says why)", param, code="fetch_failed") from None

    def _fetch_in_slot(self, url: str, param: str, deadline: float) -> bytes:
        try:
            return self._fetch(url, param, deadline)
        finally:
            self.slots.release()  # the slot is free once the thread is, whether or not its caller still waits

    def _fetch(self, url: str, param: str, deadline: float) -> bytes:
        for _ in range(MAX_REDIRECTS + 1):
            status, location, body = self._get(url, param, deadline)
            if status not in REDIRECTS:
                if status != 200:
                    raise FetchFailed(f"status {status}")
                return body
            if not location:
                raise FetchFailed(f"status {status} without a Location")
            url = urllib.parse.urljoin(url, location)
        raise FetchFailed(f"more than {MAX_REDIRECTS} redirects")

    def _get(self, url: str, param: str, deadline: float) -> tuple[int, str | None, bytes]:
        """One request: (status, Location, body). The address is checked before anything is sent to it."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise APIError(403, f"{shown(url)}: only http(s) URLs with a host are fetched (also after a redirect)",
                           param)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addresses = self.resolve(parts.hostname, port)
        if not addresses:
            raise FetchFailed(f"{parts.hostname} has no address")
        if not self.allow_private and not all(map(is_public, addresses)):
            raise APIError(403, f"{shown(url)}: its host is not a public address (start the server with "
                                f"--allow-private-urls to fetch from private, loopback or link-local addresses)",
                           param, code="address_refused")
        left = _time_left(deadline)
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = kind(parts.hostname, port, timeout=left())
        # Connect to the address just checked (TLS still verifies the host's name).
        conn._create_connection = lambda _address, timeout, *_: self.connect((addresses[0], port), timeout)
        try:
            conn.request("GET", urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, "")),
                         headers={"User-Agent": "lynx-serve", "Accept": "image/*, video/*, application/json"})
            sock = conn.sock  # the response reads it also once the connection lets go of it
            sock.settimeout(left())
            response = conn.getresponse()
            if response.status != 200:
                return response.status, response.getheader("Location"), b""
            length = response.getheader("Content-Length", "")
            if length.isdigit() and int(length) > self.max_bytes:
                raise _too_large(url, self.max_bytes, param)
            body = bytearray()
            while True:
                sock.settimeout(left())
                chunk = response.read1(READ_SIZE)
                if not chunk:
                    return 200, None, bytes(body)
                body += chunk
                if len(body) > self.max_bytes:
                    raise _too_large(url, self.max_bytes, param)
        finally:
            conn.close()


def _time_left(deadline: float) -> Callable[[], float]:
    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchFailed("past the fetch's deadline")
        return remaining
    return left


def _too_large(url: str, max_bytes: int, param: str) -> APIError:
    return APIError(413, f"{shown(url)} is over the server's limit of {max_bytes} bytes (--max-body-mb)", param,
                    code="request_too_large")


def shown(url: str) -> str:
    """A URL as messages show it: cut short (a request may send megabytes of one)."""
    return url if len(url) <= 200 else url[:200] + "..."
