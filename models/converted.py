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

import logging
import os


from errors import InputError
from models.checkpoint import LoadReport, check_shapes, lynx_report
from models.tensor_files import open_weight_file, safetensors_metadata
from models.weight_files import CONVERTED_WEIGHTS

log = logging.getLogger("lynx")


def converted_plan(folder: str, model, dtype, mapped: bool = True) -> tuple[dict, list[LoadReport]]:
    """Every tensor of `model` (on meta) from the folder's model.safetensors, checked: missing or misshapen tensors
    are an error. With `mapped`, tensors in the run's `dtype` are used in place (memory-mapped) on the CPU; a run
    that quantizes reads them instead, since the pages of a mapped layer would stay resident after quantizing it."""
    path = os.path.join(folder, CONVERTED_WEIGHTS)
    state = open_weight_file(path, "converted", mapped=mapped)
    stored = safetensors_metadata(path).get("dtype")
    wanted = str(dtype).removeprefix("torch.")
    if stored is not None and stored != wanted and wanted == "float32":  # an up-cast gives no precision back
        log.warning("%s holds %s weights and the config sets dtype: float32: cast up as they are read, they keep %s's "
                    "precision, so the answers are not a float32 run's of the release files (convert again with "
                    "--dtype float32 for those, or leave dtype unset to run in %s)", path, stored, stored, stored)
    elif stored is not None and stored != wanted:
        log.warning("%s holds %s weights and this run uses %s: they are cast as they are read (exact only in the "
                    "folder's dtype: its [PAD] rows are the mean taken in %s)", path, stored, wanted, stored)
    own = model.state_dict()
    missing = [key for key in own if key not in state]
    if missing:
        raise InputError(f"{path}: missing {len(missing)} tensors the model needs, e.g. '{missing[0]}' — convert "
                         f"again for this config")
    check_shapes(own, state, path)
    return {key: state[key] for key in own}, [lynx_report(own, state, path)]
