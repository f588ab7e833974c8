"""benchmarks/benchmark.py runs on the CPU with the tiny model (what CI can run; its numbers mean nothing)."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import workload  # noqa: E402


def test_tiny_benchmark_reports_what_it_ran(tmp_path):
    """The rows are the configurations, sets and modes asked for, each with the records it timed (3 records in
    batches of 2: the split pass times the first batch and scales its parts by 2; a limit of 2 records is one batch,
    its time scaled to the set and marked estimated), 4 decoding steps per batch (5 new tokens, the first from the
    prefill), the table printing the JSON's figures and the speed-up over the baseline's row, the saved weights'
    file, and answers equal where both sides are float32 (every answer forced to 5 tokens)."""
    out, weights = tmp_path / "results.json", tmp_path / "weights"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "benchmark.py"), "--tiny", "--device", "cpu", "--limit", "3",
           "--batch-size", "2", "--max-new-tokens", "5", "--modes", "paper", "greedy", "--fidelity-limit", "2",
           "--split-limit", "2", "--quantize", "int8", "int4", "--quantized-modes", "greedy", "--quantized-sets",
           "images", "--save-weights", str(weights), "--out", str(out)]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["environment"]["card"] == "CPU" and "failures" not in report
    rows = report["results"]
    assert [(r["config"], r["set"], r["mode"]) for r in rows] == [
        ("baseline", "images", "paper"), ("baseline", "videos", "paper"),  # the baseline's own mode
        ("baseline", "images", "greedy"), ("baseline", "videos", "greedy"),  # its float32 answers, 2 records
        ("fast", "images", "paper"), ("fast", "videos", "paper"), ("fast", "images", "greedy"),
        ("fast", "videos", "greedy"), ("fast-int8", "images", "greedy"), ("fast-int4", "images", "greedy")]
    for r in rows:
        timed = r["split_records"] if r["config"] == "baseline" else r["measured_records"]  # the baseline: split
        assert r["records"] == 3 and r["split_records"] == 2 and r["estimated"] == (timed < 3)
        assert r["measured_records"] == (2 if r["mode"] == "greedy" and r["config"] != "fast" else 3)  # fidelity
        assert set(r["parts"]) == {"vit", "resampler", "prefill", "decode"} and min(r["parts"].values()) >= 0
        assert r["decode_ms_per_step"] == pytest.approx(1000 * r["parts"]["decode"] / 2 / 4)
        assert r["warmup_s"] > 0 and r["graph_replays"] is None and r["peak_gib"] is None  # no CUDA here
        if r["config"] == "baseline":  # its time is its split pass: the parts and the host's work between them
            assert sum(r["parts"].values()) <= r["seconds"]

    lines = run.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("config "))
    for word in ("model s", "media s", "ViT s", "resamp s", "prefill s", "decode s", "ms/step", "peak GiB",
                 "speed-up"):
        assert word in lines[head]
    baseline = {(r["set"], r["mode"]): r["seconds"] for r in rows if r["config"] == "baseline"}
    for line, r in zip(lines[head + 2:], rows, strict=False):
        cells = line.split()
        seconds = ("~" if r["estimated"] else "") + f"{r['seconds']:.2f}"
        media = f"{report['media_decode_s'][r['set']]:.2f}"
        assert cells[:6] == [r["config"], r["set"], r["mode"], "3", seconds, media]
        assert cells[10:12] == [f"{r['decode_ms_per_step']:.1f}", "n/a"]
        speed_up = [] if r["config"] == "baseline" else [f"{baseline[r['set'], r['mode']] / r['seconds']:.1f}x"]
        assert cells[13:] == speed_up
    assert lines[head + 2 + len(rows)].startswith("greedy, ")  # no row more: the answers' agreement follows

    # float32 on both sides on the CPU: the fast path's greedy answers are the original's, all 5 tokens long
    assert report["fidelity"] == {s: dict(records=2, equal=2, first_token_equal=2, mean_common_prefix=5.0)
                                  for s in ("images", "videos")}
    for mode in ("int8", "int4"):  # the quantized fast path: its greedy answers, compared with the fast path's
        assert report["agreement"][f"fast-{mode} / fast greedy"]["images"]["records"] == 2
        assert "linear layers" in report["quantized"][mode]
    assert "greedy, fast (float32) vs original (float32), images: 2/2 answers equal" in run.stdout

    saved = report["weights"]  # written by this run (so timed), then loaded: the random model, in bfloat16
    path = weights / "lynx_random_bf16.safetensors"
    assert saved["path"] == str(path) and saved["bytes"] == path.stat().st_size
    assert saved["save_s"] > 0 and saved["load_s"] > 0
    assert f"weights: {saved['bytes'] / 2**30:.1f} GiB loaded in {saved['load_s']:.1f} s from {path}" in run.stdout
    model = workload.build_random_lynx(workload.lynx_config(True, 2, 5), True, "cpu", 0)
    state = load_file(str(path))
    assert state.keys() == model.state_dict().keys()
    assert all(v.dtype == torch.bfloat16 and v.shape == model.state_dict()[k].shape for k, v in state.items())


def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.sh --tiny: every stage of the GPU check with the tiny model on the CPU (pytest only
    collects the gpu tests). A stage out of time (here load-int8, given 5 s: its child process alone takes longer
    to start) is recorded and the next one runs; the report writes <card>-<date>.json and prints BENCHMARKS.md's
    rows."""
    import os

    env = {**os.environ, "PYTHON": sys.executable, "BUDGET_load_int8": "5"}
    work, results = tmp_path / "work", tmp_path / "results"
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--tiny", "--work", str(work),
                          "--results", str(results)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    stages = {s["stage"]: s["status"] for s in map(json.loads, (work / "stages.jsonl").read_text().splitlines())}
    assert stages == {"env": "ok", "pytest-gpu": "ok", "benchmark": "ok", "release-files": "ok", "load": "ok",
                      "load-int8": "timeout", "report": "ok"}
    [path] = results.glob("cpu-*.json")
    report = json.loads(path.read_text())
    assert (work / path.name).exists()  # a copy beside the logs (what a GPU session brings back)
    assert "tests collected" in report["pytest_gpu"]["summary"]
    configs = {(r["config"], r["mode"]) for r in report["benchmark"]["results"]}
    assert {("fast", m) for m in ("paper", "beam5", "greedy")} <= configs
    assert {("fast-int8", "paper"), ("fast-int4", "greedy"), ("baseline", "paper")} <= configs
    assert [(r["quantize"], r["cache"]) for r in report["load"]] == [("none", "warm")]
    assert report["load"][0]["files_cached_gb"] == report["load"][0]["files_gb"] > 0
    out = run.stdout
    assert "| CPU | " in out and "| images | paper |" in out and "| int8 | images |" in out
    assert f"| cpu | none | warm | {report['load'][0]['load_s']} |" in out
    assert "load-int8      timeout" in out


