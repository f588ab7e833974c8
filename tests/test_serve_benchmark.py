"""benchmarks/serve_benchmark.py runs on the CPU with the tiny model (what CI can run; its numbers mean little)."""
import json
import subprocess
import sys

from conftest import ROOT


def test_serve_benchmark_prints_the_table_with_batching_on_and_off(tmp_path):
    out = tmp_path / "serve.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "serve_benchmark.py"), "--clients", "1", "3",
           "--requests-per-client", "2", "--warmup", "1", "--out", str(out)]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    head = lines.index("| batching | clients | requests | req/s | p50 ms | p95 ms | mean batch |")
    rows = [line.strip("| ").split(" | ") for line in lines[head + 2:head + 6]]
    assert [(r[0], r[1], r[2]) for r in rows] == [("on", "1", "2"), ("on", "3", "6"), ("off", "1", "2"),
                                                  ("off", "3", "6")]
    report = json.loads(out.read_text())
    assert report["card"].startswith("CPU") and len(report["results"]) == 4
    off = [r for r in report["results"] if r["batching"] == "off"]
    assert all(r["mean_batch"] == 1.0 and r["requests_per_s"] > 0 and r["p95_ms"] >= r["p50_ms"] for r in off)
