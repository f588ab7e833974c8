"""The batching engine alone, over a stand-in pipeline that records its calls: which requests share a batch, the
window, seeded sampling alone, a request out of memory failing alone (the halving itself is the pipeline's:
tests/test_robustness.py), a failing request failing alone, a full queue, stopping; and the application's
supervision of the engine's worker."""
from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
import torch

from configs.decoding import DecodingSettings
from dataset.media import MediaOptions
from lynx.pipeline import Answer, OutOfMemory
from server.engine import Engine, QueueFull, Work

GREEDY = DecodingSettings(max_new_tokens=8, num_beams=1, use_nucleus_sampling=False)
SAMPLED = GREEDY.replace(use_nucleus_sampling=True)


class FakePipeline:
    """Answers the item 'kind:question' (or, when sampling, a draw from a generator seeded with the call's seed,
    else from torch's global one); fails as told: `oom` items get OutOfMemory, a `bad` one fails the batch."""

    def __init__(self, oom=(), bad: str | None = None):
        self.calls: list[list[str]] = []
        self.seeds: list[int | None] = []
        self.oom, self.bad = set(oom), bad

    def answer_items(self, items, settings=None, seed=None, watch=None, lengths=None):
        questions = [item.split(":")[1] for item in items]
        self.calls.append(questions)
        self.seeds.append(seed)
        if self.bad in questions:
            raise ValueError(f"cannot use {self.bad}")
        if settings.use_nucleus_sampling:
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            texts = [f"{q}:{torch.randint(0, 10**9, (), generator=generator).item()}" for q in questions]
        else:
            texts = list(items)
        return [OutOfMemory() if q in self.oom else Answer([1], text, "stop") for q, text in zip(questions, texts)]


def work(kind: str, question: str, settings=None, **more) -> Work:
    return Work(f"{kind}:{question}", kind, settings or GREEDY, **more)


def run(pipeline, works, batch_size=4, window=0.05, queue_size=64, gap=0.0):
    """Submit `works` (with `gap` seconds between them) and return each one's answer or exception."""
    async def main():
        engine = Engine(pipeline, batch_size, window, queue_size)
        engine.start()
        futures = []
        for work in works:
            futures.append(engine.submit(work))
            await asyncio.sleep(gap)
        results = await asyncio.gather(*futures, return_exceptions=True)
        await engine.stop()
        return [r.text if isinstance(r, Answer) else r for r in results], engine.stats
    return asyncio.run(main())


def test_requests_batch_by_kind_and_settings_up_to_the_batch_size():
    pipeline = FakePipeline()
    works = [work("image", f"q{i}") for i in range(6)] + [
        work("video", "v0"), work("image", "b0", GREEDY.replace(num_beams=5))]
    results, stats = run(pipeline, works)
    assert results == [w.item for w in works]
    assert sorted(map(sorted, pipeline.calls)) == [["b0"], ["q0", "q1", "q2", "q3"], ["q4", "q5"], ["v0"]]
    assert stats.batches == 4 and stats.answered == 8 and stats.batch_sizes == {4: 1, 2: 1, 1: 2}


def test_without_a_window_a_lone_request_does_not_wait():
    pipeline = FakePipeline()
    results, _ = run(pipeline, [work("image", f"q{i}") for i in range(3)], window=0.0, gap=0.05)
    assert pipeline.calls == [["q0"], ["q1"], ["q2"]]


def test_seeded_sampling_runs_alone_and_repeats():
    pipeline = FakePipeline()
    works = [work("image", "s", SAMPLED, seed=7), work("image", "t", SAMPLED),
             work("image", "u", SAMPLED), work("image", "s", SAMPLED, seed=7)]
    torch.manual_seed(0)
    results, _ = run(pipeline, works)
    assert results[0] == results[3]
    assert sorted(map(sorted, pipeline.calls)) == [["s"], ["s"], ["t", "u"]]
    assert sorted(pipeline.seeds, key=str) == [7, 7, None]  # the seed goes to the call, not to torch's global state
    state = torch.get_rng_state()
    assert run(FakePipeline(), works[:1])[0] == results[:1]
    assert torch.equal(torch.get_rng_state(), state)


def test_a_request_out_of_memory_even_alone_fails_alone():
    pipeline = FakePipeline(oom=["q1"])
    results, stats = run(pipeline, [work("image", f"q{i}") for i in range(3)])
    assert results[0] == "image:q0" and results[2] == "image:q2" and isinstance(results[1], OutOfMemory)
    assert pipeline.calls == [["q0", "q1", "q2"]]  # one call: the pipeline halved the batch itself
    assert stats.failed == 1 and stats.answered == 2


