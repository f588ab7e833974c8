"""Lynx's speed on Open-VQA-sized work with random weights: the original's configuration (float32, eager attention,
transformers' generate) against the fast path (bfloat16, SDPA, prefill once, fixed KV cache, CUDA graphs).

    python benchmarks/benchmark.py --device cuda --out benchmarks/results.json   # full size, one GPU
    python benchmarks/benchmark.py --tiny --device cpu --limit 8                 # smoke run: numbers mean nothing

No files are needed. The model has LYNX.yaml's dimensions (EVA ViT-g 1408 x 39 at 420 px, 3-layer resampler,
LLaMA-7B with 16 adapters, vocabulary 32000 + [PAD]) and random weights rounded to bfloat16, so the float32 and
bfloat16 models hold the same numbers. Pixels are random; prompts are random ids as long as the Open-VQA questions'
prompts (estimated: see `prompt_tokens`). Every answer is forced to --max-new-tokens tokens (EOS banned), Lynx's
worst case. Each (configuration, set, mode) first runs one full-length batch as a warm-up (compilation and CUDA
graph capture happen there; reported as `warm-up s`), then:
  - a split pass, synchronising after each part of each batch: ViT, resampler, prefill, decode;
  - for the fast path, a set pass: the whole set as a run does it, the ViT of the next batch overlapping the LLM on
    a side CUDA stream. Its time is the set's `model s`; the baseline's is its split pass (the original overlaps
    nothing).
Media decoding (JPEG / mp4 to pixels) runs on the CPU in DataLoader workers while the GPU works; it is timed apart
on synthetic files, for one process.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs.decoding import DecodingSettings  # noqa: E402
from configs.schema import config_from_dict, load_config  # noqa: E402
from decoding import Decoder, make_decoder  # noqa: E402
from lynx.media_ahead import MediaAhead  # noqa: E402
from models.lynx import Lynx, LynxLlamaForCausalLM, vit_chunk_for  # noqa: E402

SETS = {"images": ("data/Open_VQA_images.jsonl", "image"), "videos": ("data/Open_VQA_videos.jsonl", "video")}
MODES = {  # the paper's beam sampling, plain beam search, greedy; all with LYNX.yaml's other decoding keys
    "paper": dict(num_beams=5, use_nucleus_sampling=True),
    "beam5": dict(num_beams=5, use_nucleus_sampling=False),
    "greedy": dict(num_beams=1, use_nucleus_sampling=False),
}
TINY = dict(  # the parity fixture's dimensions (tests/fixtures/tiny)
    image_res=84, vit=dict(embed_dim=64, depth=2, num_heads=4, mlp_ratio=4.3637, patch_size=14),
    llm=dict(vocab_size=1001, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=512),
)
LLAMA_7B = dict(vocab_size=32001, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, max_position_embeddings=2048)


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
                   help="records per set whose float32 greedy answers are compared with the fast bfloat16 ones")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="records per set (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decoding layers (default: on CUDA)")
    p.add_argument("--save-weights", metavar="DIR", default=None,
                   help="save the random weights there (or load them if saved before) and time the loading")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON")
    return p.parse_args(argv)


# ---- work: prompt lengths, batches


def prompt_tokens(question: str, template: str, max_tokens: int) -> int:
    """Estimated LLaMA token count of the lower-cased prompt: BOS, one token per word (one more per 6 letters past
    the first 6), one per punctuation mark or newline; cut to max_input_tokens. "user: what is in the image?\\nbot:"
    gives 12, as the real tokenizer does."""
    text = template.format(question=question).strip().lower()
    pieces = re.findall(r"[^\W_]+|[^\w\s]|_|\n", text)
    count = 1 + sum(1 + (len(p) - 1) // 6 if p[0].isalnum() else 1 for p in pieces)
    return min(count, max_tokens)


def read_questions(name: str, limit: int | None) -> list[str]:
    path = ROOT / SETS[name][0]
    with open(path, encoding="utf-8") as f:
        questions = [json.loads(line)["question"] for line in f if line.strip()]
    return questions[:limit] if limit else questions


class Batch:
    def __init__(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.pixels, self.input_ids, self.attention_mask = pixels, input_ids, attention_mask

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def make_batches(lengths: list[int], frames: int, cfg, pad_id: int, batch_size: int, pin: bool,
                 seed: int) -> list[Batch]:
    """Random pixels and prompt ids of the given lengths, left-padded like the real collate."""
    gen = torch.Generator().manual_seed(seed)
    res = cfg.image_res
    batches = []
    for start in range(0, len(lengths), batch_size):
        rows = lengths[start:start + batch_size]
        shape = (len(rows), 3, res, res) if frames == 0 else (len(rows), frames, 3, res, res)
        pixels = torch.randn(shape, generator=gen)
        width = max(rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, n in enumerate(rows):
            ids[i, width - n:] = torch.randint(3, pad_id, (n,), generator=gen)
            ids[i, width - n] = 1  # BOS
            mask[i, width - n:] = 1
        batches.append(Batch(pixels.pin_memory() if pin else pixels, ids, mask))
    return batches


# ---- the model


def lynx_config(tiny: bool, batch_size: int, max_new_tokens: int):
    if tiny:
        cfg = config_from_dict({"image_res": TINY["image_res"], "vit": TINY["vit"]})
    else:
        cfg = load_config(str(ROOT / "configs" / "LYNX.yaml"))
    cfg.batch_size_test, cfg.max_new_tokens = batch_size, max_new_tokens
    cfg.min_length = max_new_tokens + 1  # min_new_tokens = max_new_tokens: every answer is full length
    return cfg


def build_random_lynx(cfg, tiny: bool, device: str, seed: int) -> Lynx:
    """Lynx with random weights, built in float32 on `device`, rounded to bfloat16 values."""
    from transformers import LlamaConfig

    dims = TINY["llm"] if tiny else LLAMA_7B
    llama = LlamaConfig(**dims, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                        tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Lynx(cfg, LynxLlamaForCausalLM(llama), vit_chunk=vit_chunk_for(cfg, device))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16))
    return model.eval().requires_grad_(False)


def set_attention(model: Lynx, fast: bool) -> None:
    """The fast path's SDPA everywhere, or the original's eager attention (ViT and LLM)."""
    for block in model.vision_encoder.blocks:
        block.attn.fused_attn = fast
    model.LLM.set_attn_implementation("sdpa" if fast else "eager")


def weights_roundtrip(model: Lynx, folder: str, device: str) -> dict:
    """Save the (bfloat16) weights once; load them into the model, timed."""
    from safetensors.torch import load_file, save_file

    path = Path(folder) / "lynx_random_bf16.safetensors"
    report = {"path": str(path)}
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        save_file({k: v.to(torch.bfloat16).cpu().contiguous() for k, v in model.state_dict().items()}, str(path))
        report["save_s"] = time.perf_counter() - start
    sync(device)
    start = time.perf_counter()
    state = load_file(str(path), device=str(device))
    model.load_state_dict(state)
    del state
    sync(device)
    report["load_s"] = time.perf_counter() - start
    report["bytes"] = path.stat().st_size
    return report


# ---- timing


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class Clock:
    """Marks that cost no host sync on CUDA (events), read after a synchronize."""

    def __init__(self, device):
        self.cuda = str(device).startswith("cuda")

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1000 if self.cuda else b - a


class Runner:
    """One configuration: the original's (transformers' generate) or the fast path (Lynx's own decoder)."""

    def __init__(self, model: Lynx, decoder: Decoder, device: str):
        self.model, self.decoder, self.device = model, decoder, device
        self.clock = Clock(device)
        self.marks = {}
        self.hooks = []

    def answer(self, batch: Batch, settings: DecodingSettings, visual=None) -> torch.Tensor:
        if visual is None:
            visual = self.model.encode_media(batch.pixels.to(self.device, non_blocking=True))
        embeds, mask = self.model.fuse(visual, batch.input_ids, batch.attention_mask)
        return self.decoder.generate(embeds, mask, settings)

    # marks taken by hooks: the resampler's start and end, the first LM head call (end of the prefill)
    def _mark(self, name):
        def hook(*_):
            if name not in self.marks:
                self.marks[name] = self.clock.mark()
        return hook

    def split_pass(self, batches, settings: DecodingSettings) -> dict:
        """Every batch part by part: seconds of ViT, resampler, prefill, decode, and the answers."""
        model = self.model
        self.hooks = [model.bridge.register_forward_pre_hook(self._mark("vit_end")),
                      model.bridge.register_forward_hook(self._mark("bridge_end")),
                      model.LLM.lm_head.register_forward_hook(self._mark("prefill_end"))]
        parts = dict(vit=0.0, resampler=0.0, prefill=0.0, decode=0.0)
        answers = []
        sync(self.device)
        wall = time.perf_counter()
        try:
            for batch in batches:
                self.marks = {}
                start = self.clock.mark()
                ids = self.answer(batch, settings)
                end = self.clock.mark()
                sync(self.device)
                m, sec = self.marks, self.clock.seconds
                parts["vit"] += sec(start, m["vit_end"])
                parts["resampler"] += sec(m["vit_end"], m["bridge_end"])
                parts["prefill"] += sec(m["bridge_end"], m["prefill_end"])
                parts["decode"] += sec(m["prefill_end"], end)
                answers.extend(ids.tolist())
        finally:
            for h in self.hooks:
                h.remove()
        return dict(parts=parts, wall=time.perf_counter() - wall, answers=answers)

    def set_pass(self, batches, settings: DecodingSettings) -> float:
        """The whole set as a run does it; on CUDA the next batch's ViT and resampler run on a side stream."""
        ahead = MediaAhead(self.model)
        sync(self.device)
        start = time.perf_counter()
        ahead.submit(batches[0].pixels)
        for j, batch in enumerate(batches):
            visual = ahead.take()
            if j + 1 < len(batches):
                ahead.submit(batches[j + 1].pixels)
            self.answer(batch, settings, visual=visual).tolist()
        sync(self.device)
        return time.perf_counter() - start


def media_decode_seconds(cfg, kind: str, records: int, samples: int = 6) -> float | None:
    """CPU seconds (one process) to read and transform `records` media of the set, timed on synthetic files: JPEG
    640 x 480 images; H.264 mp4 videos of 48 frames at 320 x 240. None when no video encoder is at hand."""
    import numpy as np
    from PIL import Image

    from dataset.media import image_transform, open_image, pixels_of_frames
    from dataset.video import load_video_frames

    transform = image_transform(cfg.image_res, cfg.image_mean, cfg.image_std)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(samples):
            yy, xx = np.mgrid[0:480, 0:640]
            base = np.stack([(xx + 40 * i) % 256, (yy * 2) % 256, (xx + yy) % 256], -1)
            noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            if kind == "images":
                paths.append(os.path.join(tmp, f"{i}.jpg"))
                Image.fromarray(noisy).save(paths[-1], quality=90)
            else:
                try:
                    sys.path.insert(0, str(ROOT / "tests"))
                    from video_helpers import write_test_video
                except ImportError:
                    return None
                small = noisy[::2, ::2]
                paths.append(os.path.join(tmp, f"{i}.mp4"))
                write_test_video(paths[-1], [np.roll(small, 4 * f, axis=1) for f in range(48)], size=(320, 240))
        start = time.perf_counter()
        for path in paths:
            if kind == "images":
                transform(open_image(path))
            else:
                pixels_of_frames(load_video_frames(path, cfg.data.num_frames), transform)
        per_record = (time.perf_counter() - start) / len(paths)
    return per_record * records


# ---- one configuration over the sets and modes


def run_config(name: str, runner: Runner, work: dict, modes: list[tuple[str, int | None]], cfg,
               device: str) -> list[dict]:
    """Rows of the table for one configuration; `modes`: (mode, records per set to time or None for all)."""
    rows = []
    for mode, limit_records in modes:
        settings = mode_settings(cfg, mode)
        for set_name, batches in work.items():
            measured = batches
            if limit_records:
                measured = batches[:max(1, math.ceil(limit_records / cfg.batch_size_test))]
            full = next(b for b in batches if len(b) == max(len(x) for x in batches))
            sync(device)
            start = time.perf_counter()
            runner.answer(full, settings).tolist()  # warm-up: a full batch, full length
            sync(device)
            warmup = time.perf_counter() - start
            if runner.clock.cuda:
                torch.cuda.reset_peak_memory_stats()
            split = runner.split_pass(measured, settings)
            scale = len(batches) / len(measured)
            seconds = split["wall"] * scale
            if name == "fast":
                seconds = runner.set_pass(measured, settings) * scale
            steps = len(measured) * (cfg.max_new_tokens - 1)
            rows.append(dict(
                config=name, set=set_name, mode=mode, records=sum(len(b) for b in batches),
                measured_records=sum(len(b) for b in measured), estimated=scale != 1.0, seconds=seconds,
                warmup_s=warmup, parts={k: v * scale for k, v in split["parts"].items()},
                decode_ms_per_step=1000 * split["parts"]["decode"] / max(steps, 1),
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if runner.clock.cuda else None,
                answers=split["answers"],
            ))
            print(f"  {name:8} {set_name:6} {mode:6} {seconds:8.2f} s{' (est.)' if scale != 1 else ''}", flush=True)
    return rows


def mode_settings(cfg, mode: str) -> DecodingSettings:
    return DecodingSettings.from_config(cfg).replace(**MODES[mode])


def fidelity(rows: list[dict], limit: int) -> dict:
    """How often the fast bfloat16 greedy answers equal the original's float32 greedy answers (same records)."""
    out = {}
    for base in (r for r in rows if r["config"] == "baseline" and r["mode"] == "greedy"):
        fast = next((r for r in rows if r["config"] == "fast" and r["mode"] == "greedy" and r["set"] == base["set"]),
                    None)
        if fast is None:
            continue
        pairs = list(zip(base["answers"], fast["answers"]))[:limit]
        same = sum(a == b for a, b in pairs)
        prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))) for a, b in pairs]
        out[base["set"]] = dict(records=len(pairs), equal=same, first_token_equal=sum(p > 0 for p in prefix),
                                mean_common_prefix=sum(prefix) / max(len(prefix), 1))
    return out


