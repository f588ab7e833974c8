"""The decoders on the tiny fixture (CPU, float32): Lynx's own decoder follows transformers 4.28.1 (the original's
rules, written out in tests/reference_428.py) on batches our pipeline builds, left and right padded, with fixed shapes,
EOS first, every stopping rule, a repetition penalty; sampling checked by its invariants; `decoder: hf` follows
transformers 5 and differs where its rules do; the factory's choice and the out-of-memory retry's smaller batches."""
import copy
import dataclasses
import json
import logging
import os
import warnings
from types import SimpleNamespace

import pytest
import torch
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

from conftest import (FIXTURE, build_tiny_lynx, eval_dataset, fixture_cases, fixture_config, read_jsonl as read_answers,
                      run_generate)
from configs.decoding import DecodingSettings
from dataset.batching import Collator
from dataset.records import read_jsonl
from decoding import FastDecoder, HFDecoder, make_decoder
from decoding.hf import generation_config
from decoding.processors import ban_repeated_ngrams, with_placeholder
from reference_428 import llm_logits, reference_generate, settings_from_kwargs


@pytest.fixture(scope="module")
def tiny():
    """The fixture's config, model and tokenizer; `batch(kind, positions)` collates fixture records and
    `fused(kind, positions)` gives their (embeds, mask)."""
    cfg, model, tokenizer = build_tiny_lynx()
    cwd = os.getcwd()
    os.chdir(FIXTURE)
    try:
        records = {kind: read_jsonl(f"./data/Open_VQA_{kind}_tiny.jsonl") for kind in ("images", "videos")}
        items = {}
        for kind, key in (("images", "image"), ("videos", "video")):
            cfg.vision_prompt_dict = key
            dataset = eval_dataset(records[kind], cfg, tokenizer)
            items[kind] = [dataset[p] for p in range(len(records[kind]))]
        cfg.vision_prompt_dict = "image"
    finally:
        os.chdir(cwd)

    def batch(kind, positions, left_pad=True):
        return Collator(tokenizer.pad_id, left_pad)([items[kind][p] for p in positions])

    def fused(kind, positions, left_pad=True):
        b = batch(kind, positions, left_pad)
        with torch.no_grad():
            return model.fuse(model.encode_media(b.pixel_values), b.input_ids, b.attention_mask)

    return SimpleNamespace(cfg=cfg, model=model, tokenizer=tokenizer, batch=batch, fused=fused,
                           sizes={kind: len(v) for kind, v in items.items()},
                           settings=DecodingSettings.from_config(cfg))


def settings_for(tiny, **keys) -> DecodingSettings:
    return tiny.settings.replace(**keys)


def reference(llm, embeds, mask, settings, tokenizer, early_stopping=False, seed=None) -> torch.Tensor:
    """The written-out 4.28.1 decoding's ids for this batch, without the placeholder (as decoders return them)."""
    if seed is not None:
        torch.manual_seed(seed)
    rows = reference_generate(llm_logits(llm, embeds, mask), len(mask), settings, eos_id=tokenizer.eos_id,
                              pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, early_stopping=early_stopping)
    return rows[:, 1:]


def hf_generate(llm, embeds, mask, settings_or_config, tokenizer=None):
    """transformers' generate itself, on a GenerationConfig (or on settings mapped as decoding.hf maps them)."""
    gen = settings_or_config
    if isinstance(gen, DecodingSettings):
        gen = generation_config(gen, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return llm.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=gen)


@pytest.mark.parametrize("left_pad", [True, False])
@pytest.mark.parametrize("kind", ["images", "videos"])
@pytest.mark.parametrize("beams", [1, 5])
def test_every_fixture_batch_follows_428(tiny, kind, beams, left_pad):
    """Batches our pipeline builds, left padded (the original's) and right padded (rows read their first token at a
    pad slot; positions still count attended tokens), and a single row."""
    settings = settings_for(tiny, num_beams=beams, use_nucleus_sampling=False, max_new_tokens=12)
    fast = FastDecoder(tiny.model.LLM, tiny.tokenizer)
    groups = [list(range(start, min(start + 3, tiny.sizes[kind]))) for start in range(0, tiny.sizes[kind], 3)]
    for positions in groups + [[2]]:
        embeds, mask = tiny.fused(kind, positions, left_pad)
        expected = reference(tiny.model.LLM, embeds, mask, settings, tiny.tokenizer)
        assert torch.equal(fast.generate(embeds, mask, settings), expected), positions


