"""Reading weight files safely and loading them into Lynx with a report of what was loaded, missing and ignored.

The original loaded its checkpoint non-strictly and cleaned keys with `str.lstrip("model.")`, which strips
characters, so a DDP (`module.`-prefixed) checkpoint silently loaded nothing. Here prefixes are removed as
prefixes, every trained part must be present, and shapes must match.
"""
from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass, field

import torch

from errors import InputError
from models.vision_encoder import eva_state_dict_for, fuse_split_qkv
from models.weight_files import WEIGHT_SOURCES

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


def read_state_file(path: str, what: str) -> dict:
    """Tensors of a .pt/.pth/.bin (loaded with weights_only=True: no pickled code runs) or .safetensors file."""
    if not os.path.isfile(path):
        raise InputError(f"weight file not found: {path} — get {WEIGHT_SOURCES[what]}")
    try:
        state = _load_tensors(path)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        if found is None:  # not a pickle of tensors at all (torch words this as a weights_only failure too)
            raise InputError(f"{path}: cannot read this weight file ({_unpickler_detail(err)})") from None
        raise InputError(
            f"{path}: refused: it holds the Python object {found.group(1)}, and loading that would execute pickled "
            f"code, which is not allowed (weights_only=True). Re-save the file as a plain dict of tensors or as "
            f".safetensors."
        ) from None
    except Exception as err:  # truncated or not a weight file at all
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise InputError(f"{path}: cannot read this weight file ({type(err).__name__}: {first})") from None
    if not isinstance(state, dict):
        raise InputError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return state


def _load_tensors(path: str):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
    return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) files cannot be mmapped


def _unpickler_detail(err: Exception) -> str:
    """The one informative line of torch's long weights_only message (e.g. 'Unsupported operand 110')."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Weights only load failed", "Please file an issue",
                                                              "Check the documentation"))]
    return useful[-1] if useful else (lines[0] if lines else type(err).__name__)


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
    """Unwrap `{'model': ...}`, strip prefixes and bring split ViT q/k/v keys into the model's fused layout."""
    if "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    cleaned = {strip_key_prefix(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
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


def _copy_into(model: torch.nn.Module, state: dict, report: LoadReport, prefix: str = "") -> None:
    """Copy the tensors the model has into it (shapes checked before); the others are reported as ignored."""
    own = model.state_dict()
    selected = {}
    for key, value in state.items():
        if key not in own:
            report.ignored.append(key)
            continue
        selected[key] = value
        report.count(prefix + key)
    model.load_state_dict(selected, strict=False)


def vision_weights(own: dict, path: str, grid: int) -> tuple[dict, list[str]]:
    """The tensors of eva_vit_g.pth the ViT uses (position grid resized) and the keys it does not use, checked
    against the ViT's state dict `own`: a key the model needs but the file lacks, or a wrong shape, is an error."""
    selected, unused = eva_state_dict_for(set(own), read_state_file(path, "vit"), grid)
    missing = sorted(set(own) - set(selected))
    if missing:
        raise InputError(f"{path}: missing {len(missing)} vision-encoder tensors the model needs, e.g. '{missing[0]}'")
    check_shapes(own, selected, path)
    return selected, unused


def load_vision_weights(vision_encoder: torch.nn.Module, path: str, weights: tuple[dict, list[str]]) -> LoadReport:
    """Load `weights` (vision_weights of eva_vit_g.pth) into the ViT; unused blocks and heads are reported."""
    selected, unused = weights
    report = LoadReport(path)
    _copy_into(vision_encoder, selected, report, prefix="vision_encoder.")
    report.ignored.extend(unused)
    return report


def read_lynx_checkpoint(path: str) -> dict:
    """The Lynx checkpoint's tensors with clean keys (see clean_lynx_state)."""
    return clean_lynx_state(read_state_file(path, "checkpoint"))


def check_lynx_state(own: dict, state: dict, path: str) -> None:
    """Every trained tensor of the model is in the checkpoint, and every tensor they share has the model's shape.
    `own` may be the state dict of a model on the meta device, so this runs before any weight is loaded."""
    missing = [k for k in own if part_of(k) in TRAINED_PARTS and k not in state]
    if missing:
        raise InputError(f"{path}: missing {len(missing)} trained tensors, e.g. '{missing[0]}' "
                         f"({part_of(missing[0])}) — is this a Lynx checkpoint for this config?")
    check_shapes(own, state, path)


def load_lynx_checkpoint(model: torch.nn.Module, path: str, state: dict | None = None) -> LoadReport:
    """Load a Lynx checkpoint (trained parts only, or the whole model) on top of the ViT and LLM weights.
    `state`: the checkpoint as read_lynx_checkpoint returned it and check_lynx_state passed, when that happened
    already (before the model was built); otherwise the file is read and checked here."""
    own = model.state_dict()
    if state is None:
        state = read_lynx_checkpoint(path)
        check_lynx_state(own, state, path)
    report = LoadReport(path)
    _copy_into(model, state, report)
    for key in own:
        if key not in state:
            report.kept[part_of(key)] = report.kept.get(part_of(key), 0) + 1
    return report
