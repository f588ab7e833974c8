"""The decoder's check as a hook, and what the server builds on it, in this process on the tiny fixture (CPU): a
watch that asks nothing changes no id (both decoders) and one that asks stops the decoding at that check; the
engine stops a batch within one check once every one of its requests has gone, and not while one is still wanted;
requests that differ only in `max_tokens` share a batch and get the answers they get alone (the original's ids);
a batch of rows with their own limits stops once every row is past its limit; the streamed text is final as it
goes out. (Streaming and a client leaving mid-stream over HTTP: tests/test_serve_decoding.py.)"""
from __future__ import annotations

import asyncio
import random
import threading

import pytest
import torch

from conftest import FIXTURE, fixture_config, read_jsonl
from decoding import FastDecoder, HFDecoder
from server.engine import Engine, Work
from server.streaming import FinalText

LONG = dict(max_new_tokens=200, min_length=200)  # EOS banned: the answer runs to its limit unless stopped


@pytest.fixture(scope="module")
def pipeline():
    from configs.schema import config_from_dict
    from lynx.pipeline import LynxPipeline

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(FIXTURE)
        return LynxPipeline.build(config_from_dict(fixture_config()), "cpu")


def records() -> list[dict]:
    return read_jsonl(FIXTURE / "data" / "Open_VQA_images_tiny.jsonl")


def item_of(pipeline, record: dict):
    return pipeline.item((FIXTURE / record["image"]).read_bytes(), record["question"], "image")


def greedy(pipeline, **keys):
    return pipeline.settings.replace(**{"num_beams": 1, "use_nucleus_sampling": False, **keys})


@pytest.fixture
def steps(monkeypatch):
    """The decoding steps Lynx's decoder runs (each one LLM forward on a chosen token), counted; `at[n]` is called
    before step n (from 1)."""
    counter = {"n": 0, "at": {}}
    real = FastDecoder._step

    def step(self, *args, **kwargs):
        counter["n"] += 1
        counter["at"].get(counter["n"], lambda: None)()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FastDecoder, "_step", step)
    return counter


# ---------------------------------------------------------------- the hook in the decoders


@pytest.mark.parametrize("decoder", [FastDecoder, HFDecoder])
def test_a_watch_sees_the_ids_so_far_and_stops_the_decoding_when_it_asks(pipeline, decoder):
    """Every 8 tokens the watch gets the ids chosen so far; asking nothing, the answer is the same ids; asking to
    stop at the second check, the answer is the first 16 of them. Beams: no ids so far (None), same answer."""
    dec = decoder(pipeline.model.LLM, pipeline.tokenizer)
    batch = pipeline.collate([item_of(pipeline, r) for r in records()[:3]])
    with torch.no_grad():
        embeds, mask = pipeline.model.fuse(pipeline.model.encode_media(batch.pixel_values), batch.input_ids,
                                           batch.attention_mask)
    settings = greedy(pipeline, max_new_tokens=40, min_length=40)
    plain = dec.generate(embeds, mask, settings)
    seen = []
    assert torch.equal(dec.generate(embeds, mask, settings, watch=lambda ids: seen.append(ids.clone()) and False),
                       plain)
    assert [ids.shape for ids in seen[:4]] == [(3, 8), (3, 16), (3, 24), (3, 32)]
    assert all(torch.equal(ids, plain[:, :ids.shape[1]]) for ids in seen)
    calls = []
    stopped = dec.generate(embeds, mask, settings, watch=lambda ids: calls.append(1) or len(calls) == 2)
    assert torch.equal(stopped, plain[:, :16]) and len(calls) == 2
    beams = settings.replace(num_beams=3)
    told = []
    assert torch.equal(dec.generate(embeds, mask, beams, watch=lambda ids: told.append(ids) and False),
                       dec.generate(embeds, mask, beams))
    assert told and set(told) == {None}


# ---------------------------------------------------------------- a batch whose clients have all gone


def run_engine(pipeline, works, at_step=None, batch_size=8, window=0.5, steps=None):
    """Submit `works` at once; `at_step(engine, futures)` runs on the event loop before that decoding step, while
    the model's thread waits for it. Returns (answers or the exception of each, the engine's stats)."""
    async def main():
        loop = asyncio.get_running_loop()
        engine = Engine(pipeline, batch_size, window, 64)
        engine.start()
        futures = [engine.submit(w) for w in works]
        if at_step is not None:
            number, action = at_step
            done = threading.Event()

            def on_loop():
                action(futures)
                done.set()
            steps["at"][number] = lambda: (loop.call_soon_threadsafe(on_loop), done.wait(10))
        results = await asyncio.gather(*futures, return_exceptions=True)
        while engine.busy:  # a batch whose requests were all cancelled still ends
            await asyncio.sleep(0.01)
        await engine.stop()
        return results, engine.stats
    return asyncio.run(main())


@pytest.mark.parametrize("beams", [1, 3])
def test_a_batch_stops_within_one_check_once_every_client_has_gone(pipeline, steps, beams):
    """Two requests of 200 tokens; both cancelled (their clients gone) before step 20: the batch stops at the next
    check (step 24: every 8 steps) instead of running its 199 steps."""
    settings = greedy(pipeline, num_beams=beams, **LONG)
    works = [Work(item_of(pipeline, r), "image", settings) for r in records()[:2]]
    results, stats = run_engine(pipeline, works, (20, lambda futures: [f.cancel() for f in futures]), steps=steps)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    check_every = pipeline.decoder.check_every
    assert 20 <= steps["n"] <= 20 + check_every, steps["n"]
    assert stats.batch_sizes == {2: 1} and stats.stopped == 1 and stats.answered == 0


