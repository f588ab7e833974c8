"""How fast serve.py answers concurrent clients, with batching on and off, in one run.

    python benchmarks/serve_benchmark.py                                   # tiny model on the CPU (what CI runs)
    python benchmarks/serve_benchmark.py --config configs/LYNX.yaml --device cuda --requests-per-client 16

For each setting (batching on: --batch-size, default the config's batch_size_test; off: --batch-size 1) a server process starts, answers a
few warm-up requests, then 1, 4 and 16 clients each send --requests-per-client Open-VQA-like requests one after the
other (questions of data/Open_VQA_images.jsonl, images from --images, as data URLs; the config's decoding).
Reported: requests/s over the whole load, p50/p95 latency per request, and the mean batch size the server formed
(from /health). The server runs on 127.0.0.1 only, with one OpenMP thread (tests/serve_helpers.Server).
"""
from __future__ import annotations

import argparse
import base64
import datetime
import itertools
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from dataset.records import read_json_lines  # noqa: E402  (torch-free)
from serve_helpers import Server  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests-per-client", type=int, default=8)
    p.add_argument("--images", default=str(ROOT / "tests" / "fixtures" / "tiny" / "images"))
    p.add_argument("--questions", default=str(ROOT / "data" / "Open_VQA_images.jsonl"))
    p.add_argument("--batch-size", type=int, default=None,
                   help="batching on: the server's --batch-size (default: the config's batch_size_test)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def requests_of(args) -> list[dict]:
    """Chat requests pairing the Open-VQA questions with the images, in a fixed order."""
    questions = [row["question"] for _, row in read_json_lines(args.questions)]
    images = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    urls = [f"data:image/{'png' if p.suffix == '.png' else 'jpeg'};base64,{base64.b64encode(p.read_bytes()).decode()}"
            for p in images]
    return [{"messages": [{"role": "user", "content": [{"type": "text", "text": q},
                                                       {"type": "image_url", "image_url": {"url": u}}]}]}
            for q, u in zip(questions, itertools.cycle(urls))]


def load(server: Server, requests: list[dict], clients: int, per_client: int) -> dict:
    """`clients` threads, each sending `per_client` requests one after the other."""
    def client(c: int) -> list[float]:
        times = []
        for k in range(per_client):
            body = requests[(c * per_client + k) % len(requests)]
            start = time.perf_counter()
            status, _, reply = server.chat(**body)
            times.append(time.perf_counter() - start)
            if status != 200:
                raise RuntimeError(f"request failed with {status}: {reply}")
        return times

    before = server.request("GET", "/health")[2]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = sorted(t for times in pool.map(client, range(clients)) for t in times)
    wall = time.perf_counter() - start
    after = server.request("GET", "/health")[2]
    batches = after["batches"] - before["batches"]
    return {"clients": clients, "requests": len(latencies), "seconds": round(wall, 3),
            "requests_per_s": round(len(latencies) / wall, 2),
            "p50_ms": round(1000 * statistics.median(latencies), 1),
            "p95_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 1),
            "mean_batch": round((after["answered"] - before["answered"]) / batches, 2) if batches else 0.0}


def run_setting(args, name: str, flags: list[str], requests: list[dict], tmp: Path) -> list[dict]:
    server = Server(Path(args.config).resolve(), tmp, *flags, device=args.device)
    try:
        server.wait_ready()
        load(server, requests, 1, args.warmup)  # first answers build caches (and CUDA graphs on a GPU)
        return [{"batching": name, **load(server, requests, c, args.requests_per_client)} for c in args.clients]
    finally:
        server.stop()


def card(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()})"


def main(argv=None) -> int:
    args = parse_args(argv)
    requests = requests_of(args)
    tmp = Path(tempfile.mkdtemp(prefix="serve_benchmark_"))
    on = ["--batch-size", str(args.batch_size)] if args.batch_size else []
    rows = run_setting(args, "on", on, requests, tmp) + run_setting(args, "off", ["--batch-size", "1"], requests, tmp)
    print("| batching | clients | requests | req/s | p50 ms | p95 ms | mean batch |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['batching']} | {r['clients']} | {r['requests']} | {r['requests_per_s']} | {r['p50_ms']} | "
              f"{r['p95_ms']} | {r['mean_batch']} |")
    if args.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        report = {"card": card(args.device), "config": args.config, "device": args.device,
                  "batch_size": args.batch_size,
                  "date": datetime.date.today().isoformat(), "commit": commit.stdout.strip(), "results": rows}
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