@pytest.mark.parametrize("left_pad", [True, False])
def test_fixed_shapes_change_no_token(tiny, left_pad):
    """Extra pads after the visual prefix and extra batch rows (what CUDA graphs need) leave every answer as it is."""
    llm, tok = tiny.model.LLM, tiny.tokenizer
    fixed = FastDecoder(llm, tok, prompt_len=32 + 48, batch_size=5, prefix_len=32)
    plain = FastDecoder(llm, tok)
    embeds, mask = tiny.fused("images", [3, 4, 5], left_pad)
    for beams in (1, 5):
        settings = settings_for(tiny, num_beams=beams, use_nucleus_sampling=False)
        assert torch.equal(fixed.generate(embeds, mask, settings), plain.generate(embeds, mask, settings))
        assert fixed.workspace.batch == 5


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
    """min_length 2 bans EOS as the first token (it counts the placeholder); 0 lets it come first. The hf decoder
    passes min_new_tokens = min_length - 1 to transformers 5 and agrees."""
    tok = tiny.tokenizer
    embeds, mask = tiny.fused("images", [0, 1, 2])
    llm = eos_first_model(tiny.model, embeds, mask, tok.eos_id)
    with torch.no_grad():
        first = llm(inputs_embeds=embeds, attention_mask=mask).logits[:, -1].argmax(-1)
    assert first[0] == first[2] == tok.eos_id
    fast, hf = FastDecoder(llm, tok), HFDecoder(llm, tok)
    for min_length in (2, 0):
        settings = settings_for(tiny, num_beams=beams, use_nucleus_sampling=False, min_length=min_length,
                                max_new_tokens=8)
        ids = fast.generate(embeds, mask, settings)
        assert torch.equal(ids, reference(llm, embeds, mask, settings, tok))
        assert (ids[0, 0] == tok.eos_id) == (min_length == 0)
        assert torch.equal(hf.generate(embeds, mask, settings)[:, 0], ids[:, 0])


@pytest.mark.parametrize("early_stopping,length_penalty,max_new_tokens", [
    (True, -2.0, 10), (False, 1.0, 10), (False, 0.0, 10), (False, 2.0, 6), (True, 1.0, 4)])
def test_beam_search_stopping_rules(tiny, early_stopping, length_penalty, max_new_tokens):
    """early_stopping is not a Lynx key (4.28's default, False, applies); the search still follows 4.28's rule for
    either value, and each length penalty, at and before the length limit."""
    llm, tok = tiny.model.LLM, tiny.tokenizer
    settings = settings_for(tiny, num_beams=5, use_nucleus_sampling=False, length_penalty=length_penalty,
                            max_new_tokens=max_new_tokens)
    fast = FastDecoder(llm, tok)
    search = dataclasses.replace(fast.search_for(settings), early_stopping=early_stopping)
    for positions in ([0, 1, 2], [6, 7, 8]):
        embeds, mask = tiny.fused("images", positions)
        expected = reference(llm, embeds, mask, settings, tok, early_stopping=early_stopping)
        assert torch.equal(fast.decode(embeds, mask, search), expected), positions


def repeated_ngram(row, eos_id, n=2):
    row = row[: row.index(eos_id) + 1] if eos_id in row else row
    grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
    return len(grams) != len(set(grams))


@pytest.mark.parametrize("beams", [1, 5])
def test_sampling_invariants(tiny, beams):
    """Reproducible with a seeded generator, never a repeated bigram, never EOS first; top-k 1 sampling is greedy."""
    tok = tiny.tokenizer
    embeds, mask = tiny.fused("images", [0, 1, 2, 3, 4, 5])
    fast = FastDecoder(tiny.model.LLM, tok)
    settings = settings_for(tiny, num_beams=beams, use_nucleus_sampling=True)
    runs = [fast.generate(embeds, mask, settings, generator=torch.Generator().manual_seed(seed)) for seed in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1])
    for ids in runs:
        for row in ids.tolist():
            assert row[0] != tok.eos_id
            assert not repeated_ngram(row, tok.eos_id)
    if beams == 1:
        greedy = settings_for(tiny, num_beams=1, use_nucleus_sampling=False)
        top1 = settings_for(tiny, num_beams=1, use_nucleus_sampling=True, top_k=1)
        assert torch.equal(fast.generate(embeds, mask, top1, generator=torch.Generator().manual_seed(3)),
                           fast.generate(embeds, mask, greedy))


