"""Checkpoint reading and loading: prefixes, layouts, safe loading, and the errors of the load report."""

import pytest
import torch
from safetensors.torch import save_file

from conftest import FIXTURE, build_tiny_lynx
from errors import InputError
from models.checkpoint import clean_lynx_state, strip_key_prefix
from state_files import load_lynx_checkpoint, read_state_file

DATA = FIXTURE / "data"


@pytest.mark.parametrize("key,expected", [
    ("module.bridge.latents", "bridge.latents"),
    ("model.bridge.latents", "bridge.latents"),
    ("module.model.LLM.model.layers.0.output_adapter.scaling", "LLM.model.layers.0.output_adapter.scaling"),
    ("LLM.model.embed_tokens.weight", "LLM.model.embed_tokens.weight"),
    ("module.LLM.model.norm.weight", "LLM.model.norm.weight"),
    ("modelling.x", "modelling.x"),
])
def test_prefixes_are_removed_as_prefixes(key, expected):
    assert strip_key_prefix(key) == expected
    if key.startswith("module."):
        assert key.lstrip("model.") != expected  # the original's character stripping breaks these keys


def test_split_qkv_keys_are_fused_into_the_eva_layout():
    q, k, v = (torch.randn(4, 4) for _ in range(3))
    qb, vb = torch.randn(4), torch.randn(4)
    state = {"model": {"module.vision_encoder.blocks.0.attn.q_proj.weight": q,
                       "module.vision_encoder.blocks.0.attn.k_proj.weight": k,
                       "module.vision_encoder.blocks.0.attn.v_proj.weight": v,
                       "module.vision_encoder.blocks.0.attn.q_proj.bias": qb,
                       "module.vision_encoder.blocks.0.attn.v_proj.bias": vb,
                       "module.bridge.latents": torch.ones(2)}}
    cleaned = clean_lynx_state(state)
    assert set(cleaned) == {"vision_encoder.blocks.0.attn.qkv.weight", "vision_encoder.blocks.0.attn.q_bias",
                            "vision_encoder.blocks.0.attn.v_bias", "bridge.latents"}
    assert torch.equal(cleaned["vision_encoder.blocks.0.attn.qkv.weight"].load(), torch.cat([q, k, v]))
    assert torch.equal(cleaned["vision_encoder.blocks.0.attn.q_bias"].load(), qb)


@pytest.fixture(scope="module")
def tiny_model():
    return build_tiny_lynx()[1]


def test_whole_model_checkpoints_give_the_same_parameters(tiny_model, in_fixture):
    reference = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    for name in ("full_lynx.pt", "full_lynx_ddp.pt"):
        report = load_lynx_checkpoint(tiny_model, str(DATA / name))
        assert sum(report.loaded.values()) > 44  # the whole model, not only the trained parts
        assert all(k.endswith("rotary_emb.inv_freq") for k in report.ignored)  # unused buffers only
        for key, value in tiny_model.state_dict().items():
            torch.testing.assert_close(value, reference[key], atol=2e-6, rtol=0, msg=key)


def test_load_report_counts_each_part(tiny_model):
    report = load_lynx_checkpoint(tiny_model, str(DATA / "finetune_lynx.pt"))
    assert report.loaded == {"adapters": 7, "bridge": 36, "frame positions": 1}
    assert report.ignored == []
    assert report.kept == {"vision encoder": 30, "LLM": 21}
    assert report.summary().endswith(
        "finetune_lynx.pt: 44 tensors loaded (adapters 7, bridge 36, frame positions 1), 0 ignored; "
        "not in the file, kept from the ViT and LLM weights: vision encoder 30, LLM 21")


def test_safetensors_checkpoint_loads_like_the_pt_file(tiny_model, tmp_path):
    state = torch.load(DATA / "finetune_lynx.pt", weights_only=True)["model"]
    path = tmp_path / "lynx.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    report = load_lynx_checkpoint(tiny_model, str(path))
    assert sum(report.loaded.values()) == 44
    assert torch.equal(tiny_model.bridge.latents, state["bridge.latents"])


def test_missing_trained_part_names_file_and_key(tiny_model, tmp_path):
    state = torch.load(DATA / "finetune_lynx.pt", weights_only=True)
    del state["model"]["absolute_frame_pos_embed"]
    path = tmp_path / "no_frames.pt"
    torch.save(state, path)
    with pytest.raises(InputError, match=r"no_frames\.pt: missing 1 trained tensors, e\.g\. 'absolute_frame_pos_embed'"):
        load_lynx_checkpoint(tiny_model, str(path))


def test_shape_mismatch_names_file_key_and_both_shapes(tiny_model, tmp_path):
    state = torch.load(DATA / "finetune_lynx.pt", weights_only=True)
    state["model"]["bridge.latents"] = torch.zeros(16, 64)
    path = tmp_path / "wrong.pt"
    torch.save(state, path)
    with pytest.raises(InputError) as err:
        load_lynx_checkpoint(tiny_model, str(path))
    message = str(err.value)
    assert "wrong.pt" in message and "'bridge.latents'" in message
    assert "(16, 64)" in message and "(32, 64)" in message


class Pickled:
    pass


def test_files_that_need_pickled_code_are_refused(tmp_path):
    path = tmp_path / "unsafe.pt"
    torch.save({"model": {}, "extra": Pickled()}, path)
    with pytest.raises(InputError, match="execute pickled code"):
        read_state_file(str(path), "checkpoint")


def test_missing_weight_file_says_where_to_get_it(tmp_path):
    with pytest.raises(InputError, match=r"not found: .*missing\.pt — get https://lf-robot-opensource"):
        read_state_file(str(tmp_path / "missing.pt"), "checkpoint")
