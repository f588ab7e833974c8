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
    asks = [ask(), ask(max_tokens=5), ask(max_tokens=6)]
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
