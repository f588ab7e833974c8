"""How long Lynx takes to load and how much memory loading needs: from the release files and from a converted folder.

    python benchmarks/write_release_files.py --out data/random-release          # once: random files, full size
    python benchmarks/load_benchmark.py --config data/random-release/lynx.yaml --device cpu --dtype bfloat16 \\
        --converted data/random-release/lynx-bf16 --quantize none int8 --out benchmarks/results/load-cpu.json

Each load runs in a fresh process (`--child`), so peaks do not mix: load seconds (build_lynx, from the first byte
read to the model in eval mode), peak host RSS (the process's high-water mark, imports included), the model's own
size (every parameter and buffer, quantized ones at their packed size), and on CUDA the peak GPU memory. The
target is a peak RSS that exceeds the model's own size (on the CPU) by little: on the CPU the model itself lives in
host memory, on a GPU it does not. A converted folder in the run's dtype is memory-mapped on the CPU: its pages are
read when first used, so the child then reads every weight once (`touch s`) and reports the peak after that too.
A missing converted folder is written first with `python -m lynx.convert` (its time reported as `convert s`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GB = 1e9


def rss_now() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def tensor_bytes(tensor) -> int:
    """Bytes a tensor holds; a torchao tensor subclass: the sum of its inner tensors (packed weights, scales)."""
    if hasattr(tensor, "__tensor_flatten__") and type(tensor).__name__ not in ("Tensor", "Parameter"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def child(args) -> dict:
    """One load in this process; returns the measurements."""
    import torch

    from configs.schema import load_config
    from models.build import build_lynx

    quantize = args.quantize[0]
    overrides = [f"dtype={args.dtype}"] + ([f"converted={args.source}"] if args.source != "release" else [])
    overrides += [f"quantize={quantize}"] if quantize != "none" else []
    cfg = load_config(args.config, overrides)
    cuda = args.device.startswith("cuda")
    before = rss_now()
    start = time.perf_counter()
    model, _ = build_lynx(cfg, args.device)
    if cuda:
        torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    peak_load = rss_peak()
    start = time.perf_counter()
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if type(tensor) in (torch.Tensor, torch.nn.Parameter) and tensor.numel():
                step = max(1, 4096 // tensor.element_size())
                tensor.reshape(-1)[::step].sum()  # one value per page: reads every page of a memory-mapped weight
    touch_s = time.perf_counter() - start
    model_bytes = sum(tensor_bytes(t) for t in list(model.parameters()) + list(model.buffers()))
    result = {"source": args.source, "device": args.device, "dtype": args.dtype, "quantize": quantize,
              "load_s": round(load_s, 2), "touch_s": round(touch_s, 2), "rss_before_load_gb": before / GB,
              "peak_rss_load_gb": peak_load / GB, "peak_rss_gb": rss_peak() / GB, "model_gb": model_bytes / GB}
    if not cuda:
        result["peak_rss_minus_model_gb"] = result["peak_rss_gb"] - result["model_gb"]
    else:
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / GB
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}


def run_child(args, source: str, quantize: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--config", args.config, "--device", args.device, "--dtype",
           args.dtype, "--source", source, "--quantize", quantize]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"source": source, "quantize": quantize, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def convert(args) -> float:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "lynx.convert", "--config", args.config, "--out", args.converted, "--dtype",
           args.dtype]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def table(rows: list[dict]) -> str:
    head = ("| source | device | dtype | quantize | load s | touch s | peak RSS GB | model GB | peak RSS - model GB "
            "| peak GPU GB |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['source']} | | | {r['quantize']} | error: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['source']} | {r['device']} | {r['dtype']} | {r['quantize']} | {r['load_s']} | "
                     f"{r['touch_s']} | {r['peak_rss_gb']:.2f} | {r['model_gb']:.2f} | "
                     f"{r.get('peak_rss_minus_model_gb', float('nan')):.2f} | {r.get('peak_gpu_gb', '-')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a config naming the release files (write_release_files.py)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--converted", help="converted folder to load too (written first when missing)")
    parser.add_argument("--quantize", nargs="+", default=["none"], choices=["none", "int8", "int4"])
    parser.add_argument("--out", help="write the results here as JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--source", default="release", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    extra = {}
    if args.converted and not os.path.isfile(os.path.join(args.converted, "model.safetensors")):
        extra["convert_s"] = round(convert(args), 1)
    sources = ["release"] + ([os.path.abspath(args.converted)] if args.converted else [])
    rows = [run_child(args, source, quantize) for source in sources for quantize in args.quantize]
    print(table(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        report = {"machine": f"{platform.node()}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
                  "config": args.config, **extra, "runs": rows}
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
