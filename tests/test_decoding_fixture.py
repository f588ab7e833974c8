"""Lynx's own decoder fed the exact inputs the original passed to its LLM (tests/fixtures/tiny/expected/sampling,
copied from the shared parity fixture): the original's ids for every batch of the paper's seeded beam sampling (all
20 seeds, images and videos), for beam search stopped at the length limit, and for greedy and beam search.
generate.py's runs of the same (cases_paper_decoding.yaml) are in tests/test_parity.py."""
import json

import pytest
import torch

import decoding.search
from conftest import FIXTURE, batch_inputs, build_tiny_lynx, saved_rows
from decoding import FastDecoder
from decoding.draws import exponential_race
from reference_428 import answer_ids, settings_from_kwargs

EXPECTED = FIXTURE / "expected"
BATCHES = {"images": 4, "videos": 2}
EOS = 2


@pytest.fixture(scope="module")
def decoder():
    """Lynx's decoder on the fixture's LLM, float32, as `decoder: auto` makes it on the CPU; one thread, as the
    original's fixture ran."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg, model, tokenizer = build_tiny_lynx()
    yield FastDecoder(model.LLM, tokenizer, prefix_len=cfg.num_bridge_tokens)
    torch.set_num_threads(threads)






def decode(decoder, inputs: dict, settings, seed: int | None = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return decoder.generate(inputs["inputs_embeds"], inputs["attention_mask"], settings, generator=generator)


def with_placeholder(ids: torch.Tensor) -> list:
    """Rows as the original's generate returned them: the BOS placeholder, then the decoder's ids."""
    return torch.cat([torch.ones_like(ids[:, :1]), ids], dim=1).tolist()


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("kind", BATCHES)
def test_paper_decoding_gives_the_original_ids_for_every_batch_and_seed(decoder, kind, seed):
    """Beam sampling (5 beams, top-k 3, top-p 0.9, length penalty -2), batch b seeded with seed + b."""
    saved = torch.load(EXPECTED / "sampling" / f"{kind}_seed{seed}_ids.pt", weights_only=True)
    for b in range(BATCHES[kind]):
        inputs = batch_inputs(kind, b)
        ids = decode(decoder, inputs, settings_from_kwargs(inputs["generate_kwargs"]), seed + b)
        assert with_placeholder(ids) == saved_rows(saved, "sequences", b), f"batch {b}"


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("kind", BATCHES)
def test_the_cuda_draw_gives_the_original_ids_on_the_cpu(decoder, kind, seed, monkeypatch):
    """The draw CUDA uses (decoding.draws.exponential_race), run on the CPU on the same shapes."""
    monkeypatch.setattr(decoding.search, "draw", exponential_race)
    saved = torch.load(EXPECTED / "sampling" / f"{kind}_seed{seed}_ids.pt", weights_only=True)
    for b in range(BATCHES[kind]):
        inputs = batch_inputs(kind, b)
        ids = decode(decoder, inputs, settings_from_kwargs(inputs["generate_kwargs"]), seed + b)
        assert with_placeholder(ids) == saved_rows(saved, "sequences", b), f"batch {b}"


@pytest.mark.parametrize("max_new_tokens", [4, 6, 8])
@pytest.mark.parametrize("kind", BATCHES)
def test_beam_search_at_the_length_limit_gives_the_original_ids(decoder, kind, max_new_tokens):
    """Beams cut at max_new_tokens are scored with length 1 + max_new_tokens and added at the end (4.28's
    finalize); transformers 5.24 gives other ids on some of these rows (expected/maxlen/README.md)."""
    saved = torch.load(EXPECTED / "maxlen" / f"{kind}_beam5_mnt{max_new_tokens}_ids.pt", weights_only=True)
    settings = settings_from_kwargs(saved["generate_kwargs"])
    for b in range(BATCHES[kind]):
        ids = decode(decoder, batch_inputs(kind, b), settings)
        assert with_placeholder(ids) == saved_rows(saved, "sequences", b), f"batch {b}"


@pytest.mark.parametrize("mode", ["greedy", "beam5"])
@pytest.mark.parametrize("kind", BATCHES)
def test_greedy_and_beam_search_give_the_original_ids(decoder, kind, mode):
    meta = [json.loads(line) for line in open(EXPECTED / f"{kind}_meta.jsonl")]
    for b in range(BATCHES[kind]):
        inputs = batch_inputs(kind, b)
        settings = settings_from_kwargs(inputs["generate_kwargs"]).replace(
            use_nucleus_sampling=False, num_beams=1 if mode == "greedy" else 5)
        want = [m[f"{mode}_ids"] for m in sorted(meta, key=lambda m: m["row"]) if m["batch"] == b]
        ids = decode(decoder, inputs, settings)
        assert answer_ids(torch.tensor(with_placeholder(ids)), EOS) == want, f"batch {b}"


def same_frequencies(a: list, b: list) -> tuple[float, float]:
    """Two equal-sized samples of answers: the chi-square statistic of their 2 x k table (answers seen fewer than 10
    times in both together merged into one cell) and a bound it exceeds with probability about 1e-6 when both come
    from one distribution."""
    assert len(a) == len(b)
    cells, rare = [], [0, 0]
    for answer in set(a) | set(b):
        x, y = a.count(answer), b.count(answer)
        if x + y >= 10:
            cells.append((x, y))
        else:
            rare = [rare[0] + x, rare[1] + y]
    if sum(rare):
        cells.append(tuple(rare))
    stat = sum((x - y) ** 2 / (x + y) for x, y in cells)
    df = max(len(cells) - 1, 1)
    z = 4.75  # Wilson-Hilferty quantile of chi-square at 1 - 1e-6
    return stat, df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


@pytest.mark.gpu
def test_cuda_answers_come_in_the_cpu_frequencies(decoder):
    """The paper's decoding on CUDA (fixed batch and prompt shapes, CUDA graphs, decoding.draws.exponential_race)
    draws other numbers than the CPU (torch.multinomial, the original's draws), from the same distribution: over
    many seeds each record's answers come in the same frequencies on both (float32 on both). Run on a GPU machine
    with `python -m pytest -m gpu`."""
    import copy

    from decoding import make_decoder

    assert torch.cuda.is_available(), "this test needs a CUDA device"
    cfg, model, tokenizer = build_tiny_lynx(decoder="auto")
    gpu = make_decoder(cfg, copy.deepcopy(model).cuda().LLM, tokenizer, "cuda", compile=False)
    assert gpu.cuda_graphs and gpu.batch_size == cfg.batch_size_test
    seeds = range(200)
    for kind in BATCHES:
        inputs = batch_inputs(kind, 0)
        settings = settings_from_kwargs(inputs["generate_kwargs"])
        cpu_answers, cuda_answers = [], []
        for seed in seeds:
            cpu_answers.append(answer_ids(torch.tensor(with_placeholder(decode(decoder, inputs, settings, seed))),
                                          EOS))
            ids = gpu.generate(inputs["inputs_embeds"].cuda(), inputs["attention_mask"].cuda(), settings,
                               generator=torch.Generator(device="cuda").manual_seed(seed)).cpu()
            cuda_answers.append(answer_ids(torch.tensor(with_placeholder(ids)), EOS))
        assert cuda_answers != cpu_answers  # other draws
        for row in range(len(inputs["attention_mask"])):
            on_cpu = [tuple(a[row]) for a in cpu_answers]
            on_cuda = [tuple(a[row]) for a in cuda_answers]
            assert len(set(on_cuda)) > 1 or len(set(on_cpu)) == 1, (kind, row)  # the draws are not lost
            stat, bound = same_frequencies(on_cpu, on_cuda)
            assert stat < bound, (kind, row, stat, bound)
