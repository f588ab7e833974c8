"""Bottleneck adapters on a Hugging Face LLaMA: h + scaling * up(SiLU(down(LayerNorm(h)))) after a layer's MLP.

The adapter is registered as `output_adapter` on the decoder layer (the released checkpoint's key) and applied
by a forward hook on that layer, so transformers' LlamaDecoderLayer is used as it is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BottleneckAdapter(nn.Module):
    def __init__(self, dim: int, bottleneck: int):
        super().__init__()
        self.adapter_norm_before = nn.LayerNorm(dim)
        self.adapter_down = nn.Linear(dim, bottleneck)
        self.adapter_up = nn.Linear(bottleneck, dim)
        self.scaling = nn.Parameter(torch.ones(1))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        delta = self.adapter_up(F.silu(self.adapter_down(self.adapter_norm_before(hidden))))
        return hidden + self.scaling * delta


def _apply_output_adapter(layer: nn.Module, args, output):
    if isinstance(output, tuple):
        return (layer.output_adapter(output[0]),) + output[1:]
    return layer.output_adapter(output)


def add_output_adapters(layers: nn.ModuleList, dim: int, every: int) -> list[int]:
    """Attach an adapter (bottleneck dim/2) to layers 0, every, 2*every, ...; return their indices."""
    chosen = list(range(0, len(layers), every))
    for i in chosen:
        layers[i].output_adapter = BottleneckAdapter(dim, dim // 2)
        layers[i].register_forward_hook(_apply_output_adapter)
    return chosen
