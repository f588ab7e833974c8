"""Write random weight files in the released layouts, full size or reduced, so that loading can be measured anywhere.

    python benchmarks/write_release_files.py --out data/random-release            # full size, ~18 GB
    python benchmarks/write_release_files.py --out /tmp/rel --layers 2 --vit-depth 2   # 7B widths, ~3.3 GB
    python benchmarks/write_release_files.py --out /tmp/rel --layers 2 --vit-depth 2 --scale 16  # a few MB

What it writes in --out:
  eva_vit_g.pth       EVA ViT-g, float16, EVA's keys, a 16x16 position grid, one block more than the model uses
                      (the 40th) and keys it does not use (final norm)
  vicuna-7b/          a LLaMA folder as transformers 4.28's save_pretrained wrote Vicuna: config.json, float16
                      pytorch_model-0000i-of-0000n.bin shards of at most 10 GB (each layer's rotary inv_freq
                      included) with their index, tokenizer.model (32000 pieces), tokenizer and generation configs
  finetune_lynx.pt    the trained parts (bridge, adapters, frame positions), float32, as {'model': state_dict}
  lynx.yaml           configs/LYNX.yaml pointing at these files (and at the reduced dimensions)

The values are a fixed pattern: a pool of random normal numbers (std 0.02; norm weights 1 + that) laid end to end
from a different place for each tensor. Loading reads the same bytes whatever they are, and the model computes
with numbers of realistic size, so nothing a load or a decode step measures changes; writing is then bound by
the disk, not by a random number generator. The .pt/.bin files are laid out by torch.save itself (under
torch.serialization.skip_data, which reserves the space) and their bytes written in place.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import struct
import sys
import time
import zlib
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs.schema import VitConfig, config_from_dict, load_config  # noqa: E402
from models.checkpoint import TRAINED_PARTS, part_of  # noqa: E402
from models.tensor_files import LazyTensor, write_safetensors  # noqa: E402

FIXTURE_LLM = ROOT / "tests" / "fixtures" / "tiny" / "data" / "vicuna-7b"
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
VOCAB = 32000
EVA_GRID = 16  # eva_vit_g.pth was trained at 224 px: a 16 x 16 grid of 14 px patches
POOL = (1 << 22) + 1021  # elements in the pattern pool (not a power of two: rows of a tensor do not repeat)
SHARD_BYTES = 10 * 10**9  # save_pretrained's max_shard_size="10GB" in transformers 4.28


def pattern_pools(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(POOL, generator=generator) * 0.02
    return {(dtype, ones): (noise + (1.0 if ones else 0.0)).to(dtype)
            for dtype in (torch.float16, torch.float32) for ones in (False, True)}


def is_norm(key: str, shape) -> bool:
    return len(shape) == 1 and ("norm" in key or "layernorm" in key) and key.endswith("weight")


def pattern(pools: dict, key: str, shape, dtype: torch.dtype) -> torch.Tensor:
    """The tensor's values: the pool from an offset that depends on the key, repeated as far as needed."""
    pool = pools[(dtype, is_norm(key, shape))]
    numel = torch.Size(shape).numel()
    start = zlib.crc32(key.encode()) % POOL
    parts, left = [pool[start:start + numel]], numel - min(numel, POOL - start)
    while left > 0:
        parts.append(pool[:left])
        left -= parts[-1].numel()
    return torch.cat(parts).view(shape)


def write_torch_file(path: Path, layout: dict, pools: dict, wrap: str | None = None) -> int:
    """torch.save's layout of `layout` (key -> (shape, dtype), or a given tensor), its bytes filled in place."""
    empty = {k: v if isinstance(v, torch.Tensor) else torch.empty(v[0], dtype=v[1]) for k, v in layout.items()}
    with torch.serialization.skip_data():  # reserves each tensor's bytes without writing (or touching) them
        torch.save({wrap: empty} if wrap else empty, path)
    index = torch.load(path, map_location="meta", weights_only=True)
    index = index[wrap] if wrap else index
    with open(path, "r+b") as f:
        for key, meta in index.items():
            value = layout[key] if isinstance(layout[key], torch.Tensor) else pattern(pools, key, meta.shape,
                                                                                       meta.dtype)
            f.seek(meta.untyped_storage()._checkpoint_offset)
            f.write(value.contiguous().view(-1).view(torch.uint8).numpy().data)
    return path.stat().st_size


