"""One answering core for every front end, each thing done once: a generate.py run makes each start-up check once;
a chat request, traced through an in-process server, has its prompt formatted and tokenized once, each image
checked once (only the sampled frames of a video), and its answer counted from its ids, never re-encoded; and the
server's batches go through the same out-of-memory halving as generate.py's."""
from __future__ import annotations

import base64
import inspect
import json
import sys
import time

import pytest

import generate  # noqa: F401 - imported before its functions are counted (it imports them by name)
from conftest import FIXTURE, fixture_config, read_jsonl, run_main


def count_calls(monkeypatch, owner, name: str) -> list:
    """Record every call of `owner.name` (a module's function, wherever it was imported (so import the modules that
    use it first), or a class's method or classmethod): the returned list gets the call's arguments."""
    calls = []
    static = inspect.getattr_static(owner, name)
    function = static.__func__ if isinstance(static, classmethod) else getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return function(*args, **kwargs)

    if inspect.isclass(owner):
        monkeypatch.setattr(owner, name, classmethod(counted) if isinstance(static, classmethod) else counted)
    else:
        for module in list(sys.modules.values()):
            if getattr(module, name, None) is function:
                monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("workers", [0, 4])  # 4: the shipped default (DataLoader worker processes)
def test_a_generate_run_makes_each_start_up_check_once(tmp_path, in_fixture, monkeypatch, workers):
    import configs.schema
    import dataset.media
    import lynx.pipeline
    import models.weight_files

    checks = {"weight files": count_calls(monkeypatch, models.weight_files, "check_weight_files"),
              "device": count_calls(monkeypatch, lynx.pipeline, "check_device"),
              "dtype": count_calls(monkeypatch, configs.schema.LynxConfig, "resolve_dtype"),
              "media options": count_calls(monkeypatch, dataset.media.MediaOptions, "from_config")}
    cfg = fixture_config()
    cfg["data"]["num_workers"] = workers
    assert run_main(cfg, tmp_path) == 0
    assert read_jsonl(tmp_path / "answers.jsonl") == read_jsonl(FIXTURE / "expected" / "images_greedy.jsonl")
    assert {name: len(calls) for name, calls in checks.items()} == {name: 1 for name in checks}


# ---------------------------------------------------------------- a request, traced


@pytest.fixture(scope="module")
def app_client():
    """The server's application in this process (the tiny fixture, CPU), so that calls inside it can be counted."""
    from fastapi.testclient import TestClient

    from configs.schema import config_from_dict
    from lynx.pipeline import LynxPipeline
    from server.app import create_app
    from server.security import Limits

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(FIXTURE)
        cfg = config_from_dict(fixture_config())
        app = create_app(lambda: LynxPipeline.build(cfg, "cpu"), Limits(), "lynx")
        with TestClient(app) as client:
            deadline = time.monotonic() + 120
            while client.get("/health").status_code != 200:
                assert time.monotonic() < deadline, client.get("/health").json()
                time.sleep(0.05)
            yield client


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(data).decode()}}


def traced(monkeypatch, client, parts: list[dict], question: str):
    """The reply to a request, and the calls it made: prompt formatting, tokenizing, image checks."""
    import dataset.batching
    import dataset.images
    from models.tokenizer import LynxTokenizer

    with monkeypatch.context() as mp:
        calls = {"format_prompt": count_calls(mp, dataset.batching, "format_prompt"),
                 "encode": count_calls(mp, LynxTokenizer, "encode"),
                 "text_ids": count_calls(mp, LynxTokenizer, "text_ids"),
                 "image check": count_calls(mp, dataset.images, "_converted")}
        reply = client.post("/v1/chat/completions", json={"messages": [
            {"role": "user", "content": [{"type": "text", "text": question}, *parts]}]})
    assert reply.status_code == 200, reply.text
    return reply.json(), calls


