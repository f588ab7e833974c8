"""transformers' `generate` as a Lynx decoder (`decoder: hf`): the original's decoding keys mapped onto a
GenerationConfig of the installed transformers (5), whose rules differ from the original's 4.28.1 (docs/fidelity.md
lists how; Lynx's own decoder, decoding/fast.py, follows 4.28.1)."""
from __future__ import annotations

import warnings

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from configs.decoding import DecodingSettings
from decoding.draws import drawing_from


def generation_config(settings: DecodingSettings, pad_id: int, bos_id: int, eos_id: int) -> GenerationConfig:
    """The decoding keys mapped onto transformers' generate: every option these settings use, under its
    GenerationConfig name (`DecodingSettings.hf`; the sampling keys mean nothing without sampling, nor
    `length_penalty` with one beam).

    `min_length`: the original ran transformers 4.28, whose output for `inputs_embeds` began with a one-token BOS
    placeholder that `min_length` counted; so `min_length: 2` meant "at least one new token before EOS". transformers
    5 counts new tokens only, hence `min_new_tokens = min_length - 1`.

    Every option the decoders implement is set here, so a generation_config.json beside the LLM (which `generate`
    reads for unset keys) cannot make this decoder differ from Lynx's own: `early_stopping` is transformers'
    default, set explicitly.
    """
    options = dict(settings.hf(), num_return_sequences=1, pad_token_id=pad_id, bos_token_id=bos_id,
                   eos_token_id=eos_id)
    if settings.num_beams > 1:
        options.update(early_stopping=False)
    return GenerationConfig(**options)


class HFDecoder:
    """Decodes with the LLM's own `generate` (transformers 5's rules); one GenerationConfig per distinct settings.

    `generate` draws from the default generator of the LLM's device. A `generator` given to a call (on that device)
    lends it its stream for the call: the call draws what `torch.manual_seed(seed); generate(...)` draws for a
    generator seeded with `seed`, the generator moves on, and the default generator is left as it was.
    A call's `watch` is a stopping criterion of `generate`, called every `check_every` tokens, as Lynx's decoder
    calls it.
    """

    def __init__(self, llm, tokenizer, check_every: int = 8):
        self.llm = llm
        self.ids = dict(pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
        self.check_every = max(1, check_every)
        self.configs: dict[DecodingSettings, GenerationConfig] = {}

    def generation_config(self, settings: DecodingSettings) -> GenerationConfig:
        if settings not in self.configs:
            self.configs[settings] = generation_config(settings, **self.ids)
        return self.configs[settings]

    @torch.inference_mode()
    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, settings: DecodingSettings,
                 generator: torch.Generator | None = None, rows: int | None = None, watch=None) -> torch.Tensor:
        """Generated ids (B, T) without the prompt; pad (greedy, sampling) or the beam filler after EOS. `rows` is
        the fast decoder's fixed batch shape: nothing to pad here. `watch`: see decoding.Decoder."""
        gen = self.generation_config(settings)
        stop = None if watch is None else Watching(watch, self.check_every, beams=settings.num_beams > 1)
        with drawing_from(generator, self.llm.lm_head.weight.device):
            return self._generate(inputs_embeds, attention_mask, gen, stop)

    def _generate(self, embeds: torch.Tensor, mask: torch.Tensor, gen: GenerationConfig,
                  stop: StoppingCriteria | None = None) -> torch.Tensor:
        criteria = StoppingCriteriaList([stop] if stop is not None else [])
        with warnings.catch_warnings():  # n-gram blocking on generated tokens only is what we want
            warnings.filterwarnings("ignore", message=".*no_repeat_ngram_size.*")
            return self.llm.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=gen,
                                     stopping_criteria=criteria)


class Watching(StoppingCriteria):
    """A decoder's `watch` as a stopping criterion: `generate` calls it after every token with the tokens so far
    (only the generated ones: the prompt is given as embeddings); every `every` tokens it asks the watch, and stops
    every row when the watch says so."""

    def __init__(self, watch, every: int, beams: bool):
        self.watch, self.every, self.beams = watch, every, beams

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        stop = input_ids.shape[1] % self.every == 0 and bool(self.watch(None if self.beams else input_ids))
        return torch.full(input_ids.shape[:1], stop, dtype=torch.bool, device=input_ids.device)
