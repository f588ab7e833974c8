"""The CUDA path's mechanisms, on the CPU: graph capture and what happens when it fails (a compile failure, running
out of memory, a capture invalidated at its end), sampling draws inside graphs, and every CUDA call naming the
model's device. CUDA objects are stand-ins (tests/cuda_fakes.py); torch.compile uses its "eager" backend. Every
replayed step is checked against transformers' forward from scratch (cuda_fakes.EagerSteps): the answers of the
same decoder run step by step share the step's code, so they would not see a slot or mask mistake in it. The same
things on a real GPU: tests/test_gpu.py."""
import contextlib
import logging
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig

from conftest import build_tiny_lynx, image_batcher
from cuda_fakes import EagerSteps, FakeCuda, FakeStream
from configs.decoding import DecodingSettings
from decoding import FastDecoder
from decoding.cuda import CudaCalls
from decoding.graphs import CaptureFailed, captured
from decoding.llama import LlamaRunner
from decoding.workspace import Workspace
from models.adapters import add_output_adapters
from models.lynx import LynxLlamaForCausalLM

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (simulated)"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The fixture's model; `batch(positions)` collates image records, `fused(positions)` gives (embeds, mask)."""
    cfg, model, tokenizer = build_tiny_lynx()
    batch = image_batcher(cfg, tokenizer)

    def fused(positions):
        b = batch(positions)
        with torch.no_grad():
            return model.fuse(model.encode_media(b.pixel_values), b.input_ids, b.attention_mask)

    settings = DecodingSettings.from_config(cfg).replace(max_new_tokens=6)
    return SimpleNamespace(cfg=cfg, model=model, tok=tokenizer, batch=batch, fused=fused, settings=settings)


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches hang on the compiled functions' code objects, shared by every runner of the process."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def graph_decoder(tiny, fake, **kw) -> FastDecoder:
    """A decoder whose every replayed step is checked against eager decoding from scratch (cuda_fakes.EagerSteps)."""
    decoder = FastDecoder(tiny.model.LLM, tiny.tok, cuda=fake, prompt_len=72, prefix_len=32, **kw)
    fake.check = EagerSteps(decoder)
    return decoder


def eager_answers(tiny, positions, settings, **kw):
    embeds, mask = tiny.fused(positions)
    return FastDecoder(tiny.model.LLM, tiny.tok, prompt_len=72, prefix_len=32).generate(embeds, mask, settings, **kw)


# ---- torch.compile: Dynamo's recompile limit


def four_layer_llm():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, max_position_embeddings=256)
    llm = LynxLlamaForCausalLM(cfg).eval()
    add_output_adapters(llm.model.layers, 32, 2)
    return llm


def step_logits(runner: LlamaRunner, rows: int) -> torch.Tensor:
    ws = Workspace(runner.dims, rows, 8, 1, 4, "cpu", torch.float32)
    hidden = torch.randn(rows, 1, 32, generator=torch.Generator().manual_seed(rows))
    with torch.inference_mode():
        return runner(hidden, torch.full((rows, 1), 8), ws.k, ws.v, torch.tensor([8]), torch.zeros(rows, 1, 1, 16))


def test_compiled_steps_past_dynamos_recompile_limit(fresh_dynamo, monkeypatch, caplog):
    """fullgraph=True, dynamic=False: every batch shape is a compiled variant of its own, and Dynamo's default
    limit of 8 variants fails a 4-layer model at rows 3 already. At that limit (reproduced here) the shape runs
    uncompiled, with the same logits and one warning; at the runner's own, larger limit rows 1-5 all compile."""
    llm = four_layer_llm()
    plain = LlamaRunner(llm)
    monkeypatch.setattr(LlamaRunner, "RECOMPILES", torch._dynamo.config.recompile_limit)
    runner = LlamaRunner(llm, compile="eager")
    with caplog.at_level(logging.WARNING, logger="lynx"):
        for rows in range(1, 6):
            torch.testing.assert_close(step_logits(runner, rows), step_logits(plain, rows), rtol=1e-5, atol=1e-6)
    assert runner.uncompiled_shapes, "Dynamo's default limit was not reached: the reproduction no longer holds"
    assert (5, 1, 32) in runner.uncompiled_shapes and (1, 1, 32) not in runner.uncompiled_shapes
    failed = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(failed) == len(runner.uncompiled_shapes) and "FailOnRecompileLimitHit" in failed[0]
    step_logits(runner, 5)  # known now: no second warning
    assert len([r for r in caplog.records if "torch.compile failed" in r.getMessage()]) == len(failed)

    torch._dynamo.reset()
    monkeypatch.undo()
    runner = LlamaRunner(llm, compile="eager")
    for rows in range(1, 6):
        torch.testing.assert_close(step_logits(runner, rows), step_logits(plain, rows), rtol=1e-5, atol=1e-6)
    assert runner.uncompiled_shapes == set()


