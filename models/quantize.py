"""Weight-only int8 / int4 quantization (torchao) of the LLM's decoder-layer linear layers, optionally the ViT's.

Decoding reads every weight once per token, so smaller weights fit smaller cards and decode faster: LLaMA-7B's
decoder layers hold 6.5 billion weights (13 GB in bfloat16, 6.5 GB in int8, ~3.5 GB in int4 with its group scales).
The embeddings, lm_head, the bridge and the adapters (the trained parts) stay in the run's dtype. A quantized layer
is still an `nn.Linear` called as before (its weight is a torchao tensor subclass), so transformers' forward and
the fast decoder's per-layer code run unchanged. One exception: timm's EVA attention passes its fused qkv weight and
the q/v biases to `F.linear` as keywords, which torchao's tensors do not take; a ViT block whose qkv is quantized
adds those biases after the product instead (timm's `qkv_bias_separate`), as torchao's kernels add a bias anyway.

Kernels: int8 works wherever torch runs. int4 uses tinygemm on CUDA (bfloat16 only; in_features a multiple of
128, out_features of 8) and torchao's CPU int4 layout on the CPU (out_features a multiple of 16, in_features of 32);
a layer of another shape is kept in the run's dtype and counted in the summary.
"""
from __future__ import annotations

import torch
from torch import nn

from errors import InputError

INT4_GROUPS = (128, 64, 32)  # int4 scales: one per this many inputs, the largest that divides in_features


def quantization_targets(model: nn.Module, vit: bool = False) -> dict[str, nn.Linear]:
    """State-dict prefix -> linear layer to quantize: every decoder layer's projections (not the adapters), and
    with `vit` the ViT blocks' qkv, proj, fc1, fc2."""
    found = {}
    for i, layer in enumerate(model.LLM.model.layers):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear) and not name.startswith("output_adapter"):
                found[f"LLM.model.layers.{i}.{name}"] = module
    if vit:
        for i, block in enumerate(model.vision_encoder.blocks):
            for name, module in block.named_modules():
                if isinstance(module, nn.Linear):
                    found[f"vision_encoder.blocks.{i}.{name}"] = module
    return found


def torchao_config(mode: str, linear: nn.Linear, device: torch.device):
    """torchao's config for this layer on this device, or None when no kernel takes its shape."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    if mode == "int8":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    n, k = linear.out_features, linear.in_features
    if device.type == "cuda":
        if k % 128 or n % 8:
            return None
        return Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d", set_inductor_config=False)
    from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

    group = next((g for g in INT4_GROUPS if k % g == 0), None)
    if group is None or n % 16:
        return None
    return PrototypeInt4WeightOnlyConfig(group_size=group, set_inductor_config=False)


class Quantizer:
    """Quantizes each target linear layer as soon as its weights have arrived (`arrived(key)`, called by
    `materialise` for every tensor), so the unquantized LLM never exists whole on the device."""

    def __init__(self, model: nn.Module, mode: str, device, dtype: torch.dtype, vit: bool = False):
        self.mode, self.device, self.dtype, self.vit = mode, torch.device(device), dtype, vit
        if self.device.type not in ("cpu", "cuda"):
            raise InputError(f"quantize: {mode} runs on CPU and CUDA devices, not on {self.device}")
        if mode == "int4" and self.device.type == "cuda" and dtype != torch.bfloat16:
            raise InputError(f"quantize: int4 on CUDA needs dtype bfloat16 (torchao's int4 kernel); this run uses "
                             f"{str(dtype).removeprefix('torch.')}")
        self.targets = quantization_targets(model, vit)
        self.attention_of = {block.attn.qkv: block.attn for block in model.vision_encoder.blocks} if vit else {}
        self.waiting = {prefix: {f"{prefix}.{name}" for name, p in linear.named_parameters(recurse=False)}
                        for prefix, linear in self.targets.items()}
        self.quantized = self.kept = 0

    def arrived(self, key: str) -> None:
        prefix = key.rpartition(".")[0]
        waiting = self.waiting.get(prefix)
        if waiting is None:
            return
        waiting.discard(key)
        if not waiting:
            del self.waiting[prefix]
            self.quantize(self.targets[prefix])

    def quantize(self, linear: nn.Linear) -> None:
        from torchao.quantization import quantize_

        config = torchao_config(self.mode, linear, self.device)
        if config is None:
            self.kept += 1
            return
        quantize_(linear, config)
        if linear in self.attention_of:
            self.attention_of[linear].qkv_bias_separate = True  # see the module's docstring
        self.quantized += 1

    def summary(self) -> str:
        parts = "LLM and ViT" if self.vit else "LLM"
        text = f"quantize {self.mode}: {self.quantized} linear layers of the {parts} (weight-only, torchao)"
        if self.kept:
            dtype = str(self.dtype).removeprefix("torch.")
            text += f"; {self.kept} kept in {dtype} (shapes the {self.mode} kernel cannot take)"
        return text


def quantize_model(model: nn.Module, mode: str, device, dtype: torch.dtype, vit: bool = False) -> Quantizer:
    """Quantize a model whose weights are loaded already (e.g. a benchmark's random model); returns the summary's
    holder."""
    quantizer = Quantizer(model, mode, device, dtype, vit)
    for linear in quantizer.targets.values():
        quantizer.quantize(linear)
    quantizer.waiting.clear()
    return quantizer
