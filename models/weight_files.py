"""Where the weight files come from, and whether the config's are there and fit: checked before torch is imported.

A converted folder (`python -m lynx.convert`) replaces the release files; it must come from the same weight files
and model settings as the run's config, or the answers would be another model's.
"""
from __future__ import annotations

import dataclasses
import os

import yaml

from errors import InputError

# Where each released file comes from, for "file missing" messages.
WEIGHT_SOURCES = {
    "vit": "EVA01_g_psz14.pt from https://huggingface.co/QuanSun/EVA-CLIP (save it as data/eva_vit_g.pth)",
    "llm": "Vicuna-7B v1.1: apply lmsys/vicuna-7b-delta-v1.1 to LLaMA-7B with FastChat's "
           "`python -m fastchat.model.apply_delta` (a Hugging Face folder, e.g. data/vicuna-7b)",
    "checkpoint": "https://lf-robot-opensource.bytetos.com/obj/lab-robot-public/lynx_release/finetune_lynx.pt "
                  "(or pretrain_lynx.pt in the same folder)",
    "converted": "a converted folder from `python -m lynx.convert --config <your config> --out <folder>`",
}

# A converted folder's files.
CONVERTED_WEIGHTS = "model.safetensors"
CONVERTED_CONFIG = "lynx.yaml"
CONVERTED_LLM = "llm"
CONVERT = "python -m lynx.convert --config <your config> --out <folder>"


def check_weight_files(cfg) -> None:
    """Fail before anything heavy is loaded when a weight file is not where the config (a LynxConfig) says, or a
    converted folder does not fit the config."""
    if cfg.converted is not None:
        check_converted(cfg)
        return
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


def llm_folder(cfg) -> str:
    """Where the LLM's config.json and tokenizer.model are: the converted folder's llm/, or the LLM folder."""
    return os.path.join(cfg.converted, CONVERTED_LLM) if cfg.converted is not None else cfg.llm_dir


def weight_settings(cfg) -> dict:
    """The config values that decide the model's weights (named as in the config)."""
    return {"vit": dataclasses.asdict(cfg.vit_dims), "image_res": cfg.image_res, "llm_path": cfg.llm_dir,
            "vit_checkpoint": cfg.vit_checkpoint, "checkpoint": cfg.checkpoint, "use_adapter": cfg.use_adapter,
            "adapter_freq": cfg.adapter_freq, "bridge_depth": cfg.bridge_depth,
            "num_bridge_tokens": cfg.num_bridge_tokens, "add_frame_pos": cfg.add_frame_pos,
            "data.num_frames": cfg.data.num_frames}


def check_converted(cfg) -> None:
    """The folder is complete and was made from this config's weights and model settings."""
    from configs.schema import config_from_dict

    folder = cfg.converted
    for name in (CONVERTED_WEIGHTS, CONVERTED_CONFIG, os.path.join(CONVERTED_LLM, "config.json"),
                 os.path.join(CONVERTED_LLM, "tokenizer.model")):
        if not os.path.isfile(os.path.join(folder, name)):
            raise InputError(f"converted folder {folder}: no {name} — write the folder with {CONVERT}")
    where = os.path.join(folder, CONVERTED_CONFIG)
    try:
        with open(where, encoding="utf-8") as f:
            made = config_from_dict(yaml.safe_load(f), where=where)
    except yaml.YAMLError as err:
        raise InputError(f"{where}: not a config ({str(err).splitlines()[0]})") from None
    ours, theirs = weight_settings(cfg), weight_settings(made)
    for key, value in ours.items():
        if theirs[key] != value:
            raise InputError(f"converted folder {folder} was made with {key} = {theirs[key]!r}, but this config has "
                             f"{key} = {value!r} — convert again for this config or set converted: null")
