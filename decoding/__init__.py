"""Decoders: from Lynx's fused prompt (visual prefix + text embeddings) to answer ids.

Two implementations behind one call, chosen once from the config's `decoder` key (`make_decoder`):
- decoding/fast.py: Lynx's own decoder, the default: transformers 4.28.1's rules (the original's), prefill once,
  fixed KV cache, CUDA graphs; split by concern into search.py (the search rules), processors.py (logits processors
  and warpers), draws.py (the random draws), workspace.py (the buffers), llama.py (the LLM's forward), graphs.py
  (CUDA graphs);
- decoding/hf.py: the installed transformers' `generate` (transformers 5's rules).
Decoding settings are a value per call (configs/decoding.py); a decoder resolves each distinct value once.
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol

import torch

from configs.decoding import DecodingSettings
from decoding.fast import FastDecoder
from decoding.hf import HFDecoder


Watch = Callable[[Optional[torch.Tensor]], bool]


class Decoder(Protocol):
    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, settings: DecodingSettings,
                 generator: torch.Generator | None = None, rows: int | None = None,
                 watch: Watch | None = None) -> torch.Tensor:
        """Generated ids (B, T) without prompt or placeholder; filler after EOS; T = the longest answer.
        inputs_embeds (B, L, hidden), attention_mask (B, L). generator: the sampling draws (None: torch's global
        generator). rows: pad the batch to this many rows (a fixed CUDA-graph shape); the out-of-memory retry
        passes its own, smaller count.

        watch: called every `check_every` tokens while rows are still running (where the fast decoder reads
        whether every row is done, a host sync it makes anyway), with the ids chosen so far (B, n), pad after EOS,
        for one beam; None for beams, whose answers are chosen at the end. When it returns True the decoding stops
        there: a caller that wants no more (its clients gone; every row at its own length limit) gets the ids so
        far, cut at that check. A watch that never returns True changes no id."""
        ...


def make_decoder(cfg, llm, tokenizer, device: str, compile: bool | None = None) -> Decoder:
    """The decoder a Lynx run uses: `decoder: hf` or `fast`, or `auto` = fast (`cfg.resolve_decoder`). On CUDA the
    fast decoder pads prompts to num_bridge_tokens + max_input_tokens and batches to batch_size_test, so one CUDA
    graph serves every batch, and compiles its layers (`compile`: override). On the CPU it keeps each batch's own
    shape, so seeded draws are the original's. tokenizer: anything with pad_id, bos_id and eos_id."""
    if cfg.resolve_decoder() != "fast":
        return HFDecoder(llm, tokenizer)
    if not str(device).startswith("cuda"):
        return FastDecoder(llm, tokenizer, prefix_len=cfg.num_bridge_tokens)
    return FastDecoder(llm, tokenizer, compile=True if compile is None else compile,
                       prompt_len=cfg.num_bridge_tokens + cfg.max_input_tokens, batch_size=cfg.batch_size_test,
                       prefix_len=cfg.num_bridge_tokens)


__all__ = ["Decoder", "FastDecoder", "HFDecoder", "Watch", "make_decoder"]