def test_a_failing_request_fails_alone():
    pipeline = FakePipeline(bad="q1")
    results, stats = run(pipeline, [work("image", f"q{i}") for i in range(3)])
    assert results[0] == "image:q0" and results[2] == "image:q2"
    assert isinstance(results[1], ValueError) and stats.failed == 1 and stats.answered == 2


def test_a_full_queue_refuses_and_a_cancelled_request_is_dropped():
    async def main():
        engine = Engine(FakePipeline(), batch_size=4, window=0.2, queue_size=2)
        engine.start()
        first = engine.submit(work("image", "a"))
        second = engine.submit(work("image", "b"))
        with pytest.raises(QueueFull):
            engine.submit(work("image", "c"))
        first.cancel()
        assert (await second).text == "image:b"
        await engine.stop()
        return engine.stats
    stats = asyncio.run(main())
    assert stats.dropped == 1 and stats.answered == 1 and stats.batch_sizes == {1: 1}


def test_stopping_lets_the_batch_that_runs_finish():
    """Stopping while a batch runs waits for it: its answers reach the requests still waiting for them."""
    import threading

    running, finish = threading.Event(), threading.Event()

    class SlowPipeline(FakePipeline):
        def answer_items(self, items, settings=None, seed=None, **watching):
            running.set()
            finish.wait(10)
            return super().answer_items(items, settings, seed)

    async def main():
        engine = Engine(SlowPipeline(), 4, 0.0, 64)
        engine.start()
        future = engine.submit(work("video", "q"))
        await asyncio.get_running_loop().run_in_executor(None, running.wait, 10)
        stopping = asyncio.ensure_future(engine.stop())
        await asyncio.sleep(0.05)
        assert not stopping.done()
        finish.set()
        await stopping
        return future.result()

    assert asyncio.run(main()).text == "video:q"


class Crash(BaseException):
    """What kills the engine's worker here: not an Exception, so the engine's own one-by-one retry lets it through
    (as a bug in the worker's own code would)."""


class CrashingPipeline(FakePipeline):
    """Enough of a LynxPipeline for server.app; the question 'crash' kills the worker."""

    cfg = SimpleNamespace(batch_size_test=4, prompt="{question}", lower_text=False, max_input_tokens=40,
                          num_bridge_tokens=32, use_left_pad=True)
    device = "cpu"
    tokenizer = None
    prepare = SimpleNamespace(media=MediaOptions(transform=None))

    def answer_items(self, items, settings=None, seed=None, **watching):
        if any(item.endswith(":crash") for item in items):
            raise Crash("a bug in the worker")
        return super().answer_items(items, settings, seed)


def test_a_dead_worker_is_restarted_once_then_the_server_fails_fast():
    """server.app supervises the engine: the first death fails only its batch and the worker starts again; the
    second marks the server failed (/health and /metrics say so) and fails the queued request at once, not after
    --request-timeout."""
    from starlette.testclient import TestClient

    from server.app import create_app
    from server.errors import APIError
    from server.security import Limits

    app = create_app(CrashingPipeline, Limits(), "lynx", window=0.05)
    with TestClient(app) as client:
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        engine = app.state.lynx.engine

        async def ask(*works):
            return await asyncio.wait_for(asyncio.gather(*map(engine.submit, works), return_exceptions=True), 10)

        [crashed] = client.portal.call(ask, work("image", "crash"))
        assert isinstance(crashed, APIError) and crashed.status == 503 and "restarted" in crashed.message
        assert [a.text for a in client.portal.call(ask, work("image", "fine"))] == ["image:fine"]
        assert client.get("/health").status_code == 200

        crashed, queued = client.portal.call(ask, work("image", "crash"),
                                             work("video", "queued"))  # another batch: it waits
        assert isinstance(queued, APIError) and (queued.status, queued.code) == (503, "engine_failed")
        assert crashed.status == 503 and "restarted" not in crashed.message
        health = client.get("/health")
        assert health.status_code == 503 and "the engine stopped twice" in health.json()["error"]
        assert health.json()["queued"] == 0
        chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "q"}]})
        assert chat.status_code == 503 and "the engine stopped twice" in chat.json()["error"]["message"]
        assert "lynx_ready 0.0" in client.get("/metrics").text
