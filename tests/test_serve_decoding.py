"""The server's decoding as clients set it, on the tiny fixture against the original's own ids: `max_tokens` bounds
the answer's ids and `finish_reason` says why it stopped (`length` at the limit, `stop` at EOS), the usage counts
those ids; a request that sets no decoding field gets the config's own (beam sampling, drawn as generate.py draws
it); `top_p: 0` as lmms-eval sends it; the bounds of what one request may cost, each refused by name; streamed
answers (text as it is chosen, beams at the end) and a client that leaves mid-stream."""
from __future__ import annotations

import json
import re
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import FIXTURE, fixture_config, read_jsonl, run_generate
from models.tokenizer import LynxTokenizer
from serve_helpers import Server, answer_of, messages_of, stream_events

EOS = 2
TOKENIZER = LynxTokenizer(str(FIXTURE / "data" / "vicuna-7b" / "tokenizer.model"))


def records(kind: str) -> list[dict]:
    return read_jsonl(FIXTURE / "data" / f"Open_VQA_{kind}s_tiny.jsonl")


def meta(kind: str) -> dict:
    """index -> the original's facts of a record (its greedy ids up to EOS, at max_new_tokens 24)."""
    return {m["index"]: m for m in read_jsonl(FIXTURE / "expected" / f"{kind}s_meta.jsonl")}


def start(tmp_path_factory, name: str, cfg: dict, *flags: str) -> Server:
    server = Server(cfg, tmp_path_factory.mktemp(name), *flags, cwd=FIXTURE)
    server.wait_ready()
    return server


@pytest.fixture(scope="module")
def greedy(tmp_path_factory):
    """The fixture's config (greedy), the server's default bounds."""
    server = start(tmp_path_factory, "greedy", fixture_config())
    yield server
    assert server.stop() == -signal.SIGTERM, server.log()[-3000:]


def ask_all(server: Server, asks: list[dict]) -> list[dict]:
    """The replies to requests sent by 8 clients at once (deterministic decoding: batching changes no answer)."""
    def one(body):
        status, _, reply = server.chat(**body)
        assert status == 200, (body.get("max_tokens"), reply)
        return reply
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, asks))


def check_reply(reply: dict, ids: list[int], text: str | None = None, ended_at_limit: bool | None = None):
    """The reply holds the answer of `ids` (the original's), counted from them; `finish_reason` exact."""
    choice = reply["choices"][0]
    assert choice["message"]["content"] == (TOKENIZER.decode(ids) if text is None else text)
    assert reply["usage"]["completion_tokens"] == len(ids)
    assert reply["usage"]["total_tokens"] == reply["usage"]["prompt_tokens"] + len(ids)
    at_limit = ids[-1] != EOS if ended_at_limit is None else ended_at_limit
    assert choice["finish_reason"] == ("length" if at_limit else "stop")


@pytest.mark.parametrize("kind", ["image", "video"])
def test_max_tokens_bounds_the_ids_and_finish_reason_says_why_it_stopped(greedy, kind):
    """Every record at max_tokens 1, 3 and 8: greedy's ids are the first max_tokens of the original's (which end
    with EOS, or run to its limit of 24)."""
    facts, asks, cut = meta(kind), [], []
    for record in records(kind):
        for limit in (1, 3, 8):
            asks.append(dict(messages=messages_of(record), max_tokens=limit))
            cut.append(facts[record["index"]]["greedy_ids"][:limit])
    replies = ask_all(greedy, asks)
    for body, reply, ids in zip(asks, replies, cut):
        assert reply["usage"]["completion_tokens"] <= body["max_tokens"]
        check_reply(reply, ids)
    assert {r["choices"][0]["finish_reason"] for r in replies} == {"stop", "length"}


def test_every_max_tokens_from_1_to_8(greedy):
    """Answers the original ended with EOS within 8 tokens (records 0 and 64: 7 and 6 ids): `length` below that
    many, `stop` from there on, never more ids than asked."""
    by_index, facts = {r["index"]: r for r in records("image")}, meta("image")
    cases = [(index, limit) for index in (0, 64) for limit in range(1, 9)]
    replies = ask_all(greedy, [dict(messages=messages_of(by_index[index]), max_tokens=limit) for index, limit in cases])
    for (index, limit), reply in zip(cases, replies):
        check_reply(reply, facts[index]["greedy_ids"][:limit])
    assert [r["choices"][0]["finish_reason"] for r in replies] == ["length"] * 6 + ["stop"] * 2 + \
        ["length"] * 5 + ["stop"] * 3


