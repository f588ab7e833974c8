"""Lynx's speed on Open-VQA-sized work with random weights: the original's configuration (float32, eager attention,
transformers' generate) against the fast path (bfloat16, SDPA, prefill once, fixed KV cache, CUDA graphs), and the
fast path with int8 / int4 weights.

    python benchmarks/benchmark.py --device cuda --out benchmarks/results.json   # full size, one GPU
    python benchmarks/benchmark.py --tiny --device cpu --limit 8                 # smoke run: numbers mean nothing

No files are needed (benchmarks/workload.py: the model and the work). Every answer is forced to --max-new-tokens
tokens (EOS banned), Lynx's worst case. Each (configuration, set, mode) first runs one full-length batch as a warm-up
(compilation and CUDA graph capture happen there; reported as `warm-up s`), then:
  - a split pass, synchronising after each part of each batch: ViT, resampler, prefill, decode (on the first
    --split-limit records; its parts are scaled to the set);
  - for the fast paths, a set pass: the whole set as a run does it, the ViT of the next batch overlapping the LLM on
    a side CUDA stream. Its time is the set's `model s`; the baseline's is its split pass (the original overlaps
    nothing).
Media decoding (JPEG / mp4 to pixels) runs on the CPU in DataLoader workers while the GPU works; it is timed apart
on synthetic files, for one process. Results are written to --out after each configuration, so a run stopped
early keeps what it measured; a configuration that fails is recorded and the others go on.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workload import (LLAMA_7B, MODES, ROOT, SETS, TINY, build_random_lynx, lynx_config, make_batches,  # noqa: E402
                      media_decode_seconds, prompt_tokens, read_questions, set_attention, sync, weights_roundtrip)
from timing import Replays, Runner  # noqa: E402

from configs.decoding import DecodingSettings  # noqa: E402
from decoding import make_decoder  # noqa: E402
from errors import described  # noqa: E402
from models.lynx import Lynx  # noqa: E402
from models.quantize import quantization_targets, quantize_model  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="the parity fixture's dimensions (CPU smoke run)")
    p.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the original's configuration (float32, eager attention, transformers' generate)")
    p.add_argument("--baseline-modes", nargs="+", choices=list(MODES), default=["paper"],
                   help="modes the baseline runs (greedy also gives the float32 answers for the fidelity check)")
    p.add_argument("--baseline-limit", type=int, default=None,
                   help="records per set for the baseline; its set times are then extrapolated (marked ~)")
    p.add_argument("--fidelity-limit", type=int, default=32,
                   help="records per set whose greedy answers are compared (float32 / bfloat16, bfloat16 / int8, int4)")
    p.add_argument("--split-limit", type=int, default=None,
                   help="records per set timed part by part (default: all); the set pass always runs the whole set")
    p.add_argument("--quantize", nargs="*", choices=["int8", "int4"], default=[],
                   help="also time the fast path with these weights (torchao weight-only, the LLM's linear layers)")
    p.add_argument("--quantized-modes", nargs="+", choices=list(MODES), default=["paper", "greedy"],
                   help="decodings of the quantized runs (greedy: on --fidelity-limit records, for the agreement)")
    p.add_argument("--quantized-sets", nargs="+", choices=list(SETS), default=None, help="default: --sets")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="records per set (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decoding layers (default: on CUDA)")
    p.add_argument("--save-weights", metavar="DIR", default=None,
                   help="save the random weights there (or load them if saved before) and time the loading")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON (after each configuration)")
    return p.parse_args(argv)


# ---- one configuration over the sets and modes


def batches_for(batches: list, records: int | None, batch_size: int) -> list:
    return batches[:max(1, math.ceil(records / batch_size))] if records else batches


def run_config(name: str, runner: Runner, work: dict, modes: list[tuple[str, int | None]], cfg, args,
               replays: Replays) -> list[dict]:
    """Rows of the table for one configuration; `modes`: (mode, records per set to time or None for all)."""
    rows = []
    for mode, limit_records in modes:
        settings = mode_settings(cfg, mode)
        for set_name, batches in work.items():
            measured = batches_for(batches, limit_records, cfg.batch_size_test)
            split_batches = batches_for(measured, args.split_limit, cfg.batch_size_test)
            full = max(batches, key=len)
            sync(args.device)
            start = time.perf_counter()
            runner.answer(full, settings).tolist()  # warm-up: a full batch, full length
            sync(args.device)
            warmup = time.perf_counter() - start
            if runner.clock.cuda:
                torch.cuda.reset_peak_memory_stats(args.device)
            replayed = replays.count
            split = runner.split_pass(split_batches, settings)
            split_scale = len(batches) / len(split_batches)
            if name == "baseline":  # the original overlaps nothing: its split pass is its set time
                seconds, scale = split["wall"] * split_scale, split_scale
            else:
                scale = len(batches) / len(measured)
                seconds = runner.set_pass(measured, settings) * scale
            steps = len(split_batches) * (cfg.max_new_tokens - 1)
            rows.append(dict(
                config=name, set=set_name, mode=mode, records=sum(len(b) for b in batches),
                measured_records=sum(len(b) for b in measured), estimated=scale != 1.0, seconds=seconds,
                split_records=sum(len(b) for b in split_batches), warmup_s=warmup,
                parts={k: v * split_scale for k, v in split["parts"].items()},
                decode_ms_per_step=1000 * split["parts"]["decode"] / max(steps, 1),
                peak_gib=torch.cuda.max_memory_allocated(args.device) / 2**30 if runner.clock.cuda else None,
                graph_replays=replays.count - replayed if replays.handle else None,
                answers=split["answers"],
            ))
            estimated = " (est.)" if rows[-1]["estimated"] else ""
            print(f"  {name:10} {set_name:6} {mode:6} {seconds:8.2f} s{estimated}", flush=True)
            if name != "baseline" and replays.handle and not rows[-1]["graph_replays"]:
                print(f"  warning: {name} {set_name} {mode} replayed no CUDA graph (decoded step by step)")
    return rows


def mode_settings(cfg, mode: str) -> DecodingSettings:
    return DecodingSettings.from_config(cfg).replace(**MODES[mode])


def agreement(rows: list[dict], reference: str, config: str, limit: int) -> dict:
    """Per set, how often `config`'s greedy answers equal `reference`'s on the same records."""
    out = {}
    for ref in (r for r in rows if r["config"] == reference and r["mode"] == "greedy"):
        other = next((r for r in rows if r["config"] == config and r["mode"] == "greedy" and r["set"] == ref["set"]),
                     None)
        if other is None:
            continue
        pairs = list(zip(ref["answers"], other["answers"]))[:limit]
        prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))) for a, b in pairs]
        out[ref["set"]] = dict(records=len(pairs), equal=sum(a == b for a, b in pairs),
                               first_token_equal=sum(p > 0 for p in prefix),
                               mean_common_prefix=sum(prefix) / max(len(prefix), 1))
    return out


# ---- report


def table(rows: list[dict], media: dict) -> str:
    """The results as a text table; the speed-up is over the baseline row of the same set and mode."""
    def num(value, digits=2):
        return "n/a" if value is None else f"{value:.{digits}f}"

    head = (f"{'config':10} {'set':6} {'mode':6} {'recs':>4} {'model s':>9} {'media s':>7} {'ViT s':>7} "
            f"{'resamp s':>8} {'prefill s':>9} {'decode s':>8} {'ms/step':>7} {'peak GiB':>8} {'warm-up s':>9} "
            f"{'speed-up':>8}")
    lines = [head, "-" * len(head)]
    base = {(r["set"], r["mode"]): r["seconds"] for r in rows if r["config"] == "baseline"}
    for r in rows:
        p = r["parts"]
        speed = base.get((r["set"], r["mode"]))
        speedup = f"{speed / r['seconds']:.1f}x" if speed and r["config"] != "baseline" else ""
        seconds = ("~" if r["estimated"] else "") + num(r["seconds"])
        lines.append(
            f"{r['config']:10} {r['set']:6} {r['mode']:6} {r['records']:4d} {seconds:>9} "
            f"{num(media.get(r['set'])):>7} {num(p['vit']):>7} {num(p['resampler']):>8} {num(p['prefill']):>9} "
            f"{num(p['decode']):>8} {num(r['decode_ms_per_step'], 1):>7} {num(r['peak_gib'], 1):>8} "
            f"{num(r['warmup_s'], 1):>9} {speedup:>8}")
    return "\n".join(lines)


def environment(device: str) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", None
    import transformers

    card = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "CPU"
    return dict(card=card, device=str(device), date=datetime.datetime.now().isoformat(timespec="seconds"),
                commit=commit, dirty=dirty, torch=torch.__version__, transformers=transformers.__version__,
                cpu_threads=torch.get_num_threads())


# ---- the run


class Report:
    """The results so far, written to --out after each configuration."""

    def __init__(self, options, **fields):
        self.args, self.data, self.rows = options, dict(fields), []

    def add(self, rows: list[dict]) -> None:
        self.rows += rows
        self.write()

    def failed(self, config: str, err: BaseException) -> None:
        line = described(err)
        print(f"  {config} failed: {line}", flush=True)
        self.data.setdefault("failures", []).append({"config": config, "error": line})
        self.write()

    def write(self) -> None:
        self.data["results"] = [{k: v for k, v in r.items() if k != "answers"} for r in self.rows]
        if self.args.out:
            Path(self.args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(self.args.out).write_text(json.dumps(self.data, indent=2))


def free(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def run_quantized(model: Lynx, cfg, args, work: dict, token_ids, report: Report, replays: Replays) -> None:
    """The fast path with each --quantize mode, one after the other on the same model: the LLM's linear weights are
    kept on the host meanwhile (so that no peak counts them twice) and put back after each mode."""
    targets = quantization_targets(model)
    kept = {key: linear.weight.detach().to("cpu", copy=True) for key, linear in targets.items()}
    sets = {name: work[name] for name in (args.quantized_sets or args.sets) if name in work}
    modes = [(m, args.fidelity_limit if m == "greedy" and args.fidelity_limit else None)
             for m in args.quantized_modes]
    for mode in args.quantize:
        name = f"fast-{mode}"
        print(f"{name}: weight-only {mode} (torchao) in the LLM's linear layers", flush=True)
        try:
            summary = quantize_model(model, mode, args.device, model.dtype).summary()
            report.data.setdefault("quantized", {})[mode] = summary
            decoder = make_decoder(cfg, model.LLM, token_ids, args.device, compile=args.compile)
            report.add(run_config(name, Runner(model, decoder, args.device), sets, modes, cfg, args, replays))
            report.data.setdefault("agreement", {})[f"{name} / fast greedy"] = agreement(
                report.rows, "fast", name, args.fidelity_limit)
        except Exception as err:  # noqa: BLE001 - the other modes still run
            report.failed(name, err)
        decoder = None
        for key, linear in targets.items():
            linear.weight = torch.nn.Parameter(kept[key].to(args.device), requires_grad=False)
        free(args.device)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    if torch.device(device).type == "cuda":
        if not torch.cuda.is_available():
            print("error: --device cuda but no CUDA device; use --device cpu (with --tiny)", file=sys.stderr)
            return 1
        torch.cuda.set_device(device)  # events, peaks and streams below name no device
    env = environment(device)
    print(f"Lynx benchmark on {env['card']} ({'tiny' if args.tiny else 'full-size'} model, random weights), "
          f"commit {env['commit']}{' + local changes' if env['dirty'] else ''}, {env['date']}", flush=True)
    cfg = lynx_config(args.tiny, args.batch_size, args.max_new_tokens)
    vocab = (TINY["llm"] if args.tiny else LLAMA_7B)["vocab_size"]
    pad_id = vocab - 1  # Lynx's [PAD], appended to the vocabulary
    token_ids = SimpleNamespace(pad_id=pad_id, bos_id=1, eos_id=2)
    on_cuda = torch.device(device).type == "cuda"
    torch.set_grad_enabled(False)
    replays = Replays(on_cuda)

    work = {}
    for name in args.sets:
        lengths = [prompt_tokens(q, cfg.prompt, cfg.max_input_tokens) for q in read_questions(name, args.limit)]
        frames = cfg.data.num_frames if name == "videos" else 0
        work[name] = make_batches(lengths, frames, cfg, pad_id, args.batch_size, on_cuda, args.seed)
    media = {name: media_decode_seconds(cfg, name, sum(len(b) for b in work[name])) for name in args.sets}

    start = time.perf_counter()
    model = build_random_lynx(cfg, args.tiny, device, args.seed)
    sync(device)
    report = Report(args, environment=env, args=vars(args), build_s=time.perf_counter() - start,
                    media_decode_s=media)
    if args.save_weights:
        report.data["weights"] = weights_roundtrip(model, args.save_weights, device)
    with torch.inference_mode():
        if args.baseline:
            print("baseline: float32, eager attention, transformers' generate", flush=True)
            set_attention(model, fast=False)
            modes = [(m, args.baseline_limit) for m in args.baseline_modes if m in args.modes]
            if args.fidelity_limit and "greedy" in args.modes and "greedy" not in args.baseline_modes:
                modes.append(("greedy", args.fidelity_limit))  # the float32 answers to compare with
            cfg.decoder = "hf"
            try:
                baseline = make_decoder(cfg, model.LLM, token_ids, device)
                report.add(run_config("baseline", Runner(model, baseline, device), work, modes, cfg, args, replays))
            except Exception as err:  # noqa: BLE001 - the fast path still runs
                report.failed("baseline", err)
            baseline = None
            free(device)
    if on_cuda:  # the CPU smoke run stays in float32
        model = model.to(torch.bfloat16)
        free(device)
    report.data["fast_dtype"] = str(model.dtype).replace("torch.", "")
    print(f"fast: {report.data['fast_dtype']}, SDPA, prefill once, fixed KV cache"
          + (", CUDA graphs" if on_cuda else ""), flush=True)
    with torch.inference_mode():
        set_attention(model, fast=True)
        cfg.decoder = "fast"
        try:
            fast = make_decoder(cfg, model.LLM, token_ids, device, compile=args.compile)
            report.add(run_config("fast", Runner(model, fast, device), work, [(m, None) for m in args.modes], cfg,
                                  args, replays))
        except Exception as err:  # noqa: BLE001 - the quantized modes still run
            report.failed("fast", err)
        fast = None
        free(device)
        report.data["fidelity"] = agreement(report.rows, "baseline", "fast", args.fidelity_limit)
        if args.quantize:
            run_quantized(model, cfg, args, work, token_ids, report, replays)

    print()
    print(table(report.rows, media))
    print_agreements(report.data, args)
    if "weights" in report.data:
        w = report.data["weights"]
        print(f"weights: {w['bytes'] / 2**30:.1f} GiB loaded in {w['load_s']:.1f} s from {w['path']}")
    report.write()
    if args.out:
        print(f"results: {args.out}")
    return 1 if report.data.get("failures") else 0


def print_agreements(data: dict, args) -> None:
    dtype = data["fast_dtype"]
    pairs = [(f"fast ({dtype}) vs original (float32)", data.get("fidelity", {}))]
    pairs += [(f"{name.split(' / ')[0]} vs fast ({dtype})", value)
              for name, value in data.get("agreement", {}).items()]
    for label, per_set in pairs:
        for set_name, f in per_set.items():
            print(f"greedy, {label}, {set_name}: {f['equal']}/{f['records']} answers equal, first token equal "
                  f"{f['first_token_equal']}/{f['records']}, mean common prefix {f['mean_common_prefix']:.1f} of "
                  f"{args.max_new_tokens} tokens")


if __name__ == "__main__":
    sys.exit(main())
