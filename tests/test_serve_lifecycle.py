"""The server's life around its requests: 503 while the model loads, a client that leaves, a full queue, a request
that takes too long, SIGTERM with requests in flight. One server process with a long batch window (1 s), so that
requests are reliably still waiting when something happens to them, and batches of up to 8, more than the queue
holds, so that a batch never fills before its window ends."""
from __future__ import annotations

import http.client
import json
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import FIXTURE, fixture_config, read_jsonl
from serve_helpers import Server, answer_of, data_url, image_message

WINDOW_S = 1.0
QUEUE = 4
TIMEOUT_S = 2.5


def ask(question: str = "What is in the image?", **fields) -> dict:
    return {"messages": image_message(question, data_url(FIXTURE / "images" / "img_a.jpg")), **fields}


GREEDY_17 = next(r["text_output"] for r in read_jsonl(FIXTURE / "expected" / "images_greedy.jsonl")
                 if r["index"] == 17)  # "What is in the image?" about img_a.jpg


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    srv = Server(fixture_config(), tmp_path_factory.mktemp("lifecycle"), "--batch-window-ms", str(WINDOW_S * 1000),
                 "--queue-size", str(QUEUE), "--request-timeout", str(TIMEOUT_S), "--batch-size", "8", cwd=FIXTURE)
    try:
        seen = srv.wait_ready()
        yield srv, seen
    finally:
        srv.stop(signal.SIGKILL)


def health(srv) -> dict:
    return srv.request("GET", "/health")[2]


def test_health_is_503_while_the_model_loads(started):
    srv, seen = started
    assert seen[0] == 503 and seen[-1] == 200, seen
    status, head, body = srv.request("POST", "/v1/chat/completions", ask())
    assert status == 200 and answer_of(body) == GREEDY_17


def test_a_client_that_leaves_is_dropped_and_the_server_goes_on(started):
    srv, _ = started
    before = health(srv)["dropped"]
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    conn.request("POST", "/v1/chat/completions", json.dumps(ask()), {"Content-Type": "application/json"})
    time.sleep(0.3)  # queued, inside the batch window
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 10
    while health(srv)["dropped"] == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert health(srv)["dropped"] == before + 1
    status, _, body = srv.request("POST", "/v1/chat/completions", ask())
    assert status == 200 and answer_of(body) == GREEDY_17


def test_a_full_queue_answers_503_with_retry_after(started):
    srv, _ = started
    with ThreadPoolExecutor(QUEUE + 2) as pool:
        replies = list(pool.map(lambda _: srv.request("POST", "/v1/chat/completions", ask()), range(QUEUE + 2)))
    busy = [(h, b) for s, h, b in replies if s == 503]
    assert len(busy) == 2 and all(h.get("retry-after") == "1" for h, _ in busy)
    assert all(b["error"]["code"] == "queue_full" and "--queue-size" in b["error"]["message"] for _, b in busy)
    assert [answer_of(b) for s, _, b in replies if s == 200] == [GREEDY_17] * QUEUE


def test_a_request_over_the_timeout_gets_504(started):
    srv, _ = started
    # Three decoding settings: three batches, each waiting out its window; the third waits past the timeout.
    asks = [ask(), ask(repetition_penalty=1.1), ask(repetition_penalty=1.2)]
    with ThreadPoolExecutor(3) as pool:
        futures = []
        for body in asks:
            futures.append(pool.submit(srv.request, "POST", "/v1/chat/completions", body))
            time.sleep(0.05)  # in this order
        replies = [f.result() for f in futures]
    assert replies[0][0] == 200
    status, _, body = replies[2]
    assert status == 504 and body["error"]["code"] == "timeout" and "--request-timeout" in body["error"]["message"]
    assert srv.request("POST", "/v1/chat/completions", ask())[0] == 200


def test_metrics_read_the_queue_from_the_engine(started):
    srv, _ = started
    with ThreadPoolExecutor(1) as pool:
        reply = pool.submit(srv.request, "POST", "/v1/chat/completions", ask())
        deadline = time.monotonic() + 10
        while srv.metrics()[("lynx_queue_length", ())] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.metrics()[("lynx_queue_length", ())] == 1  # waiting out its batch window
        assert reply.result()[0] == 200
    assert srv.metrics()[("lynx_queue_length", ())] == 0


def test_without_their_flags_no_url_is_fetched_and_no_cors_is_sent(started):
    srv, _ = started
    status, _, body = srv.request("POST", "/v1/chat/completions",
                                  {"messages": image_message("q", "http://127.0.0.1:9/cat.jpg")})
    assert status == 403 and "http(s) URLs are not fetched" in body["error"]["message"]
    status, head, _ = srv.request("OPTIONS", "/v1/chat/completions",
                                  headers={"Origin": "http://page.test", "Access-Control-Request-Method": "POST"})
    assert status == 405 and "access-control-allow-origin" not in head


def test_sigterm_finishes_the_requests_in_flight_then_exits(started):
    srv, _ = started
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(srv.request, "POST", "/v1/chat/completions", ask()) for _ in range(3)]
        deadline = time.monotonic() + 10
        while health(srv)["queued"] + health(srv)["running"] < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        srv.process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        with pytest.raises(OSError):  # no new connections while it finishes
            socket.create_connection(("127.0.0.1", srv.port), timeout=2).close()
        replies = [f.result() for f in futures]
    assert [(s, answer_of(b)) for s, _, b in replies] == [(200, GREEDY_17)] * 3
    assert srv.process.wait(30) == -signal.SIGTERM
    assert "Traceback" not in srv.log()


@pytest.mark.parametrize("flags, words", [
    (["--host", "0.0.0.0"], "--host 0.0.0.0 lets other machines use the server: give it an --api-key"),
    (["--host", "192.168.1.20"], "give it an --api-key (or --allow-unauthenticated"),
    (["--url-fetch-workers", "0"], "--url-fetch-workers must be at least 1"),
    (["--url-timeout", "-1"], "--url-timeout must be 0 or more")])
def test_serve_refuses_an_open_server_without_a_key(flags, words):
    """serve.py checks its flags (limits_of) before it loads anything or binds an address."""
    from errors import InputError
    from serve import limits_of, parse_args

    with pytest.raises(InputError) as caught:
        limits_of(parse_args(flags))
    assert words in str(caught.value)


def test_who_may_ask_follows_the_address_it_listens_on():
    """Loopback: this machine's names and --allowed-hosts; another address: any Host (the key guards it) unless
    --allowed-hosts names some."""
    from serve import limits_of, parse_args

    def allowed(*flags):
        return limits_of(parse_args(list(flags))).allowed_hosts

    assert allowed() == {"localhost", "127.0.0.1", "::1"}
    assert allowed("--allowed-hosts", "Lynx.Example:8000,lab.test") == {"localhost", "127.0.0.1", "::1",
                                                                        "lynx.example", "lab.test"}
    assert allowed("--allowed-hosts", "*") is None
    assert allowed("--host", "0.0.0.0", "--api-key", "k") is None
    assert allowed("--host", "0.0.0.0", "--allow-unauthenticated") is None
    assert "lynx.lan" in allowed("--host", "10.0.0.5", "--api-key", "k", "--allowed-hosts", "lynx.lan")
    assert limits_of(parse_args([])).fetcher is None
    fetcher = limits_of(parse_args(["--allow-http-urls", "--url-timeout", "5", "--max-body-mb", "2"])).fetcher
    assert (fetcher.timeout, fetcher.workers, fetcher.max_bytes, fetcher.allow_private) == (5, 8, 2 * 2**20, False)
