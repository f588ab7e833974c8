"""The CUDA path on a real GPU (`python -m pytest -m gpu`; left out of the default run, which has no GPU; the CPU
tests of the same mechanisms are in tests/test_cuda_path.py): graphs captured and replayed on other inputs than the
capture's, in bfloat16 with torch.compile and sampling; shapes past Dynamo's recompile limit; a capture that fails
and what it leaves behind; the visual prefix computed ahead; a second GPU; the factory's choice on CUDA."""
import copy
import gc
import logging
import warnings
from types import SimpleNamespace

import pytest
import torch

from conftest import build_tiny_lynx, fixture_config, image_batcher
from configs.decoding import DecodingSettings
from decoding import FastDecoder
from decoding.llama import LlamaRunner

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tiny():
    """The fixture's model on the CPU (float32), its records' pixels and prompts; `fused(model, positions)`."""
    assert torch.cuda.is_available(), "tests marked gpu need a CUDA device"
    cfg, model, tokenizer = build_tiny_lynx()
    batch = image_batcher(cfg, tokenizer)

    def fused(on, positions):
        b = batch(positions)
        with torch.inference_mode():
            return on.fuse(on.encode_media(b.pixel_values.to(on.device)), b.input_ids.to(on.device),
                           b.attention_mask.to(on.device))

    return SimpleNamespace(cfg=cfg, model=model, tok=tokenizer, batch=batch, fused=fused,
                           settings=DecodingSettings.from_config(cfg))


def on_gpu(tiny, device="cuda", dtype=torch.bfloat16):
    return copy.deepcopy(tiny.model).to(device, dtype).eval()


def seeded(seed: int, device="cuda") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@pytest.fixture
def replays():
    """Counts CUDA-graph replays (torch's global replay hook)."""
    count = SimpleNamespace(n=0)

    def hook(graph):
        count.n += 1

    handle = torch.cuda.graphs.register_graph_replay_start_hook(hook)
    yield count
    handle.remove()


MODES = {"greedy": dict(num_beams=1, use_nucleus_sampling=False),
         "beam5": dict(num_beams=5, use_nucleus_sampling=False),
         "paper": dict(num_beams=5, use_nucleus_sampling=True),
         "sampling": dict(num_beams=1, use_nucleus_sampling=True)}


def test_graphs_replay_new_inputs_in_bfloat16_with_compile_and_sampling(tiny, replays):
    """Captured on one batch, replayed on others: the tokens of the same compiled steps run one by one (the same
    kernels), sampled ones with the same seeded generator; every step after the first batch is a replay."""
    model = on_gpu(tiny)
    graphs = FastDecoder(model.LLM, tiny.tok, compile=True, prompt_len=72, batch_size=4, prefix_len=32)
    eager = FastDecoder(model.LLM, tiny.tok, compile=True, cuda_graphs=False, prompt_len=72, batch_size=4,
                        prefix_len=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "The CUDA Graph is empty": captured on another device
        for mode, keys in MODES.items():
            settings = tiny.settings.replace(**keys)
            for positions in ([0, 1, 2, 3], [4, 5, 6], [7, 8, 9, 0]):
                embeds, mask = tiny.fused(model, positions)
                before = replays.n
                mine = graphs.generate(embeds, mask, settings, generator=seeded(7))
                theirs = eager.generate(embeds, mask, settings, generator=seeded(7))
                assert torch.equal(mine, theirs), (mode, positions)
                assert replays.n - before >= 8, (mode, positions, "graphs were not replayed")
            torch.manual_seed(3)  # torch's default CUDA generator: graphs draw from it too
            mine = graphs.generate(embeds, mask, settings)
            torch.manual_seed(3)
            assert torch.equal(mine, eager.generate(embeds, mask, settings)), mode
    assert graphs.cuda_graphs and not graphs.run.uncompiled_shapes


def test_shapes_past_the_recompile_limit_keep_their_graphs(tiny, replays, monkeypatch):
    """Many (rows, beams) shapes in one process, as a server meets them: past the limit a shape is captured
    uncompiled, graphs stay on for every shape."""
    monkeypatch.setattr(LlamaRunner, "RECOMPILES", 1)
    model = on_gpu(tiny)
    graphs = FastDecoder(model.LLM, tiny.tok, compile=True, prompt_len=72, prefix_len=32)
    eager = FastDecoder(model.LLM, tiny.tok, compile=True, cuda_graphs=False, prompt_len=72, prefix_len=32)
    for beams in (1, 3):
        settings = tiny.settings.replace(num_beams=beams, use_nucleus_sampling=False)
        for rows in range(1, 7):
            embeds, mask = tiny.fused(model, list(range(rows)))
            before = replays.n
            assert torch.equal(graphs.generate(embeds, mask, settings), eager.generate(embeds, mask, settings))
            assert replays.n - before >= 8, (rows, beams)
    assert graphs.cuda_graphs and len(graphs.run.uncompiled_shapes) >= 10


def reserved_growth(device) -> int:
    """Reserved memory after freeing blocks used on another stream, ten times: flat unless the allocator still
    thinks a capture is under way (then it defers those frees for good)."""
    other = torch.cuda.Stream(device=device)
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_reserved(device)
    for _ in range(10):
        block = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)
        block.record_stream(other)
        del block
        torch.cuda.synchronize(device)
    return torch.cuda.memory_reserved(device) - start


