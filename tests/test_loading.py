"""Loading straight to the device: the model equals whole-file loading tensor for tensor, no file is read whole,
every LLM form (.bin / .safetensors, sharded) loads, and bad LLM files fail before any weight is read."""
import json
import os
import shutil

import pytest
import torch

from conftest import FIXTURE, build_tiny_lynx, fixture_config
from configs.schema import config_from_dict
from errors import InputError
from models.build import build_lynx
from models.lynx import Lynx, LynxLlamaForCausalLM
from models.vision_encoder import resize_pos_embed
from random_fixture import config as other_config, write_random_fixture

DATA = FIXTURE / "data"


def load_whole_files(cfg, dtype: torch.dtype) -> Lynx:
    """The former way, kept here as the reference: transformers' from_pretrained, [PAD] rows by resizing, whole
    files read with torch.load and copied in, the new parts cast last (rotary frequencies stay float32)."""
    from models.tokenizer import LynxTokenizer

    vocab = LynxTokenizer(os.path.join(cfg.llm_dir, "tokenizer.model")).vocab_size
    llm = LynxLlamaForCausalLM.from_pretrained(cfg.llm_dir, dtype=dtype, attn_implementation="sdpa")
    old = llm.get_input_embeddings().weight.shape[0]
    llm.resize_token_embeddings(vocab, mean_resizing=False)
    with torch.no_grad():
        for weight in (llm.get_input_embeddings().weight, llm.get_output_embeddings().weight):
            weight[old:] = weight[:old].float().mean(dim=0, keepdim=True).to(weight.dtype)
    model = Lynx(cfg, llm)
    eva = torch.load(cfg.vit_checkpoint, map_location="cpu", weights_only=True)
    own = model.vision_encoder.state_dict()
    grid = cfg.image_res // cfg.vit_dims.patch_size
    model.vision_encoder.load_state_dict(
        {k: resize_pos_embed(v, grid) if k == "pos_embed" else v for k, v in eva.items() if k in own}, strict=False)
    state = torch.load(cfg.checkpoint, map_location="cpu", weights_only=True)["model"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    for head in {k.rsplit(".attn.", 1)[0] for k in state if ".attn.q_proj." in k}:
        parts = [state.pop(f"{head}.attn.{n}_proj.weight") for n in "qkv"]
        state[f"{head}.attn.qkv.weight"] = torch.cat(parts)
        state[f"{head}.attn.q_bias"] = state.pop(f"{head}.attn.q_proj.bias")
        state[f"{head}.attn.v_bias"] = state.pop(f"{head}.attn.v_proj.bias")
    model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()}, strict=False)
    model.vision_encoder.to(dtype)
    model.bridge.to(dtype)
    for i in model.adapter_layers:
        model.LLM.model.layers[i].output_adapter.to(dtype)
    model.absolute_frame_pos_embed.data = model.absolute_frame_pos_embed.data.to(dtype)
    return model.eval().requires_grad_(False)


def assert_same_tensors(model, reference):
    for kind in ("named_parameters", "named_buffers"):
        ours, theirs = dict(getattr(model, kind)()), dict(getattr(reference, kind)())
        assert list(ours) == list(theirs), kind
        for name, value in ours.items():
            other = theirs[name]
            assert (value.dtype, value.device, value.shape) == (other.dtype, other.device, other.shape), name
            assert torch.equal(value, other), name
            assert not value.requires_grad, name
    assert not model.training


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("checkpoint", ["finetune_lynx.pt", "full_lynx_ddp.pt"])
def test_tiny_fixture_loads_as_whole_files_do(checkpoint, dtype, monkeypatch):
    cfg, model, _ = build_tiny_lynx(checkpoint=f"./data/{checkpoint}", dtype=dtype)
    monkeypatch.chdir(FIXTURE)
    assert_same_tensors(model, load_whole_files(cfg, getattr(torch, dtype)))


