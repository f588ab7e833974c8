"""On a Lynx that is not the shared fixture (tests/random_fixture.py: other ViT and LLM dims, 4 frames, another
prompt template, right padding, no lower-casing), answers over HTTP equal generate.py's, asked one by one and by
8 clients at once; traversal and garbage get 4xx and the server goes on.

This fixture pads on the right, where (as in the original) a padded row's answer depends on the longer rows of its
batch, so generate.py answers each record alone here (`batch_size_test: 1`): that is the answer a request gets,
whatever the server batches it with (it batches only prompts of equal length then).

The checklist of a server that one request cannot hurt runs here too, on a model the server's code was not tuned
on: costly or malformed requests are refused at once while /health keeps answering, a request's media held while
it waits are its pixels at the model's size, and the answers stay generate.py's."""
from __future__ import annotations

import base64
import io
import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import read_jsonl, run_generate
from random_fixture import config, write_random_fixture
from serve_helpers import (MediaWeb, Server, answer_of, data_url, image_message, stream_events,
                           video_message)

FETCH_WORKERS = 8  # serve.py's default --url-fetch-workers
FRAMES = 64  # image_url frames of the big request: --max-images is raised to take them


def messages_of(root, record: dict) -> list[dict]:
    if "image" in record:
        return image_message(record["question"], data_url(root / record["image"]))
    video = record["video"]
    if isinstance(video, list):  # inline base64 frames: sent as the original's .json frame list
        url = "data:application/json;base64," + base64.b64encode(json.dumps(video).encode()).decode()
    else:
        url = data_url(root / video)
    return video_message(record["question"], url)


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """(root, [(record, generate.py's answer)], server)."""
    root = write_random_fixture(tmp_path_factory.mktemp("other_serve"))
    asked = []
    for kind in ("images", "videos"):
        cfg = config(root, test_files=[str(root / "data" / f"Open_VQA_{kind}_tiny.jsonl")],
                     vision_prompt_dict=kind[:-1], batch_size_test=1)
        out = root / f"generated_{kind}"
        out.mkdir()
        run = run_generate(cfg, out, cwd=root)
        assert run.returncode == 0, run.stderr[-3000:]
        answers = {r["index"]: r["text_output"] for r in read_jsonl(out / "answers.jsonl")}
        asked += [(r, answers[r["index"]]) for r in read_jsonl(root / "data" / f"Open_VQA_{kind}_tiny.jsonl")]
    srv = Server(config(root), root, "--batch-size", "3", "--batch-window-ms", "50", "--allow-http-urls",
                 "--allow-private-urls", "--max-images", str(FRAMES), "--max-body-mb", "100", cwd=root)
    try:
        srv.wait_ready()
        yield root, asked, srv
    finally:
        srv.stop(signal.SIGKILL)


def test_answers_over_http_equal_generate_one_by_one(other):
    root, asked, srv = other
    assert len(asked) == 16
    for record, want in asked:
        status, _, body = srv.chat(messages=messages_of(root, record))
        assert status == 200 and answer_of(body) == want, (record["index"], body)


def test_answers_over_http_equal_generate_with_8_clients_at_once(other):
    root, asked, srv = other
    jobs = [job for job in asked for _ in range(2)]  # each question twice, at about the same time
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda job: srv.chat(messages=messages_of(root, job[0])), jobs))
    assert [answer_of(body) for _, _, body in replies] == [want for _, want in jobs]
    assert srv.request("GET", "/health")[2]["largest_batch"] > 1


def test_traversal_and_garbage_get_4xx_and_the_server_goes_on(other):
    root, asked, srv = other
    record, want = asked[0]
    bad = [image_message("q", "../../../../etc/passwd"), image_message("q", "file:///etc/passwd"),
           image_message("q", "data:image/png;base64," + base64.b64encode(b"\x89PNG garbage").decode()),
           [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 42}}]}]]
    for messages in bad:
        status, _, body = srv.chat(messages=messages)
        assert 400 <= status < 500 and body["error"]["message"], body
        good, _, reply = srv.chat(messages=messages_of(root, record))
        assert good == 200 and answer_of(reply) == want
    status, _, body = srv.request("POST", "/v1/chat/completions", b"\x00\xff garbage")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    assert "Traceback" not in srv.log()