def test_graphs_stay_on_for_shapes_past_the_compile_limit(tiny, fresh_dynamo, monkeypatch):
    """A decoder that meets many (rows, beams) shapes, as a server does: shapes past the compile limit are captured
    uncompiled, every shape replays graphs, and the tokens are the eager decoder's."""
    monkeypatch.setattr(LlamaRunner, "RECOMPILES", 2)
    fake = FakeCuda()
    decoder = graph_decoder(tiny, fake, compile="eager")
    embeds, mask = tiny.fused([0, 1, 2, 3, 4])
    for beams in (1, 2):
        settings = tiny.settings.replace(num_beams=beams)
        for rows in range(1, 6):
            replays = fake.replays
            answers = decoder.generate(embeds[:rows], mask[:rows], settings)
            assert torch.equal(answers, eager_answers(tiny, list(range(rows)), settings)), (rows, beams)
            assert fake.replays - replays == settings.max_new_tokens, (rows, beams)  # every step a replay
    assert decoder.cuda_graphs and len(decoder.run.uncompiled_shapes) >= 5
    assert fake.check.checked == 10 * (settings.max_new_tokens - 1)  # every step's logits: eager decoding's


# ---- running out of memory


def oom_when(monkeypatch, condition):
    """LlamaRunner's decoding steps raise CUDA's out-of-memory error when condition(rows) holds."""
    real = LlamaRunner.__call__

    def call(self, hidden, *args, prefill=False):
        if not prefill and condition(hidden.shape[0]):
            raise torch.OutOfMemoryError(OOM)
        return real(self, hidden, *args, prefill=prefill)

    monkeypatch.setattr(LlamaRunner, "__call__", call)


@pytest.mark.parametrize("where", ["warm-up", "capture"])
def test_out_of_memory_while_capturing_reaches_the_halving(tiny, monkeypatch, where):
    """Out of memory in the warm-up or inside a capture is no reason to turn graphs off: it reaches the run's retry,
    which decodes halves at their own (smaller) size, with graphs; the stream and the allocator are restored."""
    from lynx.pipeline import LynxPipeline

    expected = [tiny.tok.decode(row) for row in eager_answers(tiny, [0, 1, 2, 3], tiny.settings).tolist()]
    fake = FakeCuda()
    oom_when(monkeypatch, lambda rows: rows > 2 and (fake.capturing or where == "warm-up"))
    pipeline = LynxPipeline(tiny.cfg, tiny.model, tiny.tok, "cpu")
    pipeline.settings = tiny.settings
    pipeline.decoder = graph_decoder(tiny, fake, batch_size=4)
    batch = tiny.batch([0, 1, 2, 3])
    assert [answer.text for answer in pipeline.answer_batch(batch)] == expected
    decoder = pipeline.decoder
    assert decoder.cuda_graphs and fake.current.name == "default"
    assert fake.abandoned == (1 if where == "capture" else 0)
    assert decoder.max_rows == {(1, 6): 2} and decoder.workspace.batch == 2
    assert fake.replays >= 2 * tiny.settings.max_new_tokens


