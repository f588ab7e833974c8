"""The config schema: the original LYNX.yaml keys (same names, LYNX.yaml's values as defaults) plus a few
documented additions.

A config is read once and every value is checked once, before anything heavy loads: an unknown key gets the
closest known key, a wrong type or value is one line naming the key, the value and what is allowed, and the prompt
template is checked as a template. The result is handed onward as a `LynxConfig`; nothing below re-reads raw dicts.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from configs.decoding import DecodingSettings, config_keys
from configs.template import prompt_problem
from configs.yaml_file import read_config_file
from errors import InputError

# Vision-encoder presets by the original's `vision_encoder` name. `vit:` in a config overrides any of these.
VIT_PRESETS = {
    "eva_vit_1b": dict(embed_dim=1408, depth=39, num_heads=16, mlp_ratio=4.3637, patch_size=14),
}
DTYPES = ("float32", "bfloat16", "float16")
DECODERS = ("auto", "hf", "fast")
VISION_KEYS = ("image", "video", "auto")
FRAME_SAMPLING = ("uniform", "random")
QUANTIZE = ("int8", "int4")
# Keys of the original's configs that only training reads: accepted and checked, then dropped (they change no
# answer, so they are not part of a run's settings).
TRAINING_KEYS = ("drop_path_rate", "label_smoothing")


@dataclass
class VitConfig:
    """Dimensions of the EVA ViT. 39 blocks of the 40 in eva_vit_g.pth are used; there is no final norm."""

    embed_dim: int = 1408
    depth: int = 39
    num_heads: int = 16
    mlp_ratio: float = 4.3637
    patch_size: int = 14


@dataclass
class DataConfig:
    """The original's `data:` section plus how video frames are chosen and decoded."""

    num_frames: int = 5
    # 'uniform': first frame of each of num_frames near-equal segments (deterministic; the original's
    # training=False rule). 'random': a random frame per segment, as the original's eval dataset did.
    frame_sampling: str = "uniform"
    # DataLoader worker processes that read and decode media while the model runs (0 = in the main process).
    num_workers: int = 4


DecodingKeys = config_keys(DecodingSettings)


@dataclass
class LynxConfig(DecodingKeys):
    """Every key of the original LYNX.yaml with LYNX.yaml's value as default, then the additions
    (docs/configuration.md). For a few keys a YAML without them got another value from the original's code
    (docs/configuration.md, "Defaults where the original's differ"). The decoding keys are DecodingSettings' fields
    with their defaults (configs/decoding.py), checked by it."""

    # -- Data
    image_rdir: str = "./images/"  # read but unused, as in the original: media paths are relative to the cwd
    test_files: list = field(default_factory=lambda: ["./data/Open_VQA_images.jsonl"])  # a single path is a list of one
    prompt: str = "User: {question}\nBot:"
    vision_prompt_dict: str = "image"  # record key holding the media: image | video | auto (per record)
    output_prompt_dict: str = "answer"
    data: DataConfig = field(default_factory=DataConfig)
    # -- Model
    vision_encoder: str = "eva_vit_1b"
    video_encoding: str = "concate"
    add_frame_pos: bool = True
    LLM: str = "vicuna-7b"
    use_flash_attn: bool = False
    use_adapter: bool = True
    adapter_freq: int = 2
    bridge: str = "resampler"
    bridge_depth: int = 3
    num_bridge_tokens: int = 32
    # -- General
    use_left_pad: bool = True
    lower_text: bool = True
    freeze_vit: bool = True
    freeze_llm: bool = True
    image_res: int = 420
    image_mean: list = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    image_std: list = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    # -- Testing
    checkpoint: str = "./data/finetune_lynx.pt"
    # -- Inference
    max_input_tokens: int = 40  # keep the last N prompt ids; 0 or less: keep all (stored as 0), as the original
    batch_size_test: int = 16
    apply_lemmatizer: bool = False
    # the decoding keys (max_new_tokens, num_beams, ...): DecodingKeys, from DecodingSettings
    # -- Additions (not in the original)
    dtype: str | None = None  # float32 | bfloat16 | float16; None: bfloat16 on CUDA, float32 on CPU
    decoder: str = "auto"  # auto | hf | fast; auto: fast (Lynx's decoder, 4.28.1's rules); hf: transformers' generate
    vit_checkpoint: str = "./data/eva_vit_g.pth"
    llm_path: str | None = None  # None: ./data/<LLM>
    vit: VitConfig | None = None  # overrides the `vision_encoder` preset's dimensions
    quantize: str | None = None  # int8 | int4: weight-only (torchao) LLM linear layers; None: the run's dtype
    quantize_vit: bool = False  # with `quantize`, the ViT's linear layers too
    converted: str | None = None  # folder written by `python -m lynx.convert`: the weights come from there

    # ---- derived values
    @property
    def llm_dir(self) -> str:
        return self.llm_path if self.llm_path is not None else os.path.join("./data", self.LLM)

    @property
    def vit_dims(self) -> VitConfig:
        return self.vit if self.vit is not None else VitConfig(**VIT_PRESETS[self.vision_encoder])

    def resolve_decoder(self) -> str:
        """`auto` is Lynx's own decoder on every device: it follows the original's decoding rules."""
        return "fast" if self.decoder == "auto" else self.decoder

    def resolve_dtype(self, device: str) -> str:
        if self.dtype is not None:
            return self.dtype
        return "bfloat16" if str(device).startswith("cuda") else "float32"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {"data": DataConfig, "vit": VitConfig}