def test_a_request_is_prepared_once_and_counted_from_its_ids(app_client, monkeypatch):
    record = read_jsonl(FIXTURE / "data" / "Open_VQA_images_tiny.jsonl")[0]
    meta = json.loads((FIXTURE / "expected" / "images_meta.jsonl").read_text().splitlines()[0])
    assert meta["index"] == record["index"]
    reply, calls = traced(monkeypatch, app_client, [image_part((FIXTURE / record["image"]).read_bytes())],
                          record["question"])
    assert {name: len(c) for name, c in calls.items()} == {"format_prompt": 1, "encode": 1, "text_ids": 1,
                                                           "image check": 1}
    assert calls["encode"][0][1] == meta["prompt_text"]  # the one text tokenized is the prompt, never the answer
    assert reply["choices"][0]["message"]["content"] == meta["greedy_text"]
    # the original's ids: the prompt's 13 tokens and 32 visual ones; the answer's ids, its EOS included
    assert reply["usage"] == {"prompt_tokens": 32 + len(meta["input_ids"]), "completion_tokens": len(
        meta["greedy_ids"]), "total_tokens": 32 + len(meta["input_ids"]) + len(meta["greedy_ids"])}
    assert reply["choices"][0]["finish_reason"] == "stop"


def test_the_body_is_parsed_checked_and_tokenized_off_the_event_loop(app_client, monkeypatch):
    """A large body would freeze every other request (and /health) while the event loop parsed or tokenized it:
    parsing, validating, checking and tokenizing run on a worker thread, where no event loop runs."""
    import asyncio

    import server.routes
    from models.tokenizer import LynxTokenizer

    on_loop = {}

    def noting(name, function):
        def wrapped(*args, **kwargs):
            try:
                asyncio.get_running_loop()
                on_loop[name] = True
            except RuntimeError:
                on_loop.setdefault(name, False)
            return function(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(server.routes, "parse", noting("parse", server.routes.parse))
    monkeypatch.setattr(LynxTokenizer, "encode", noting("encode", LynxTokenizer.encode))
    record = read_jsonl(FIXTURE / "data" / "Open_VQA_images_tiny.jsonl")[0]
    reply = app_client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "text", "text": record["question"]}, image_part((FIXTURE / record["image"]).read_bytes())]}]})
    assert reply.status_code == 200, reply.text
    assert on_loop == {"parse": False, "encode": False}


def test_frames_are_sampled_before_any_is_checked_or_decoded(app_client, monkeypatch):
    frames = json.loads(json.dumps(read_jsonl(FIXTURE / "data" / "Open_VQA_videos_tiny.jsonl")[4]["video"]))
    seven = [base64.b64decode(f) for f in frames + frames[:2]]  # 7 frames: Lynx uses 5 of them
    reply, calls = traced(monkeypatch, app_client, [image_part(f) for f in seven], "what moves?")
    assert len(calls["image check"]) == 5 and len(calls["encode"]) == 1 and len(calls["format_prompt"]) == 1
    assert reply["usage"]["completion_tokens"] <= 24


def test_the_server_goes_through_the_one_out_of_memory_halving(app_client, monkeypatch):
    """The engine hands a batch to the pipeline's core, which halves it (as for generate.py, tests/test_robustness.py):
    here every batch of more than one request runs out of memory, and each request still gets its own answer."""
    import asyncio

    import torch

    from lynx.pipeline import LynxPipeline
    from server.engine import Engine, Work

    pipeline = app_client.app.state.lynx.engine.pipeline
    records = read_jsonl(FIXTURE / "data" / "Open_VQA_images_tiny.jsonl")[:3]
    expected = {r["index"]: r["text_output"] for r in read_jsonl(FIXTURE / "expected" / "images_greedy.jsonl")}
    items = [pipeline.item((FIXTURE / r["image"]).read_bytes(), r["question"], "image") for r in records]
    tried, real = [], LynxPipeline.decode_batch

    def decode_batch(self, batch, *args, **kwargs):
        tried.append(len(batch))
        if len(batch) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, batch, *args, **kwargs)

    monkeypatch.setattr(LynxPipeline, "decode_batch", decode_batch)

    async def main():
        engine = Engine(pipeline, batch_size=3, window=0.5, queue_size=8)
        engine.start()
        futures = [engine.submit(Work(item, "image", pipeline.settings)) for item in items]
        answers = await asyncio.gather(*futures)
        await engine.stop()
        return answers, engine.stats.batch_sizes

    answers, batches = asyncio.run(main())
    assert [a.text for a in answers] == [expected[r["index"]] for r in records]
    assert batches == {3: 1} and tried == [3, 1, 2, 1, 1]  # one batch of 3, halved down to single requests