def test_a_smaller_workspace_after_running_out_of_memory(tiny, monkeypatch):
    """A cache of 4 rows does not fit: the halves get caches of 2 rows, and a later full batch is refused at once
    (the retry halves it) instead of building the 4-row cache again."""
    import decoding.fast
    from lynx.pipeline import LynxPipeline

    runs = ([0, 1, 2, 3], [4, 5, 6, 7], [8, 9])
    expected = [[tiny.tok.decode(row) for row in eager_answers(tiny, p, tiny.settings).tolist()] for p in runs]
    built = []

    class SmallMemory(Workspace):
        def __init__(self, dims, batch, *args):
            built.append(batch)
            if batch > 2:
                raise torch.OutOfMemoryError(OOM)
            super().__init__(dims, batch, *args)

    monkeypatch.setattr(decoding.fast, "Workspace", SmallMemory)
    pipeline = LynxPipeline(tiny.cfg, tiny.model, tiny.tok, "cpu")
    pipeline.settings = tiny.settings
    pipeline.decoder = FastDecoder(tiny.model.LLM, tiny.tok, prompt_len=72, prefix_len=32, batch_size=4)
    for positions, answers in zip(runs, expected):
        batch = tiny.batch(positions)
        assert [answer.text for answer in pipeline.answer_batch(batch)] == answers
    assert built == [4, 2]  # the cache that failed, then the smaller one for every later batch and half
    assert [t.shape[0] for t in pipeline.decoder.workspace.k] == [2, 2]


# ---- a capture that fails


def test_a_capture_invalidated_at_its_end_is_loud_and_decodes_eagerly(tiny, caplog):
    fake = FakeCuda()
    fake.fail_capture_end = 1
    decoder = graph_decoder(tiny, fake, batch_size=4)
    embeds, mask = tiny.fused([0, 1, 2])
    expected = eager_answers(tiny, [0, 1, 2], tiny.settings)
    with caplog.at_level(logging.WARNING, logger="lynx"):
        assert torch.equal(decoder.generate(embeds, mask, tiny.settings), expected)
    warning = next(r.getMessage() for r in caplog.records if "CUDA graph" in r.getMessage())
    assert "4 rows x 1 beams" in warning and "step by step" in warning and "previous error" in warning
    assert fake.current.name == "default" and fake.abandoned == 1 and not fake.capturing
    assert fake.replays == 0 and decoder.cuda_graphs
    graphs = len(fake.graphs)
    assert torch.equal(decoder.generate(embeds, mask, tiny.settings), expected)  # the same shape: eager, no retry
    assert len(fake.graphs) == graphs and fake.replays == 0
    beams = tiny.settings.replace(num_beams=2)  # another shape still gets graphs
    assert torch.equal(decoder.generate(embeds, mask, beams), eager_answers(tiny, [0, 1, 2], beams))
    assert fake.replays == beams.max_new_tokens


@pytest.mark.parametrize("failure, raised", [(ValueError("operation not permitted when stream is capturing"),
                                              CaptureFailed), (torch.OutOfMemoryError(OOM), torch.OutOfMemoryError)])
def test_capture_restores_the_stream_whatever_fails(failure, raised):
    fake = FakeCuda()
    graph, side = fake.graph(), fake.stream()
    with pytest.raises(raised) as info:
        with captured(graph, fake, side, ("pool",), "16 rows x 5 beams"):
            assert fake.current is side
            raise failure
    assert fake.current.name == "default" and not fake.capturing
    if raised is CaptureFailed:
        assert "16 rows x 5 beams" in str(info.value) and "ValueError" in str(info.value)
    assert fake.abandoned == 1


def test_a_capture_that_cannot_begin_is_a_capture_failure():
    fake = FakeCuda()
    fake.fail_capture_begin = 1
    ran = []
    with pytest.raises(CaptureFailed, match="16 rows x 5 beams.*not permitted"):
        with captured(fake.graph(), fake, fake.stream(), ("pool",), "16 rows x 5 beams"):
            ran.append(True)
    assert not ran and fake.current.name == "default" and fake.abandoned == 1


