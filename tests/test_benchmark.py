"""benchmarks/benchmark.py runs on the CPU with the tiny model (what CI can run; its numbers mean nothing)."""
import json
import subprocess
import sys

from conftest import ROOT


def test_tiny_benchmark_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "results.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "benchmark.py"), "--tiny", "--device", "cpu", "--limit", "3",
           "--batch-size", "2", "--max-new-tokens", "5", "--modes", "paper", "greedy", "--fidelity-limit", "2",
           "--split-limit", "2", "--quantize", "int8", "int4", "--quantized-modes", "greedy", "--quantized-sets",
           "images", "--save-weights", str(tmp_path / "weights"), "--out", str(out)]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("config "))
    for word in ("model s", "media s", "ViT s", "resamp s", "prefill s", "decode s", "ms/step", "peak GiB",
                 "speed-up"):
        assert word in lines[head]
    table = [line.split() for line in lines[head + 2:head + 8]]
    assert [(r[0], r[1], r[2]) for r in table] == [
        ("baseline", "images", "paper"), ("baseline", "videos", "paper"), ("baseline", "images", "greedy"),
        ("baseline", "videos", "greedy"), ("fast", "images", "paper"), ("fast", "videos", "paper")]
    assert "answers equal" in run.stdout
    assert "greedy, fast-int8 vs fast (float32), images:" in run.stdout

    report = json.loads(out.read_text())
    assert report["environment"]["card"] == "CPU"
    rows = report["results"]
    assert {(r["config"], r["set"], r["mode"]) for r in rows} >= {("fast", "images", "greedy"),
                                                                 ("fast", "videos", "greedy")}
    fast_images = next(r for r in rows if r["config"] == "fast" and r["set"] == "images" and r["mode"] == "paper")
    assert fast_images["records"] == 3 and set(fast_images["parts"]) == {"vit", "resampler", "prefill", "decode"}
    assert fast_images["split_records"] == 2 and not fast_images["estimated"]  # the set pass ran every record
    assert fast_images["graph_replays"] is None and fast_images["peak_gib"] is None  # no CUDA here
    for mode in ("int8", "int4"):  # the quantized fast path: its greedy answers, compared with the fast path's
        assert {(r["set"], r["mode"]) for r in rows if r["config"] == f"fast-{mode}"} == {("images", "greedy")}
        assert report["agreement"][f"fast-{mode} / fast greedy"]["images"]["records"] == 2
        assert "linear layers" in report["quantized"][mode]
    assert "failures" not in report
    baseline_greedy = next(r for r in rows if r["config"] == "baseline" and r["mode"] == "greedy")
    assert baseline_greedy["measured_records"] == 2 and baseline_greedy["estimated"]
    # float32 on both sides on the CPU: the fast path's greedy answers are the original's
    assert all(f["equal"] == f["records"] == 2 for f in report["fidelity"].values())
    assert report["weights"]["load_s"] >= 0 and (tmp_path / "weights" / "lynx_random_bf16.safetensors").exists()


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
    sys.path.insert(0, str(ROOT / "benchmarks"))
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
