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
    assert report["card"].startswith("CPU")
    results = report["results"]
    assert [(r["batching"], r["clients"], r["requests"]) for r in results] == [
        ("on", 1, 2), ("on", 3, 6), ("off", 1, 2), ("off", 3, 6)]
    for r, cells in zip(results, rows):
        assert cells == [r["batching"], str(r["clients"]), str(r["requests"]), str(r["requests_per_s"]),
                         str(r["p50_ms"]), str(r["p95_ms"]), str(r["mean_batch"])]
        # both rounded: seconds to 3 decimals (a tiny load takes a few hundredths), requests/s to 2
        low, high = r["requests"] / (r["seconds"] + 0.0005), r["requests"] / max(r["seconds"] - 0.0005, 1e-9)
        assert low - 0.005 <= r["requests_per_s"] <= high + 0.005, r
        assert 0 < r["p50_ms"] <= r["p95_ms"] <= 1000 * r["seconds"]  # no request outlasts its load
        # one request at a time: batches of one; with batching on, three clients share batches of at most three
        assert (1.0 <= r["mean_batch"] <= 3.0) if (r["batching"], r["clients"]) == ("on", 3) else r["mean_batch"] == 1.0