@pytest.mark.parametrize("kind", ["image", "video"])
def test_beam_search_at_the_length_limit_is_the_originals(greedy, kind):
    """temperature 0 and 5 beams at max_tokens 4, 6, 8: the original's answers, ids and whether each ended at the
    length limit (tests/fixtures/tiny/expected/maxlen) -- an answer may end with EOS as its 8th id."""
    asks, expected = [], []
    for limit in (4, 6, 8):
        saved = torch.load(FIXTURE / "expected" / "maxlen" / f"{kind}s_beam5_mnt{limit}_ids.pt", weights_only=True)
        by_index = {r["index"]: r for r in records(kind)}
        for i, index in enumerate(saved["indices"]):
            asks.append(dict(messages=messages_of(by_index[index]), max_tokens=limit, temperature=0, num_beams=5))
            expected.append((saved["generated_ids"][i], saved["text_output"][i], saved["ended_at_max_length"][i]))
    for reply, (ids, text, at_limit) in zip(ask_all(greedy, asks), expected):
        check_reply(reply, ids, text, at_limit)


def test_top_p_0_as_lmms_eval_sends_it(greedy):
    """`top_p: 0` is accepted (OpenAI takes 0 to 1): without sampling it changes nothing; with sampling only the top
    token is left, so the answer is greedy's."""
    record = records("image")[1]
    want = meta("image")[record["index"]]["greedy_ids"]
    for extra in (dict(temperature=0, top_p=0), dict(temperature=1.0, top_p=0, seed=3), dict(temperature=0.7,
                                                                                            top_p=0)):
        status, _, reply = greedy.chat(messages=messages_of(record), **extra)
        assert status == 200, reply
        check_reply(reply, want)


def test_what_a_request_may_cost_is_bounded_and_bad_values_are_named(greedy):
    ok = messages_of(records("image")[0])
    refused = [
        (dict(num_beams=10000), "num_beams is 10000, over the server's limit of 10 (--num-beams-limit)", "num_beams"),
        (dict(top_k=101, temperature=1.0), "top_k is 101, over the server's limit of 100 (--top-k-limit)", "top_k"),
        (dict(max_tokens=1025), "max_tokens is 1025, over the server's limit of 1024 (--max-tokens-limit)",
         "max_tokens"),
        (dict(max_completion_tokens=5000), "max_completion_tokens is 5000, over the server's limit of 1024 "
                                           "(--max-tokens-limit)", "max_completion_tokens"),
        (dict(max_tokens=0), "'max_tokens' must be at least 1, got 0", "max_tokens"),
        (dict(top_p=1.5), "'top_p' must be from 0 to 1 (0: the top token), got 1.5", "top_p"),
        (dict(num_beams=0), "'num_beams' must be at least 1, got 0", "num_beams"),
        (dict(repetition_penalty=0), "'repetition_penalty' must be a number greater than 0, got 0", "repetition_penalty"),
        (dict(max_tokens=8, min_length=10), "'min_length' must be between 0 and max_new_tokens + 1 = 9", "min_length"),
        (dict(temperature=-1), "temperature: Input should be greater than or equal to 0", "temperature"),
    ]
    for fields, message, param in refused:
        start_s = time.monotonic()
        status, _, reply = greedy.chat(messages=ok, **fields)
        assert time.monotonic() - start_s < 1.0, fields
        assert status == 400 and reply["error"]["message"].startswith(message), (fields, reply)
        assert reply["error"]["param"] == param, fields
        status, _, reply = greedy.chat(messages=ok, max_tokens=3)
        assert status == 200 and reply["usage"]["completion_tokens"] == 3
    assert "Traceback" not in greedy.log()


