"""Build Lynx from a config: ViT from eva_vit_g.pth, LLM from its folder, then the Lynx checkpoint on top."""
from __future__ import annotations

import logging
import os

import torch
from transformers import AutoConfig

from configs.schema import DTYPES, LynxConfig
from errors import InputError
from models.tokenizer import LynxTokenizer
from models.checkpoint import (check_lynx_state, load_lynx_checkpoint, load_vision_weights,
                               read_lynx_checkpoint, vision_weights)
from models.lynx import Lynx, LynxLlamaForCausalLM, vit_chunk_for
from models.weight_files import check_weight_files

log = logging.getLogger("lynx")
TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}


def add_pad_rows(llm: LynxLlamaForCausalLM, vocab_size: int) -> None:
    """Grow the input and output embeddings to `vocab_size` rows set to the mean of the existing rows ([PAD])."""
    old = llm.get_input_embeddings().weight.shape[0]
    if vocab_size == old:
        return
    llm.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        for weight in (llm.get_input_embeddings().weight, llm.get_output_embeddings().weight):
            weight[old:] = weight[:old].float().mean(dim=0, keepdim=True).to(weight.dtype)


def load_llm(cfg: LynxConfig, dtype: torch.dtype) -> LynxLlamaForCausalLM:
    try:
        return LynxLlamaForCausalLM.from_pretrained(cfg.llm_dir, dtype=dtype, attn_implementation="sdpa")
    except (OSError, ValueError) as err:
        raise InputError(f"{cfg.llm_dir}: cannot load the LLM ({str(err).splitlines()[0]})") from None


def model_skeleton(cfg: LynxConfig, vocab_size: int) -> Lynx:
    """Lynx on the meta device (shapes, no memory, no weights): lets a checkpoint be checked before anything loads."""
    try:
        llm_config = AutoConfig.from_pretrained(cfg.llm_dir)
    except (OSError, ValueError) as err:
        raise InputError(f"{cfg.llm_dir}: cannot read the LLM's config.json ({str(err).splitlines()[0]})") from None
    llm_config.vocab_size = vocab_size
    with torch.device("meta"):
        return Lynx(cfg, LynxLlamaForCausalLM(llm_config))


def build_lynx(cfg: LynxConfig, device: str = "cpu") -> tuple[Lynx, LynxTokenizer]:
    """The model in eval mode on `device` in the config's dtype, and its tokenizer. Prints a load report."""
    check_weight_files(cfg)
    dtype = TORCH_DTYPES[cfg.resolve_dtype(device)]
    tokenizer = LynxTokenizer(os.path.join(cfg.llm_dir, "tokenizer.model"))
    grid = cfg.image_res // cfg.vit_dims.patch_size
    # Check both files against the model's shapes before any weight loads: a bad file fails in seconds.
    skeleton = model_skeleton(cfg, tokenizer.vocab_size)
    vit_weights = vision_weights(skeleton.vision_encoder.state_dict(), cfg.vit_checkpoint, grid)
    lynx_state = read_lynx_checkpoint(cfg.checkpoint)
    check_lynx_state(skeleton.state_dict(), lynx_state, cfg.checkpoint)
    llm = load_llm(cfg, dtype)
    add_pad_rows(llm, tokenizer.vocab_size)
    model = Lynx(cfg, llm, vit_chunk=vit_chunk_for(cfg, device))
    reports = [load_vision_weights(model.vision_encoder, cfg.vit_checkpoint, vit_weights)]
    log.info("%s: LLM loaded (%d layers, adapters on %s)", cfg.llm_dir, llm.config.num_hidden_layers,
             model.adapter_layers)
    reports.append(load_lynx_checkpoint(model, cfg.checkpoint, lynx_state))
    for report in reports:
        log.info("%s", report.summary())
    cast_new_parts(model, dtype)
    model.to(device=device).eval()
    model.requires_grad_(False)
    return model, tokenizer


def cast_new_parts(model: Lynx, dtype: torch.dtype) -> None:
    """Bring the parts built here (ViT, bridge, adapters, frame positions) to the LLM's dtype. Not `model.to(dtype)`:
    that would also round the LLM's float32 rotary frequencies, shifting every position in bfloat16."""
    model.vision_encoder.to(dtype)
    model.bridge.to(dtype)
    for i in model.adapter_layers:
        model.LLM.model.layers[i].output_adapter.to(dtype)
    if model.absolute_frame_pos_embed is not None:
        model.absolute_frame_pos_embed.data = model.absolute_frame_pos_embed.data.to(dtype)
