"""benchmarks/write_release_files.py (reduced: widths / 16, 2 layers, 2 ViT blocks) writes files in the released
layouts that load as the whole-file way loads them; benchmarks/load_benchmark.py measures loading both ways."""
import json
import sys

import pytest
import torch

from conftest import ROOT
from configs.schema import load_config
from models.build import build_lynx
from state_files import read_state_file
from test_loading import assert_same_tensors, load_whole_files

sys.path.insert(0, str(ROOT / "benchmarks"))
import load_benchmark  # noqa: E402
import write_release_files  # noqa: E402


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    out = tmp_path_factory.mktemp("release")
    sizes = write_release_files.write_release(out, layers=2, vit_depth=2, scale=16, shard_bytes=12 * 10**6)
    return out, sizes


def test_files_have_the_released_layouts(release):
    out, sizes = release
    eva = read_state_file(str(out / "eva_vit_g.pth"), "vit")
    assert eva["pos_embed"].shape == (1, 1 + 16 * 16, 88) and eva["pos_embed"].dtype == torch.float16
    assert "blocks.2.attn.qkv.weight" in eva and "norm.weight" in eva  # a block and keys the model does not use
    assert "blocks.0.attn.k_bias" not in eva and "blocks.0.attn.q_bias" in eva
    index = json.loads((out / "vicuna-7b" / "pytorch_model.bin.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"pytorch_model-00001-of-{len(shards):05d}.bin"
    assert "model.layers.1.self_attn.rotary_emb.inv_freq" in index["weight_map"]
    llm = {}
    for shard in shards:
        llm.update(torch.load(out / "vicuna-7b" / shard, weights_only=True))
    assert llm["model.embed_tokens.weight"].shape == (32000, 256) and llm["lm_head.weight"].dtype == torch.float16
    assert abs(llm["model.norm.weight"].float().mean().item() - 1) < 0.01  # norm weights near 1, others near 0
    assert abs(llm["model.layers.0.mlp.up_proj.weight"].float().std().item() - 0.02) < 0.002
    trained = torch.load(out / "finetune_lynx.pt", weights_only=True)["model"]
    assert trained["bridge.latents"].dtype == torch.float32 and "LLM.model.layers.0.output_adapter.scaling" in trained
    assert not any(k.startswith(("vision_encoder.", "LLM.model.embed")) for k in trained)


def test_files_load_as_whole_file_loading_does(release):
    out, _ = release
    cfg = load_config(str(out / "lynx.yaml"), ["dtype=bfloat16"])
    model, tokenizer = build_lynx(cfg, "cpu")
    assert tokenizer.vocab_size == 32001
    assert_same_tensors(model, load_whole_files(cfg, torch.bfloat16))


def test_load_benchmark_measures_both_ways_cold_and_warm(release, tmp_path, capsys):
    """Every (source, page cache) asked for, in order, with figures that fit what was loaded: the files' sizes, the
    share of them in the page cache, the model's size (its tensors are anonymous memory when read from the release
    files, file-backed when mapped from the converted folder), and peaks that contain what they count."""
    out, sizes = release
    result, converted = tmp_path / "load.json", tmp_path / "converted"
    assert load_benchmark.main(["--config", str(out / "lynx.yaml"), "--converted", str(converted),
                                "--out", str(result)]) == 0
    report = json.loads(result.read_text())
    assert report["convert_s"] > 0
    runs = report["runs"]
    assert [(run["source"], run["cache"]) for run in runs] == [
        ("release", "cold"), ("release", "warm"), (str(converted), "cold"), (str(converted), "warm")]
    model, _ = build_lynx(load_config(str(out / "lynx.yaml"), ["dtype=bfloat16"]), "cpu")
    model_gb = round(sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 1e9, 3)
    files_gb = {"release": round(sum(sizes.values()) / 1e9, 3),
                str(converted): round((converted / "model.safetensors").stat().st_size / 1e9, 3)}
    printed = capsys.readouterr().out
    for run in runs:
        assert run["files_gb"] == files_gb[run["source"]] and run["model_gb"] == model_gb
        if run["cache"] == "warm":
            assert run["files_cached_gb"] == run["files_gb"]
        else:  # dropped, or the run says it could not be (a tmpfs keeps its pages)
            assert run["files_cached_gb"] == 0 or "could not drop" in run["cache_note"]
        assert 0 < run["load_s"] and run["peak_rss_gb"] >= max(run["peak_anon_gb"], run["peak_file_gb"])
        assert run["peak_anon_minus_model_gb"] == pytest.approx(run["peak_anon_gb"] - model_gb, abs=0.002)
        grown = run["peak_anon_gb"] - run["anon_before_load_gb"]
        if run["source"] == "release":
            assert grown >= 0.9 * model_gb
        else:  # mapped: the model is the file's pages, read by the touch pass
            assert grown < 0.5 * model_gb and run["peak_file_gb"] >= model_gb
        cached = f"{run['files_cached_gb']:.2f} of {run['files_gb']:.2f}"
        assert f"| {run['source']} | cpu | bfloat16 | none | {run['cache']} | {cached} | {run['load_s']} |" in printed