def test_without_decoding_fields_a_request_decodes_as_the_config_says(tmp_path_factory, tmp_path):
    """A config that samples with beams (the paper's decoding): a request that sets no temperature gets beam
    sampling, the answer generate.py gives that record with the same seed (batch b of a run is seeded with
    --seed + b); temperature 0 gets beam search. The server's own bound on beams is a flag."""
    asked = records("image")[:4]
    cfg = fixture_config(use_nucleus_sampling=True, num_beams=5, batch_size_test=1)
    run = run_generate(cfg, tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    generated = {row["index"]: row["text_output"] for row in read_jsonl(tmp_path / "answers.jsonl")}
    searched = {row["index"]: row["text_output"] for row in read_jsonl(FIXTURE / "expected" / "images_beam5.jsonl")}
    server = start(tmp_path_factory, "beam_sampling", cfg, "--num-beams-limit", "5")
    try:
        sampled = [answer_of(server.chat(messages=messages_of(r), seed=42 + b)[2]) for b, r in enumerate(asked)]
        assert sampled == [generated[r["index"]] for r in asked]
        assert sampled != [searched[r["index"]] for r in asked]  # so the two cannot be taken for each other
        search = [answer_of(server.chat(messages=messages_of(r), temperature=0)[2]) for r in asked]
        assert search == [searched[r["index"]] for r in asked]
        status, _, reply = server.chat(messages=messages_of(asked[0]), num_beams=6)
        assert status == 400 and "over the server's limit of 5 (--num-beams-limit)" in reply["error"]["message"]
    finally:
        assert server.stop() == -signal.SIGTERM, server.log()[-3000:]


def test_a_long_greedy_answer_streams_in_chunks_that_make_the_whole_answer(greedy):
    """200 tokens (EOS banned: min_length) streamed: text at every check of the decoder (8 tokens), the chunks put
    together are the answer sent whole, then the finish reason, then the usage in a last chunk without choices."""
    ask = dict(messages=messages_of(records("image")[1]), max_tokens=200, min_length=200)
    status, _, whole = greedy.chat(**ask)
    assert status == 200 and whole["usage"]["completion_tokens"] == 200
    before = greedy.metrics()
    events = stream_events(greedy, {**ask, "stream_options": {"include_usage": True}})
    after = greedy.metrics()
    for name, grown in (("lynx_request_duration_seconds_count", 1), ("lynx_completion_tokens_sum", 200)):
        assert after[(name, ())] - before[(name, ())] == grown, name  # a streamed answer counts when it ends
    texts = [e["choices"][0]["delta"].get("content") for e in events if e["choices"]]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len([t for t in texts if t]) > 5, texts
    assert "".join(t for t in texts if t) == answer_of(whole)
    assert [e["choices"][0].get("finish_reason") for e in events if e["choices"]][-1] == "length"
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]
    assert len({e["id"] for e in events}) == 1


def test_beam_search_streams_its_answer_at_the_end(greedy):
    ask = dict(messages=messages_of(records("image")[1]), max_tokens=12, temperature=0, num_beams=3)
    events = stream_events(greedy, ask)
    texts = [e["choices"][0]["delta"].get("content") for e in events if e["choices"]]
    assert texts == [answer_of(greedy.chat(**ask)[2]), None]
    assert "usage" not in events[-1]


def test_a_client_that_leaves_mid_stream_stops_its_batch(greedy):
    """A streamed request of 1024 tokens whose client closes the connection after its first text: its batch stops
    (the engine's `stopped_batches`), the request is not answered but counted as closed by its client; the server
    answers the next one."""
    before, counted = greedy.request("GET", "/health")[2], greedy.metrics()
    body = json.dumps(dict(messages=messages_of(records("image")[1]), max_tokens=1024, min_length=1024,
                           stream=True)).encode()
    with socket.create_connection(("127.0.0.1", greedy.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        received = b""
        while not re.search(rb'"content": "[^"]', received):
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
    deadline = time.monotonic() + 60
    while (health := greedy.request("GET", "/health")[2])["stopped_batches"] == before["stopped_batches"]:
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
    assert health["answered"] == before["answered"] and health["running"] == 0
    metrics, closed = greedy.metrics(), ("lynx_refused_requests_total", (("reason", "client_closed"),))
    assert metrics[("lynx_stopped_batches_total", ())] == health["stopped_batches"]
    assert metrics[closed] - counted.get(closed, 0) == 1
    status, _, reply = greedy.chat(messages=messages_of(records("image")[1]), max_tokens=3)
    assert status == 200 and reply["usage"]["completion_tokens"] == 3
