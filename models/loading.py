"""Lynx's weights, planned from the files and put on the device tensor by tensor.

A plan maps every tensor of the model (its state-dict key) to a LazyTensor: the release files (ViT, LLM folder,
Lynx checkpoint on top) or a converted folder. Planning reads only the files' indexes, so every shape is checked
before any weight is read. `materialise` then fills a model built on the meta device: each tensor is read, made
in the run's dtype on the target device and assigned, so no second copy of the model ever exists, on the host or
on the device. A quantizer may take each linear layer as soon as its weights have arrived.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from errors import InputError
from models.checkpoint import LoadReport, check_lynx_state, check_shapes, lynx_report, read_lynx_checkpoint, \
    vision_weights
from models.tensor_files import LazyTensor, open_weight_file
from models.weight_files import llm_files

EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")


def release_plan(cfg, model: nn.Module, file_vocab: int) -> tuple[dict, list[LoadReport]]:
    """The plan from eva_vit_g.pth, the LLM folder and the Lynx checkpoint (its tensors win over the other two), all
    checked against `model` (on meta). `file_vocab`: the rows of the LLM files' embeddings (their config.json)."""
    own = model.state_dict()
    grid = cfg.image_res // cfg.vit_dims.patch_size
    vit, vit_report = vision_weights(model.vision_encoder.state_dict(), cfg.vit_checkpoint, grid)
    llm, llm_report = llm_weights(cfg.llm_dir, model.LLM.state_dict(keep_vars=True), file_vocab)
    lynx_state = read_lynx_checkpoint(cfg.checkpoint)
    check_lynx_state(own, lynx_state, cfg.checkpoint)
    plan = {"vision_encoder." + k: v for k, v in vit.items()}
    plan.update({"LLM." + k: v for k, v in llm.items()})
    plan.update({k: v for k, v in lynx_state.items() if k in own})
    return plan, [vit_report, llm_report, lynx_report(own, lynx_state, cfg.checkpoint)]


def llm_weights(folder: str, own: dict, file_vocab: int) -> tuple[dict, LoadReport]:
    """The LLM folder's tensors, checked against the LLM's state dict `own` (on meta, keep_vars). The embeddings hold
    `file_vocab` rows in the files and get the model's (the tokenizer's: [PAD] appended) when read."""
    state = {}
    for path in llm_files(folder):
        state.update({k: v for k, v in open_weight_file(path, "llm").items() if isinstance(v, LazyTensor)})
    expected = {k: v for k, v in own.items() if ".output_adapter." not in k}
    report = LoadReport(folder)
    selected = {}
    for key, value in state.items():
        if key in expected:
            selected[key] = value
            report.count("LLM." + key)
        else:
            report.ignored.append(key)
    missing = [k for k in expected if k not in selected and not _tied(k, expected, selected)]
    if missing:
        raise InputError(f"{folder}: missing {len(missing)} LLM tensors the model needs, e.g. '{missing[0]}'")
    in_files = {k: torch.empty(file_vocab, *v.shape[1:], device="meta") if k in EMBEDDINGS else v
                for k, v in expected.items()}
    check_shapes(in_files, selected, folder)
    for key in EMBEDDINGS:
        if key in selected and expected[key].shape[0] != file_vocab:
            selected[key] = with_rows(selected[key], expected[key].shape[0])
    return selected, report


def _tied(key: str, own: dict, present: dict) -> bool:
    """Whether `key` is the same tensor as another key the files hold (tied embeddings)."""
    return any(own[other] is own[key] for other in present if other != key)


def with_rows(embedding: LazyTensor, rows: int) -> LazyTensor:
    """An embedding with `rows` rows: added rows ([PAD]) are the mean of the existing ones, taken in the run's dtype
    (as the original resized after loading); fewer rows keep the first ones."""
    shape = torch.Size([rows, *embedding.shape[1:]])

    def make(device, dtype):
        old = embedding.shape[0]
        if rows <= old:
            return embedding.make(device, dtype)[:rows].clone()
        out = torch.empty(shape, device=device, dtype=dtype)
        embedding.into(out[:old])
        out[old:] = mean_row(out[:old]).to(dtype)
        return out

    return LazyTensor(shape, embedding.dtype, make)


def mean_row(weight: torch.Tensor, columns: int = 256) -> torch.Tensor:
    """The mean of the rows in float32, equal to `weight.float().mean(0)`; on the CPU `columns` at a time (each
    column's sum is its own, and 256 is a multiple of any vector width), so the float32 copy is of one slice, not
    of the whole embedding (0.5 GB for LLaMA's). The slices share one buffer: a fresh one each (33 MB for LLaMA's)
    stayed resident after it was freed (see models/tensor_files.py)."""
    if weight.device.type != "cpu":
        return weight.float().mean(dim=0, keepdim=True)
    buffer = torch.empty(weight.shape[0] * min(columns, weight.shape[1]), dtype=torch.float32)
    means = []
    for i in range(0, weight.shape[1], columns):
        part = weight[:, i:i + columns]
        means.append(buffer[:part.numel()].view(part.shape).copy_(part).mean(dim=0, keepdim=True))
    return torch.cat(means, dim=1)


def materialise(model: nn.Module, plan: dict, device, dtype: torch.dtype, quantizer=None) -> nn.Module:
    """Fill `model` (built on meta) from `plan`, tensor by tensor, on `device` in `dtype`; `quantizer.arrived(key)`
    is told of each tensor as it lands. Buffers no file holds are made here. Returns the model, in eval mode."""
    device = torch.device(device)
    slots = _slots(model)
    for key in model.state_dict():
        if key not in plan:
            continue
        value = plan[key].load(device, dtype)
        for module, name in slots[key]:
            if name in module._parameters:
                module._parameters[name] = nn.Parameter(value, requires_grad=False)
            else:
                module._buffers[name] = value
        if quantizer is not None:
            quantizer.arrived(key)
    _make_unsaved_buffers(model, device, dtype)
    left = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise InputError(f"no weights for {len(left)} tensors of the model, e.g. '{left[0]}'")
    return model.eval().requires_grad_(False)


def _slots(model: nn.Module) -> dict:
    """State-dict key -> every (module, attribute) holding that tensor (tied weights are held twice)."""
    holders: dict[int, list] = {}
    for module in model.modules():
        for name, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is not None:
                holders.setdefault(id(tensor), []).append((module, name))
    return {key: holders[id(tensor)] for key, tensor in model.state_dict(keep_vars=True).items()}


def _make_unsaved_buffers(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """The buffers that no file holds: EVA's zero key bias (in the run's dtype) and the LLM's rotary frequencies,
    computed on the CPU in float32 as transformers does (rounding them to bfloat16 would shift every position)."""
    for module in model.modules():
        k_bias = module._buffers.get("k_bias")
        if k_bias is not None and k_bias.is_meta:
            module._buffers["k_bias"] = torch.zeros(k_bias.shape, device=device, dtype=dtype)
    llm = model.LLM.model
    if llm.rotary_emb.inv_freq.is_meta:
        with torch.device("cpu"):
            llm.rotary_emb = LlamaRotaryEmbedding(config=llm.config).to(device)
