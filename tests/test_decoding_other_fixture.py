"""Lynx's own decoder against the written-out 4.28.1 decoding (tests/reference_428.py) on a Lynx that is not the
shared fixture (tests/random_fixture.py: other ViT and LLM dims, right padding, an adapter on every layer): greedy,
beam search, the paper's beam sampling over several seeds, and limits short enough to cut beams."""
import os

import pytest
import torch

from configs.decoding import DecodingSettings
from conftest import eval_dataset
from configs.schema import config_from_dict
from dataset.batching import Collator, batches_by_media
from dataset.records import read_jsonl
from decoding import FastDecoder, make_decoder
from models.build import build_lynx
from random_fixture import config, write_random_fixture
from reference_428 import llm_logits, reference_generate


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """(model, tokenizer, decoder as `decoder: auto` makes it on the CPU, right-padded fused batches by kind)."""
    root = write_random_fixture(tmp_path_factory.mktemp("other_decoding"))
    cwd = os.getcwd()
    os.chdir(root)  # media paths in the jsonl are relative to the fixture root
    try:
        cfg = config_from_dict(config(root))
        model, tokenizer = build_lynx(cfg, "cpu")
        fused = {}
        for kind, data in (("image", "Open_VQA_images_tiny.jsonl"), ("video", "Open_VQA_videos_tiny.jsonl")):
            cfg.vision_prompt_dict = kind
            records = read_jsonl(str(root / "data" / data))
            dataset = eval_dataset(records, cfg, tokenizer)
            collate = Collator(tokenizer.pad_id, left_pad=cfg.use_left_pad)
            fused[kind] = []
            for positions in batches_by_media(records, list(range(len(records))), kind, 3)[:2]:
                batch = collate([dataset[p] for p in positions])
                with torch.no_grad():
                    fused[kind].append(model.fuse(model.encode_media(batch.pixel_values), batch.input_ids,
                                                  batch.attention_mask))
    finally:
        os.chdir(cwd)
    decoder = make_decoder(cfg, model.LLM, tokenizer, "cpu")
    return model, tokenizer, decoder, fused


PAPER = dict(use_nucleus_sampling=True, num_beams=5, top_k=3, top_p=0.9, length_penalty=-2.0)
CASES = {
    "greedy": dict(num_beams=1),
    "greedy_limit_3": dict(num_beams=1, max_new_tokens=3),
    "beam5": dict(num_beams=5),
    "beam5_limit_3": dict(num_beams=5, max_new_tokens=3),
    "beam3_limit_5_penalty_1": dict(num_beams=3, max_new_tokens=5, length_penalty=1.0),
    "paper": PAPER,
    "paper_limit_4": dict(PAPER, max_new_tokens=4),
    "sampling": dict(use_nucleus_sampling=True, num_beams=1, top_k=5, top_p=0.8, temperature=0.8),
}


def settings(**changes) -> DecodingSettings:
    base = dict(max_new_tokens=8, min_length=2, num_beams=1, use_nucleus_sampling=False, temperature=1.0, top_k=3,
                top_p=0.9, no_repeat_ngram_size=2, length_penalty=-2.0, repetition_penalty=1.0)
    return DecodingSettings(**{**base, **changes})


@pytest.mark.parametrize("name", CASES)
def test_the_decoder_follows_428_on_another_lynx(other, name):
    model, tokenizer, decoder, fused = other
    assert isinstance(decoder, FastDecoder)
    s = settings(**CASES[name])
    seeds = range(3) if s.use_nucleus_sampling else [None]
    assert any((mask[:, -1] == 0).any() for batches in fused.values() for _, mask in batches)  # right padding
    answers = set()
    for kind, batches in fused.items():
        for b, (embeds, mask) in enumerate(batches):
            for seed in seeds:
                generator = None
                if seed is not None:
                    torch.manual_seed(seed + b)
                    generator = torch.Generator().manual_seed(seed + b)
                expected = reference_generate(llm_logits(model.LLM, embeds, mask), len(mask), s,
                                              eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                                              bos_id=tokenizer.bos_id)[:, 1:]
                ours = decoder.generate(embeds, mask, s, generator=generator)
                assert torch.equal(ours, expected), (kind, b, seed)
                answers.add(tuple(map(tuple, ours.tolist())))
    if s.use_nucleus_sampling:
        assert len(answers) > 4  # 4 batches x 3 seeds: the seeds change answers
    if s.max_new_tokens <= 4:  # beams cut at the limit: answers without EOS
        assert any(tokenizer.eos_id not in row for batch in answers for row in batch)