def tokenizer_model(vocab: int) -> bytes:
    """The fixture's sentencepiece model with pieces appended up to `vocab` (appended protobuf entries of the
    repeated `pieces` field: type NORMAL, a very low score so that they are never chosen over the real ones)."""
    def varint(n):
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    def piece(i):
        text = f"\u2581r{i}".encode()
        body = b"\x0a" + varint(len(text)) + text + b"\x15" + struct.pack("<f", -1e4 - i) + b"\x18\x01"
        return b"\x0a" + varint(len(body)) + body

    import sentencepiece as spm

    base = (FIXTURE_LLM / "tokenizer.model").read_bytes()
    have = spm.SentencePieceProcessor(model_proto=base).get_piece_size()
    return base + b"".join(piece(i) for i in range(vocab - have))


def llm_layout(dims: dict) -> dict:
    """Key -> (shape, dtype) of transformers 4.28's LLaMA state dict, in its order (inv_freq in every layer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        llm = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, **dims))
    head = dims["hidden_size"] // dims["num_attention_heads"]
    layout = {}
    for key, value in llm.state_dict().items():
        layout[key] = (value.shape, torch.float16)
        if key.endswith("self_attn.o_proj.weight"):
            inv_freq = 1.0 / (10000 ** (torch.arange(0, head, 2).float() / head))
            layout[key.replace("o_proj.weight", "rotary_emb.inv_freq")] = inv_freq.half()
    return layout


def write_llm(folder: Path, dims: dict, pools: dict, shard_bytes: int, safetensors: bool) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"_name_or_path": "vicuna-7b", "architectures": ["LlamaForCausalLM"], "bos_token_id": 1,
              "eos_token_id": 2, "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 2048,
              "model_type": "llama", "pad_token_id": 0, "rms_norm_eps": 1e-06, "tie_word_embeddings": False,
              "torch_dtype": "float16", "transformers_version": "4.28.1", "use_cache": True, "vocab_size": VOCAB,
              **dims}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in ("generation_config.json", "special_tokens_map.json", "tokenizer_config.json"):
        shutil.copy(FIXTURE_LLM / name, folder / name)
    (folder / "tokenizer.model").write_bytes(tokenizer_model(VOCAB))
    layout = llm_layout(dims)
    shards, size = [{}], 0
    for key, spec in layout.items():  # transformers 4.28's shard_checkpoint: a new shard when the next tensor tips over
        shape, dtype = (spec.shape, spec.dtype) if isinstance(spec, torch.Tensor) else spec
        nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = spec
        size += nbytes
    kind, suffix = ("model", "safetensors") if safetensors else ("pytorch_model", "bin")
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"{kind}-{i + 1:05d}-of-{len(shards):05d}.{suffix}" if len(shards) > 1 else f"{kind}.{suffix}"
        if safetensors:
            lazies = {k: LazyTensor.of(v) if isinstance(v, torch.Tensor) else LazyTensor(
                torch.Size(v[0]), v[1], lambda device, dtype, k=k, v=v: pattern(pools, k, v[0], v[1]))
                for k, v in shard.items()}
            total += write_safetensors(str(folder / name), lazies, metadata={"format": "pt"})
        else:
            total += write_torch_file(folder / name, shard, pools)
        weight_map.update({k: name for k in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / f"{kind}.{suffix}.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def eva_layout(dims: VitConfig) -> dict:
    """Key -> (shape, float16) of eva_vit_g.pth: timm's Eva keys (EVA's own) with one more block, at 224 px."""
    from models.vision_encoder import build_vision_encoder

    with torch.device("meta"):
        vit = build_vision_encoder(dataclasses.replace(dims, depth=dims.depth + 1), EVA_GRID * dims.patch_size)
    layout = {k: (v.shape, torch.float16) for k, v in vit.state_dict().items()}
    layout.update({"norm.weight": ((dims.embed_dim,), torch.float16), "norm.bias": ((dims.embed_dim,), torch.float16)})
    return layout


def reduced_dims(layers: int, scale: int) -> tuple[dict, VitConfig]:
    llm = dict(LLAMA_7B, num_hidden_layers=layers)
    vit = VitConfig()
    if scale > 1:
        llm.update(hidden_size=4096 // scale, intermediate_size=11008 // scale,
                   num_attention_heads=max(1, 32 // scale))
        vit = dataclasses.replace(vit, embed_dim=1408 // scale, num_heads=max(1, 16 // scale))
    return llm, vit


def write_release(out: Path, layers: int = 32, vit_depth: int = 39, scale: int = 1, seed: int = 0,
                  shard_bytes: int = SHARD_BYTES, safetensors: bool = False) -> dict:
    """Write the files and lynx.yaml into `out`; returns {file: bytes}."""
    from models.build import model_skeleton, read_llm_config

    out.mkdir(parents=True, exist_ok=True)
    pools = pattern_pools(seed)
    llm_dims, vit = reduced_dims(layers, scale)
    vit = dataclasses.replace(vit, depth=vit_depth)
    sizes = {"eva_vit_g.pth": write_torch_file(out / "eva_vit_g.pth", eva_layout(vit), pools),
             "vicuna-7b": write_llm(out / "vicuna-7b", llm_dims, pools, shard_bytes, safetensors)}
    raw = yaml.safe_load((ROOT / "configs" / "LYNX.yaml").read_text())
    raw.update(vit_checkpoint=str(out / "eva_vit_g.pth"), llm_path=str(out / "vicuna-7b"),
               checkpoint=str(out / "finetune_lynx.pt"), vit=dataclasses.asdict(vit),
               test_files=[str(ROOT / "tests" / "fixtures" / "tiny" / "data" / "Open_VQA_images_tiny.jsonl")])
    cfg = config_from_dict(raw)
    skeleton = model_skeleton(cfg, read_llm_config(str(out / "vicuna-7b")))
    trained = {k: (v.shape, torch.float32) for k, v in skeleton.state_dict().items() if part_of(k) in TRAINED_PARTS}
    sizes["finetune_lynx.pt"] = write_torch_file(out / "finetune_lynx.pt", trained, pools, wrap="model")
    (out / "lynx.yaml").write_text("# configs/LYNX.yaml with random release files (benchmarks/write_release_files.py)\n"
                                   + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
    load_config(str(out / "lynx.yaml"))  # the written config is valid
    return sizes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--layers", type=int, default=32, help="LLaMA decoder layers (released: 32)")
    parser.add_argument("--vit-depth", type=int, default=39, help="ViT blocks the model uses; the file holds one more")
    parser.add_argument("--scale", type=int, default=1, help="divide every width by this (1: the released widths)")
    parser.add_argument("--max-shard-gb", type=float, default=SHARD_BYTES / 1e9, help="LLM shard size limit")
    parser.add_argument("--safetensors", action="store_true", help="LLM shards as .safetensors instead of .bin")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    sizes = write_release(args.out, args.layers, args.vit_depth, args.scale, args.seed,
                          int(args.max_shard_gb * 1e9), args.safetensors)
    for name, size in sizes.items():
        print(f"{args.out / name}: {size / 1e9:.2f} GB")
    print(f"wrote {sum(sizes.values()) / 1e9:.2f} GB in {time.perf_counter() - start:.1f} s; config: "
          f"{args.out / 'lynx.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
