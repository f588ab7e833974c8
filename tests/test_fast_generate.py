"""The fast decoder against transformers' generate on the tiny fixture (CPU, float32): same tokens for greedy and
beam search; sampling checked by its invariants."""
import copy
import os
import warnings

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (MinNewTokensLengthLogitsProcessor, NoRepeatNGramLogitsProcessor,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from conftest import FIXTURE, build_tiny_lynx, fixture_cases, fixture_config, read_jsonl as read_answers, run_generate
from dataset.batching import Collator, LynxEvalDataset
from dataset.records import read_jsonl
from models.decoding import generation_config
from models.fast_generate import (FastGenerator, SearchSettings, UnsupportedOptions, ban_early_eos,
                                  ban_repeated_ngrams, fast_decoder_for, keep_top_k, keep_top_p)


@pytest.fixture(scope="module")
def tiny():
    """(config, model, tokenizer) of the fixture, and a function giving fused (embeds, mask) of fixture records."""
    cfg, model, tokenizer = build_tiny_lynx()
    cwd = os.getcwd()
    os.chdir(FIXTURE)
    try:
        records = {kind: read_jsonl(f"./data/Open_VQA_{kind}_tiny.jsonl") for kind in ("images", "videos")}
        items = {}
        for kind, key in (("images", "image"), ("videos", "video")):
            cfg.vision_prompt_dict = key
            dataset = LynxEvalDataset(records[kind], cfg, tokenizer)
            items[kind] = [dataset[p] for p in range(len(records[kind]))]
        cfg.vision_prompt_dict = "image"
    finally:
        os.chdir(cwd)

    def fused(kind, positions, left_pad=True):
        batch = Collator(tokenizer.pad_id, left_pad)([items[kind][p] for p in positions])
        with torch.no_grad():
            return model.fuse(model.encode_media(batch.pixel_values), batch.input_ids, batch.attention_mask)

    return cfg, model, tokenizer, fused, {kind: len(v) for kind, v in items.items()}


def config_for(tiny, **keys):
    cfg, _, tokenizer, _, _ = tiny
    cfg = copy.copy(cfg)
    for key, value in keys.items():
        setattr(cfg, key, value)
    return generation_config(cfg, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)


def hf_generate(llm, embeds, mask, gen):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return llm.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=gen)


@pytest.mark.parametrize("kind", ["images", "videos"])
@pytest.mark.parametrize("beams", [1, 5])
def test_every_fixture_batch_gives_the_tokens_of_generate(tiny, kind, beams):
    _, model, _, fused, sizes = tiny
    gen = config_for(tiny, num_beams=beams, use_nucleus_sampling=False)
    fast = FastGenerator(model.LLM)
    for start in range(0, sizes[kind], 3):
        embeds, mask = fused(kind, list(range(start, min(start + 3, sizes[kind]))))
        assert torch.equal(fast.generate(embeds, mask, gen), hf_generate(model.LLM, embeds, mask, gen))


@pytest.mark.parametrize("kind", ["images", "videos"])
@pytest.mark.parametrize("beams", [1, 5])
def test_right_padding_and_single_rows(tiny, kind, beams):
    """Right-padded rows read their first token at a pad slot; positions must still count attended tokens."""
    _, model, _, fused, _ = tiny
    gen = config_for(tiny, num_beams=beams, use_nucleus_sampling=False)
    fast = FastGenerator(model.LLM)
    embeds, mask = fused(kind, [0, 1, 2], left_pad=False)
    assert (mask[:, -1] == 0).any()
    assert torch.equal(fast.generate(embeds, mask, gen), hf_generate(model.LLM, embeds, mask, gen))
    embeds, mask = fused(kind, [2])
    assert torch.equal(fast.generate(embeds, mask, gen), hf_generate(model.LLM, embeds, mask, gen))


@pytest.mark.parametrize("left_pad", [True, False])
def test_fixed_shapes_change_no_token(tiny, left_pad):
    """Extra pads after the visual prefix and extra batch rows (what CUDA graphs need) leave every answer as it is."""
    _, model, _, fused, _ = tiny
    fixed = FastGenerator(model.LLM, prompt_len=32 + 48, batch_size=5, prefix_len=32)
    embeds, mask = fused("images", [3, 4, 5], left_pad)
    for beams in (1, 5):
        gen = config_for(tiny, num_beams=beams, use_nucleus_sampling=False)
        assert torch.equal(fixed.generate(embeds, mask, gen), hf_generate(model.LLM, embeds, mask, gen))


def eos_first_model(model, embeds, mask, eos_id):
    """A copy of the LLM whose EOS row is pushed toward rows 0 and 2's first hidden states: EOS is their best first
    token."""
    llm = copy.deepcopy(model.LLM)
    with torch.no_grad():
        hidden = llm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state[:, -1]
        weight = llm.lm_head.weight
        for row in (0, 2):
            gap = (hidden[row] @ weight.T).max() - hidden[row] @ weight[eos_id] + 1.0
            weight[eos_id] += gap * hidden[row] / hidden[row].pow(2).sum()
    return llm


