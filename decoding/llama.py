"""transformers' LlamaForCausalLM forward written out over the fixed KV cache, layer by layer (gpt-fast style), with
Lynx's output adapters. The only file of the fast decoder that knows the LLM's architecture: another LLaMA-family
LLM needs another version of this file.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from decoding.cuda import is_out_of_memory
from decoding.workspace import CacheDims
from errors import described

log = logging.getLogger("lynx")


def cache_dims(llm) -> CacheDims:
    """Layers, key/value heads, head size and vocabulary of a LlamaForCausalLM."""
    cfg = llm.config
    heads = cfg.num_attention_heads
    return CacheDims(layers=cfg.num_hidden_layers,
                     kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                     head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
                     vocab=llm.lm_head.out_features)


def decoder_layer_qkv(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """LlamaDecoderLayer up to attention: (q, k, v) as (batch, heads, length, head_dim), rotated."""
    attn = layer.self_attn
    b, l, _ = hidden.shape
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x).view(b, l, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, l, -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(b, l, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def decoder_layer_rest(layer, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """LlamaDecoderLayer after attention, then Lynx's output adapter where the layer has one."""
    b, _, l, _ = attended.shape
    hidden = hidden + layer.self_attn.o_proj(attended.transpose(1, 2).reshape(b, l, -1))
    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    adapter = getattr(layer, "output_adapter", None)
    return adapter(hidden) if adapter is not None else hidden


def attend(q, k, v, k_cache, v_cache, slots, mask, scale):
    """Write this step's keys and values into their slots, then attend over the first mask.shape[-1] slots."""
    k_cache.index_copy_(2, slots, k)
    v_cache.index_copy_(2, slots, v)
    n = mask.shape[-1]
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    return F.scaled_dot_product_attention(q, k_cache[:, :, :n], v_cache[:, :, :n], attn_mask=mask, scale=scale, **gqa)


def float32_rotary(llm):
    """The LLM's rotary embedding with float32 inverse frequencies. `model.to(torch.bfloat16)` also rounds that
    buffer, which moves the rotary angles by up to ~0.2 rad at position 100; a fresh module computes it again."""
    rope = llm.model.rotary_emb
    if rope.inv_freq.dtype == torch.float32:
        return rope
    with torch.device(rope.inv_freq.device):
        return type(rope)(llm.config)


class LlamaRunner:
    """The LLM's forward over a fixed cache.

    `compile=True` compiles, for decoding steps, the two halves of a layer around attention (norms, projections,
    rotary, MLP, adapter: many small kernels fused); cache writes and attention stay eager, so no compiled code
    mutates the cache. A string names torch.compile's backend instead of inductor (the tests use "eager"). The
    prefill runs eagerly: once per batch, and its length varies.

    Each batch shape (rows, beams) is a compiled variant of its own (`dynamic=False`: fixed shapes for CUDA
    graphs), so a process that meets many shapes (halved batches, a server's settings) would reach Dynamo's
    recompile limit, where `fullgraph=True` fails: the limit is raised for these calls (RECOMPILES), and a shape
    that fails to compile anyway, for that or any other reason, runs uncompiled from then on (one warning); its
    steps are still captured as CUDA graphs.
    """

    RECOMPILES = 64  # compiled variants per layer half: shapes x (layers with and without an adapter)

    def __init__(self, llm, compile: bool | str = False):
        self.llm = llm
        self.dims = cache_dims(llm)
        self.rotary = float32_rotary(llm)
        self.qkv, self.rest = decoder_layer_qkv, decoder_layer_rest
        self.compiled = bool(compile)
        self.uncompiled_shapes: set[tuple[int, ...]] = set()
        if compile:
            backend = compile if isinstance(compile, str) else "inductor"
            self.qkv = torch.compile(decoder_layer_qkv, fullgraph=True, dynamic=False, backend=backend)
            self.rest = torch.compile(decoder_layer_rest, fullgraph=True, dynamic=False, backend=backend)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(tokens)

    def __call__(self, hidden, positions, k_caches, v_caches, slots, mask, prefill=False) -> torch.Tensor:
        """Float32 logits of `hidden` (batch, length, dim) at `positions` (prefill: of the last slot only); its keys
        and values go to `slots` of every layer's cache; `mask` (batch, 1, length, slots attended) is additive."""
        args = (hidden, positions, k_caches, v_caches, slots, mask, prefill)
        shape = tuple(hidden.shape)
        if prefill or not self.compiled or shape in self.uncompiled_shapes:
            return self.forward(decoder_layer_qkv, decoder_layer_rest, *args)
        try:
            with torch._dynamo.config.patch(recompile_limit=self.RECOMPILES):
                return self.forward(self.qkv, self.rest, *args)
        except Exception as err:  # noqa: BLE001 - whatever stops the compiler, the step itself can still run
            if is_out_of_memory(err):
                raise
            failure = described(err)
        self.uncompiled_shapes.add(shape)
        log.warning("torch.compile failed for decoding steps of shape %s (%s); that shape runs uncompiled, still "
                    "as CUDA graphs on CUDA", "x".join(map(str, shape)), failure)
        return self.forward(decoder_layer_qkv, decoder_layer_rest, *args)  # rewrites the same cache slots

    def forward(self, qkv, rest, hidden, positions, k_caches, v_caches, slots, mask, prefill) -> torch.Tensor:
        model = self.llm.model
        cos, sin = self.rotary(hidden, positions)
        for layer, k_cache, v_cache in zip(model.layers, k_caches, v_caches):
            q, k, v = qkv(layer, hidden, cos, sin)
            attended = attend(q, k, v, k_cache, v_cache, slots, mask, layer.self_attn.scaling)
            hidden = rest(layer, hidden, attended)
        if prefill:
            hidden = hidden[:, -1:]
        return self.llm.lm_head(model.norm(hidden)).float()
