"""The benchmark's work and model: Open-VQA-sized batches (random pixels, prompts as long as the real ones) and a
Lynx of LYNX.yaml's dimensions (or the parity fixture's, --tiny) with random weights rounded to bfloat16, so that the
float32 and bfloat16 models hold the same numbers; and the CPU time of decoding the sets' media."""
from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs.schema import config_from_dict, load_config  # noqa: E402
from dataset.prompt import pad_batch  # noqa: E402
from dataset.records import read_json_lines  # noqa: E402
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



# ---- the work: prompt lengths, batches


def prompt_tokens(question: str, template: str, max_tokens: int) -> int:
    """Estimated LLaMA token count of the lower-cased prompt: BOS, one token per word (one more per 6 letters past
    the first 6), one per punctuation mark or newline; cut to max_input_tokens. "user: what is in the image?\\nbot:"
    gives 12, as the real tokenizer does."""
    text = template.format(question=question).strip().lower()
    pieces = re.findall(r"[^\W_]+|[^\w\s]|_|\n", text)
    count = 1 + sum(1 + (len(p) - 1) // 6 if p[0].isalnum() else 1 for p in pieces)
    return min(count, max_tokens)


def read_questions(name: str, limit: int | None) -> list[str]:
    questions = [row["question"] for _, row in read_json_lines(ROOT / SETS[name][0])]
    return questions[:limit] if limit else questions


class Batch:
    def __init__(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.pixel_values, self.input_ids, self.attention_mask = pixel_values, input_ids, attention_mask

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
        prompts = []
        for n in rows:
            prompt = torch.randint(3, pad_id, (n,), generator=gen)
            prompt[0] = 1  # BOS
            prompts.append(prompt.tolist())
        ids, mask = pad_batch(prompts, pad_id, left=True)
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


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


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



def media_decode_seconds(cfg, kind: str, records: int, samples: int = 6) -> float | None:
    """CPU seconds (one process) to read and transform `records` media of the set, timed on synthetic files: JPEG
    640 x 480 images; H.264 mp4 videos of 48 frames at 320 x 240. None when no video encoder is at hand."""
    import numpy as np
    from PIL import Image

    from dataset.media import MediaOptions, load_pixels

    if kind == "videos":
        try:
            sys.path.insert(0, str(ROOT / "tests"))
            from video_helpers import write_test_video
        except ImportError:
            return None
    options = MediaOptions.from_config(cfg)
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
                small = noisy[::2, ::2]
                paths.append(os.path.join(tmp, f"{i}.mp4"))
                write_test_video(paths[-1], [np.roll(small, 4 * f, axis=1) for f in range(48)], size=(320, 240))
        start = time.perf_counter()
        for path in paths:
            load_pixels(path, SETS[kind][1], options)
        per_record = (time.perf_counter() - start) / len(paths)
    return per_record * records

