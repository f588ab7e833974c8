"""Lynx's own decoder over toy logits: its search, buffers, loop and draws, with the LLM's forward (decoding/llama.py)
replaced by a table. Prompt p's logits are `table[p, 0]` at the first step and `table[p, t + 1]` after token t, as the
logits functions of tests/reference_428.py see them, so the decoder and the written-out 4.28.1 decoding can be fed
the same logits."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from decoding.fast import FastDecoder
from decoding.workspace import CacheDims

EOS, BOS = 2, 1


class TableRunner:
    """A stand-in for decoding.llama.LlamaRunner: the same calls, logits from `table` (prompts, vocab + 1, vocab).
    A row's prompt is its row of the batch; the token a row was fed travels as its hidden state."""

    def __init__(self, table: torch.Tensor):
        self.table = table
        self.dims = CacheDims(layers=0, kv_heads=1, head_dim=1, vocab=table.shape[-1])

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[..., None].float()

    def __call__(self, hidden, positions, k_caches, v_caches, slots, mask, prefill=False) -> torch.Tensor:
        prompts = torch.arange(hidden.shape[0])
        if prefill:
            return self.table[prompts, 0][:, None, :].clone()
        last = hidden[..., 0].long().clamp(max=self.table.shape[1] - 2)
        return self.table[prompts[:, None], last + 1].clone()


def toy_decoder(table: torch.Tensor, pad_id: int, **options) -> FastDecoder:
    """A FastDecoder whose LLM answers from `table` (see TableRunner), on the CPU."""
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=table.shape[-1], hidden_size=8, intermediate_size=8,
                                       num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1))
    tokenizer = SimpleNamespace(pad_id=pad_id, eos_id=EOS, bos_id=BOS)
    decoder = FastDecoder(llm, tokenizer, **options)
    decoder.run = TableRunner(table)
    return decoder


def decode(decoder: FastDecoder, prompts: int, settings, generator=None) -> torch.Tensor:
    """The decoder's ids for `prompts` prompts (their logits come from the table; the prompt itself is a stand-in)."""
    embeds = torch.zeros(prompts, 2, 1)
    mask = torch.ones(prompts, 2, dtype=torch.long)
    return decoder.generate(embeds, mask, settings, generator=generator)


def table_logits(table: torch.Tensor):
    """The same logits as a tests/reference_428.py logits function: (prompt rows, generated ids) -> logits."""
    def logits(rows, generated):
        last = generated[:, -1] + 1 if generated.shape[1] else torch.zeros(len(rows), dtype=torch.long)
        return table[rows, last.clamp(max=table.shape[1] - 1)].clone()
    return logits
