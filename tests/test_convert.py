"""Converted folders (python -m lynx.convert): the same model and the same answers as the release files, loaded
memory-mapped with nothing read in the run's dtype, and refused when made for another config."""
import logging
import os
import subprocess
import sys

import pytest
import torch
import yaml

import generate
import models.tensor_files
from conftest import FIXTURE, ROOT, build_tiny_lynx, fixture_cases, fixture_config
from errors import InputError
from lynx import convert
from test_loading import assert_same_tensors

CASES = {c["name"]: c for c in fixture_cases()}


def convert_fixture(tmp_path_factory, dtype: str) -> str:
    """The tiny fixture converted in `dtype`, made from the fixture root."""
    out = tmp_path_factory.mktemp("converted") / f"lynx-{dtype}"
    config = tmp_path_factory.mktemp("cfg") / "config.yaml"
    config.write_text(yaml.safe_dump(fixture_config()))
    cwd = os.getcwd()
    os.chdir(FIXTURE)
    try:
        assert convert.main(["--config", str(config), "--out", str(out), "--dtype", dtype]) == 0
    finally:
        os.chdir(cwd)
    return str(out)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """In float32, the fixture runs' dtype."""
    return convert_fixture(tmp_path_factory, "float32")


@pytest.fixture(scope="module")
def converted_bf16(tmp_path_factory):
    return convert_fixture(tmp_path_factory, "bfloat16")


def test_converted_folder_holds_the_same_model(converted, monkeypatch):
    _, reference, _ = build_tiny_lynx()

    def no_reads(*args):
        raise AssertionError("a tensor was read, not mapped")

    monkeypatch.setattr(models.tensor_files, "_read", no_reads)  # in the run's dtype on the CPU: mapped, no copy
    _, model, _ = build_tiny_lynx(converted=converted)
    assert_same_tensors(model, reference)


def test_converted_folder_in_another_dtype_is_cast_when_read(converted):
    """Equal to the release files' load in that dtype, except the [PAD] rows: their mean was taken in float32."""
    _, reference, _ = build_tiny_lynx(dtype="bfloat16")
    _, model, _ = build_tiny_lynx(converted=converted, dtype="bfloat16")
    theirs = reference.state_dict()
    for key, value in model.state_dict().items():
        if key in ("LLM.model.embed_tokens.weight", "LLM.lm_head.weight"):
            assert torch.equal(value[:-1], theirs[key][:-1])
            torch.testing.assert_close(value[-1:], theirs[key][-1:], atol=1e-3, rtol=0)
        else:
            assert value.dtype == torch.bfloat16 and torch.equal(value, theirs[key]), key


@pytest.mark.parametrize("name", ["images_greedy", "videos_beam5"])
def test_converted_folder_gives_the_original_answers(converted, name, tmp_path, in_fixture):
    case = CASES[name]
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(fixture_config(**case["set"], converted=converted)))
    output = tmp_path / "answers.jsonl"
    assert generate.main(["--config", str(cfg_path), "--output_path", str(output), "--device", "cpu"]) == 0
    assert output.read_bytes() == (FIXTURE / case["expected"]).read_bytes()


def load(**overrides):
    """LynxPipeline.from_config on the fixture's config with keys replaced: the weight files are checked first."""
    from configs.schema import config_from_dict
    from lynx.pipeline import LynxPipeline

    return LynxPipeline.from_config(config_from_dict(fixture_config(**overrides)), device="cpu")


def test_folder_made_from_another_checkpoint_is_refused(converted, in_fixture):
    with pytest.raises(InputError, match=r"was made with checkpoint = './data/finetune_lynx.pt', but this config has "
                                         r"checkpoint = './data/full_lynx.pt' — convert again for this config"):
        load(converted=converted, checkpoint="./data/full_lynx.pt")


def test_folder_made_for_other_model_settings_is_refused(converted, in_fixture):
    with pytest.raises(InputError, match=r"was made with adapter_freq = 2, but this config has adapter_freq = 1"):
        load(converted=converted, adapter_freq=1)


def test_incomplete_folder_names_the_missing_file(converted, tmp_path, in_fixture):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(converted, copy)
    (copy / "model.safetensors").unlink()
    with pytest.raises(InputError, match=r"converted folder .*copy: no model\.safetensors — write the folder with "
                                         r"python -m lynx\.convert"):
        load(converted=str(copy))


def test_release_files_are_not_needed(converted, tmp_path, monkeypatch):
    """Only the folder is read: from a folder where the config's release files do not exist, the run loads."""
    from configs.schema import config_from_dict
    from models.build import build_lynx

    monkeypatch.chdir(tmp_path)
    cfg = config_from_dict(fixture_config(converted=converted))
    assert not any(os.path.exists(p) for p in (cfg.vit_checkpoint, cfg.llm_dir, cfg.checkpoint))
    model, _ = build_lynx(cfg, "cpu")
    assert model.LLM.lm_head.weight.shape[0] == 1001


def test_quantized_run_from_a_converted_folder(converted):
    _, model, _ = build_tiny_lynx(converted=converted, quantize="int8")
    assert type(model.LLM.model.layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"


def test_a_run_without_a_dtype_computes_in_the_folders(converted_bf16, in_fixture, caplog):
    """A bfloat16 folder and no `dtype`: the run is bfloat16, the same model as with `dtype: bfloat16` (cast up to the
    CPU's float32, its weights would give neither the folder's answers nor the release files')."""
    with caplog.at_level(logging.INFO, logger="lynx"):
        _, model, _ = build_tiny_lynx(converted=converted_bf16)
    assert "dtype bfloat16: the converted folder's own (dtype is unset)" in caplog.text
    _, reference, _ = build_tiny_lynx(converted=converted_bf16, dtype="bfloat16")
    assert_same_tensors(model, reference)
    assert model.dtype == torch.bfloat16


def test_a_run_set_to_float32_says_the_folders_precision_stays(converted_bf16, caplog):
    with caplog.at_level(logging.WARNING, logger="lynx"):
        _, model, _ = build_tiny_lynx(converted=converted_bf16, dtype="float32")
    assert model.dtype == torch.float32
    assert ("holds bfloat16 weights and the config sets dtype: float32: cast up as they are read, they keep "
            "bfloat16's precision, so the answers are not a float32 run's of the release files (convert again with "
            "--dtype float32 for those, or leave dtype unset to run in bfloat16)") in caplog.text


def test_help_and_a_missing_weight_file_answer_before_torch(tmp_path):
    """`python -m lynx.convert --help` took 20 s importing torch before parsing its flags."""
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(fixture_config(checkpoint="./data/nope.pt")))
    code = ("import runpy, sys\n"
            "sys.argv = ['lynx.convert', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('lynx.convert', run_name='__main__')\n"
            "except SystemExit as stop:\n    print(stop.code, 'torch' in sys.modules)\n")
    for argv, status in ((["--help"], 0), (["--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o")], 1)):
        proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=FIXTURE, capture_output=True, text=True,
                              timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.stdout.splitlines()[-1] == f"{status} False", proc.stderr
    assert proc.stderr.startswith("error: a weight file named by the config is missing")