def test_http_urls_are_fetched_when_allowed(other):
    """--allow-http-urls --allow-private-urls: the image comes from a web server (here one on 127.0.0.1 serving the
    fixture's images)."""
    root, asked, srv = other
    record, want = asked[0]
    web = MediaWeb(root)
    try:
        url = web.url(f"/{record['image']}")
        status, _, body = srv.chat(messages=image_message(record["question"], url))
        assert status == 200 and answer_of(body) == want, body
        status, _, body = srv.chat(messages=image_message(record["question"], url + ".missing"))
        assert status == 400 and "cannot fetch" in body["error"]["message"]
    finally:
        web.close()


def test_slow_urls_do_not_hold_up_other_requests(other):
    """45 requests whose URL answers only when the test says so: 8 (--url-fetch-workers) are fetched, the others
    get 503 at once, and a request with its image inline is answered while the 8 still wait; then the 8 are
    answered too. (With fetches on the threads that read every request's media, 40 of them stopped the rest.)"""
    root, asked, srv = other
    record, want = asked[0]
    web = MediaWeb(root)
    slow = image_message(record["question"], web.url(f"/hold/{record['image']}"))
    try:
        with ThreadPoolExecutor(45) as pool:
            replies = [pool.submit(srv.chat, messages=slow) for _ in range(45)]
            deadline = time.monotonic() + 30
            while (web.held < FETCH_WORKERS or sum(r.done() for r in replies) < 45 - FETCH_WORKERS) \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            busy = [r.result() for r in replies if r.done()]
            assert len(busy) == 45 - FETCH_WORKERS and web.held == FETCH_WORKERS
            assert all(status == 503 and body["error"]["code"] == "fetch_busy" for status, _, body in busy)
            status, _, body = srv.chat(messages=messages_of(root, record))
            assert status == 200 and answer_of(body) == want
            assert sum(r.done() for r in replies) == 45 - FETCH_WORKERS  # the 8 still wait for their URL
            web.release.set()
            fetched = [r.result() for r in replies if r.result()[0] != 503]
        assert [(status, answer_of(body)) for status, _, body in fetched] == [(200, want)] * FETCH_WORKERS
    finally:
        web.close()


def answers_still_generates(root, asked, srv) -> None:
    for record, want in asked:
        status, _, body = srv.chat(messages=messages_of(root, record))
        assert status == 200 and answer_of(body) == want, (record["index"], body)


