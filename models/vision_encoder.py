"""EVA ViT-g/14 as Lynx uses it: timm's `Eva` with q/v biases, absolute positions and no final norm.

The released `eva_vit_g.pth` is in EVA's own key layout, which timm's `Eva` uses unchanged; the only conversions
are the position-grid resize (the checkpoint was trained at 224 px) and, for Lynx checkpoints that hold the whole
model, fusing the split `q_proj/k_proj/v_proj` keys back into `qkv` + `q_bias` + `v_bias`.
"""
from __future__ import annotations

from functools import partial

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.eva import Eva
from torch import nn

from configs.schema import VitConfig
from models.tensor_files import LazyTensor


def build_vision_encoder(dims: VitConfig, image_res: int) -> Eva:
    """An EVA ViT whose `forward_features` returns every token of the last block: (B, 1 + (res/patch)^2, D)."""
    model = Eva(
        img_size=image_res,
        patch_size=dims.patch_size,
        embed_dim=dims.embed_dim,
        depth=dims.depth,
        num_heads=dims.num_heads,
        mlp_ratio=dims.mlp_ratio,
        qkv_bias=True,
        use_abs_pos_emb=True,
        use_rot_pos_emb=False,
        num_classes=0,
        global_pool="",
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_post_transformer_norm=False,
        use_fc_norm=False,
    )
    zero_key_biases(model)
    return model


def zero_key_biases(model: Eva) -> None:
    """EVA has no key bias; timm keeps a non-persistent `k_bias` buffer that must be zero."""
    for block in model.blocks:
        if getattr(block.attn, "k_bias", None) is not None:
            block.attn.k_bias.zero_()


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize the patch rows of a (1, 1 + g*g, D) position table to (1, 1 + grid*grid, D), keeping the cls row.

    Bicubic, align_corners=False, computed in float32 as the original does (the checkpoint is float16).
    """
    return resample_abs_pos_embed(
        pos_embed.float(), new_size=(grid, grid), num_prefix_tokens=1, interpolation="bicubic", antialias=False
    )


def eva_state_dict_for(wanted: set, state: dict, grid: int) -> tuple[dict, list[str]]:
    """Select from an EVA checkpoint (LazyTensors) the keys in `wanted` (the ViT's state-dict keys), its position
    grid to be resized when read.

    Returns (state dict for the model, keys of the file that the model does not use). Extra blocks (the 40th of
    eva_vit_g.pth) and heads are among the unused keys.
    """
    selected, unused = {}, []
    for key, value in state.items():
        if key not in wanted or not isinstance(value, LazyTensor):
            unused.append(key)
        elif key == "pos_embed":
            selected[key] = resized_pos_embed(value, grid)
        else:
            selected[key] = value
    return selected, unused


def resized_pos_embed(pos_embed: LazyTensor, grid: int) -> LazyTensor:
    """The position table resized to the model's grid when it is read: on the CPU in float32 whatever the device
    (the same numbers everywhere), then in the run's dtype."""
    shape = torch.Size([pos_embed.shape[0], 1 + grid * grid, pos_embed.shape[-1]])

    def make(device, dtype):
        return resize_pos_embed(pos_embed.load("cpu"), grid).to(device=device, dtype=dtype)

    return LazyTensor(shape, pos_embed.dtype, make)


def fuse_split_qkv(state: dict, prefix: str = "vision_encoder.") -> dict:
    """Turn `...attn.{q,k,v}_proj.*` keys (the layout of whole-model Lynx checkpoints) into EVA's fused layout.
    Values are LazyTensors: the fused qkv is concatenated when it is read."""
    out = {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.startswith(prefix) and ".attn." in key and any(p in key for p in ("q_proj", "k_proj", "v_proj")):
            head, tail = key.rsplit(".attn.", 1)
            groups.setdefault(head + ".attn.", {})[tail] = value
        else:
            out[key] = value
    for head, parts in groups.items():
        names = ("q_proj.weight", "k_proj.weight", "v_proj.weight")
        if all(n in parts for n in names):
            out[head + "qkv.weight"] = LazyTensor.cat([parts[n] for n in names])
        else:  # incomplete: keep as they are so the load report names them
            out.update({head + n: parts[n] for n in names if n in parts})
        if "q_proj.bias" in parts:
            out[head + "q_bias"] = parts["q_proj.bias"]
        if "v_proj.bias" in parts:
            out[head + "v_bias"] = parts["v_proj.bias"]
        if "k_proj.bias" in parts:
            out[head + "k_proj.bias"] = parts["k_proj.bias"]  # EVA has none: reported as ignored
    return out
