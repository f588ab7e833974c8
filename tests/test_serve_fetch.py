"""server/fetch.py alone: the address checks on every hop, one deadline per fetch, its own bounded pool, one message
for every failure. Names resolve through a stand-in (`Names`) and every connection goes through a stand-in that
dials only the test's web server on 127.0.0.1 (`Dialer`), so no test sends a packet to any other address: a
"public" address here is one the stand-in maps to that server, and a refused address is refused before any dial."""
from __future__ import annotations

import ipaddress
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import FIXTURE
from serve_helpers import MediaWeb
from server.errors import APIError
from server.fetch import Fetcher, is_public

PUBLIC = "93.184.216.34"  # stands for a host on the internet; the Dialer sends it to 127.0.0.1
IMAGE = (FIXTURE / "images" / "img_a.jpg").read_bytes()


class Names:
    """A stand-in resolver: test names to the addresses given; literal addresses to themselves."""

    def __init__(self, **names: list[str]):
        self.names = {name.replace("_", "."): addresses for name, addresses in names.items()}

    def __call__(self, host: str, port: int) -> list[str]:
        try:
            ipaddress.ip_address(host)
            return [host]
        except ValueError:
            if host not in self.names:
                raise socket.gaierror(f"{host}: unknown name") from None
            return self.names[host]


class Dialer:
    """A stand-in for socket.create_connection that records every dial: PUBLIC goes to the web server, 127.0.0.1
    is dialed as it is, any other address fails the test."""

    def __init__(self, web: MediaWeb):
        self.web, self.dialed = web, []

    def __call__(self, address, timeout):
        self.dialed.append(address)
        host, port = address
        assert host in (PUBLIC, "127.0.0.1"), f"dialed {address}"
        return socket.create_connection(("127.0.0.1", self.web.port if host == PUBLIC else port), timeout)


@pytest.fixture
def web():
    server = MediaWeb(FIXTURE)
    yield server
    server.close()


def fetcher(web, allow_private=False, timeout=10.0, workers=4, max_bytes=2**20, **names):
    dialer = Dialer(web)
    names = Names(media_test=[PUBLIC], **names)
    return Fetcher(timeout, workers, max_bytes, allow_private, resolve=names, connect=dialer), dialer


def refusal(fetch: Fetcher, url: str) -> APIError:
    with pytest.raises(APIError) as caught:
        fetch.fetch(url, "messages.0.content.1.image_url")
    return caught.value


def test_public_addresses_only():
    assert is_public(PUBLIC) and is_public("2606:2800:220:1::")
    for address in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
                    "0.0.0.0", "224.0.0.1", "239.1.2.3", "::1", "fe80::1", "fc00::1", "ff02::1", "::ffff:127.0.0.1",
                    "::ffff:10.0.0.1", "192.0.2.1"):
        assert not is_public(address), address


def test_a_public_url_is_fetched_through_the_checked_address(web):
    fetch, dialer = fetcher(web)
    assert fetch.fetch(f"http://media.test:{web.port}/images/img_a.jpg", "p") == IMAGE
    assert dialer.dialed == [(PUBLIC, web.port)]  # the address that was checked, not a second lookup


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:{port}/images/img_a.jpg", "http://[::1]:{port}/images/img_a.jpg", "http://10.1.2.3/x.jpg",
    "http://169.254.169.254/latest/meta-data/", "http://224.0.0.1/x.jpg", "http://intranet.test/x.jpg",
    "http://mixed.test/x.jpg"])
def test_private_addresses_are_refused_before_any_dial(web, url):
    fetch, dialer = fetcher(web, intranet_test=["10.0.0.7"], mixed_test=[PUBLIC, "192.168.0.9"])
    error = refusal(fetch, url.format(port=web.port))
    assert error.status == 403 and "not a public address" in error.message and "--allow-private-urls" in error.message
    assert error.param == "messages.0.content.1.image_url" and dialer.dialed == []


def test_every_redirect_is_checked_again(web):
    fetch, dialer = fetcher(web, intranet_test=["10.0.0.7"])
    hop = f"http://media.test:{web.port}/redirect?to="
    assert fetch.fetch(hop + f"http://media.test:{web.port}/images/img_a.jpg", "p") == IMAGE  # public to public
    for target in (f"http://127.0.0.1:{web.port}/images/img_a.jpg", "http://intranet.test/x.jpg"):
        dialer.dialed.clear()
        error = refusal(fetch, hop + target)
        assert error.status == 403 and "not a public address" in error.message, target
        assert dialer.dialed == [(PUBLIC, web.port)], target  # the redirect's host was never dialed
    error = refusal(fetch, hop + "file:///etc/passwd")
    assert error.status == 403 and "only http(s) URLs" in error.message


