"""Config loading: the original's keys and defaults, the additions, overrides and the errors."""
import dataclasses
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from configs.decoding import DecodingSettings
from configs.schema import DataConfig, LynxConfig, VitConfig, config_from_dict, load_config, parse_override
from conftest import FIXTURE, ROOT, eval_dataset, fixture_config
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


LYNX_YAML = str(ROOT / "configs" / "LYNX.yaml")


def test_quoted_prompt_on_the_command_line_is_lynx_yaml_own_prompt():
    """docs/configuration.md's way: a quoted YAML string, so \n is a line break as in the file."""
    own = load_config(LYNX_YAML)
    assert own.prompt == "User: {question}\nBot:"
    cfg = load_config(LYNX_YAML, ['prompt="User: {question}\\nBot:"'])
    assert cfg.prompt == own.prompt
    assert cfg.to_dict() == own.to_dict()  # the same settings: the same answers, the same resume fingerprint


def test_the_readme_command_line_gives_lynx_yaml_prompt_through_the_shell(tmp_path):
    """The words as typed in bash (docs/configuration.md) reach the config as LYNX.yaml's prompt."""
    script = tmp_path / "run.sh"
    script.write_text(
        '"$PYTHON" -c \'import sys; from configs.schema import load_config; '
        'print(repr(load_config("configs/LYNX.yaml", sys.argv[2:]).prompt))\' '
        '--set \'prompt="User: {question}\\nBot:"\'\n')
    proc = subprocess.run(["bash", str(script)], cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == repr("User: {question}\nBot:") + "\n"


@pytest.mark.parametrize("text, value", [
    ("prompt=Q: {question} A:", "Q: {question} A:"),                       # unquoted: as written ...
    ("prompt=  Q: {question} # note", "  Q: {question} # note"),           # ... spaces and '#' included
    ("prompt=User: {question}\nBot:", "User: {question}\nBot:"),            # a real line break (bash $'...')
    ("prompt='User: {question}\\nBot:'", "User: {question}\\nBot:"),        # single quotes keep the backslash
    ("prompt=\"it's {question}\"", "it's {question}"),
    ("prompt=''", ""),
    ("dtype=\"bfloat16\"", "bfloat16"),
    ("data.frame_sampling=random", "random"),
    ("llm_path=data/my llm", "data/my llm"),
    ("llm_path=null", None),
])
def test_text_values_are_taken_as_written_or_as_one_quoted_yaml_string(text, value):
    assert parse_override(text)[1] == value


@pytest.mark.parametrize("text, problem", [
    ("prompt=User: {question}\\nBot:",
     "a value without quotes is taken as written, so its backslash would stay a backslash; quote it as YAML: "
     "\"...\" reads \\n as a line break, '...' keeps backslashes"),
    ("llm_path=C:\\models",
     "a value without quotes is taken as written, so its backslash would stay a backslash; quote it as YAML: "
     "\"...\" reads \\n as a line break, '...' keeps backslashes"),
    ("prompt=\"User: {question}\\nBot:",
     "a value that starts with a quote is read as a quoted YAML string, and this one is not (found unexpected end "
     "of stream)"),
    ("prompt=\"User: {question}\" # Bot:",
     "a value that starts with a quote must be one quoted YAML string, with nothing after it"),
    ("prompt=\"User\": {question}",
     "a value that starts with a quote must be one quoted YAML string, with nothing after it"),
    ("prompt=\"User: {question}\nBot:\"",
     "a quoted value may not span lines (YAML would fold the line break into a space); write the line break as \\n "
     "inside double quotes"),
])
def test_text_values_yaml_would_read_otherwise_are_refused(text, problem):
    with pytest.raises(InputError) as err:
        parse_override(text)
    assert str(err.value) == f"--set {text!r}: {problem}"
    assert "\n" not in str(err.value)


def test_other_values_are_read_as_yaml():
    assert parse_override("num_beams=3") == (["num_beams"], 3)
    assert parse_override("test_files=[a.jsonl, b.jsonl]") == (["test_files"], ["a.jsonl", "b.jsonl"])
    with pytest.raises(InputError) as err:
        load_config(LYNX_YAML, ['num_beams="3"'])
    assert str(err.value) == "--set 'num_beams=\"3\"': 'num_beams' must be an integer, got '3'"


def test_unknown_key_names_the_closest_known_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("num_beam: 3\n")
    with pytest.raises(InputError, match="unknown config key 'num_beam' \\(did you mean 'num_beams'\\?\\)"):
        load_config(str(path))
    with pytest.raises(InputError, match="'data.num_frame'.*'num_frames'"):
        load_config(str(ROOT / "configs" / "LYNX.yaml"), ["data.num_frame=3"])


@pytest.mark.parametrize("text, line, key, first", [
    ("num_beams: 1\nmax_new_tokens: 4\nnum_beams: 5\n", 3, "num_beams", 1),
    ("data:\n  num_frames: 5\n  num_workers: 0\n  num_frames: 8\n", 4, "num_frames", 2),
    ("vit: {embed_dim: 64, depth: 2, embed_dim: 96}\n", 1, "embed_dim", 1),
])
def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path, text, line, key, first):
    """YAML's loaders keep the last value silently."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as err:
        load_config(str(path))
    assert str(err.value) == f"{path}:{line}: '{key}' is given twice (first on line {first}); keep one"


@pytest.mark.parametrize("overrides, blamed", [
    (["num_beams=abc"], "--set 'num_beams=abc': 'num_beams' must be an integer, got 'abc'"),
    (["num_beams=2", "num_beam=2"], "--set 'num_beam=2': unknown config key 'num_beam' (did you mean 'num_beams'?)"),
    (["vit={embed_dim: 64, depth: 2, num_heads: 4, mlp_ratio: 4.0, patch_size: 14}", "vit.num_heads=5"],
     "--set 'vit.num_heads=5': 'vit.embed_dim' 64 must be divisible by 'vit.num_heads' 5"),
])
def test_a_bad_set_value_is_blamed_on_that_set(overrides, blamed):
    with pytest.raises(InputError) as err:
        load_config(LYNX_YAML, overrides)
    assert str(err.value) == blamed


def test_the_files_own_mistake_is_the_files_and_a_set_may_mend_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("num_beams: 0\n")
    with pytest.raises(InputError) as err:
        load_config(str(path), ["max_new_tokens=abc"])
    assert str(err.value) == f"{path}: 'num_beams' must be at least 1, got 0"
    assert load_config(str(path), ["num_beams=2"]).num_beams == 2


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("num_beams: 1\nprompt: [unclosed\nlower_text: true\n")
    with pytest.raises(InputError, match=r"c\.yaml:\d+: YAML syntax error"):
        load_config(str(path))


# Every key with a value its type allows but the model cannot use: the whole message, as printed after "error: ".
BAD_VALUES = [
    # types
    ({"num_beams": "five"}, "'num_beams' must be an integer, got 'five'"),
    ({"num_beams": True}, "'num_beams' must be an integer, got True"),
    ({"use_left_pad": "yes"}, "'use_left_pad' must be true or false, got 'yes'"),
    ({"lower_text": 1}, "'lower_text' must be true or false, got 1"),
    ({"top_p": "0.9"}, "'top_p' must be a number, got '0.9'"),
    ({"prompt": None}, "'prompt' must be a string, got None"),
    ({"max_input_tokens": "40"}, "'max_input_tokens' must be an integer, got '40'"),  # any integer: see below
    ({"image_mean": 0.5}, "'image_mean' must be a list, got 0.5"),
    ({"data": [5]}, "'data' must be a mapping, got [5]"),
    ({"data": {"num_frames": 2.5}}, "'data.num_frames' must be an integer, got 2.5"),
    ({"data": {"num_frames": True}}, "'data.num_frames' must be an integer, got True"),
    # choices
    ({"dtype": "fp8"}, "'dtype' must be one of float32, bfloat16, float16, got 'fp8'"),
    ({"quantize": "int2"}, "'quantize' must be one of int8, int4, got 'int2'"),
    ({"converted": ""}, "'converted' must be null or a non-empty path (a folder written by python -m lynx.convert), "
                        "got ''"),
    ({"decoder": "vllm"}, "'decoder' must be one of auto, hf, fast, got 'vllm'"),
    ({"vision_prompt_dict": "audio"}, "'vision_prompt_dict' must be one of image, video, auto, got 'audio'"),
    ({"vision_encoder": "eva_vit_g"}, "'vision_encoder' must be one of eva_vit_1b, got 'eva_vit_g'"),
    ({"video_encoding": "mean"}, "'video_encoding' must be one of concate, got 'mean'"),
    ({"bridge": "qformer"}, "'bridge' must be one of resampler, got 'qformer'"),
    ({"data": {"frame_sampling": "middle"}}, "'data.frame_sampling' must be one of uniform, random, got 'middle'"),
    # ranges and lengths
    ({"data": {"num_workers": -1}}, "'data.num_workers' must be 0 (read media in the main process) or more, got -1"),
    ({"data": {"num_frames": 0}}, "'data.num_frames' must be at least 1, got 0"),
    ({"batch_size_test": 0}, "'batch_size_test' must be at least 1, got 0"),
    ({"adapter_freq": 0}, "'adapter_freq' must be at least 1, got 0"),
    ({"bridge_depth": 0}, "'bridge_depth' must be at least 1, got 0"),
    ({"num_bridge_tokens": -2}, "'num_bridge_tokens' must be at least 1, got -2"),
    ({"image_res": 0}, "'image_res' must be at least 1, got 0"),
    ({"image_res": 100}, "'image_res' 100 is not a multiple of the patch size 14"),
    ({"image_mean": [0.5, 0.5]}, "'image_mean' must be a list of 3 numbers, got [0.5, 0.5]"),
    ({"image_mean": [0.5, "a", 0.5]}, "'image_mean' must be a list of 3 numbers, got [0.5, 'a', 0.5]"),
    ({"image_mean": [0.5, float("nan"), 0.5]}, "'image_mean' must be a list of 3 numbers, got [0.5, nan, 0.5]"),
    ({"image_std": [0.2, 0, 0.2]}, "'image_std' must be a list of 3 numbers greater than 0, got [0.2, 0, 0.2]"),
    ({"image_std": [0.2, True, 0.2]}, "'image_std' must be a list of 3 numbers greater than 0, got [0.2, True, 0.2]"),
    ({"vit": {"embed_dim": 0}}, "'vit.embed_dim' must be at least 1, got 0"),
    ({"vit": {"depth": 0}}, "'vit.depth' must be at least 1, got 0"),
    ({"vit": {"num_heads": 0}}, "'vit.num_heads' must be at least 1, got 0"),
    ({"vit": {"mlp_ratio": 0}}, "'vit.mlp_ratio' must be a number greater than 0, got 0.0"),
    ({"vit": {"patch_size": 0}}, "'vit.patch_size' must be at least 1, got 0"),
    ({"vit": {"embed_dim": 100, "num_heads": 3}}, "'vit.embed_dim' 100 must be divisible by 'vit.num_heads' 3"),
    ({"vit": {"num_heads": 5}}, "'vit.embed_dim' 1408 must be divisible by 'vit.num_heads' 5"),
    # paths and names
    ({"test_files": []}, "'test_files' must be a path or a non-empty list of paths, got []"),
    ({"test_files": ["a.jsonl", ""]}, "'test_files' must be a path or a non-empty list of paths, got ['a.jsonl', '']"),
    ({"test_files": [3]}, "'test_files' must be a path or a non-empty list of paths, got [3]"),
    ({"checkpoint": ""}, "'checkpoint' must be a non-empty path, got ''"),
    ({"vit_checkpoint": " "}, "'vit_checkpoint' must be a non-empty path, got ' '"),
    ({"llm_path": ""}, "'llm_path' must be null or a non-empty path, got ''"),
    ({"LLM": ""}, "'LLM' must be a non-empty name (the folder ./data/<LLM> unless llm_path is set), got ''"),
    ({"output_prompt_dict": ""}, "'output_prompt_dict' must be a non-empty string, got ''"),
    # keys of the original's training configs
    ({"drop_path_rate": 2}, "'drop_path_rate' must be a number from 0 to 1 (read, unused at inference), got 2.0"),
    ({"label_smoothing": "x"}, "'label_smoothing' must be a number, got 'x'"),
    # decoding keys: checked by DecodingSettings (tests/test_decoding_settings.py has them all)
    ({"use_nucleus_sampling": True, "temperature": 0},
     "'temperature' must be a number greater than 0 when sampling (use_nucleus_sampling: true), got 0.0"),
]


@pytest.mark.parametrize("raw,message", BAD_VALUES, ids=[str(raw) for raw, _ in BAD_VALUES])
def test_bad_values_name_the_key_the_value_and_what_is_allowed(raw, message):
    with pytest.raises(InputError) as err:
        config_from_dict(raw, where="c.yaml")
    assert str(err.value) == f"c.yaml: {message}"


def test_every_key_is_checked():
    """Each key of LynxConfig, DataConfig and VitConfig is named by a row of BAD_VALUES (or is a decoding key,
    checked through DecodingSettings, or a boolean, whose type is all there is to check)."""
    named = {message.split("'")[1] for _, message in BAD_VALUES}
    decoding = {f.name for f in dataclasses.fields(DecodingSettings)}
    booleans = {f.name for f in dataclasses.fields(LynxConfig) if isinstance(f.default, bool)}
    keys = {f.name for f in dataclasses.fields(LynxConfig)} - {"data", "vit"}
    keys |= {f"data.{f.name}" for f in dataclasses.fields(DataConfig)}
    keys |= {f"vit.{f.name}" for f in dataclasses.fields(VitConfig)}
    unchecked = keys - named - decoding - booleans - {"image_rdir", "prompt"}  # any string; the prompt: below
    assert unchecked == set()


# ---------------------------------------------------------------- the prompt template, checked once at start

@pytest.mark.parametrize("prompt, problem", [
    ("User: {question\nBot:", "is not a valid template (unmatched '{' in format spec; a literal brace is written "
                              "{{ or }})"),
    ("User: {question", "is not a valid template (expected '}' before end of string; a literal brace is written "
                        "{{ or }})"),
    ("User: question}", "is not a valid template (Single '}' encountered in format string; a literal brace is "
                        "written {{ or }})"),
    ("User: {} Bot:", "has the field {}, which names no record field (write e.g. {question})"),
    ("User: {0} Bot:", "has the field {0}, which names no record field (write e.g. {question})"),
    ("User: {question.} Bot:", "has the field {question.}, which names no record field (write e.g. {question})"),
    ("User: {question!x} Bot:", "has the field {question!x}: '!x' is no conversion (!r, !s or !a)"),
    ("User: {question:zz} Bot:", "has the field {question:zz}: the format spec ':zz' suits no text or number"),
    ("User: {question!r:d} Bot:", "has the field {question!r:d}: the format spec ':d' suits no text or number"),
    ("User: {question:>{}} Bot:", "has the field {}, which names no record field (write e.g. {question})"),
])
def test_a_broken_prompt_template_is_one_line_at_start(prompt, problem):
    with pytest.raises(InputError) as err:
        config_from_dict({"prompt": prompt}, where="c.yaml")
    assert str(err.value) == f"c.yaml: 'prompt' {problem}: {prompt!r}"
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("prompt", ["", "Describe the image.", "User: {question}\nBot:", "{{literal}} {question}",
                                    "#{index:03d} {question!r:>20}", "{question[0]} {meta.name}", "{question:>{width}}"])
def test_templates_that_some_record_can_fill_are_accepted(prompt):
    """Whether a record has the fields (and values that suit the format spec) is that record's matter."""
    assert config_from_dict({"prompt": prompt}).prompt == prompt


