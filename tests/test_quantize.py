"""quantize: int8 | int4 (torchao weight-only) on the CPU: quantized tiny models answer end to end with both
decoders and with the ViT quantized too, layers are quantized as their weights arrive, and settings no kernel takes
are one clear line."""
import logging

import pytest
import torch
import yaml

import generate
import models.quantize
from conftest import FIXTURE, build_tiny_lynx, fixture_cases, fixture_config, read_jsonl, run_main
from configs.schema import config_from_dict
from errors import InputError
from models.build import model_skeleton, read_llm_config
from models.quantize import Quantizer

CASES = {c["name"]: c for c in fixture_cases()}


def answers(tmp_path, name: str, **settings) -> list[str]:
    run = f"{name}-{'-'.join(map(str, settings.values()))}"
    cfg_path = tmp_path / f"{run}.yaml"
    cfg_path.write_text(yaml.safe_dump(fixture_config(**CASES[name]["set"], **settings)))
    output = tmp_path / f"{run}.jsonl"
    assert generate.main(["--config", str(cfg_path), "--output_path", str(output), "--device", "cpu"]) == 0
    return [r["text_output"] for r in read_jsonl(output)]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_answers_with_both_decoders(mode, tmp_path, in_fixture, capsys):
    """Greedy answers through generate.py, transformers' generate and the fast decoder alike; how many equal the
    float32 answers is printed (random tiny weights: a weak proxy for quality, not asserted)."""
    expected = [r["text_output"] for name in ("images_greedy", "videos_greedy")
                for r in read_jsonl(FIXTURE / CASES[name]["expected"])]
    hf = answers(tmp_path, "images_greedy", quantize=mode) + answers(tmp_path, "videos_greedy", quantize=mode)
    fast = answers(tmp_path, "images_greedy", quantize=mode, decoder="fast")
    assert len(hf) == len(expected) and all(isinstance(a, str) for a in hf)
    assert fast == hf[:len(fast)]  # the fast decoder's per-layer code runs the quantized layers as transformers does
    same = sum(a == b for a, b in zip(hf, expected))
    with capsys.disabled():
        print(f"\n{mode}: {same} of {len(expected)} greedy answers equal float32's on the tiny fixture")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_vit_answers_every_image_and_video(mode, dtype, tmp_path, in_fixture, caplog, capsys):
    """`quantize_vit: true` answers every record of the fixture, images and videos in one run (timm's EVA attention
    calls F.linear with keywords, which torchao's tensors refuse: it crashed on the first batch). How many answers
    equal float32's is printed (random tiny weights: a weak proxy for quality, not asserted)."""
    expected = read_jsonl(FIXTURE / CASES["images_greedy"]["expected"]) + read_jsonl(
        FIXTURE / CASES["videos_greedy"]["expected"])
    cfg = fixture_config(test_files=["./data/Open_VQA_images_tiny.jsonl", "./data/Open_VQA_videos_tiny.jsonl"],
                         vision_prompt_dict="auto", quantize=mode, quantize_vit=True, dtype=dtype)
    with caplog.at_level(logging.INFO, logger="lynx"):
        assert run_main(cfg, tmp_path) == 0
    assert any(f"quantize {mode}: " in r.getMessage() and "of the LLM and ViT" in r.getMessage()
               for r in caplog.records)
    rows = read_jsonl(tmp_path / "answers.jsonl")
    assert [r["index"] for r in rows] == [r["index"] for r in expected]
    assert all(isinstance(r["text_output"], str) and r["text_output"] for r in rows)
    same = sum(a["text_output"] == b["text_output"] for a, b in zip(rows, expected))
    with capsys.disabled():
        print(f"\n{mode} {dtype}, quantize_vit: {same} of {len(expected)} greedy answers equal float32's")


def test_vit_layers_are_quantized_on_request():
    _, model, _ = build_tiny_lynx(quantize="int8", quantize_vit=True)
    assert type(model.vision_encoder.blocks[0].attn.qkv.weight).__name__ == "Int8Tensor"
    assert type(model.LLM.model.layers[1].mlp.down_proj.weight).__name__ == "Int8Tensor"
    assert type(model.LLM.lm_head.weight) is torch.nn.Parameter  # lm_head, adapters, bridge: the run's dtype
    assert type(model.LLM.model.layers[0].output_adapter.adapter_down.weight) is torch.nn.Parameter
    _, plain, _ = build_tiny_lynx(quantize="int8")
    assert type(plain.vision_encoder.blocks[0].attn.qkv.weight) is torch.nn.Parameter


def test_layers_are_quantized_as_their_weights_arrive(monkeypatch):
    """When the first layer is quantized, the last LLM layer has no weights yet: the unquantized LLM never exists
    whole on the device."""
    seen = []
    quantize = Quantizer.quantize

    def recording(self, linear):
        last = self_model[0].LLM.model.layers[-1].mlp.down_proj.weight
        seen.append(last.is_meta)
        quantize(self, linear)

    self_model = []
    init = Quantizer.__init__

    def keep_model(self, model, *args, **kwargs):
        self_model.append(model)
        init(self, model, *args, **kwargs)

    monkeypatch.setattr(Quantizer, "__init__", keep_model)
    monkeypatch.setattr(Quantizer, "quantize", recording)
    build_tiny_lynx(quantize="int8")
    assert seen[0] and not seen[-1] and len(seen) == 14


def test_int4_keeps_layers_no_kernel_takes():
    """The tiny LLM's MLP (172 wide) fits no int4 kernel: those layers stay float32, the attention is int4."""
    _, model, _ = build_tiny_lynx(quantize="int4")
    layer = model.LLM.model.layers[0]
    assert type(layer.self_attn.q_proj.weight).__name__ == "Int4OpaqueTensor"
    assert layer.mlp.up_proj.weight.dtype == torch.float32 and type(layer.mlp.up_proj.weight) is torch.nn.Parameter


def skeleton():
    cfg = config_from_dict(fixture_config())
    return model_skeleton(cfg, read_llm_config(str(FIXTURE / "data" / "vicuna-7b")))


def test_int4_on_cuda_needs_bfloat16():
    with pytest.raises(InputError, match="quantize: int4 on CUDA needs dtype bfloat16 .*; this run uses float16"):
        Quantizer(skeleton(), "int4", "cuda", torch.float16)


def test_unknown_mode_is_named():
    with pytest.raises(InputError, match="'quantize' must be one of int8, int4, got 'int3'"):
        config_from_dict({"quantize": "int3"})


def test_targets_are_the_decoder_projections_only():
    targets = models.quantize.quantization_targets(skeleton())
    assert sorted({key.rsplit(".", 1)[1] for key in targets}) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert len(targets) == 14
