"""A converted folder (written by `python -m lynx.convert`): the whole model in its own key layout, ready to map.

    <folder>/model.safetensors   every tensor of Lynx's state dict in one dtype, conversions done ([PAD] rows,
                                 position grid resized, qkv fused, Lynx checkpoint applied)
    <folder>/lynx.yaml           the config it was made from
    <folder>/llm/                the LLM folder's config, generation config and tokenizer (no weights)

A run whose config says `converted: <folder>` reads only this folder, memory-mapped. The folder must come from the
same weight files and model settings as the run's config; a difference is refused in one line naming it, since the
answers would be another model's.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import yaml

from errors import InputError
from models.checkpoint import LoadReport, check_shapes
from models.weight_files import open_weight_file, safetensors_metadata

log = logging.getLogger("lynx")
WEIGHTS = "model.safetensors"
CONFIG = "lynx.yaml"
LLM = "llm"
CONVERT = "python -m lynx.convert --config <your config> --out <folder>"


def llm_folder(cfg) -> str:
    """Where the LLM's config.json and tokenizer.model are: the converted folder's llm/, or the LLM folder."""
    return os.path.join(cfg.converted, LLM) if cfg.converted is not None else cfg.llm_dir


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
    for name in (WEIGHTS, CONFIG, os.path.join(LLM, "config.json"), os.path.join(LLM, "tokenizer.model")):
        if not os.path.isfile(os.path.join(folder, name)):
            raise InputError(f"converted folder {folder}: no {name} — write the folder with {CONVERT}")
    where = os.path.join(folder, CONFIG)
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


def converted_plan(folder: str, model, dtype, mapped: bool = True) -> tuple[dict, list[LoadReport]]:
    """Every tensor of `model` (on meta) from the folder's model.safetensors, checked: missing or misshapen tensors
    are an error. With `mapped`, tensors in the run's `dtype` are used in place (memory-mapped) on the CPU; a run
    that quantizes reads them instead, since the pages of a mapped layer would stay resident after quantizing it."""
    path = os.path.join(folder, WEIGHTS)
    state = open_weight_file(path, "converted", mapped=mapped)
    stored = safetensors_metadata(path).get("dtype")
    if stored is not None and stored != str(dtype).removeprefix("torch."):
        log.warning("%s holds %s weights and this run uses %s: they are cast as they are read (exact only in the "
                    "folder's dtype: its [PAD] rows are the mean taken in %s)", path, stored,
                    str(dtype).removeprefix("torch."), stored)
    own = model.state_dict()
    missing = [key for key in own if key not in state]
    if missing:
        raise InputError(f"{path}: missing {len(missing)} tensors the model needs, e.g. '{missing[0]}' — convert "
                         f"again for this config")
    check_shapes(own, state, path)
    report = LoadReport(path)
    for key in state:
        if key in own:
            report.count(key)
        else:
            report.ignored.append(key)
    return {key: state[key] for key in own}, [report]