@pytest.mark.parametrize("override, message", [
    ("data.num_workers=-1", "--set 'data.num_workers=-1': 'data.num_workers' must be 0 (read media in the main "
                            "process) or more, got -1"),
    ("temperature=0", "--set 'temperature=0': 'temperature' must be a number greater than 0 when sampling "
                      "(use_nucleus_sampling: true), got 0.0"),
    ("prompt=User: {question", "--set 'prompt=User: {question': 'prompt' is not a valid template (expected '}' before "
                               "end of string; a literal brace is written {{ or }}): 'User: {question'"),
    ("prompt=User: {question}\\nBot:", "--set 'prompt=User: {question}\\\\nBot:': a value without quotes is taken as "
                                       "written, so its backslash would stay a backslash; quote it as YAML: \"...\" "
                                       "reads \\n as a line break, '...' keeps backslashes"),
])
def test_generate_with_the_shipped_config_stops_before_the_model_loads(tmp_path, monkeypatch, capsys, override,
                                                                       message):
    """configs/LYNX.yaml (num_workers 4, decoder auto) with one bad value: exit 1, one line, nothing written."""
    import generate
    from lynx.pipeline import LynxPipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(LynxPipeline, "build", refuse)
    monkeypatch.chdir(ROOT)
    output = tmp_path / "out.jsonl"
    status = generate.main(["--config", "configs/LYNX.yaml", "--output_path", str(output), "--device", "cpu",
                            "--set", override])
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [f"error: {message}"]
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- what the original accepted