# Keys whose default is None, with the type a value must have.
_OPTIONAL_TYPES = {"dtype": str, "llm_path": str, "quantize": str, "converted": str}
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}
_CHOICES = {
    "dtype": DTYPES,
    "quantize": QUANTIZE,
    "decoder": DECODERS,
    "vision_prompt_dict": VISION_KEYS,
    "vision_encoder": tuple(VIT_PRESETS),
    "video_encoding": ("concate",),
    "bridge": ("resampler",),
    "data.frame_sampling": FRAME_SAMPLING,
}


def _at_least(low: int):
    return (lambda value: value >= low), f"at least {low}"


def _path(value) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _numbers(value, positive: bool = False) -> bool:
    return (len(value) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                    and (v > 0 or not positive) for v in value))


# (dotted key, test, what is allowed) for every key whose type alone does not say enough. Booleans need nothing
# more; the decoding keys are checked by DecodingSettings; choices above; the prompt by prompt_problem.
_RULES = [
    ("test_files", lambda v: len(v) > 0 and all(_path(p) for p in v), "a path or a non-empty list of paths"),
    ("output_prompt_dict", _path, "a non-empty string"),
    ("LLM", _path, "a non-empty name (the folder ./data/<LLM> unless llm_path is set)"),
    ("checkpoint", _path, "a non-empty path"),
    ("vit_checkpoint", _path, "a non-empty path"),
    ("llm_path", _path, "null or a non-empty path"),
    ("converted", _path, "null or a non-empty path (a folder written by python -m lynx.convert)"),
    ("data.num_frames", *_at_least(1)),
    ("data.num_workers", lambda v: v >= 0, "0 (read media in the main process) or more"),
    ("adapter_freq", *_at_least(1)),
    ("bridge_depth", *_at_least(1)),
    ("num_bridge_tokens", *_at_least(1)),
    ("image_res", *_at_least(1)),
    ("batch_size_test", *_at_least(1)),
    ("image_mean", _numbers, "a list of 3 numbers"),
    ("image_std", lambda v: _numbers(v, positive=True), "a list of 3 numbers greater than 0"),
    ("vit.embed_dim", *_at_least(1)),
    ("vit.depth", *_at_least(1)),
    ("vit.num_heads", *_at_least(1)),
    ("vit.mlp_ratio", lambda v: math.isfinite(v) and v > 0, "a number greater than 0"),
    ("vit.patch_size", *_at_least(1)),
]


def _closest(name: str, known) -> str:
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _check_type(key: str, value: Any, expected: type, where: str):
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
        raise InputError(f"{where}: '{key}' must be {_TYPE_NAMES[expected]}, got {value!r}")
    return value


def _check_training_key(key: str, value: Any, where: str) -> None:
    value = _check_type(key, value, float, where)
    if not 0 <= value <= 1:
        raise InputError(f"{where}: '{key}' must be a number from 0 to 1 (read, unused at inference), got {value!r}")


def _build(cls, raw: dict, where: str, prefix: str = ""):
    known = {f.name: f for f in dataclasses.fields(cls)}
    extra = TRAINING_KEYS if cls is LynxConfig else ()
    values = {}
    for key, value in raw.items():
        if key in extra:
            _check_training_key(key, value, where)
            continue
        if key not in known:
            raise InputError(f"{where}: unknown config key '{prefix}{key}'{_closest(key, [*known, *extra])}")
        if key in _SECTIONS:
            if value is None and key == "vit":
                values[key] = None
                continue
            if not isinstance(value, dict):
                raise InputError(f"{where}: '{prefix}{key}' must be a mapping, got {value!r}")
            values[key] = _build(_SECTIONS[key], value, where, prefix=f"{key}.")
            continue
        default = known[key].default
        if default is dataclasses.MISSING:
            default = known[key].default_factory()
        if value is None and default is None:
            values[key] = None
            continue
        if key == "test_files" and isinstance(value, str):
            value = [value]  # the original took one path as well as a list
        expected = _OPTIONAL_TYPES.get(key, type(default))
        values[key] = _check_type(prefix + key, value, expected, where)
    return cls(**values)


def _value(cfg: LynxConfig, dotted: str):
    """The value at a dotted key; None where the section itself is unset (`vit: null`)."""
    value = cfg
    for key in dotted.split("."):
        if value is None:
            return None
        value = getattr(value, key)
    return value