def test_abandoning_a_capture_takes_the_allocator_out_of_capture_mode(monkeypatch):
    """After a capture that did not end cleanly the graph is reset (torch lets go of the pool where it knows how),
    then the allocator is told to stop sending allocations to the pool: torch versions that did so already answer
    "not currently recording", which is no error. The pool itself is never released here."""
    calls = []

    def end(*args):
        calls.append(args)
        if len(calls) > 1:
            raise RuntimeError("endAllocatePool: not currently recording to mempool_id")

    monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", end)
    monkeypatch.setattr(torch._C, "_cuda_releasePool", lambda *a: pytest.fail("the pool was released"))
    fake = FakeCuda()
    cuda = CudaCalls(torch.device("cuda:1"))
    for _ in range(2):
        cuda.abandon(fake.graph(), (0, 7))
    assert calls == [(1, (0, 7)), (1, (0, 7))] and fake.resets == 2


# ---- sampling inside graphs


@pytest.mark.parametrize("beams", [1, 3])
def test_replayed_steps_draw_what_steps_draw(tiny, beams):
    """Sampled decoding with graphs: the draws of a seeded generator, or of torch's default one, are those of the
    eager steps, and the generator ends where the eager run leaves it."""
    settings = tiny.settings.replace(num_beams=beams, use_nucleus_sampling=True, top_k=20, top_p=0.95)
    embeds, mask = tiny.fused([0, 1, 2])
    fake = FakeCuda()
    graphs = graph_decoder(tiny, fake, batch_size=4)
    eager = FastDecoder(tiny.model.LLM, tiny.tok, prompt_len=72, prefix_len=32, batch_size=4)
    for seed in (1, 2):
        mine, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        assert torch.equal(graphs.generate(embeds, mask, settings, generator=mine),
                           eager.generate(embeds, mask, settings, generator=theirs))
        assert torch.equal(mine.get_state(), theirs.get_state())
        torch.manual_seed(seed)
        with_default = graphs.generate(embeds, mask, settings)
        state = torch.get_rng_state()
        torch.manual_seed(seed)
        assert torch.equal(with_default, eager.generate(embeds, mask, settings))
        assert torch.equal(torch.get_rng_state(), state)
    assert fake.replays == 4 * settings.max_new_tokens
    assert fake.check.checked == 4 * (settings.max_new_tokens - 1)  # every step's logits: eager decoding's
    assert all(g.generators == [graphs.graph_rng] for g in fake.graphs)


# ---- every CUDA call names the device


class Recorder:
    """torch.cuda stand-ins that record the device each call names."""

    def __init__(self, monkeypatch):
        self.calls = []
        self.current = {}
        record = self.calls.append

        def stream(device=None, **_):
            record(("Stream", torch.device(device)))
            return FakeStream("side", device)

        def current_stream(device=None):
            record(("current_stream", None if device is None else torch.device(device)))
            return self.current.setdefault(device, FakeStream("default", device or "cuda:0"))

        @contextlib.contextmanager
        def use_stream(s):
            record(("stream", s.device))
            yield

        @contextlib.contextmanager
        def device(d):
            record(("device", torch.device(d)))
            yield

        monkeypatch.setattr(torch.cuda, "Stream", stream)
        monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
        monkeypatch.setattr(torch.cuda, "stream", use_stream)
        monkeypatch.setattr(torch.cuda, "device", device)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: record(("synchronize", torch.device(d))))
        event = SimpleNamespace(record=lambda s: record(("record", s.device)))
        monkeypatch.setattr(torch.cuda, "Event", lambda **_: event)
        monkeypatch.setattr(torch.cuda, "default_generators", {1: "generator of cuda:1"}, raising=False)
        monkeypatch.setattr(torch, "Generator", lambda device=None: record(("Generator", torch.device(device))))


def test_graph_capture_calls_name_the_models_device(monkeypatch):
    rec = Recorder(monkeypatch)
    cuda = CudaCalls(torch.device("cuda:1"))
    cuda.stream()
    cuda.current_stream()
    cuda.synchronize()
    cuda.generator()
    assert cuda.default_generator() == "generator of cuda:1"
    cuda1 = torch.device("cuda:1")
    assert rec.calls == [("Stream", cuda1), ("current_stream", cuda1), ("synchronize", cuda1), ("Generator", cuda1)]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # inside the decoder's on_device block
    for device, held in (("cuda:1", True), ("cuda", True), ("cuda:0", False), ("cpu", False)):
        assert cuda.holds(SimpleNamespace(device=torch.device(device))) == held, device