def test_sampled_tokens_come_from_the_top_k(tiny):
    """Forcing 24 tokens with top-k 3: every sampled token is among the 3 best of its step (checked by replaying
    the answer through the model)."""
    model, tok = tiny.model, tiny.tokenizer
    embeds, mask = tiny.fused("videos", [0, 1])
    settings = settings_for(tiny, num_beams=1, use_nucleus_sampling=True, top_p=1.0, min_length=25,
                            no_repeat_ngram_size=0)
    ids = FastDecoder(model.LLM, tok).generate(embeds, mask, settings, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (2, 24)
    with torch.no_grad():
        text = model.LLM.get_input_embeddings()(ids)
        full_mask = torch.cat([mask, torch.ones_like(ids)], 1)
        from models.lynx import positions_from_mask
        logits = model.LLM(inputs_embeds=torch.cat([embeds, text], 1), attention_mask=full_mask,
                           position_ids=positions_from_mask(full_mask)).logits
    step_logits = logits[:, embeds.shape[1] - 1:-1]  # the logits each token was drawn from
    step_logits[..., tok.eos_id] = -float("inf")
    top3 = step_logits.topk(3).indices
    assert (top3 == ids[..., None]).any(-1).all()


def test_repetition_penalty_is_lynxs_own(tiny, caplog):
    """repetition_penalty follows 4.28 (the placeholder <s> is among the ids it penalises) in Lynx's own decoder,
    with no fallback to transformers' generate."""
    llm, tok = tiny.model.LLM, tiny.tokenizer
    embeds, mask = tiny.fused("images", [0, 1, 2])
    fast = FastDecoder(llm, tok)
    caplog.set_level(logging.WARNING, logger="lynx")
    plain = settings_for(tiny, max_new_tokens=12)
    for penalty in (1.3, 0.7):
        penalised = plain.replace(repetition_penalty=penalty)
        ids = fast.generate(embeds, mask, penalised)
        assert torch.equal(ids, reference(llm, embeds, mask, penalised, tok))
        assert not torch.equal(ids, fast.generate(embeds, mask, plain))  # the option changes the answers
    assert caplog.records == []


def test_decoder_auto_is_lynxs_own_on_every_device(tiny):
    """The factory's choice, checkable without a GPU: `auto` (and `fast`) is Lynx's own decoder, with the fixed
    shapes of CUDA graphs on a CUDA device (nothing runs there until it decodes) and each batch's own shape on the
    CPU (seeded draws as the original's); `hf` is transformers' generate."""
    cfg = copy.copy(tiny.cfg)
    llm, tok = tiny.model.LLM, tiny.tokenizer
    for name in ("auto", "fast"):
        cfg.decoder = name
        decoder = make_decoder(cfg, llm, tok, "cpu")
        assert isinstance(decoder, FastDecoder) and decoder.batch_size is None and decoder.prompt_len is None
        assert decoder.prefix_len == 32
        for device in ("cuda", "cuda:1"):
            decoder = make_decoder(cfg, llm, tok, device, compile=False)
            assert isinstance(decoder, FastDecoder)
            assert (decoder.batch_size, decoder.prompt_len, decoder.prefix_len) == (3, 32 + 40, 32)
    cfg.decoder = "hf"
    for device in ("cpu", "cuda"):
        assert isinstance(make_decoder(cfg, llm, tok, device), HFDecoder)


def test_the_llms_generation_config_changes_no_decoding_option(tiny):
    """transformers' generate fills keys left unset from the LLM's generation_config.json; the hf decoder sets every
    key it uses, so values there change no answer, even where a setting equals transformers' default
    (no_repeat_ngram_size 0). Lynx's own decoder never reads that file."""
    tok = tiny.tokenizer
    llm = copy.deepcopy(tiny.model.LLM)
    llm.generation_config.no_repeat_ngram_size = 2
    llm.generation_config.early_stopping = True
    clean_hf = HFDecoder(tiny.model.LLM, tok)
    embeds, mask = tiny.fused("images", [0, 1, 2])
    settings = settings_for(tiny, no_repeat_ngram_size=0, min_length=25)  # 24 tokens: repeated bigrams
    expected = clean_hf.generate(embeds, mask, settings)
    assert not torch.equal(clean_hf.generate(embeds, mask, settings.replace(no_repeat_ngram_size=2)), expected)
    assert torch.equal(HFDecoder(llm, tok).generate(embeds, mask, settings), expected)
    assert torch.equal(FastDecoder(llm, tok).generate(embeds, mask, settings),
                       FastDecoder(tiny.model.LLM, tok).generate(embeds, mask, settings))
    paper = HFDecoder(llm, tok).generation_config(settings_for(tiny, num_beams=5, use_nucleus_sampling=True))
    assert (paper.do_sample, paper.num_beams, paper.top_k, paper.top_p, paper.temperature, paper.length_penalty,
            paper.early_stopping, paper.min_new_tokens, paper.no_repeat_ngram_size, paper.repetition_penalty,
            paper.max_new_tokens, paper.pad_token_id, paper.eos_token_id) == (
        True, 5, 3, 0.9, 1.0, -2.0, False, 1, 2, 1.0, 24, tok.pad_id, tok.eos_id)


def test_out_of_memory_retry_decodes_halves_at_their_own_size(tiny, monkeypatch):
    """A decoder with a fixed batch shape runs out of memory on more than one row: the run's retry asks for
    smaller batches (`rows`), the decoder keeps its own batch size, every record is answered as usual, and every
    try draws from a generator seeded afresh with the batch's seed."""
    from lynx.pipeline import LynxPipeline

    model, tok = tiny.model, tiny.tokenizer
    batch = tiny.batch("images", [0, 1, 2])
    expected = [answer.text for answer in LynxPipeline(tiny.cfg, model, tok, "cpu").answer_batch(batch)]
    pipeline = LynxPipeline(tiny.cfg, model, tok, "cpu")
    pipeline.decoder = FastDecoder(model.LLM, tok, prompt_len=32 + 40, batch_size=3, prefix_len=32)
    real_prefill, real_generator = FastDecoder._prefill, pipeline.generator
    rows_tried, seeds = [], []

    def prefill(self, ws, embeds, mask):
        rows_tried.append(embeds.shape[0])
        if embeds.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real_prefill(self, ws, embeds, mask)

    monkeypatch.setattr(FastDecoder, "_prefill", prefill)
    monkeypatch.setattr(pipeline, "generator", lambda seed: seeds.append(seed) or real_generator(seed))
    answers = pipeline.answer_batch(batch, seed=45)
    assert [answer.text for answer in answers] == expected  # every row answered: no OutOfMemory among them
    assert rows_tried == [3, 1, 2, 1, 1]  # the batch, its first half, the second half and its halves
    assert seeds == [45] * 5
    assert pipeline.decoder.batch_size == 3


def test_top_p_0_leaves_the_top_token_when_sampling(tiny):
    """`top_p: 0` (OpenAI takes 0 to 1, and lmms-eval sends 0) keeps only the best token of each step when sampling:
    greedy's answer, in both decoders. (4.28.1's warper would drop every token and fail; docs/fidelity.md.)"""
    embeds, mask = tiny.fused("images", [0, 1, 2])
    greedy = settings_for(tiny, num_beams=1, use_nucleus_sampling=False)
    top = settings_for(tiny, num_beams=1, use_nucleus_sampling=True, top_p=0.0, top_k=0, temperature=0.7)
    for decoder in (FastDecoder(tiny.model.LLM, tiny.tokenizer), HFDecoder(tiny.model.LLM, tiny.tokenizer)):
        want = decoder.generate(embeds, mask, greedy)
        assert torch.equal(decoder.generate(embeds, mask, top, generator=torch.Generator().manual_seed(0)), want)


def test_hf_decoder_seeded_by_a_generator(tiny):
    """A generator lends its stream to transformers' sampling: a generator seeded with s draws what
    `torch.manual_seed(s)` then `generate` draws; it moves on, and torch's global generator is left as it was."""
    embeds, mask = tiny.fused("images", [0, 1, 2])
    hf = HFDecoder(tiny.model.LLM, tiny.tokenizer)
    settings = settings_for(tiny, num_beams=5, use_nucleus_sampling=True)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    runs = [hf.generate(embeds, mask, settings, generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2, 3)]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(runs[0], runs[1])
    assert any(not torch.equal(runs[0], other) for other in runs[2:])
    torch.manual_seed(1)
    assert torch.equal(hf_generate(tiny.model.LLM, embeds, mask, settings, tiny.tokenizer), runs[0])
    generator = torch.Generator().manual_seed(1)
    hf.generate(embeds, mask, settings, generator=generator)
    assert not torch.equal(hf.generate(embeds, mask, settings, generator=generator), runs[0])  # moved on


def test_vit_in_chunks_gives_the_same_visual_tokens(tiny):
    model = tiny.model
    videos = torch.randn(2, 5, 3, 84, 84, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model.encode_media(videos)
        model.vit_chunk = 3
        try:
            chunked = model.encode_media(videos)
        finally:
            model.vit_chunk = None
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


def test_generate_py_with_the_hf_decoder_gives_the_original_answers(tmp_path):
    """`decoder: hf` on the fixture's beam search (24 tokens, no beam cut at the limit): there transformers 5's
    rules give the original's answers."""
    spec = next(c for c in fixture_cases() if c["name"] == "images_beam5")
    run = run_generate(fixture_config(**spec["set"], decoder="hf"), tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert read_answers(tmp_path / "answers.jsonl") == read_answers(FIXTURE / spec["expected"])


@pytest.mark.parametrize("kind", ["images", "videos"])
def test_the_hf_decoder_follows_transformers_5_at_the_length_limit(tiny, kind):
    """Where the rules differ the decoders differ: beams cut at max_new_tokens are scored with length
    max_new_tokens by transformers 5 (1 + max_new_tokens in 4.28, and 4.28 adds every running beam). The hf decoder
    gives the ids transformers 5.24 gave on the original's inputs (expected/maxlen/meta.json), Lynx's decoder the
    original's; the records that differ are the ones listed there."""
    maxlen = FIXTURE / "expected" / "maxlen"
    comparison = json.loads((maxlen / "meta.json").read_text())["transformers_5_24_comparison"]
    eos = tiny.tokenizer.eos_id
    fast, hf = FastDecoder(tiny.model.LLM, tiny.tokenizer), HFDecoder(tiny.model.LLM, tiny.tokenizer)

    def answers(ids: torch.Tensor) -> list:
        return [row[:row.index(eos) + 1] if eos in row else row for row in ids.tolist()]

    for m in (4, 6, 8):
        saved = torch.load(maxlen / f"{kind}_beam5_mnt{m}_ids.pt", weights_only=True)
        settings = settings_from_kwargs(saved["generate_kwargs"])
        theirs, ours = [], []
        for b in range(4 if kind == "images" else 2):
            inputs = torch.load(FIXTURE / "expected" / "sampling" / f"{kind}_batch{b}_inputs.pt", weights_only=True)
            theirs += answers(hf.generate(inputs["inputs_embeds"], inputs["attention_mask"], settings))
            ours += answers(fast.generate(inputs["inputs_embeds"], inputs["attention_mask"], settings))
        assert theirs == comparison["transformers_5_24_generated_ids"][f"{kind}_mnt{m}"]
        assert ours == saved["generated_ids"]
        differ = [index for index, t, o in zip(saved["indices"], theirs, ours) if t != o]
        assert differ == comparison["records_whose_ids_differ"][f"{kind}_mnt{m}"]


def test_ngram_blocking_sees_the_placeholder_in_lynxs_decoder_only():
    """Documented difference: 4.28 (the original's, and Lynx's decoder) counts its BOS placeholder among the ids, so
    after a generated <s> (id 1) it bans the answer's first token; transformers 5 (the hf decoder) looks at
    generated tokens only."""
    scores = torch.zeros(1, 10)
    generated = torch.tensor([[5, 1, 0]])  # first token 5, then <s>; the next choice is step 2
    ids = with_placeholder(generated, bos_id=1)
    assert ban_repeated_ngrams(scores, ids, torch.tensor(3), 2)[0, 5] == -float("inf")
    assert torch.isfinite(NoRepeatNGramLogitsProcessor(2)(generated[:, :2], scores.clone())[0, 5])