# ---- report


def table(rows: list[dict], media: dict) -> str:
    """The results as a text table; the speed-up is over the baseline row of the same set and mode."""
    def num(value, digits=2):
        return "n/a" if value is None else f"{value:.{digits}f}"

    head = (f"{'config':8} {'set':6} {'mode':6} {'recs':>4} {'model s':>9} {'media s':>7} {'ViT s':>7} "
            f"{'resamp s':>8} {'prefill s':>9} {'decode s':>8} {'ms/step':>7} {'peak GiB':>8} {'warm-up s':>9} "
            f"{'speed-up':>8}")
    lines = [head, "-" * len(head)]
    base = {(r["set"], r["mode"]): r["seconds"] for r in rows if r["config"] == "baseline"}
    for r in rows:
        p = r["parts"]
        speed = base.get((r["set"], r["mode"]))
        speedup = f"{speed / r['seconds']:.1f}x" if speed and r["config"] == "fast" else ""
        seconds = ("~" if r["estimated"] else "") + num(r["seconds"])
        lines.append(
            f"{r['config']:8} {r['set']:6} {r['mode']:6} {r['records']:4d} {seconds:>9} {num(media.get(r['set'])):>7} "
            f"{num(p['vit']):>7} {num(p['resampler']):>8} {num(p['prefill']):>9} {num(p['decode']):>8} "
            f"{num(r['decode_ms_per_step'], 1):>7} {num(r['peak_gib'], 1):>8} {num(r['warmup_s'], 1):>9} "
            f"{speedup:>8}")
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

    card = torch.cuda.get_device_name() if str(device).startswith("cuda") else "CPU"
    return dict(card=card, device=str(device), date=datetime.datetime.now().isoformat(timespec="seconds"),
                commit=commit, dirty=dirty, torch=torch.__version__, transformers=transformers.__version__,
                cpu_threads=torch.get_num_threads())


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device; use --device cpu (with --tiny)", file=sys.stderr)
        return 1
    env = environment(device)
    print(f"Lynx benchmark on {env['card']} ({'tiny' if args.tiny else 'full-size'} model, random weights), "
          f"commit {env['commit']}{' + local changes' if env['dirty'] else ''}, {env['date']}", flush=True)
    cfg = lynx_config(args.tiny, args.batch_size, args.max_new_tokens)
    vocab = (TINY["llm"] if args.tiny else LLAMA_7B)["vocab_size"]
    pad_id = vocab - 1  # Lynx's [PAD], appended to the vocabulary
    token_ids = SimpleNamespace(pad_id=pad_id, bos_id=1, eos_id=2)
    on_cuda = device.startswith("cuda")
    torch.set_grad_enabled(False)

    work = {}
    for name in args.sets:
        lengths = [prompt_tokens(q, cfg.prompt, cfg.max_input_tokens) for q in read_questions(name, args.limit)]
        frames = cfg.data.num_frames if name == "videos" else 0
        work[name] = make_batches(lengths, frames, cfg, pad_id, args.batch_size, on_cuda, args.seed)
    media = {name: media_decode_seconds(cfg, name, sum(len(b) for b in work[name])) for name in args.sets}

    start = time.perf_counter()
    model = build_random_lynx(cfg, args.tiny, device, args.seed)
    sync(device)
    report = dict(environment=env, args=vars(args), build_s=time.perf_counter() - start)
    if args.save_weights:
        report["weights"] = weights_roundtrip(model, args.save_weights, device)
    rows = []
    with torch.inference_mode():
        if args.baseline:
            print("baseline: float32, eager attention, transformers' generate", flush=True)
            set_attention(model, fast=False)
            modes = [(m, args.baseline_limit) for m in args.baseline_modes if m in args.modes]
            if args.fidelity_limit and "greedy" in args.modes and "greedy" not in args.baseline_modes:
                modes.append(("greedy", args.fidelity_limit))  # the float32 answers to compare with
            cfg.decoder = "hf"
            baseline = make_decoder(cfg, model.LLM, token_ids, device)
            rows += run_config("baseline", Runner(model, baseline, device), work, modes, cfg, device)
    if on_cuda:  # the CPU smoke run stays in float32
        model = model.to(torch.bfloat16)
        torch.cuda.empty_cache()
    print(f"fast: {str(model.dtype).replace('torch.', '')}, SDPA, prefill once, fixed KV cache"
          + (", CUDA graphs" if on_cuda else ""), flush=True)
    with torch.inference_mode():
        set_attention(model, fast=True)
        cfg.decoder = "fast"
        fast = make_decoder(cfg, model.LLM, token_ids, device, compile=args.compile)
        rows += run_config("fast", Runner(model, fast, device), work, [(m, None) for m in args.modes], cfg, device)

    report["fast_dtype"] = str(model.dtype).replace("torch.", "")
    report["fidelity"] = fidelity(rows, args.fidelity_limit)
    report["media_decode_s"] = media
    print()
    print(table(rows, media))
    for set_name, f in report["fidelity"].items():
        print(f"greedy, fast ({report['fast_dtype']}) vs original (float32), {set_name}: {f['equal']}/{f['records']} "
              f"answers equal, "
              f"first token equal {f['first_token_equal']}/{f['records']}, mean common prefix "
              f"{f['mean_common_prefix']:.1f} of {args.max_new_tokens} tokens")
    if "weights" in report:
        w = report["weights"]
        print(f"weights: {w['bytes'] / 2**30:.1f} GiB loaded in {w['load_s']:.1f} s from {w['path']}")
    report["results"] = [{k: v for k, v in r.items() if k != "answers"} for r in rows]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