@pytest.fixture(scope="module")
def other_root(tmp_path_factory):
    return write_random_fixture(tmp_path_factory.mktemp("other"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_other_dims_load_as_whole_files_do(other_root, dtype):
    cfg = config_from_dict(other_config(other_root, dtype=dtype))
    model, _ = build_lynx(cfg, "cpu")
    assert_same_tensors(model, load_whole_files(cfg, getattr(torch, dtype)))


def test_no_weight_file_is_read_whole(monkeypatch):
    """torch.load only ever reads a file's index (on the meta device); each tensor is read by itself."""
    real_load = torch.load
    loads = []

    def index_only(path, *args, map_location=None, **kwargs):
        assert map_location == "meta", f"{path} read whole"
        loads.append(os.path.basename(str(path)))
        return real_load(path, *args, map_location=map_location, **kwargs)

    monkeypatch.setattr(torch, "load", index_only)
    build_tiny_lynx()
    assert sorted(loads) == ["eva_vit_g.pth", "finetune_lynx.pt", "pytorch_model.bin"]


def llm_copy(tmp_path, shards: int, safetensors: bool) -> str:
    """The fixture's LLM folder with its weights split into `shards` files (.bin or .safetensors, with an index)."""
    from safetensors.torch import save_file

    folder = tmp_path / "llm"
    shutil.copytree(DATA / "vicuna-7b", folder)
    (folder / "pytorch_model.bin").unlink()
    state = torch.load(DATA / "vicuna-7b" / "pytorch_model.bin", weights_only=True)
    keys = list(state)
    kind, suffix = ("model", "safetensors") if safetensors else ("pytorch_model", "bin")
    weight_map = {}
    for i in range(shards):
        name = f"{kind}-{i + 1:05d}-of-{shards:05d}.{suffix}" if shards > 1 else f"{kind}.{suffix}"
        part = {k: state[k].contiguous() for k in keys[i::shards]}
        save_file(part, str(folder / name)) if safetensors else torch.save(part, folder / name)
        weight_map.update({k: name for k in part})
    if shards > 1:
        (folder / f"{kind}.{suffix}.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return str(folder)


@pytest.mark.parametrize("shards,safetensors", [(1, True), (3, True), (3, False)])
def test_every_llm_folder_form_gives_the_same_model(tmp_path, shards, safetensors):
    _, reference, _ = build_tiny_lynx(dtype="bfloat16")
    _, model, _ = build_tiny_lynx(dtype="bfloat16", llm_path=llm_copy(tmp_path, shards, safetensors))
    assert_same_tensors(model, reference)


def test_llm_tensor_of_the_wrong_shape_is_found_before_weights_load(tmp_path, monkeypatch):
    folder = llm_copy(tmp_path, 1, safetensors=False)
    state = torch.load(os.path.join(folder, "pytorch_model.bin"), weights_only=True)
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 64, dtype=torch.float16)
    torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    import models.build

    monkeypatch.setattr(models.build, "materialise", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(InputError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' has shape \(3, 64\) in the file "
                                         r"but the model expects \(172, 64\)"):
        build_tiny_lynx(llm_path=folder)


def test_llm_folder_lacking_a_tensor_names_it(tmp_path):
    folder = llm_copy(tmp_path, 1, safetensors=False)
    state = torch.load(os.path.join(folder, "pytorch_model.bin"), weights_only=True)
    del state["model.norm.weight"]
    torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    with pytest.raises(InputError, match=r"llm: missing 1 LLM tensors the model needs, e\.g\. 'model\.norm\.weight'"):
        build_tiny_lynx(llm_path=folder)


def test_truncated_safetensors_file_is_one_clear_error(tmp_path):
    folder = llm_copy(tmp_path, 1, safetensors=True)
    path = os.path.join(folder, "model.safetensors")
    os.truncate(path, os.path.getsize(path) - 1000)
    with pytest.raises(InputError, match=r"model\.safetensors: the file ends before its tensors do \(truncated\?\)"):
        build_tiny_lynx(llm_path=folder)


def test_tensors_read_in_chunks_are_whole(monkeypatch):
    """A tensor that changes dtype on its way is read and converted a chunk at a time (here 1000 bytes)."""
    import models.tensor_files

    _, reference, _ = build_tiny_lynx(dtype="bfloat16")
    monkeypatch.setattr(models.tensor_files, "CHUNK", 1000)
    _, model, _ = build_tiny_lynx(dtype="bfloat16")
    assert_same_tensors(model, reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pad_row_mean_taken_by_slices_equals_the_whole_mean(dtype):
    from models.loading import mean_row

    weight = (torch.randn(3001, 700, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    assert torch.equal(mean_row(weight), weight.float().mean(dim=0, keepdim=True))


@pytest.mark.gpu
@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_loading_straight_to_cuda(quantize, monkeypatch):
    """On the GPU: the CPU load's tensors (the [PAD] mean taken on the GPU: close, not equal), quantized layers
    packed there, and the visual prefix computed."""
    _, on_cpu, _ = build_tiny_lynx(dtype="bfloat16")
    monkeypatch.chdir(FIXTURE)
    model, _ = build_lynx(config_from_dict(fixture_config(dtype="bfloat16", quantize=quantize)), "cuda")
    theirs = on_cpu.state_dict()
    for key, value in model.state_dict().items():
        assert value.device.type == "cuda", key
        if quantize is None and key in ("LLM.model.embed_tokens.weight", "LLM.lm_head.weight"):
            torch.testing.assert_close(value.cpu(), theirs[key], atol=1e-3, rtol=0)
        elif quantize is None:
            assert torch.equal(value.cpu(), theirs[key]), key
    visual = model.encode_media(torch.rand(1, 3, 84, 84))
    assert visual.device.type == "cuda" and torch.isfinite(visual.float()).all()
