"""How long Lynx takes to load and how much memory loading needs: from the release files and from a converted folder,
with the weight files out of the page cache (cold: a first load after a download or a reboot) and in it (warm).

    python benchmarks/write_release_files.py --out data/random-release          # once: random files, full size
    python benchmarks/load_benchmark.py --config data/random-release/lynx.yaml --device cpu --dtype bfloat16 \\
        --converted data/random-release/lynx-bf16 --quantize none int8 --out benchmarks/results/load-cpu.json

Each load runs in a fresh process (`--child`), so peaks do not mix: load seconds (build_lynx, from the first byte
read to the model in eval mode), the model's own size (every parameter and buffer, quantized ones at their packed
size), the peaks of host memory, and on CUDA the peak GPU memory. Host memory is counted two ways, since only one of
them is the process's own: anonymous RSS (memory the process allocated: the model on the CPU, buffers, the C heap)
and file-backed RSS (pages of files the process maps: its libraries, and a memory-mapped converted folder, whose
pages are the model's tensors). The kernel keeps the high-water mark of their sum (peak RSS); the peak of each is
sampled every 2 ms. The target: on the CPU the peak anonymous RSS exceeds the model by little (imports included;
a process's imports alone take about 0.5 GB anonymous and 0.35 GB file-backed).

Before each cold load the weight files are written back and dropped from the page cache (posix_fadvise DONTNEED,
file by file: no root needed, nothing else evicted); before each warm load they are read through once. How much
of them was in the page cache when the load began is measured (mincore) and reported beside it: a cold load whose
files could not be dropped says so. A converted folder in the run's dtype is memory-mapped on the CPU: its pages
are read when first used, so the child then reads every weight once (`touch s`) and reports the peak after that too.
A missing converted folder is written first with `python -m lynx.convert` (its time reported as `convert s`).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GB = 1e9


def memory_now() -> dict:
    """This process's resident memory now, in bytes: total (VmRSS), anonymous (RssAnon), file-backed (RssFile)."""
    wanted, now = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file"}, {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in wanted:
                now[wanted[key]] = int(value.split()[0]) * 1024  # kB
    return now


def rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


class Peaks:
    """The highest anonymous and file-backed RSS seen while it runs, sampled by a thread every `interval` s (the
    kernel keeps a high-water mark of their sum only)."""

    def __init__(self, interval: float = 0.002):
        self.anon = self.file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def __enter__(self) -> "Peaks":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.sample()

    def sample(self) -> None:
        now = memory_now()
        self.anon, self.file = max(self.anon, now["anon"]), max(self.file, now["file"])


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
    before = memory_now()
    with Peaks() as peaks:
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
              "load_s": round(load_s, 2), "touch_s": round(touch_s, 2), "rss_before_load_gb": before["rss"] / GB,
              "anon_before_load_gb": before["anon"] / GB, "peak_rss_load_gb": peak_load / GB,
              "peak_rss_gb": rss_peak() / GB, "peak_anon_gb": peaks.anon / GB, "peak_file_gb": peaks.file / GB,
              "model_gb": model_bytes / GB}
    if not cuda:
        result["peak_anon_minus_model_gb"] = result["peak_anon_gb"] - result["model_gb"]
        result["peak_rss_minus_model_gb"] = result["peak_rss_gb"] - result["model_gb"]
    else:
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / GB
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}


# ---- the page cache: the weight files dropped from it or read into it, and how much of them it holds


def weight_files(config: str, source: str) -> list[str]:
    """The files a load from `source` reads: the release files the config names, or the converted folder's."""
    from configs.schema import load_config
    from models.loading import llm_files
    from models.weight_files import CONVERTED_WEIGHTS

    if source != "release":
        return [os.path.join(source, CONVERTED_WEIGHTS)]
    cfg = load_config(config)
    return [cfg.vit_checkpoint, *llm_files(cfg.llm_dir), cfg.checkpoint]


def set_page_cache(paths: list[str], cache: str) -> str | None:
    """cold: each file written back and its pages dropped from the page cache; warm: each file read through once.
    Returns why the files could not be dropped, or None."""
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            if cache == "warm":
                buffer = bytearray(16 << 20)
                while f.readinto(buffer):
                    pass
                continue
            if not hasattr(os, "posix_fadvise"):
                return f"posix_fadvise is not available on {platform.system()}"
            os.fsync(f.fileno())  # dirty pages (a file just written) are not dropped
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return None