def _validate(cfg: LynxConfig, where: str) -> LynxConfig:
    for key, choices in _CHOICES.items():
        value = _value(cfg, key)
        if value is not None and value not in choices:
            raise InputError(f"{where}: '{key}' must be one of {', '.join(choices)}, got {value!r}")
    for key, test, allowed in _RULES:
        value = _value(cfg, key)
        if value is not None and not test(value):  # None: an optional key unset, or `vit: null`
            raise InputError(f"{where}: '{key}' must be {allowed}, got {value!r}")
    dims = cfg.vit_dims
    if dims.embed_dim % dims.num_heads:
        raise InputError(f"{where}: 'vit.embed_dim' {dims.embed_dim} must be divisible by 'vit.num_heads' "
                         f"{dims.num_heads}")
    if cfg.image_res % dims.patch_size:
        raise InputError(f"{where}: 'image_res' {cfg.image_res} is not a multiple of the patch size "
                         f"{dims.patch_size}")
    problem = prompt_problem(cfg.prompt)
    if problem:
        raise InputError(f"{where}: 'prompt' {problem}: {cfg.prompt!r}")
    DecodingSettings.from_config(cfg).checked(where)
    cfg.max_input_tokens = max(cfg.max_input_tokens, 0)  # 0 = no truncation, however it was written
    return cfg


def _is_text_key(keys: list[str]) -> bool:
    """Whether a (dotted) key holds a string (`prompt`, `checkpoint`, `data.frame_sampling`, ...)."""
    cls = LynxConfig
    for key in keys[:-1]:
        cls = _SECTIONS.get(key)
        if cls is None:
            return False
    fields = {f.name: f for f in dataclasses.fields(cls)}
    f = fields.get(keys[-1])
    return f is not None and (_OPTIONAL_TYPES.get(f.name) is str or isinstance(f.default, str))


def _text_value(text: str, value: str):
    """A text key's `--set` value: one quoted YAML string is read as YAML ('"User: {question}\\nBot:"' holds a line
    break, as in LYNX.yaml); anything else is taken exactly as written. What YAML and the text would read apart is
    refused: a backslash in an unquoted value, a line break inside quotes (YAML folds it), text after the quotes."""
    stripped = value.strip()
    if stripped in ("null", "~"):
        return None
    if stripped[:1] not in ("'", '"'):
        if "\\" in value:
            raise InputError(f"--set {text!r}: a value without quotes is taken as written, so its backslash would stay "
                             f"a backslash; quote it as YAML: \"...\" reads \\n as a line break, '...' keeps backslashes")
        return value
    if "\n" in stripped:
        raise InputError(f"--set {text!r}: a quoted value may not span lines (YAML would fold the line break into a "
                         f"space); write the line break as \\n inside double quotes")
    try:
        node = yaml.compose(stripped)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise InputError(f"--set {text!r}: a value that starts with a quote is read as a quoted YAML string, and this "
                         f"one is not ({problem})") from None
    if not isinstance(node, yaml.ScalarNode) or node.style not in ("'", '"') or node.end_mark.index != len(stripped):
        raise InputError(f"--set {text!r}: a value that starts with a quote must be one quoted YAML string, with "
                         f"nothing after it")
    return node.value


def parse_override(text: str) -> tuple[list[str], Any]:
    """'data.num_frames=8' -> (['data', 'num_frames'], 8). Values are read as YAML ('true', '[a, b]', '-2.0'),
    except for text keys such as `prompt` (see _text_value)."""
    if "=" not in text:
        raise InputError(f"--set {text!r}: expected key=value")
    key, value = text.split("=", 1)
    keys = key.strip().split(".")
    if _is_text_key(keys):
        return keys, _text_value(text, value)
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as err:
        raise InputError(f"--set {text!r}: the value is not valid YAML ({err})") from None
    return keys, parsed


def config_from_dict(raw: dict, where: str = "config") -> LynxConfig:
    """Check a raw mapping (as read from YAML) and return the typed config."""
    if not isinstance(raw, dict):
        raise InputError(f"{where}: expected a mapping of config keys at the top level")
    return _validate(_build(LynxConfig, raw, where), where)


def _with_override(raw: dict, text: str) -> dict:
    """A copy of `raw` with one `--set key=value` applied."""
    raw = copy.deepcopy(raw)
    keys, value = parse_override(text)
    target = raw
    for key in keys[:-1]:
        if not isinstance(target.get(key), dict):
            target[key] = {}
        target = target[key]
    target[keys[-1]] = value
    return raw


def load_config(path: str, overrides: list[str] = ()) -> LynxConfig:
    """Read a YAML config and apply `--set key=value` overrides (dotted keys reach into `data:` and `vit:`). A value
    the config refuses is blamed on the file when the file alone is refused, else on the first --set that makes the
    config unusable."""
    raw = read_config_file(path)
    merged = raw
    for text in overrides:
        merged = _with_override(merged, text)
    try:
        return config_from_dict(merged, where=path)
    except InputError as err:
        refused = err
    if overrides:
        config_from_dict(raw, where=path)  # the file's own mistake is the file's
        for text in overrides:  # else the first --set after which the config is refused
            raw = _with_override(raw, text)
            config_from_dict(raw, where=f"--set {text!r}")
    raise refused
