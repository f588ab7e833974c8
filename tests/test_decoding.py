"""The decoders on the tiny fixture (CPU, float32): Lynx's own decoder gives the tokens of transformers' generate for
greedy and beam search, sampling is checked by its invariants; the factory's choice, the fallback to generate, and
the out-of-memory retry's smaller batches."""
import copy
import dataclasses
import logging
import os
import warnings
from types import SimpleNamespace

import pytest
import torch
from transformers.generation.logits_process import (MinNewTokensLengthLogitsProcessor, NoRepeatNGramLogitsProcessor,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from conftest import FIXTURE, build_tiny_lynx, fixture_cases, fixture_config, read_jsonl as read_answers, run_generate
from configs.decoding import DecodingSettings
from dataset.batching import Collator, LynxEvalDataset
from dataset.records import read_jsonl
from decoding import FastDecoder, HFDecoder, make_decoder
from decoding.hf import generation_config
from decoding.search import ban_early_eos, ban_repeated_ngrams, keep_top_k, keep_top_p


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
            dataset = LynxEvalDataset(records[kind], cfg, tokenizer)
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


def hf_generate(llm, embeds, mask, settings_or_config, tokenizer=None):
    """transformers' generate itself, on a GenerationConfig (or on settings mapped as decoding.hf maps them)."""
    gen = settings_or_config
    if isinstance(gen, DecodingSettings):
        gen = generation_config(gen, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return llm.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=gen)


@pytest.mark.parametrize("kind", ["images", "videos"])
@pytest.mark.parametrize("beams", [1, 5])
def test_every_fixture_batch_gives_the_tokens_of_generate(tiny, kind, beams):
    settings = settings_for(tiny, num_beams=beams, use_nucleus_sampling=False)
    fast = FastDecoder(tiny.model.LLM, tiny.tokenizer)
    for start in range(0, tiny.sizes[kind], 3):
        embeds, mask = tiny.fused(kind, list(range(start, min(start + 3, tiny.sizes[kind]))))
        assert torch.equal(fast.generate(embeds, mask, settings),
                           hf_generate(tiny.model.LLM, embeds, mask, settings, tiny.tokenizer))


@pytest.mark.parametrize("kind", ["images", "videos"])
@pytest.mark.parametrize("beams", [1, 5])
def test_right_padding_and_single_rows(tiny, kind, beams):
    """Right-padded rows read their first token at a pad slot; positions must still count attended tokens."""
    llm, tok = tiny.model.LLM, tiny.tokenizer
    settings = settings_for(tiny, num_beams=beams, use_nucleus_sampling=False)
    fast = FastDecoder(llm, tok)
    embeds, mask = tiny.fused(kind, [0, 1, 2], left_pad=False)
    assert (mask[:, -1] == 0).any()
    assert torch.equal(fast.generate(embeds, mask, settings), hf_generate(llm, embeds, mask, settings, tok))
    embeds, mask = tiny.fused(kind, [2])
    assert torch.equal(fast.generate(embeds, mask, settings), hf_generate(llm, embeds, mask, settings, tok))


@pytest.mark.parametrize("left_pad", [True, False])
def test_fixed_shapes_change_no_token(tiny, left_pad):
    """Extra pads after the visual prefix and extra batch rows (what CUDA graphs need) leave every answer as it is."""
    llm, tok = tiny.model.LLM, tiny.tokenizer
    fixed = FastDecoder(llm, tok, prompt_len=32 + 48, batch_size=5, prefix_len=32)
    embeds, mask = tiny.fused("images", [3, 4, 5], left_pad)
    for beams in (1, 5):
        settings = settings_for(tiny, num_beams=beams, use_nucleus_sampling=False)
        assert torch.equal(fixed.generate(embeds, mask, settings), hf_generate(llm, embeds, mask, settings, tok))
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
    """min_new_tokens bans EOS as the first token (the original's min_length 2); without it EOS may come first."""
    tok = tiny.tokenizer
    embeds, mask = tiny.fused("images", [0, 1, 2])
    llm = eos_first_model(tiny.model, embeds, mask, tok.eos_id)
    with torch.no_grad():
        first = llm(inputs_embeds=embeds, attention_mask=mask).logits[:, -1].argmax(-1)
    assert first[0] == first[2] == tok.eos_id
    fast = FastDecoder(llm, tok)
    for min_length in (2, 0):
        settings = settings_for(tiny, num_beams=beams, use_nucleus_sampling=False, min_length=min_length)
        ids = fast.generate(embeds, mask, settings)
        assert torch.equal(ids, hf_generate(llm, embeds, mask, settings, tok))
        assert (ids[0, 0] == tok.eos_id) == (min_length == 0)


@pytest.mark.parametrize("early_stopping,length_penalty", [(True, -2.0), ("never", 1.0), ("never", -2.0),
                                                           (False, 1.0), (False, 0.0)])
def test_beam_search_stopping_rules(tiny, early_stopping, length_penalty):
    """early_stopping is not a Lynx key (transformers' default, False, applies); the search still follows each of
    transformers' rules for it."""
    llm, tok = tiny.model.LLM, tiny.tokenizer
    settings = settings_for(tiny, num_beams=5, use_nucleus_sampling=False, length_penalty=length_penalty)
    gen = generation_config(settings, tok.pad_id, tok.bos_id, tok.eos_id)
    gen.early_stopping = early_stopping
    fast = FastDecoder(llm, tok)
    search = dataclasses.replace(fast.search_for(settings), early_stopping=early_stopping)
    for positions in ([0, 1, 2], [6, 7, 8]):
        embeds, mask = tiny.fused("images", positions)
        assert torch.equal(fast.decode(embeds, mask, search), hf_generate(llm, embeds, mask, gen))


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


def test_unsupported_options_fall_back_to_transformers(tiny, caplog):
    """repetition_penalty is transformers' only: those settings are decoded by generate, with one warning per
    distinct settings; the fast decoder's own settings in between are still its own."""
    llm, tok = tiny.model.LLM, tiny.tokenizer
    embeds, mask = tiny.fused("images", [0, 1, 2])
    fast = FastDecoder(llm, tok)
    penalised = settings_for(tiny, repetition_penalty=1.3)
    plain = settings_for(tiny)
    expected = hf_generate(llm, embeds, mask, penalised, tok)
    assert not torch.equal(expected, hf_generate(llm, embeds, mask, plain, tok))  # the option changes the answers
    caplog.set_level(logging.WARNING, logger="lynx")
    assert torch.equal(fast.generate(embeds, mask, penalised), expected)
    assert torch.equal(fast.generate(embeds, mask, plain), hf_generate(llm, embeds, mask, plain, tok))
    assert torch.equal(fast.generate(embeds, mask, penalised), expected)
    assert fast.search_for(plain) is not None and fast.workspace is not None
    fast.generate(embeds, mask, penalised.replace(repetition_penalty=1.5))
    assert [r.getMessage() for r in caplog.records] == [
        "the fast decoder does not support repetition_penalty 1.3; decoding these settings with transformers' "
        "generate",
        "the fast decoder does not support repetition_penalty 1.5; decoding these settings with transformers' "
        "generate"]


def test_decoder_auto_is_fast_on_cuda_and_hf_on_cpu(tiny):
    """The factory's choice, checkable without a GPU: a CUDA device string gets Lynx's own decoder with the fixed
    shapes of CUDA graphs (nothing runs on the device until it decodes)."""
    cfg = copy.copy(tiny.cfg)
    cfg.decoder = "auto"
    llm, tok = tiny.model.LLM, tiny.tokenizer
    assert isinstance(make_decoder(cfg, llm, tok, "cpu"), HFDecoder)
    for device in ("cuda", "cuda:1"):
        decoder = make_decoder(cfg, llm, tok, device, compile=False)
        assert isinstance(decoder, FastDecoder)
        assert (decoder.batch_size, decoder.prompt_len, decoder.prefix_len) == (3, 32 + 40, 32)
    cfg.decoder = "fast"
    decoder = make_decoder(cfg, llm, tok, "cpu")
    assert isinstance(decoder, FastDecoder) and decoder.batch_size is None and decoder.prefix_len == 32
    cfg.decoder = "hf"
    assert isinstance(make_decoder(cfg, llm, tok, "cuda"), HFDecoder)


def test_the_llms_generation_config_changes_no_decoding_option(tiny):
    """Both decoders take every option from the settings and the tokenizer. transformers' generate fills keys left
    unset from the LLM's generation_config.json; no key that either decoder uses is left unset, so values there
    change no answer, even where a setting equals transformers' default (no_repeat_ngram_size 0)."""
    tok = tiny.tokenizer
    llm = copy.deepcopy(tiny.model.LLM)
    llm.generation_config.no_repeat_ngram_size = 2
    clean_hf = HFDecoder(tiny.model.LLM, tok)
    embeds, mask = tiny.fused("images", [0, 1, 2])
    settings = settings_for(tiny, no_repeat_ngram_size=0, min_length=25)  # 24 tokens: repeated bigrams
    expected = clean_hf.generate(embeds, mask, settings)
    assert not torch.equal(clean_hf.generate(embeds, mask, settings.replace(no_repeat_ngram_size=2)), expected)
    assert torch.equal(HFDecoder(llm, tok).generate(embeds, mask, settings), expected)
    assert torch.equal(FastDecoder(llm, tok).generate(embeds, mask, settings), expected)
    # every key the fast decoder's search uses is set for generate too, e.g. beam sampling's early_stopping
    paper = settings_for(tiny, num_beams=5, use_nucleus_sampling=True)
    gen = HFDecoder(llm, tok).generation_config(paper)
    search = FastDecoder(llm, tok).search_for(paper)
    keys = {"eos_id": "eos_token_id", "pad_id": "pad_token_id", "fill_id": "pad_token_id"}
    for field in dataclasses.fields(search):
        assert getattr(gen, keys.get(field.name, field.name)) == getattr(search, field.name), field.name


def test_out_of_memory_retry_decodes_halves_at_their_own_size(tiny, monkeypatch):
    """A decoder with a fixed batch shape runs out of memory on more than one row: the run's retry asks for
    smaller batches (`rows`), the decoder keeps its own batch size, and every record is answered as usual."""
    from lynx.pipeline import LynxPipeline
    from lynx.run import answer_with_retry

    model, tok = tiny.model, tiny.tokenizer
    batch = tiny.batch("images", [0, 1, 2])
    expected = LynxPipeline(tiny.cfg, model, tok, "cpu").answer_batch(batch)
    pipeline = LynxPipeline(tiny.cfg, model, tok, "cpu")
    pipeline.decoder = FastDecoder(model.LLM, tok, prompt_len=32 + 40, batch_size=3, prefix_len=32)
    real_prefill = FastDecoder._prefill
    rows_tried = []

    def prefill(self, ws, embeds, mask):
        rows_tried.append(embeds.shape[0])
        if embeds.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real_prefill(self, ws, embeds, mask)

    monkeypatch.setattr(FastDecoder, "_prefill", prefill)
    failures = []
    answers = answer_with_retry(pipeline, batch, lambda p, e: failures.append((p, e)))
    assert failures == []
    assert answers == list(zip(batch.positions, expected))
    assert rows_tried == [3, 1, 2, 1, 1]  # the batch, its first half, the second half and its halves
    assert pipeline.decoder.batch_size == 3


def test_hf_decoder_seeded_by_a_generator(tiny):
    """A generator makes transformers' sampling reproducible per call and leaves torch's global generator as it
    was (the run's seeded draws go on unchanged)."""
    embeds, mask = tiny.fused("images", [0, 1, 2])
    hf = HFDecoder(tiny.model.LLM, tiny.tokenizer)
    settings = settings_for(tiny, num_beams=5, use_nucleus_sampling=True)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    runs = [hf.generate(embeds, mask, settings, generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2, 3)]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(runs[0], runs[1])
    assert any(not torch.equal(runs[0], other) for other in runs[2:])


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


def test_generate_py_with_the_fast_decoder_gives_the_original_answers(tmp_path):
    spec = next(c for c in fixture_cases() if c["name"] == "images_beam5")
    run = run_generate(fixture_config(**spec["set"], decoder="fast"), tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert read_answers(tmp_path / "answers.jsonl") == read_answers(FIXTURE / spec["expected"])


@pytest.mark.gpu
def test_cuda_graphs_give_the_eager_tokens(tiny):
    """Run on a GPU machine with `python -m pytest -m gpu` (not part of the default run, which has no GPU)."""
    assert torch.cuda.is_available(), "this test needs a CUDA device"
    tok = tiny.tokenizer
    embeds, mask = tiny.fused("images", [0, 1, 2])
    gpu = copy.deepcopy(tiny.model).cuda()
    for beams in (1, 5):
        settings = settings_for(tiny, num_beams=beams, use_nucleus_sampling=False)
        eager = FastDecoder(gpu.LLM, tok, cuda_graphs=False).generate(embeds.cuda(), mask.cuda(), settings)
        graphs = FastDecoder(gpu.LLM, tok, prompt_len=80, batch_size=4, prefix_len=32)
        assert torch.equal(graphs.generate(embeds.cuda(), mask.cuda(), settings), eager)
        assert torch.equal(graphs.generate(embeds.cuda(), mask.cuda(), settings), eager)  # replayed on new inputs


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
