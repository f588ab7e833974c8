"""Reading weight files safely and loading them into Lynx with a report of what was loaded, missing and ignored.

The original loaded its checkpoint non-strictly and cleaned keys with `str.lstrip("model.")`, which strips
characters, so a DDP (`module.`-prefixed) checkpoint silently loaded nothing. Here prefixes are removed as
prefixes, every trained part must be present, and shapes must match.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from errors import InputError
from models.vision_encoder import eva_state_dict_for, fuse_split_qkv
from models.tensor_files import LazyTensor, open_weight_file

KEY_PREFIXES = ("module.", "model.")
PARTS = ("vision encoder", "LLM", "adapters", "bridge", "frame positions")


def part_of(key: str) -> str:
    if key.startswith("vision_encoder."):
        return "vision encoder"
    if key.startswith("bridge."):
        return "bridge"
    if key.startswith("absolute_frame_pos_embed"):
        return "frame positions"
    if ".output_adapter." in key:
        return "adapters"
    return "LLM"


TRAINED_PARTS = ("adapters", "bridge", "frame positions")


def strip_key_prefix(key: str) -> str:
    """Remove leading `module.` / `model.` prefixes (DDP and wrapper saves) — as prefixes, not characters."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in KEY_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def clean_lynx_state(state: dict) -> dict:
    """Unwrap `{'model': ...}`, strip prefixes and bring split ViT q/k/v keys into the model's fused layout.
    Returns LazyTensors (tensors given are wrapped): nothing is read here."""
    if "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    cleaned = {strip_key_prefix(k): v if isinstance(v, LazyTensor) else LazyTensor.of(v) for k, v in state.items()
               if isinstance(v, (LazyTensor, torch.Tensor))}
    return fuse_split_qkv(cleaned)


@dataclass
class LoadReport:
    """What one weight file contributed, per part of the model."""

    path: str
    loaded: dict = field(default_factory=dict)  # part -> count
    ignored: list = field(default_factory=list)  # keys of the file the model does not have
    kept: dict = field(default_factory=dict)  # part -> count of model tensors the file does not hold

    def count(self, key: str) -> None:
        part = part_of(key)
        self.loaded[part] = self.loaded.get(part, 0) + 1

    def summary(self) -> str:
        total = sum(self.loaded.values())
        parts = ", ".join(f"{p} {self.loaded[p]}" for p in PARTS if p in self.loaded)
        text = f"{self.path}: {total} tensors loaded ({parts or 'none'}), {len(self.ignored)} ignored"
        if self.ignored:
            shown = ", ".join(self.ignored[:4]) + (", ..." if len(self.ignored) > 4 else "")
            text += f" [{shown}]"
        if self.kept:
            kept = ", ".join(f"{p} {self.kept[p]}" for p in PARTS if p in self.kept)
            text += f"; not in the file, kept from the ViT and LLM weights: {kept}"
        return text


def check_shapes(own: dict, state: dict, path: str) -> None:
    """Every tensor of the file that the model has must have the model's shape (`own` may live on meta)."""
    for key, value in state.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise InputError(f"{path}: '{key}' has shape {tuple(value.shape)} in the file but the model expects "
                             f"{tuple(own[key].shape)} — the file does not fit this config")


def vision_weights(own: dict, path: str, grid: int) -> tuple[dict, LoadReport]:
    """The tensors of eva_vit_g.pth the ViT uses (position grid resized), checked against the ViT's state dict `own`
    (shapes; may live on meta): a key the model needs but the file lacks, or a wrong shape, is an error. The report
    lists the file's unused blocks and heads."""
    selected, unused = eva_state_dict_for(set(own), open_weight_file(path, "vit"), grid)
    missing = sorted(set(own) - set(selected))
    if missing:
        raise InputError(f"{path}: missing {len(missing)} vision-encoder tensors the model needs, e.g. '{missing[0]}'")
    check_shapes(own, selected, path)
    report = LoadReport(path)
    for key in selected:
        report.count("vision_encoder." + key)
    report.ignored.extend(unused)
    return selected, report


def read_lynx_checkpoint(path: str) -> dict:
    """The Lynx checkpoint's tensors (LazyTensors) with clean keys (see clean_lynx_state)."""
    return clean_lynx_state(open_weight_file(path, "checkpoint"))


def check_lynx_state(own: dict, state: dict, path: str) -> None:
    """Every trained tensor of the model is in the checkpoint, and every tensor they share has the model's shape.
    `own` may be the state dict of a model on the meta device, so this runs before any weight is loaded."""
    missing = [k for k in own if part_of(k) in TRAINED_PARTS and k not in state]
    if missing:
        raise InputError(f"{path}: missing {len(missing)} trained tensors, e.g. '{missing[0]}' "
                         f"({part_of(missing[0])}) — is this a Lynx checkpoint for this config?")
    check_shapes(own, state, path)


def lynx_report(own: dict, state: dict, path: str) -> LoadReport:
    """What the checkpoint gives the model (`own`: its state dict), what it holds that the model lacks, and what
    the model keeps from the ViT and LLM files."""
    report = LoadReport(path)
    for key in state:
        if key in own:
            report.count(key)
        else:
            report.ignored.append(key)
    for key in own:
        if key not in state:
            report.kept[part_of(key)] = report.kept.get(part_of(key), 0) + 1
    return report