def test_a_request_cannot_hurt_the_server(other):
    """Refused quickly, by name: a huge num_beams, a 5 MB question (while /health answers within 1.5 s), deeply
    nested JSON, a lone surrogate, a text/plain body, a foreign Host. Answered as OpenAI's clients mean them:
    top_p 0 and n null (the config's greedy answer); max_tokens bounds the usage; a long one-beam answer streams in
    several chunks that make the whole answer; /metrics is served. Then the answers are still generate.py's."""
    root, asked, srv = other
    record, want = asked[0]
    ok = messages_of(root, record)
    started = time.monotonic()
    status, _, body = srv.chat(messages=ok, num_beams=10000, temperature=0)
    assert time.monotonic() - started < 1 and status == 400 and body["error"]["param"] == "num_beams"
    assert "--num-beams-limit" in body["error"]["message"]

    latencies, done = [], threading.Event()

    def poll_health():
        while not done.is_set():
            began = time.monotonic()
            assert srv.request("GET", "/health")[0] == 200
            latencies.append(time.monotonic() - began)
            time.sleep(0.02)

    poller = threading.Thread(target=poll_health)
    poller.start()
    started = time.monotonic()
    try:
        status, _, body = srv.chat(messages=image_message("why " * 1_250_000, data_url(root / record["image"])))
    finally:
        refused_in = time.monotonic() - started
        done.set()
        poller.join()
    assert status == 400 and "--max-question-bytes" in body["error"]["message"], body
    assert refused_in < 3, refused_in  # parsed and checked, never tokenized
    assert body["error"]["param"] == "messages.0.content"
    assert latencies and max(latencies) < 1.5, max(latencies)

    text = json.dumps({"messages": ok})
    for raw, headers, got in [
            (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, 400),
            (text.replace(record["question"], "\\ud800", 1).encode(), {}, 400),
            (text.encode(), {"Content-Type": "text/plain"}, 415),
            (text.encode(), {"Host": "attacker.example"}, 421)]:
        status, _, body = srv.request("POST", "/v1/chat/completions", raw, headers=headers)
        assert status == got and body["error"]["message"], body

    for fields in ({"top_p": 0}, {"n": None}):
        status, _, body = srv.chat(messages=ok, **fields)
        assert status == 200 and answer_of(body) == want, (fields, body)
    for max_tokens in (1, 2, 5):
        status, _, body = srv.chat(messages=ok, max_tokens=max_tokens, min_length=max_tokens + 1)
        assert status == 200 and body["usage"]["completion_tokens"] <= max_tokens, body
    long = dict(messages=ok, max_tokens=48, min_length=48, num_beams=1, temperature=0)
    status, _, whole = srv.chat(**long)
    assert status == 200 and whole["usage"]["completion_tokens"] == 48, whole
    events = stream_events(srv, {**long, "stream_options": {"include_usage": True}})
    texts = [e["choices"][0]["delta"].get("content") for e in events if e["choices"]]
    assert len([t for t in texts if t]) > 2 and "".join(t for t in texts if t) == answer_of(whole), texts
    assert events[-1]["usage"] == whole["usage"]
    status, head, page = srv.request("GET", "/metrics")
    assert status == 200 and "lynx_ready 1.0" in page
    answers_still_generates(root, asked, srv)
    assert "Traceback" not in srv.log()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def noise_jpeg_urls(count: int) -> list[str]:
    """`count` data URLs of 4000 x 3000 JPEGs of noise (four distinct ones in turn), each about 0.8 MB."""
    import numpy as np
    from PIL import Image

    rng, urls = np.random.default_rng(0), []
    for _ in range(4):
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (3000, 4000, 3), dtype=np.uint8)).save(out, format="JPEG", quality=5)
        urls.append("data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode())
    return [urls[i % 4] for i in range(count)]


def test_a_waiting_request_holds_its_pixels_not_its_body(other):
    """64 frames of 4000 x 3000 (a 66 MB body; 2.3 GB once decoded) wait in the queue behind a long request: the
    server's resident memory grows by at most 200 MB, and by less than the body, since what waits is the sampled
    frames at the model's size (the body, the base64 text and the decoded frames are freed, and their memory given
    back, once prepared). The long request's own beams count in the growth too."""
    root, asked, srv = other
    record, want = asked[0]
    big = json.dumps({"messages": image_message(record["question"], *noise_jpeg_urls(FRAMES))}).encode()
    hold = dict(messages=messages_of(root, record), max_tokens=1024, min_length=1024, num_beams=10, temperature=0)
    with ThreadPoolExecutor(2) as pool:
        held = pool.submit(srv.chat, **hold)
        while srv.request("GET", "/health")[2]["running"] == 0 and not held.done():
            time.sleep(0.01)
        before = rss_bytes(srv.process.pid)
        waiting = pool.submit(srv.request, "POST", "/v1/chat/completions", big)
        while srv.request("GET", "/health")[2]["queued"] == 0 and not waiting.done():
            time.sleep(0.01)
        assert not held.done(), "the long request ended before the big one was queued"
        grown = rss_bytes(srv.process.pid) - before
        status, _, body = waiting.result()
        assert held.result()[0] == 200
    assert status == 200 and body["choices"][0]["message"]["content"], body
    assert grown <= min(200 * 2**20, len(big)), f"resident memory grew by {grown / 2**20:.0f} MB"
