"""Lynx: EVA ViT -> Perceiver resampler -> LLaMA with adapters; the visual tokens are a prefix of the text."""
from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaForCausalLM

from configs.schema import LynxConfig
from models.adapters import add_output_adapters
from models.resampler import PerceiverResampler
from models.vision_encoder import build_vision_encoder


def vit_chunk_for(cfg: LynxConfig, device: str) -> int | None:
    """Images (frames) per ViT call on `device`; None: all at once. On a GPU, batch_size_test bounds a video batch's
    activations (16 x 5 frames at once would outgrow the KV cache)."""
    return cfg.batch_size_test if str(device).startswith("cuda") else None


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Number attended tokens 0, 1, 2, ... without gaps; masked slots get 1 (the original's rule)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


class LynxLlamaForCausalLM(LlamaForCausalLM):
    """transformers' LLaMA, with position ids taken from the attention mask at every decoding step.

    The original numbers prompt and generated tokens by the running count of attended tokens, so a generated token
    follows the last real prompt token whatever the padding. transformers otherwise counts cache slots, which
    differs for right-padded rows.
    """

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, inputs_embeds=None, **kwargs):
        if attention_mask is not None and attention_mask.ndim == 2:
            # replaces transformers' own running positions, which continue from a right-padded row's last pad
            kwargs["position_ids"] = positions_from_mask(attention_mask)
        return super().prepare_inputs_for_generation(input_ids, attention_mask=attention_mask,
                                                     inputs_embeds=inputs_embeds, **kwargs)


class Lynx(nn.Module):
    """The model, as transformers' InstructBLIP exposes it: `encode_media` (ViT + resampler: the visual prefix),
    `fuse` (prefix + text embeddings) and the `LLM`; decoding is the decoders' job (decoding/). Attribute names
    equal the released checkpoints' key prefixes: vision_encoder, bridge, LLM, absolute_frame_pos_embed."""

    def __init__(self, cfg: LynxConfig, llm: LynxLlamaForCausalLM, vit_chunk: int | None = None):
        super().__init__()
        self.vit_chunk = vit_chunk  # images (frames) per ViT call; None: all at once (see vit_chunk_for)
        dims = cfg.vit_dims
        hidden = llm.config.hidden_size
        self.vision_encoder = build_vision_encoder(dims, cfg.image_res)
        self.bridge = PerceiverResampler(dims.embed_dim, hidden, depth=cfg.bridge_depth,
                                         num_latents=cfg.num_bridge_tokens)
        self.LLM = llm
        self.adapter_layers = add_output_adapters(llm.model.layers, hidden, cfg.adapter_freq) if cfg.use_adapter else []
        if cfg.add_frame_pos:
            self.absolute_frame_pos_embed = nn.Parameter(torch.zeros(1, cfg.data.num_frames, 1, dims.embed_dim))
        else:
            self.absolute_frame_pos_embed = None

    @property
    def device(self) -> torch.device:
        return self.bridge.latents.device

    @property
    def dtype(self) -> torch.dtype:
        return self.bridge.latents.dtype

    def encode_media(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) or videos (B, F, 3, H, W) -> visual prefix (B, num_bridge_tokens, hidden)."""
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        if pixel_values.ndim == 5:  # video: every frame through the ViT, frame positions, frames concatenated
            batch, frames = pixel_values.shape[:2]
            feats = self.vision_features(pixel_values.flatten(0, 1))  # (B*F, N, D)
            feats = feats.unflatten(0, (batch, frames))  # (B, F, N, D)
            if self.absolute_frame_pos_embed is not None:
                feats = feats + self.absolute_frame_pos_embed
            feats = feats.flatten(1, 2)  # (B, F*N, D)
        else:
            feats = self.vision_features(pixel_values)  # (B, N, D)
        return self.bridge(feats)

    def vision_features(self, images: torch.Tensor) -> torch.Tensor:
        if not self.vit_chunk or images.shape[0] <= self.vit_chunk:
            return self.vision_encoder.forward_features(images)
        return torch.cat([self.vision_encoder.forward_features(part) for part in images.split(self.vit_chunk)])

    def fuse(self, visual: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """[visual prefix | padded text]: pads of a left-padded batch sit between the prefix and the text."""
        text = self.LLM.get_input_embeddings()(input_ids.to(self.device))
        embeds = torch.cat([visual.to(text.dtype), text], dim=1)
        prefix_mask = torch.ones(visual.shape[:2], dtype=attention_mask.dtype, device=self.device)
        mask = torch.cat([prefix_mask, attention_mask.to(self.device)], dim=1)
        return embeds, mask