def test_a_batch_runs_on_while_one_of_its_clients_waits(pipeline, steps):
    settings = greedy(pipeline, **LONG)
    works = [Work(item_of(pipeline, r), "image", settings) for r in records()[:2]]
    results, stats = run_engine(pipeline, works, (20, lambda futures: futures[0].cancel()), steps=steps)
    assert isinstance(results[0], asyncio.CancelledError)
    assert len(results[1].ids) == 200 and results[1].finish == "length"
    assert steps["n"] == 199 and stats.stopped == 0 and stats.answered == 1


# ---------------------------------------------------------------- requests that differ only in max_tokens


def test_requests_that_differ_only_in_max_tokens_share_a_batch_and_get_their_own_answers(pipeline):
    """max_tokens 1..8 for the record of index 0 (the original's greedy answer: 7 ids, EOS last) at once: one
    batch of 8, each answer the first max_tokens of the original's ids, `length` below 7 and `stop` from 7 on, as
    each request gets alone."""
    record = next(r for r in records() if r["index"] == 0)
    meta = {m["index"]: m for m in read_jsonl(FIXTURE / "expected" / "images_meta.jsonl")}[0]
    original = meta["greedy_ids"]
    assert len(original) == 7 and original[-1] == pipeline.tokenizer.eos_id
    item = item_of(pipeline, record)
    works = [Work(item, "image", greedy(pipeline, max_new_tokens=n)) for n in range(1, 9)]
    results, stats = run_engine(pipeline, works)
    assert stats.batch_sizes == {8: 1}
    alone = [pipeline.answer_items([item], greedy(pipeline, max_new_tokens=n))[0] for n in range(1, 9)]
    assert results == alone
    assert [r.ids for r in results] == [original[:n] for n in range(1, 9)]
    assert [r.finish for r in results] == ["length"] * 6 + ["stop"] * 2


def test_beam_search_batches_only_requests_of_one_max_tokens(pipeline):
    item = item_of(pipeline, records()[0])
    beams = pipeline.settings.replace(num_beams=3, use_nucleus_sampling=False)
    works = [Work(item, "image", beams.replace(max_new_tokens=n)) for n in (4, 4, 6)]
    _, stats = run_engine(pipeline, works)
    assert stats.batch_sizes == {2: 1, 1: 1}


def test_rows_with_their_own_limits_stop_once_each_is_past_its_own(pipeline, steps):
    """Decoded to 200 tokens with EOS banned, rows limited to 2 and 3 tokens stop at the first check (8 steps), each
    cut at its own limit."""
    items = [item_of(pipeline, r) for r in records()[:2]]
    whole = pipeline.answer_items(items, greedy(pipeline, max_new_tokens=8, min_length=4))
    steps["n"] = 0
    cut = pipeline.answer_items(items, greedy(pipeline, **LONG), lengths=[2, 3])
    assert steps["n"] == pipeline.decoder.check_every
    assert [a.ids for a in cut] == [whole[0].ids[:2], whole[1].ids[:3]]
    assert [a.finish for a in cut] == ["length", "length"]


def test_rows_own_limits_are_refused_where_they_would_change_answers(pipeline):
    items = [item_of(pipeline, r) for r in records()[:2]]
    beams = pipeline.settings.replace(num_beams=3, use_nucleus_sampling=False, max_new_tokens=4)
    with pytest.raises(ValueError, match="share one length limit with beams"):
        pipeline.answer_items(items, beams, lengths=[2, 4])
    with pytest.raises(ValueError, match="from 1 to max_new_tokens"):
        pipeline.answer_items(items, greedy(pipeline, max_new_tokens=4), lengths=[2, 5])


# ---------------------------------------------------------------- the streamed text


def test_streamed_text_is_final_when_it_goes_out(pipeline):
    """Random answers, byte pieces among them (a character's UTF-8 bytes over several ids): what goes out at each
    id, then the rest of the answer, is the answer's text, and never text that a later id would change."""
    tok, draw = pipeline.tokenizer, random.Random(0)
    bytes_pieces, words = list(range(3, 259)), list(range(259, 1000))
    space, byte = tok.sp.piece_to_id("\u2581"), tok.sp.piece_to_id
    # "t", a space, then a no-break space in two bytes at the end: the answer's text is stripped to "t"
    directed = [[tok.sp.piece_to_id("\u2581t"), space, byte("<0xC2>"), byte("<0xA0>")]]
    randomly = [[draw.choice(bytes_pieces if draw.random() < 0.5 else words) for _ in range(draw.randint(1, 12))]
                for _ in range(300)]
    for ids in directed + randomly:
        answer = tok.decode(ids)
        text, streamed = FinalText(tok.decode), ""
        for n in range(1, len(ids) + 1):
            streamed += text.more(ids[:n])
            assert answer.startswith(streamed), (ids, n)
        assert streamed + text.rest(answer) == answer, ids
