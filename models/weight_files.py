"""Where the weight files come from, and whether the config's are there and fit: checked before torch is imported.

A converted folder (`python -m lynx.convert`) replaces the release files; it must come from the same weight files
and model settings as the run's config, or the answers would be another model's.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import shlex

import yaml

from errors import InputError

# Where the released files come from (`python -m lynx.fetch` brings them from there).
HUB = "https://huggingface.co"
EVA_REPO, EVA_FILE = "QuanSun/EVA-CLIP", "EVA01_g_psz14.pt"  # saved under the config's vit_checkpoint name
# The original's "method 1"; its other way, LLaMA-7B plus lmsys/vicuna-7b-delta-v1.1 merged with FastChat's
# `python -m fastchat.model.apply_delta`, makes a folder of the same form.
LLM_REPOS = {"vicuna-7b": "lmsys/vicuna-7b-v1.1"}
RELEASE_URL = "https://lf-robot-opensource.bytetos.com/obj/lab-robot-public/lynx_release/"
RELEASED_CHECKPOINTS = ("finetune_lynx.pt", "pretrain_lynx.pt")
FETCH = "python -m lynx.fetch"
PARTIAL = ".partial"  # a file lynx.fetch is downloading, renamed once verified

# Where each file comes from, for "file missing" messages.
WEIGHT_SOURCES = {
    "vit": f"{EVA_FILE} from {HUB}/{EVA_REPO}, saved under the config's name ({FETCH} brings it)",
    "llm": f"the files of {HUB}/{LLM_REPOS['vicuna-7b']} ({FETCH} brings them)",
    "checkpoint": f"{RELEASE_URL}finetune_lynx.pt or pretrain_lynx.pt ({FETCH} brings it)",
    "converted": "a converted folder from `python -m lynx.convert --config <your config> --out <folder>`",
}

# An LLM folder (Hugging Face layout): the files a run reads besides the weights, the two it cannot do without,
# and the forms of the weights in transformers' order of preference.
LLM_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
                  "special_tokens_map.json")
LLM_REQUIRED = ("config.json", "tokenizer.model")
LLM_WEIGHTS = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
               "pytorch_model.bin")

# A converted folder's files.
CONVERTED_WEIGHTS = "model.safetensors"
CONVERTED_CONFIG = "lynx.yaml"
CONVERTED_LLM = "llm"
CONVERT = "python -m lynx.convert --config <your config> --out <folder>"


@dataclasses.dataclass(frozen=True)
class MissingWeights:
    """A weight file or folder the config names that is not there: the key naming it, the path, what is wrong,
    and where lynx.fetch would get it (None when it would not: a path that looks mistyped, a name not released)."""

    key: str
    path: str
    problem: str
    source: str | None

    def line(self) -> str:
        return f"  {self.key} {self.path}: {self.problem}" + (f" — {self.source}" if self.source else "")


def command(program: str, config: str | None = None, overrides=()) -> str:
    """`program` on a config with a run's --set values (which may move the weight files), ready to paste."""
    words = [program, "--config", shlex.quote(config) if config else "<your config>"]
    words += [f"--set {shlex.quote(value)}" for value in overrides]
    return " ".join(words)


def check_weight_files(cfg, config: str | None = None, overrides=()) -> None:
    """Fail before anything heavy is loaded when weight files are not where the config (a LynxConfig read from
    `config` with `overrides`) says, naming them all, or when a converted folder does not fit the config."""
    if cfg.converted is not None:
        check_converted(cfg)
        return
    missing = missing_weight_files(cfg)
    if missing:
        raise InputError(missing_message(missing, config, overrides))


def missing_message(missing: list[MissingWeights], config: str | None, overrides=()) -> str:
    """Every missing file on a line of its own, where relative paths are read from, and the fetch command."""
    one = len(missing) == 1
    head = "a weight file named by the config is missing" if one else \
        f"{len(missing)} weight files named by the config are missing"
    if any(not os.path.isabs(m.path) for m in missing):
        head += f" (relative paths are read from the working directory, {os.getcwd()})"
    lines = [head + ":"] + [m.line() for m in missing]
    if all(m.source for m in missing):
        lines.append(f"fetch {'it' if one else 'them'} with: {command(FETCH, config, overrides)}")
    elif any(m.source for m in missing):
        lines.append(f"fetch those with a source with: {command(FETCH, config, overrides)}")
    return "\n".join(lines)