def cached_bytes(paths: list[str]) -> int | None:
    """Bytes of the files in the page cache now: mincore on a mapping of each file (reads nothing). None where
    the C library has no mincore."""
    try:
        mincore = ctypes.CDLL(None, use_errno=True).mincore
    except (OSError, AttributeError, TypeError):
        return None
    page, total = mmap.PAGESIZE, 0
    for path in paths:
        if not os.path.getsize(path):
            continue
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
            start = ctypes.c_char.from_buffer(mapped)
            pages = (ctypes.c_ubyte * ((len(mapped) + page - 1) // page))()
            failed = mincore(ctypes.c_void_p(ctypes.addressof(start)), ctypes.c_size_t(len(mapped)), pages)
            del start  # the mapping closes only once nothing points into it
            if failed:
                return None
            total += min(len(mapped), sum(flag & 1 for flag in pages) * page)
    return total


def run_child(args, source: str, quantize: str, cache: str) -> dict:
    paths = weight_files(args.config, source)
    not_dropped = set_page_cache(paths, cache)
    cached = cached_bytes(paths)
    row = {"cache": cache, "files_gb": round(sum(os.path.getsize(p) for p in paths) / GB, 3),
           "files_cached_gb": None if cached is None else round(cached / GB, 3)}
    if cache == "cold" and (not_dropped or cached):
        left = "" if cached is None else f" ({cached / GB:.2f} GB of them left there)"
        why = not_dropped or "the kernel kept them"
        row["cache_note"] = f"could not drop the files from the page cache: {why}{left}"
    cmd = [sys.executable, __file__, "--child", "--config", args.config, "--device", args.device, "--dtype",
           args.dtype, "--source", source, "--quantize", quantize]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"source": source, "quantize": quantize, **row, "error": proc.stderr.strip().splitlines()[-1:]}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), **row}


def convert(args) -> float:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "lynx.convert", "--config", os.path.abspath(args.config), "--out",
           os.path.abspath(args.converted), "--dtype", args.dtype]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def table(rows: list[dict]) -> str:
    """The runs as a Markdown table (GB; `files cached`: of the weight files, in the page cache as the load began)."""
    def gb(value):
        return "-" if value is None else f"{value:.2f}"

    head = ("| source | device | dtype | quantize | page cache | files cached GB | load s | touch s | peak anon GB "
            "| peak file-backed GB | peak RSS GB | model GB | peak anon - model GB | peak RSS - model GB "
            "| peak GPU GB |\n" + "| --- " * 15 + "|")
    lines = [head]
    for r in rows:
        cache = r["cache"] + (" (not dropped)" if "cache_note" in r else "")
        cached = f"{gb(r['files_cached_gb'])} of {gb(r['files_gb'])}"
        if "error" in r:
            lines.append(f"| {r['source']} | | | {r['quantize']} | {cache} | {cached} | error: {r['error']} "
                         + "| " * 8 + "|")
            continue
        lines.append(f"| {r['source']} | {r['device']} | {r['dtype']} | {r['quantize']} | {cache} | {cached} | "
                     f"{r['load_s']} | {r['touch_s']} | {gb(r['peak_anon_gb'])} | {gb(r['peak_file_gb'])} | "
                     f"{gb(r['peak_rss_gb'])} | {gb(r['model_gb'])} | {gb(r.get('peak_anon_minus_model_gb'))} | "
                     f"{gb(r.get('peak_rss_minus_model_gb'))} | {gb(r.get('peak_gpu_gb'))} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a config naming the release files (write_release_files.py)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--converted", help="converted folder to load too (written first when missing)")
    parser.add_argument("--quantize", nargs="+", default=["none"], choices=["none", "int8", "int4"])
    parser.add_argument("--cache", nargs="+", default=["cold", "warm"], choices=["cold", "warm"],
                        help="the weight files' state in the page cache as each load begins (default: both)")
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
    rows = [run_child(args, source, quantize, cache) for source in sources for quantize in args.quantize
            for cache in args.cache]
    print(table(rows))
    for note in sorted({r["cache_note"] for r in rows if "cache_note" in r}):
        print(note)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        report = {"machine": f"{platform.node()}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
                  "config": os.path.abspath(args.config), **extra, "runs": rows}
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