@pytest.mark.parametrize("failure", ["unjoined stream", "out of memory"])
def test_a_failed_capture_leaves_stream_and_allocator_as_they_were(tiny, monkeypatch, caplog, failure):
    """A capture invalidated at its end (a forked stream never joined), or out of memory inside a capture: the
    current stream is the one before, the allocator is out of capture mode, and the answers are right (that batch
    decoded step by step, or the out-of-memory error raised for the caller's retry)."""
    model = on_gpu(tiny)
    decoder = FastDecoder(model.LLM, tiny.tok, prompt_len=72, batch_size=4, prefix_len=32)
    embeds, mask = tiny.fused(model, [0, 1, 2])
    settings = tiny.settings
    expected = FastDecoder(model.LLM, tiny.tok, cuda_graphs=False).generate(embeds, mask, settings)
    real_step = FastDecoder._step
    scratch = torch.zeros(8, device="cuda")
    fork = torch.cuda.Stream(device="cuda")
    broken = []

    def step(self, ws, s, n_keys, generator=None):
        if torch.cuda.is_current_stream_capturing() and not broken:
            broken.append(True)
            if failure == "out of memory":
                raise torch.OutOfMemoryError("CUDA out of memory (simulated inside a capture)")
            fork.wait_stream(torch.cuda.current_stream(scratch.device))
            with torch.cuda.stream(fork):
                scratch.add_(1)  # never joined back: cudaStreamEndCapture fails
        return real_step(self, ws, s, n_keys, generator)

    monkeypatch.setattr(FastDecoder, "_step", step)
    stream = torch.cuda.current_stream()
    with caplog.at_level(logging.WARNING, logger="lynx"):
        if failure == "out of memory":
            with pytest.raises(torch.OutOfMemoryError):
                decoder.generate(embeds, mask, settings)
            answers = decoder.generate(embeds[:2], mask[:2], settings, rows=2)  # the retry's half, with graphs
            assert torch.equal(answers, expected[:2, :answers.shape[1]])
        else:
            assert torch.equal(decoder.generate(embeds, mask, settings), expected)
            assert any("4 rows x 1 beams" in r.getMessage() for r in caplog.records)
    assert broken and torch.cuda.current_stream() == stream and not torch.cuda.is_current_stream_capturing()
    assert decoder.cuda_graphs
    assert reserved_growth("cuda") < 2 * 64 * 2**20


def test_media_ahead_gives_the_inline_prefix(tiny):
    from lynx.media_ahead import MediaAhead

    model = on_gpu(tiny)
    pixels = [tiny.batch(p).pixel_values.pin_memory() for p in ([0, 1, 2], [3, 4, 5], [6, 7])]
    with torch.inference_mode():
        inline = [model.encode_media(p.to("cuda")) for p in pixels]
        ahead = MediaAhead(model)
        ahead.submit(pixels[0])
        for j in range(len(pixels)):
            visual = ahead.take()
            if j + 1 < len(pixels):
                ahead.submit(pixels[j + 1])
            torch.cuda._sleep(10**7)  # the current stream busy while the next prefix is computed
            torch.testing.assert_close(visual, inline[j], rtol=1e-2, atol=1e-2)  # a race leaves garbage


def test_a_second_gpu(tiny, replays):
    if torch.cuda.device_count() < 2:
        pytest.skip("this machine has one GPU: the cuda:1 case needs two")
    from lynx.media_ahead import MediaAhead

    model = on_gpu(tiny, "cuda:1")
    gc.collect()
    before_gpu0 = torch.cuda.memory_allocated(0)
    decoder = FastDecoder(model.LLM, tiny.tok, compile=True, prompt_len=72, batch_size=4, prefix_len=32)
    eager = FastDecoder(model.LLM, tiny.tok, compile=True, cuda_graphs=False, prompt_len=72, batch_size=4,
                        prefix_len=32)
    settings = tiny.settings.replace(num_beams=5, use_nucleus_sampling=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for positions in ([0, 1, 2], [3, 4, 5, 6]):
            embeds, mask = tiny.fused(model, positions)
            before = replays.n
            mine = decoder.generate(embeds, mask, settings, generator=seeded(1, "cuda:1"))
            theirs = eager.generate(embeds, mask, settings, generator=seeded(1, "cuda:1"))
            assert torch.equal(mine, theirs) and replays.n - before >= 8
    with torch.inference_mode():
        pixels = tiny.batch([0, 1, 2]).pixel_values.pin_memory()
        ahead = MediaAhead(model)
        ahead.submit(pixels)
        torch.cuda._sleep(10**7)
        torch.testing.assert_close(ahead.take(), model.encode_media(pixels.to("cuda:1")), rtol=1e-2, atol=1e-2)
    assert torch.cuda.current_device() == 0 and torch.cuda.memory_allocated(0) <= before_gpu0


def test_decoder_auto_is_the_fast_decoder_on_cuda(in_fixture):
    """The shipped `decoder: auto` on CUDA: Lynx's own decoder, CUDA graphs and compiled layers, on the GPU."""
    from configs.schema import config_from_dict
    from lynx.pipeline import LynxPipeline

    cfg = config_from_dict(fixture_config(decoder="auto", batch_size_test=4))  # the shapes compiled above
    pipeline = LynxPipeline.from_config(cfg, "cuda")
    decoder = pipeline.decoder
    assert isinstance(decoder, FastDecoder) and decoder.cuda_graphs and decoder.run.compiled
    assert decoder.device.type == "cuda" and decoder.cuda.device == decoder.device
    assert pipeline.answer([("images/img_a.jpg", "What is in the image?")]) == [pipeline.answer(
        [("images/img_a.jpg", "What is in the image?")])[0]]  # answers, graphs replayed the second time
