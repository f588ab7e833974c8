"""Perceiver resampler: 32 learned latents read the visual tokens and become the LLM's visual prefix.

Unlike OpenFlamingo's, the keys and values come from the media tokens only (latents are not appended to them).
Module names follow the released checkpoint: `layers.{i}.0` attention, `layers.{i}.1.{0,1,3}` feed-forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PerceiverAttention(nn.Module):
    def __init__(self, media_dim: int, latent_dim: int, heads: int = 8, dim_head: int = 64):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm_media = nn.LayerNorm(media_dim)
        self.norm_latents = nn.LayerNorm(latent_dim)
        self.to_q = nn.Linear(latent_dim, inner, bias=False)
        self.to_kv = nn.Linear(media_dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, latent_dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        media, latents = self.norm_media(media), self.norm_latents(latents)
        q = self.to_q(latents)  # (B, L, inner)
        k, v = self.to_kv(media).chunk(2, dim=-1)  # (B, N, inner) each
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, dim_head)
        return self.to_out(out.transpose(1, 2).flatten(2))


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False)
    )


class PerceiverResampler(nn.Module):
    def __init__(self, media_dim: int, latent_dim: int, depth: int = 3, num_latents: int = 32,
                 heads: int = 8, dim_head: int = 64, ff_mult: int = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, latent_dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(media_dim, latent_dim, heads, dim_head), feed_forward(latent_dim, ff_mult)])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(latent_dim)

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        """(B, N, media_dim) visual tokens -> (B, num_latents, latent_dim)."""
        latents = self.latents.unsqueeze(0).expand(media.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = attn(media, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)