def test_gpu_report_of_a_check_stopped_early(tmp_path):
    """What a GPU run that ran out of time leaves: pytest's log without its summary, the benchmark's JSON without
    the quantized configurations. The report says which tests passed or failed and which targets were met, missed
    or not measured, and prints the rows it has."""
    import gpu_report

    (tmp_path / "pytest-gpu.log").write_text(
        "tests/test_gpu.py::test_graphs_replay PASSED [ 10%]\ntests/test_gpu.py::test_media_ahead FAILED [ 20%]\n")
    (tmp_path / "stages.jsonl").write_text(json.dumps({"stage": "pytest-gpu", "status": "timeout"}) + "\n")
    row = dict(config="fast", set="images", mode="paper", seconds=9.5, estimated=False, decode_ms_per_step=8.4,
               peak_gib=19.0)
    bench = {"environment": {"card": "NVIDIA H200", "date": "2026-12-01T10:00:00", "commit": "abc1234"},
             "fast_dtype": "bfloat16", "results": [row, dict(row, config="baseline", seconds=114.0, estimated=True)],
             "fidelity": {"images": dict(records=32, equal=20, first_token_equal=31, mean_common_prefix=30.0)}}
    (tmp_path / "benchmark.json").write_text(json.dumps(bench))
    summary = gpu_report.pytest_summary(tmp_path)
    assert summary["failed"] == ["tests/test_gpu.py::test_media_ahead"] and "2 tests reported" in summary["summary"]
    assert gpu_report.speed_rows(bench, "NVIDIA H200", "2026-12-01", "abc1234") == [
        "| NVIDIA H200 | 2026-12-01 | abc1234 | images | paper | 9.50 | ~114.00 | 12.0× | 8.4 | 19.0 |"]
    targets = gpu_report.targets(bench, [])
    assert "image set, paper decoding, model s: 9.50 (target <= 10.0): met" in targets
    assert "a 16 x 5-beam step, ms: 8.40 (target <= 8.0): missed" in targets
    assert "peak GiB, int8: — (target <= 12.0): not measured" in targets
    assert gpu_report.main(["--work", str(tmp_path), "--results", str(tmp_path / "results")]) == 0
    assert json.loads((tmp_path / "results" / "nvidia-h200-2026-12-01.json").read_text())["stages"][0]["status"] \
        == "timeout"
