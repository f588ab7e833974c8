"""Where the weight files come from, and whether the config's are there: checked before torch is imported."""
from __future__ import annotations

import os

from errors import InputError

# Where each released file comes from, for "file missing" messages.
WEIGHT_SOURCES = {
    "vit": "EVA01_g_psz14.pt from https://huggingface.co/QuanSun/EVA-CLIP (save it as data/eva_vit_g.pth)",
    "llm": "Vicuna-7B v1.1: apply lmsys/vicuna-7b-delta-v1.1 to LLaMA-7B with FastChat's "
           "`python -m fastchat.model.apply_delta` (a Hugging Face folder, e.g. data/vicuna-7b)",
    "checkpoint": "https://lf-robot-opensource.bytetos.com/obj/lab-robot-public/lynx_release/finetune_lynx.pt "
                  "(or pretrain_lynx.pt in the same folder)",
}


def check_weight_files(cfg) -> None:
    """Fail before anything heavy is loaded when a weight file is not where the config (a LynxConfig) says."""
    if not os.path.isfile(cfg.vit_checkpoint):
        raise InputError(f"weight file not found: {cfg.vit_checkpoint} — get {WEIGHT_SOURCES['vit']}")
    llm_config = os.path.join(cfg.llm_dir, "config.json")
    if not os.path.isfile(llm_config):
        raise InputError(f"LLM folder not found or incomplete: {cfg.llm_dir} (no config.json) — get "
                         f"{WEIGHT_SOURCES['llm']}")
    if not os.path.isfile(os.path.join(cfg.llm_dir, "tokenizer.model")):
        raise InputError(f"tokenizer not found: {os.path.join(cfg.llm_dir, 'tokenizer.model')} — get "
                         f"{WEIGHT_SOURCES['llm']}")
    if not os.path.isfile(cfg.checkpoint):
        raise InputError(f"weight file not found: {cfg.checkpoint} — get {WEIGHT_SOURCES['checkpoint']}")