@pytest.mark.parametrize("beams", [1, 5])
def test_eos_as_best_first_token(tiny, beams):
    """min_new_tokens bans EOS as the first token (the original's min_length 2); without it EOS may come first."""
    _, model, tokenizer, fused, _ = tiny
    embeds, mask = fused("images", [0, 1, 2])
    llm = eos_first_model(model, embeds, mask, tokenizer.eos_id)
    with torch.no_grad():
        first = llm(inputs_embeds=embeds, attention_mask=mask).logits[:, -1].argmax(-1)
    assert first[0] == first[2] == tokenizer.eos_id
    fast = FastGenerator(llm)
    for min_length in (2, 0):
        gen = config_for(tiny, num_beams=beams, use_nucleus_sampling=False, min_length=min_length)
        ids = fast.generate(embeds, mask, gen)
        assert torch.equal(ids, hf_generate(llm, embeds, mask, gen))
        assert (ids[0, 0] == tokenizer.eos_id) == (min_length == 0)


@pytest.mark.parametrize("early_stopping,length_penalty", [(True, -2.0), ("never", 1.0), ("never", -2.0),
                                                           (False, 1.0), (False, 0.0)])
def test_beam_search_stopping_rules(tiny, early_stopping, length_penalty):
    _, model, _, fused, _ = tiny
    gen = config_for(tiny, num_beams=5, use_nucleus_sampling=False, length_penalty=length_penalty)
    gen.early_stopping = early_stopping
    fast = FastGenerator(model.LLM)
    for positions in ([0, 1, 2], [6, 7, 8]):
        embeds, mask = fused("images", positions)
        assert torch.equal(fast.generate(embeds, mask, gen), hf_generate(model.LLM, embeds, mask, gen))


def test_logits_processors_equal_transformers():
    torch.manual_seed(0)
    rows, width, vocab = 6, 12, 40
    tokens = torch.randint(0, 5, (rows, width))  # few ids: many repeated n-grams
    scores = torch.randn(rows, vocab)
    for n in (1, 2, 3):
        for step in range(width + 1):
            expected = NoRepeatNGramLogitsProcessor(n)(tokens[:, :step], scores)
            assert torch.equal(ban_repeated_ngrams(scores, tokens, torch.tensor(step), n), expected), (n, step)
    for step in range(4):
        expected = MinNewTokensLengthLogitsProcessor(0, 2, eos_token_id=3)(tokens[:, :step], scores)
        assert torch.equal(ban_early_eos(scores, torch.tensor(step), 2, 3), expected)
    for k, keep in ((3, 1), (3, 2), (1, 2), (50, 1)):
        assert torch.equal(keep_top_k(scores, k, keep), TopKLogitsWarper(k, min_tokens_to_keep=keep)(tokens, scores))
    for p, keep in ((0.9, 1), (0.9, 2), (0.3, 1), (0.01, 2)):
        assert torch.equal(keep_top_p(scores, p, keep), TopPLogitsWarper(p, min_tokens_to_keep=keep)(tokens, scores))


def repeated_ngram(row, eos_id, n=2):
    row = row[: row.index(eos_id) + 1] if eos_id in row else row
    grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
    return len(grams) != len(set(grams))


@pytest.mark.parametrize("beams", [1, 5])
def test_sampling_invariants(tiny, beams):
    """Reproducible with a seeded generator, never a repeated bigram, never EOS first; top-k 1 sampling is greedy."""
    _, model, tokenizer, fused, _ = tiny
    embeds, mask = fused("images", [0, 1, 2, 3, 4, 5])
    fast = FastGenerator(model.LLM)
    gen = config_for(tiny, num_beams=beams, use_nucleus_sampling=True)
    runs = [fast.generate(embeds, mask, gen, generator=torch.Generator().manual_seed(seed)) for seed in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1])
    for ids in runs:
        for row in ids.tolist():
            assert row[0] != tokenizer.eos_id
            assert not repeated_ngram(row, tokenizer.eos_id)
    if beams == 1:
        greedy = config_for(tiny, num_beams=1, use_nucleus_sampling=False)
        top1 = config_for(tiny, num_beams=1, use_nucleus_sampling=True, top_k=1)
        assert torch.equal(fast.generate(embeds, mask, top1, generator=torch.Generator().manual_seed(3)),
                           fast.generate(embeds, mask, greedy))