def missing_weight_files(cfg) -> list[MissingWeights]:
    """The release files (ViT, LLM folder, Lynx checkpoint) the config names that are not there, in that order."""
    missing = []
    if not os.path.isfile(cfg.vit_checkpoint):
        problem, close = absent(cfg.vit_checkpoint, "file")
        source = None if close else f"{EVA_FILE} of {HUB}/{EVA_REPO}, saved under this name"
        missing.append(MissingWeights("vit_checkpoint", cfg.vit_checkpoint, problem, source))
    gaps = llm_folder_gaps(cfg.llm_dir)
    if gaps:
        key = "llm_path" if cfg.llm_path is not None else "LLM folder"
        problem, close = (f"no {', no '.join(gaps)}", None) if os.path.isdir(cfg.llm_dir) else \
            absent(cfg.llm_dir, "folder")
        repo = LLM_REPOS.get(cfg.LLM)
        if repo is None:
            problem += f"; lynx.fetch knows no source for LLM '{cfg.LLM}' (only {', '.join(LLM_REPOS)})"
        source = None if close or repo is None else f"the files of {HUB}/{repo}"
        missing.append(MissingWeights(key, cfg.llm_dir, problem, source))
    if not os.path.isfile(cfg.checkpoint):
        problem, close = absent(cfg.checkpoint, "file")
        name = os.path.basename(cfg.checkpoint)
        if name not in RELEASED_CHECKPOINTS and not close:
            problem += f" (not a released file: those are {' and '.join(RELEASED_CHECKPOINTS)})"
        source = None if close or name not in RELEASED_CHECKPOINTS else RELEASE_URL + name
        missing.append(MissingWeights("checkpoint", cfg.checkpoint, problem, source))
    return missing


def absent(path: str, noun: str) -> tuple[str, str | None]:
    """Why `path` (a file or folder) is not there, and the name of one beside it that looks like what was meant."""
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        return f"no such {noun} (there is no folder {folder})", None
    if os.path.exists(path + PARTIAL):
        return f"not there yet: a download of it is in {path}{PARTIAL}", None
    names = [name for name in os.listdir(folder) if not name.endswith(PARTIAL)]
    close = difflib.get_close_matches(os.path.basename(path), names, n=1, cutoff=0.8)
    if close:
        return f"no such {noun}; did you mean {os.path.join(folder, close[0])}?", close[0]
    return f"no such {noun}", None


def llm_folder_gaps(folder: str) -> list[str]:
    """What an LLM folder lacks for a run (file names, or its weights); empty when it is complete."""
    if not os.path.isdir(folder):
        return ["folder"]
    gaps = [name for name in LLM_REQUIRED if not os.path.isfile(os.path.join(folder, name))]
    if not any(os.path.isfile(os.path.join(folder, name)) for name in LLM_WEIGHTS):
        return gaps + [f"weights ({' or '.join(LLM_WEIGHTS)})"]
    return gaps + [os.path.basename(path) for path in llm_files(folder) if not os.path.isfile(path)]


def llm_files(folder: str) -> list[str]:
    """The weight files of a Hugging Face folder: one file, or the shards its index names."""
    for name in LLM_WEIGHTS:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            with open(path, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as err:
            raise InputError(f"{path}: cannot read this shard index ({type(err).__name__}: {err})") from None
        return [os.path.join(folder, shard) for shard in shards]
    raise InputError(f"{folder}: no LLM weights (none of {', '.join(LLM_WEIGHTS)})")


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


def converted_dtype(folder: str) -> str | None:
    """The dtype a converted folder's weights are stored in (its file's note), read without torch; None when it says
    none or cannot be read (loading it names the problem)."""
    from safetensors import safe_open

    try:
        with safe_open(os.path.join(folder, CONVERTED_WEIGHTS), framework="numpy") as f:
            return (f.metadata() or {}).get("dtype")
    except Exception:  # noqa: BLE001 - safetensors raises its own errors for a damaged file
        return None


def run_dtype(cfg, device: str) -> str:
    """The dtype a run computes in: the config's `dtype`; when unset, a converted folder's own (cast to the device's
    default, its weights would give neither the folder's answers nor the release files'); else the device's default
    (bfloat16 on CUDA, float32 on the CPU)."""
    if cfg.dtype is None and cfg.converted is not None:
        stored = converted_dtype(cfg.converted)
        if stored is not None:
            return stored
    return cfg.resolve_dtype(device)
