"""The original's decoding options as a transformers GenerationConfig."""
from __future__ import annotations

from transformers import GenerationConfig

from configs.schema import LynxConfig


def generation_config(cfg: LynxConfig, pad_id: int, bos_id: int, eos_id: int) -> GenerationConfig:
    """Map LYNX.yaml's decoding keys onto transformers' generate.

    `min_length`: the original ran transformers 4.28, whose output for `inputs_embeds` began with a one-token BOS
    placeholder that `min_length` counted; so `min_length: 2` meant "at least one new token before EOS". transformers
    5 counts new tokens only, hence `min_new_tokens = min_length - 1`.
    """
    options = dict(
        max_new_tokens=cfg.max_new_tokens,
        min_new_tokens=max(cfg.min_length - 1, 0),
        num_beams=cfg.num_beams,
        do_sample=cfg.use_nucleus_sampling,
        no_repeat_ngram_size=cfg.no_repeat_ngram_size,
        repetition_penalty=cfg.repetition_penalty,
        num_return_sequences=1,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
    )
    if cfg.num_beams > 1:
        options.update(length_penalty=cfg.length_penalty)
    if cfg.use_nucleus_sampling:
        options.update(top_p=cfg.top_p, top_k=cfg.top_k, temperature=cfg.temperature)
    return GenerationConfig(**options)
