"""The buffers of one batch shape: the fixed KV cache and the search state, allocated once and updated in place.

KV cache: one buffer per layer, (batch, kv_heads, slots, head_dim). Slots [0, prompt_len) hold the prompt, once per
row for all its beams; slot prompt_len + t * num_beams + k holds the token that beam slot k fed at step t. Beams are
never copied when they are reordered: `history[b, k, t]` names the beam slot that holds the t-th token of beam k,
and the step's attention mask lets beam k see exactly those slots.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 16  # decoding steps per attention width (and per CUDA graph)


def round16(n: int) -> int:
    return -(-n // 16) * 16


@dataclass(frozen=True)
class CacheDims:
    """What the buffers need to know of the LLM (decoding.llama reads it from the model's config)."""

    layers: int
    kv_heads: int
    head_dim: int
    vocab: int


class Workspace:
    """Everything a batch shape needs, allocated once: the KV cache, the search state, the step counter.

    All updates are in place, so CUDA graphs captured on these tensors replay on new batches.
    """

    def __init__(self, dims: CacheDims, batch: int, prompt_len: int, beams: int, max_new: int, device, dtype):
        slots = round16(prompt_len + beams * max_new)  # aligned rows for the attention kernels; spares stay masked
        self.slots = slots
        self.shape = (batch, prompt_len, beams, max_new)
        self.batch, self.prompt_len, self.beams, self.max_new = batch, prompt_len, beams, max_new
        self.k = [torch.zeros(batch, dims.kv_heads, slots, dims.head_dim, device=device, dtype=dtype)
                  for _ in range(dims.layers)]
        self.v = [torch.zeros_like(t) for t in self.k]
        vocab = dims.vocab
        z = dict(device=device)
        self.prompt_mask = torch.zeros(batch, prompt_len, dtype=torch.bool, **z)
        self.n_real = torch.zeros(batch, dtype=torch.long, **z)  # attended prompt tokens: positions continue here
        self.first_logits = torch.zeros(batch, vocab, **z)
        self.logits = torch.zeros(batch, beams, vocab, **z)
        self.step = torch.zeros((), dtype=torch.long, **z)
        self.done = torch.zeros((), dtype=torch.bool, **z)
        self.seqs = torch.zeros(batch, beams, max_new, dtype=torch.long, **z)  # running sequences
        self.history = torch.zeros(batch, beams, max_new, dtype=torch.long, **z)  # which beam slot holds token t
        self.parent = torch.zeros(batch, beams, dtype=torch.long, **z)
        self.unfinished = torch.ones(batch, dtype=torch.bool, **z)  # greedy / sampling
        self.gen_len = torch.zeros(batch, dtype=torch.long, **z)
        self.scores = torch.zeros(batch, beams, **z)  # beams: running scores (float32, as 4.28's)
        # beams: each prompt's finished hypotheses (4.28's BeamHypotheses), float64 scores as its Python floats
        self.hyp_seqs = torch.zeros(batch, beams, max_new, dtype=torch.long, **z)
        self.hyp_len = torch.zeros(batch, beams, dtype=torch.long, **z)  # generated tokens before EOS
        self.hyp_scores = torch.zeros(batch, beams, dtype=torch.float64, **z)
        self.hyp_order = torch.zeros(batch, beams, dtype=torch.long, **z)  # when it was added: ties go by it
        self.hyp_used = torch.zeros(batch, beams, dtype=torch.bool, **z)
        self.prompt_done = torch.zeros(batch, dtype=torch.bool, **z)
        self.penalties: dict[float, torch.Tensor] = {}
        self.graphs: dict = {}  # per decoding.search.Search: {slots attended: step graph, "last": graph}
        self.pool = None

    def keys_at(self, step: int) -> int:
        """Slots a step attends over: the prompt and the generated slots up to the end of the step's block of
        BLOCK steps (step-major layout), so early steps read less of the cache. One CUDA graph per block."""
        block_end = min(self.max_new, (step // BLOCK + 1) * BLOCK)
        return min(self.slots, round16(self.prompt_len + block_end * self.beams))

    def penalty(self, length_penalty: float) -> torch.Tensor:
        """L ** length_penalty for L = 0..max_new + 1 (lengths count the placeholder), float64: the Python floats
        4.28 divides by."""
        if length_penalty not in self.penalties:
            table = [1.0] + [float(n ** length_penalty) for n in range(1, self.max_new + 2)]
            self.penalties[length_penalty] = torch.tensor(table, dtype=torch.float64, device=self.step.device)
        return self.penalties[length_penalty]