def test_training_keys_are_read_and_not_kept():
    cfg = config_from_dict({"drop_path_rate": 0.1, "label_smoothing": 0.1})
    assert "drop_path_rate" not in cfg.to_dict() and "label_smoothing" not in cfg.to_dict()
    assert cfg.to_dict() == LynxConfig().to_dict()  # so a run's settings (and resume fingerprint) do not change


def test_test_files_may_be_a_single_path():
    assert config_from_dict({"test_files": "./data/Open_VQA_videos.jsonl"}).test_files == \
        ["./data/Open_VQA_videos.jsonl"]
    cfg = load_config(str(ROOT / "configs" / "LYNX.yaml"), ["test_files=./data/Open_VQA_videos.jsonl"])
    assert cfg.test_files == ["./data/Open_VQA_videos.jsonl"]


@pytest.mark.parametrize("written, stored", [(40, 40), (1, 1), (0, 0), (-1, 0), (-40, 0)])
def test_max_input_tokens_zero_or_less_means_no_truncation(written, stored):
    assert config_from_dict({"max_input_tokens": written}).max_input_tokens == stored


def test_max_input_tokens_zero_or_less_keeps_the_whole_prompt(in_fixture):
    """Through the dataset's encode path: a prompt longer than 40 ids keeps all of them (BOS first) at 0 or -5,
    and only its last 40 at 40, as the original's `if max_input_tokens > 0: ids = ids[-max_input_tokens:]`."""
    from dataset.records import read_jsonl as read_records
    from models.tokenizer import LynxTokenizer

    tokenizer = LynxTokenizer("data/vicuna-7b/tokenizer.model")
    record = read_records("data/Open_VQA_images_tiny.jsonl")[0]
    record.fields["question"] = "what is the colour of the large object in the middle of the picture " * 3
    ids = {}
    for written in (40, 0, -5):
        cfg = config_from_dict(fixture_config(max_input_tokens=written))
        ids[written] = eval_dataset([record], cfg, tokenizer)[0].input_ids
    assert len(ids[0]) > 40 and ids[0][0] == tokenizer.bos_id
    assert ids[-5] == ids[0]
    assert ids[40] == ids[0][-40:]