def test_sampled_tokens_come_from_the_top_k(tiny):
    """Forcing 24 tokens with top-k 3: every sampled token is among the 3 best of its step (checked by replaying
    the answer through the model)."""
    _, model, tokenizer, fused, _ = tiny
    embeds, mask = fused("videos", [0, 1])
    gen = config_for(tiny, num_beams=1, use_nucleus_sampling=True, top_p=1.0, min_length=25, no_repeat_ngram_size=0)
    ids = FastGenerator(model.LLM).generate(embeds, mask, gen, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (2, 24)
    with torch.no_grad():
        text = model.LLM.get_input_embeddings()(ids)
        full_mask = torch.cat([mask, torch.ones_like(ids)], 1)
        from models.lynx import positions_from_mask
        logits = model.LLM(inputs_embeds=torch.cat([embeds, text], 1), attention_mask=full_mask,
                           position_ids=positions_from_mask(full_mask)).logits
    step_logits = logits[:, embeds.shape[1] - 1:-1]  # the logits each token was drawn from
    step_logits[..., tokenizer.eos_id] = -float("inf")
    top3 = step_logits.topk(3).indices
    assert (top3 == ids[..., None]).any(-1).all()


def test_unsupported_options_fall_back_to_transformers(tiny):
    cfg, model, _, _, _ = tiny
    gen = config_for(tiny, repetition_penalty=1.3)
    with pytest.raises(UnsupportedOptions, match="repetition_penalty"):
        SearchSettings.resolve(model.LLM, gen)
    fast_cfg = copy.copy(cfg)
    fast_cfg.decoder = "fast"
    assert fast_decoder_for(model, fast_cfg, "cpu", gen) is None
    assert fast_decoder_for(model, fast_cfg, "cpu", config_for(tiny)) is not None
    auto_cfg = copy.copy(cfg)
    auto_cfg.decoder = "auto"
    assert fast_decoder_for(model, auto_cfg, "cpu", config_for(tiny)) is None  # CPU default: transformers


def test_generation_config_from_the_model_fills_unset_keys(tiny):
    """Keys left unset take the LLM's generation_config values, as in generate."""
    _, model, _, _, _ = tiny
    llm = copy.deepcopy(model.LLM)
    llm.generation_config.no_repeat_ngram_size = 3
    gen = GenerationConfig(max_new_tokens=4, eos_token_id=2, pad_token_id=1000)
    assert SearchSettings.resolve(llm, gen).no_repeat_ngram_size == 3


def test_vit_in_chunks_gives_the_same_visual_tokens(tiny):
    _, model, _, _, _ = tiny
    videos = torch.randn(2, 5, 3, 84, 84, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model.encode_media(videos)
        model.vit_chunk = 3
        try:
            chunked = model.encode_media(videos)
        finally:
            model.vit_chunk = None
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


def test_generate_py_with_the_fast_decoder_gives_the_original_answers(tmp_path):
    spec = next(c for c in fixture_cases() if c["name"] == "images_beam5")
    run = run_generate(fixture_config(**spec["set"], decoder="fast"), tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert read_answers(tmp_path / "answers.jsonl") == read_answers(FIXTURE / spec["expected"])


@pytest.mark.gpu
def test_cuda_graphs_give_the_eager_tokens(tiny):
    """Run on a GPU machine with `python -m pytest -m gpu` (not part of the default run, which has no GPU)."""
    assert torch.cuda.is_available(), "this test needs a CUDA device"
    cfg, model, _, fused, _ = tiny
    embeds, mask = fused("images", [0, 1, 2])
    gpu = copy.deepcopy(model).cuda()
    for beams in (1, 5):
        gen = config_for(tiny, num_beams=beams, use_nucleus_sampling=False)
        eager = FastGenerator(gpu.LLM, cuda_graphs=False).generate(embeds.cuda(), mask.cuda(), gen)
        graphs = FastGenerator(gpu.LLM, prompt_len=80, batch_size=4, prefix_len=32)
        assert torch.equal(graphs.generate(embeds.cuda(), mask.cuda(), gen), eager)
        assert torch.equal(graphs.generate(embeds.cuda(), mask.cuda(), gen), eager)  # replayed on new inputs


def test_ngram_blocking_sees_generated_tokens_only():
    """Documented difference: the original (transformers 4.28) also counted its BOS placeholder, so after a
    generated <s> (id 1) it banned the answer's first token. Both decoders here look at generated tokens only."""
    scores = torch.zeros(1, 10)
    generated = torch.tensor([[5, 1, 0]])  # first token 5, then <s>; the next choice is step 2
    assert torch.isfinite(ban_repeated_ngrams(scores, generated, torch.tensor(2), 2)[0, 5])
    hf = NoRepeatNGramLogitsProcessor(2)
    assert torch.isfinite(hf(generated[:, :2], scores.clone())[0, 5])
    with_placeholder = torch.tensor([[1, 5, 1]])  # what the original's processor saw
    assert hf(with_placeholder, scores.clone())[0, 5] == -float("inf")
