"""A second tiny Lynx with other dimensions, written in the released files' layouts with random weights.

Used to check that loading and decoding follow the config (ViT dims, LLM dims from its config.json,
adapter_freq, num_frames, prompt, padding side) rather than the shared fixture's particular values.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import FIXTURE

VIT = dict(embed_dim=48, depth=3, num_heads=3, mlp_ratio=4.3637, patch_size=14)
LLM = dict(hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=6)
NUM_FRAMES = 4
VOCAB = 1000


def eva_checkpoint(generator: torch.Generator) -> dict:
    """EVA layout, float16, a 4x4 position grid (+cls), one block more than the model uses, extra keys."""
    d, hidden = VIT["embed_dim"], int(VIT["embed_dim"] * VIT["mlp_ratio"])

    def rand(*shape):
        return (torch.randn(*shape, generator=generator) * 0.2).half()

    state = {"cls_token": rand(1, 1, d), "pos_embed": rand(1, 17, d), "patch_embed.proj.weight": rand(d, 3, 14, 14),
             "patch_embed.proj.bias": rand(d), "norm.weight": rand(d), "norm.bias": rand(d), "mask_token": rand(1, 1, d)}
    for n in range(VIT["depth"] + 1):
        p = f"blocks.{n}."
        state.update({p + "norm1.weight": 1 + rand(d), p + "norm1.bias": rand(d), p + "attn.qkv.weight": rand(3 * d, d),
                      p + "attn.q_bias": rand(d), p + "attn.v_bias": rand(d), p + "attn.proj.weight": rand(d, d),
                      p + "attn.proj.bias": rand(d), p + "norm2.weight": 1 + rand(d), p + "norm2.bias": rand(d),
                      p + "mlp.fc1.weight": rand(hidden, d), p + "mlp.fc1.bias": rand(hidden),
                      p + "mlp.fc2.weight": rand(d, hidden), p + "mlp.fc2.bias": rand(d)})
    return state


def trained_parts(model_state: dict, generator: torch.Generator) -> dict:
    """Random values for every trained tensor of a built Lynx (bridge, adapters, frame positions)."""
    from models.checkpoint import TRAINED_PARTS, part_of

    out = {}
    for key, value in model_state.items():
        if part_of(key) in TRAINED_PARTS:
            noise = torch.randn(value.shape, generator=generator) * 0.2
            out[key] = (1 + noise) if key.endswith(("norm.weight", "_before.weight", "norm_media.weight",
                                                   "norm_latents.weight", ".0.weight")) and value.ndim == 1 else noise
    return out


def write_random_fixture(root: Path, seed: int = 7) -> Path:
    """Write data/{eva_vit_g.pth, vicuna-7b/, finetune_lynx.pt}, copy the shared fixture's media; return root."""
    from configs.schema import config_from_dict

    generator = torch.Generator().manual_seed(seed)
    data = root / "data"
    (data / "vicuna-7b").mkdir(parents=True)
    torch.save(eva_checkpoint(generator), data / "eva_vit_g.pth")
    torch.manual_seed(seed)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, rms_norm_eps=1e-6, max_position_embeddings=512,
                                       pad_token_id=0, bos_token_id=1, eos_token_id=2, **LLM))
    llm.to(torch.float16).save_pretrained(data / "vicuna-7b")
    shutil.copy(FIXTURE / "data" / "vicuna-7b" / "tokenizer.model", data / "vicuna-7b")
    for folder in ("images", "videos"):
        shutil.copytree(FIXTURE / folder, root / folder)
    for name in ("Open_VQA_images_tiny.jsonl", "Open_VQA_videos_tiny.jsonl"):
        shutil.copy(FIXTURE / "data" / name, data / name)
    # The trained parts' keys and shapes: those of a model of this shape, on the meta device.
    from models.build import model_skeleton, read_llm_config

    skeleton = model_skeleton(config_from_dict(config(root)), read_llm_config(str(data / "vicuna-7b")))
    torch.save({"model": trained_parts(skeleton.state_dict(), generator)}, data / "finetune_lynx.pt")
    return root


def config(root: Path, **overrides) -> dict:
    cfg = {
        "test_files": [str(root / "data" / "Open_VQA_images_tiny.jsonl")],
        "prompt": "Question: {question} Short answer:",
        "vision_prompt_dict": "image",
        "data": {"num_frames": NUM_FRAMES, "num_workers": 0},
        "vit": dict(VIT),
        "image_res": 56,
        "adapter_freq": 1,
        "use_left_pad": False,
        "lower_text": False,
        "vit_checkpoint": str(root / "data" / "eva_vit_g.pth"),
        "llm_path": str(root / "data" / "vicuna-7b"),
        "checkpoint": str(root / "data" / "finetune_lynx.pt"),
        "batch_size_test": 3,
        "max_new_tokens": 12,
        "num_beams": 1,
        "use_nucleus_sampling": False,
    }
    cfg.update(overrides)
    return cfg