def test_the_address_checked_is_the_address_dialed(web):
    """A name that answers a public address when checked and a private one when asked again (DNS rebinding):
    the connection goes to the address that was checked."""
    answers = iter([[PUBLIC], ["10.0.0.7"]])
    fetch = Fetcher(10, 1, 2**20, resolve=lambda host, port: next(answers), connect=(dialer := Dialer(web)))
    assert fetch.fetch(f"http://rebind.test:{web.port}/images/img_a.jpg", "p") == IMAGE
    assert dialer.dialed == [(PUBLIC, web.port)]


def test_allow_private_fetches_from_this_machine(web):
    fetch, dialer = fetcher(web, allow_private=True, local_test=["127.0.0.1"])
    assert fetch.fetch(f"http://local.test:{web.port}/images/img_a.jpg", "p") == IMAGE
    assert fetch.fetch(web.url(f"/redirect?to={web.url('/images/img_a.jpg')}"), "p") == IMAGE


def test_one_message_for_every_failure_whatever_the_port(web):
    """Refused, reset, timed out, an error status, too many redirects, an unknown name: the client cannot tell
    an open port from a closed one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    fetch, _ = fetcher(web, allow_private=True, timeout=1.0)
    urls = [f"http://127.0.0.1:{closed}/x.jpg", web.url("/reset"), web.url("/hold/images/img_a.jpg"),
            web.url("/no-such.jpg"), web.url("/loop"), "http://nowhere.test/x.jpg"]
    messages = set()
    for url in urls:
        error = refusal(fetch, url)
        assert error.status == 400 and error.code == "fetch_failed", (url, error.message)
        messages.add(error.message.replace(url, "URL"))
    assert messages == {"cannot fetch URL (no 200 answer within --url-timeout 1 s; the server's log says why)"}


def test_one_deadline_for_the_whole_fetch(web):
    """/trickle sends a byte every 0.2 s: each read is quick, the whole would take 20 s; the fetch ends at its
    deadline (1 s) and its thread is free again."""
    fetch, _ = fetcher(web, allow_private=True, timeout=1.0, workers=1)
    started = time.monotonic()
    error = refusal(fetch, web.url("/trickle"))
    assert error.status == 400 and time.monotonic() - started < 5
    assert fetch.fetch(web.url("/images/img_a.jpg"), "p") == IMAGE  # one worker: the slot was given back


def test_its_own_bounded_pool_refuses_at_once_when_full(web):
    fetch, _ = fetcher(web, allow_private=True, workers=2)
    with ThreadPoolExecutor(2) as pool:
        held = [pool.submit(fetch.fetch, web.url("/hold/images/img_a.jpg"), "p") for _ in range(2)]
        deadline = time.monotonic() + 10
        while web.held < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        error = refusal(fetch, web.url("/images/img_a.jpg"))
        assert error.status == 503 and error.code == "fetch_busy" and error.headers == {"Retry-After": "1"}
        assert "--url-fetch-workers" in error.message
        web.release.set()
        assert [f.result() for f in held] == [IMAGE, IMAGE]
    assert fetch.fetch(web.url("/images/img_a.jpg"), "p") == IMAGE


def test_a_body_over_the_limit_is_413(web):
    """Announced too large: refused before its body (which /big never sends); sent larger than announced
    (no Content-Length): refused once the bytes read pass the limit."""
    fetch, _ = fetcher(web, allow_private=True, max_bytes=1000, timeout=5.0)
    for path in ("/big", "/unsized"):
        error = refusal(fetch, web.url(path))
        assert error.status == 413 and "over the server's limit of 1000 bytes" in error.message, path


def test_a_slow_resolver_does_not_hold_the_caller_past_the_deadline(web):
    """Resolving has no timeout of its own: the caller stops waiting at the deadline anyway."""
    gate = threading.Event()

    def slow(host, port):
        gate.wait(10)
        return ["127.0.0.1"]

    fetch = Fetcher(0.5, 1, 2**20, True, resolve=slow, connect=Dialer(web))
    started = time.monotonic()
    error = refusal(fetch, web.url("/images/img_a.jpg"))
    gate.set()
    assert error.status == 400 and time.monotonic() - started < 5