def test_media_ahead_waits_on_the_models_device(monkeypatch):
    """On cuda:1 the side stream, the waits and the event are on GPU 1, and the LLM's stream (GPU 1's current one)
    waits for the ViT: no call falls back to the current device."""
    from lynx.media_ahead import MediaAhead

    rec = Recorder(monkeypatch)
    cuda1 = torch.device("cuda:1")
    visual = SimpleNamespace(streams=[], record_stream=lambda s: visual.streams.append(s))
    pixels = SimpleNamespace(to=lambda device, non_blocking: (rec.calls.append(("pixels to", device)), pixels)[1])
    model = SimpleNamespace(device=cuda1, encode_media=lambda p: visual)
    ahead = MediaAhead(model)
    ahead.submit(pixels)
    assert ahead.take() is visual
    assert ("current_stream", None) not in rec.calls
    assert {c[1] for c in rec.calls} == {cuda1}
    llm_stream = rec.current[cuda1]
    assert visual.streams == [llm_stream] and llm_stream.waited  # the event the side stream recorded


def test_the_pipeline_works_on_its_device(tiny, monkeypatch):
    """Loading and answering run with the pipeline's device current (a server answers on a thread of its own,
    which would start on GPU 0); a single process given cuda:1 selects it at start-up."""
    import lynx.pipeline
    from lynx.processes import Processes

    active = []

    @contextlib.contextmanager
    def on_device(device):
        active.append(str(device))
        yield
        active.pop()

    monkeypatch.setattr(lynx.pipeline, "on_device", on_device)
    pipeline = lynx.pipeline.LynxPipeline(tiny.cfg, tiny.model, tiny.tok, "cpu")
    pipeline.device = "cuda:1"
    seen = []
    pipeline.decoder = SimpleNamespace(generate=lambda embeds, *a, **k: (
        seen.append(list(active)), torch.full((embeds.shape[0], 1), tiny.tok.eos_id))[1])
    pipeline.answer_batch(tiny.batch([0]))
    assert seen == [["cuda:1"]]
    monkeypatch.setattr(lynx.pipeline, "check_device", lambda device: None)
    monkeypatch.setattr(lynx.pipeline, "build_lynx",
                        lambda cfg, device, dtype: (seen.append(list(active)), (tiny.model, tiny.tok))[1])
    monkeypatch.setattr(lynx.pipeline, "make_decoder", lambda *a: None)
    lynx.pipeline.LynxPipeline.build(tiny.cfg, "cuda:1")
    assert seen[-1] == ["cuda:1"]

    selected = []
    monkeypatch.setattr(torch.cuda, "set_device", selected.append)
    for device in ("cuda:1", "cuda", "cpu"):
        assert Processes().join(device) == device
    assert selected == ["cuda:1"]


# ---- the decoder's watch between replayed steps


def test_a_watch_between_replayed_steps_sees_the_real_rows_and_stops_the_replays(tiny):
    """With graphs and rows padded to batch_size 4, the watch sees the 3 real rows' ids so far every 8 steps, as
    eager decoding chose them; asking to stop at the second check ends the replays there."""
    settings = tiny.settings.replace(num_beams=1, use_nucleus_sampling=False, max_new_tokens=24, min_length=24)
    embeds, mask = tiny.fused([0, 1, 2])
    expected = eager_answers(tiny, [0, 1, 2], settings)
    fake = FakeCuda()
    graphs = graph_decoder(tiny, fake, batch_size=4)
    seen = []
    assert torch.equal(graphs.generate(embeds, mask, settings, watch=lambda ids: seen.append(ids.clone()) and False),
                       expected)
    assert [ids.shape for ids in seen] == [(3, 8), (3, 16)]
    assert all(torch.equal(ids, expected[:, :ids.shape[1]]) for ids in seen)
    replays = fake.replays
    stopped = graphs.generate(embeds, mask, settings, watch=lambda ids: ids.shape[1] == 16)
    assert torch.equal(stopped, expected[:, :16]) and fake.replays - replays == 16