def test_generate_sh_without_weights_names_the_missing_files_and_the_fetch_command(tmp_path):
    """A new user's first `bash generate.sh` without the weights: every file, where it goes and comes from, and the
    one command that fetches them."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    shutil.copytree(ROOT / "data", tmp_path / "data", ignore=shutil.ignore_patterns("*.pt", "*.pth", "vicuna-7b"))
    proc = subprocess.run(["bash", str(ROOT / "generate.sh")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        f"error: 3 weight files named by the config are missing (relative paths are read from the working "
        f"directory, {tmp_path}):",
        "  vit_checkpoint ./data/eva_vit_g.pth: no such file — EVA01_g_psz14.pt of "
        "https://huggingface.co/QuanSun/EVA-CLIP, saved under this name",
        "  LLM folder ./data/vicuna-7b: no such folder — the files of https://huggingface.co/lmsys/vicuna-7b-v1.1",
        "  checkpoint ./data/finetune_lynx.pt: no such file — "
        "https://lf-robot-opensource.bytetos.com/obj/lab-robot-public/lynx_release/finetune_lynx.pt",
        "fetch them with: python -m lynx.fetch --config ./configs/LYNX.yaml"]
    assert not (tmp_path / "result_0.jsonl").exists()


def test_smoke_config_runs_and_prints_answers(tmp_path):
    proc = subprocess.run(["bash", "generate.sh", "configs/tiny.yaml", str(tmp_path / "smoke.jsonl")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stderr[-2000:]
    shown = proc.stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in shown] == ["img-17", "img-3", "img-42", "vid-1", "vid-33", "vid-65"]
    assert all(line.split("\t")[1] for line in shown)
    assert len((tmp_path / "smoke.jsonl").read_text().splitlines()) == 6
