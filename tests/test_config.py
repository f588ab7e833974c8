"""Config loading: the original's keys and defaults, the additions, overrides and the errors."""
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from configs.schema import LynxConfig, config_from_dict, load_config, parse_override
from conftest import FIXTURE, ROOT
from errors import InputError

# The released LYNX.yaml's keys and values.
ORIGINAL = {
    "image_rdir": "./images/", "test_files": ["./data/Open_VQA_images.jsonl"], "prompt": "User: {question}\nBot:",
    "vision_prompt_dict": "image", "output_prompt_dict": "answer", "vision_encoder": "eva_vit_1b",
    "video_encoding": "concate", "add_frame_pos": True, "LLM": "vicuna-7b", "use_flash_attn": False,
    "use_adapter": True, "adapter_freq": 2, "bridge": "resampler", "bridge_depth": 3, "num_bridge_tokens": 32,
    "use_left_pad": True, "lower_text": True, "freeze_vit": True, "freeze_llm": True, "image_res": 420,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "checkpoint": "./data/finetune_lynx.pt", "max_input_tokens": 40, "batch_size_test": 16, "max_new_tokens": 64,
    "min_length": 2, "num_beams": 5, "length_penalty": -2.0, "top_p": 0.9, "top_k": 3, "no_repeat_ngram_size": 2,
    "apply_lemmatizer": False, "use_nucleus_sampling": True,
}


def test_lynx_yaml_holds_the_original_keys_and_values():
    cfg = load_config(str(ROOT / "configs" / "LYNX.yaml"))
    for key, value in ORIGINAL.items():
        assert getattr(cfg, key) == value, key
    assert cfg.data.num_frames == 5
    assert cfg.llm_dir == "./data/vicuna-7b" and cfg.vit_checkpoint == "./data/eva_vit_g.pth"
    assert (cfg.vit_dims.embed_dim, cfg.vit_dims.depth, cfg.vit_dims.num_heads) == (1408, 39, 16)


def test_defaults_equal_the_original_values_without_a_file():
    cfg = LynxConfig()
    for key, value in ORIGINAL.items():
        assert getattr(cfg, key) == value, key


def test_video_config_differs_only_in_the_two_documented_keys():
    image = yaml.safe_load((ROOT / "configs" / "LYNX.yaml").read_text())
    video = yaml.safe_load((ROOT / "configs" / "LYNX_video.yaml").read_text())
    changed = {k for k in image if image[k] != video[k]}
    assert changed == {"test_files", "vision_prompt_dict"}
    assert video["vision_prompt_dict"] == "video" and video["test_files"] == ["./data/Open_VQA_videos.jsonl"]


def test_dtype_default_depends_on_the_device():
    cfg = LynxConfig()
    assert cfg.resolve_dtype("cuda") == "bfloat16" and cfg.resolve_dtype("cpu") == "float32"
    cfg.dtype = "float16"
    assert cfg.resolve_dtype("cuda") == "float16"


def test_vit_section_overrides_the_preset():
    cfg = load_config(str(FIXTURE / "config.yaml"))
    dims = cfg.vit_dims
    assert (dims.embed_dim, dims.depth, dims.num_heads, dims.patch_size) == (64, 2, 4, 14)
    partial = config_from_dict({"vit": {"depth": 3}})
    assert (partial.vit_dims.depth, partial.vit_dims.embed_dim) == (3, 1408)


def test_overrides_are_yaml_values_and_reach_sections(tmp_path):
    cfg = load_config(str(ROOT / "configs" / "LYNX.yaml"),
                      ["num_beams=1", "use_nucleus_sampling=false", "data.num_frames=8", "test_files=[a.jsonl]",
                       "prompt=Q: {question} A:"])
    assert cfg.num_beams == 1 and cfg.use_nucleus_sampling is False
    assert cfg.data.num_frames == 8 and cfg.test_files == ["a.jsonl"] and cfg.prompt == "Q: {question} A:"
    assert parse_override("length_penalty=-1") == (["length_penalty"], -1)
    assert parse_override("dtype=null") == (["dtype"], None)
    assert parse_override("llm_path=data/my llm") == (["llm_path"], "data/my llm")


def test_unknown_key_names_the_closest_known_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("num_beam: 3\n")
    with pytest.raises(InputError, match="unknown config key 'num_beam' \\(did you mean 'num_beams'\\?\\)"):
        load_config(str(path))
    with pytest.raises(InputError, match="'data.num_frame'.*'num_frames'"):
        load_config(str(ROOT / "configs" / "LYNX.yaml"), ["data.num_frame=3"])


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("num_beams: 1\nprompt: [unclosed\nlower_text: true\n")
    with pytest.raises(InputError, match=r"c\.yaml:\d+: YAML syntax error"):
        load_config(str(path))


@pytest.mark.parametrize("raw,message", [
    ({"num_beams": "five"}, "'num_beams' must be int"),
    ({"use_left_pad": "yes"}, "'use_left_pad' must be bool"),
    ({"dtype": "fp8"}, "'dtype' must be one of float32, bfloat16, float16"),
    ({"vision_prompt_dict": "audio"}, "'vision_prompt_dict' must be one of image, video, auto"),
    ({"data": {"frame_sampling": "middle"}}, "'data.frame_sampling' must be one of uniform, random"),
    ({"image_res": 100}, "not a multiple of the patch size 14"),
    ({"batch_size_test": 0}, "'batch_size_test' must be at least 1"),
])
def test_bad_values_are_named(raw, message):
    with pytest.raises(InputError, match=message.replace("(", "\\(")):
        config_from_dict(raw)


def test_generate_sh_without_weights_names_the_missing_file(tmp_path):
    """A new user's first `bash generate.sh` without the weights: one line, the file and where to get it."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    shutil.copytree(ROOT / "data", tmp_path / "data", ignore=shutil.ignore_patterns("*.pt", "*.pth", "vicuna-7b"))
    proc = subprocess.run(["bash", str(ROOT / "generate.sh")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines == ["error: weight file not found: ./data/eva_vit_g.pth — get EVA01_g_psz14.pt from "
                     "https://huggingface.co/QuanSun/EVA-CLIP (save it as data/eva_vit_g.pth)"]
    assert not (tmp_path / "result_0.jsonl").exists()


def test_smoke_config_runs_and_prints_answers(tmp_path):
    proc = subprocess.run(["bash", "generate.sh", "configs/tiny.yaml", str(tmp_path / "smoke.jsonl")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stderr[-2000:]
    shown = proc.stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in shown] == ["img-17", "img-3", "img-42", "vid-1", "vid-33", "vid-65"]
    assert all(line.split("\t")[1] for line in shown)
    assert len((tmp_path / "smoke.jsonl").read_text().splitlines()) == 6
