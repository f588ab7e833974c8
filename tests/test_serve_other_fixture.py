"""On a Lynx that is not the shared fixture (tests/random_fixture.py: other ViT and LLM dims, 4 frames, another
prompt template, right padding, no lower-casing), answers over HTTP equal generate.py's, asked one by one and by
8 clients at once; traversal and garbage get 4xx and the server goes on.

This fixture pads on the right, where (as in the original) a padded row's answer depends on the longer rows of its
batch, so generate.py answers each record alone here (`batch_size_test: 1`): that is the answer a request gets,
whatever the server batches it with (it batches only prompts of equal length then)."""
from __future__ import annotations

import base64
import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import read_jsonl, run_generate
from random_fixture import config, write_random_fixture
from serve_helpers import MediaWeb, Server, answer_of, data_url, image_message, video_message

FETCH_WORKERS = 8  # serve.py's default --url-fetch-workers


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
                 "--allow-private-urls", cwd=root)
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
