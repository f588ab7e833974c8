"""Fast decoding for Lynx's LLM: each prompt is prefilled once, the KV cache has a fixed size, and a decoding step
(token choice + one forward) runs without a host sync, so on CUDA it is replayed as a CUDA graph.

The search is transformers' `generate` (5.24) for the options Lynx uses: greedy search, sampling (temperature, top-k,
top-p), beam search and beam sampling, with `min_new_tokens`, `no_repeat_ngram_size` over the generated tokens,
`length_penalty` and the `early_stopping` rule. In float32 greedy and beam search give `generate`'s tokens
(tests/test_fast_generate.py); sampling draws other random numbers than `generate`.

KV cache: one buffer per layer, (batch, kv_heads, slots, head_dim). Slots [0, prompt_len) hold the prompt, once per
row for all its beams; slot prompt_len + t * num_beams + k holds the token that beam slot k fed at step t. Beams are
never copied when they are reordered: `history[b, k, t]` names the beam slot that holds the t-th token of beam k,
and the step's attention mask lets beam k see exactly those slots. The beams of a row are the queries of one
attention call over the row's slots.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import GenerationConfig
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from models.lynx import positions_from_mask

log = logging.getLogger("lynx")

NEG = -1.0e9  # transformers' score for a beam that must not be chosen
BLOCK = 16  # decoding steps per attention width (and per CUDA graph)


def _round16(n: int) -> int:
    return -(-n // 16) * 16

# GenerationConfig keys that change nothing here, or whose value is checked below.
_HANDLED = {
    "max_new_tokens", "min_new_tokens", "min_length", "max_length", "num_beams", "do_sample", "temperature", "top_k",
    "top_p", "no_repeat_ngram_size", "length_penalty", "early_stopping", "pad_token_id", "bos_token_id",
    "eos_token_id", "decoder_start_token_id", "num_return_sequences", "repetition_penalty", "use_cache",
    "transformers_version", "_from_model_config", "output_attentions", "output_hidden_states", "output_scores",
    "output_logits", "return_dict_in_generate", "typical_p", "epsilon_cutoff", "eta_cutoff", "num_beam_groups",
    "diversity_penalty", "encoder_repetition_penalty", "encoder_no_repeat_ngram_size", "remove_invalid_values",
    "renormalize_logits", "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
    "assistant_lookbehind", "target_lookbehind", "cache_implementation", "compile_config", "disable_compile",
    "low_memory", "is_assistant", "trust_remote_code",
}
# Keys of _HANDLED with the only value the fast path accepts (besides None).
_REQUIRED = {
    "num_return_sequences": 1, "repetition_penalty": 1.0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "num_beam_groups": 1, "diversity_penalty": 0.0, "encoder_repetition_penalty": 1.0,
    "encoder_no_repeat_ngram_size": 0, "remove_invalid_values": False, "renormalize_logits": False,
    "output_attentions": False, "output_hidden_states": False, "output_scores": False, "output_logits": False,
    "return_dict_in_generate": False, "low_memory": False,
}


class UnsupportedOptions(ValueError):
    """The generation config asks for something only transformers' `generate` does."""


@dataclass(frozen=True)
class SearchSettings:
    """The decoding options of one `generate` call, as transformers resolves them."""

    max_new_tokens: int
    min_new_tokens: int
    num_beams: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    no_repeat_ngram_size: int
    length_penalty: float
    early_stopping: bool | str
    eos_id: int
    pad_id: int  # written after EOS by greedy search and sampling
    fill_id: int  # beam search's filler after EOS (transformers: `pad_token_id or eos_token_id`)

    @classmethod
    def resolve(cls, llm, gen: GenerationConfig) -> "SearchSettings":
        """Fill unset keys as `generate` does (the model's generation_config.json, then transformers' defaults);
        raise UnsupportedOptions for anything the fast path does not reproduce."""
        gen, _ = llm._prepare_generation_config(gen)
        values = gen.to_dict()
        extra = sorted(k for k, v in values.items()
                       if k not in _HANDLED and v not in (None, False, {}, []) and not k.startswith("_"))
        wrong = sorted(k for k, v in _REQUIRED.items() if values.get(k) not in (None, v))
        if extra or wrong:
            raise UnsupportedOptions(f"the fast decoder does not support {', '.join(extra + wrong)}")
        if gen.max_new_tokens is None:
            raise UnsupportedOptions("the fast decoder needs max_new_tokens")
        if gen.min_new_tokens is None and (gen.min_length or 0) > 0:
            raise UnsupportedOptions("the fast decoder takes min_new_tokens, not min_length")
        eos = gen.eos_token_id
        if isinstance(eos, (list, tuple)):
            if len(eos) != 1:
                raise UnsupportedOptions("the fast decoder takes a single eos_token_id")
            eos = eos[0]
        if eos is None:
            raise UnsupportedOptions("the fast decoder needs eos_token_id")
        pad = gen.pad_token_id if gen.pad_token_id is not None else eos
        beams = gen.num_beams or 1
        return cls(
            max_new_tokens=int(gen.max_new_tokens),
            min_new_tokens=int(gen.min_new_tokens or 0),
            num_beams=int(beams),
            do_sample=bool(gen.do_sample),
            temperature=float(gen.temperature if gen.temperature is not None else 1.0),
            top_k=int(gen.top_k or 0),
            top_p=float(gen.top_p if gen.top_p is not None else 1.0),
            no_repeat_ngram_size=int(gen.no_repeat_ngram_size or 0),
            length_penalty=float(gen.length_penalty if gen.length_penalty is not None else 1.0),
            early_stopping=gen.early_stopping if gen.early_stopping is not None else False,
            eos_id=int(eos),
            pad_id=int(pad),
            fill_id=int(gen.pad_token_id or eos),
        )


# ---- logits processors: transformers' rules on fixed-width token buffers with the step as a tensor


def ban_repeated_ngrams(scores: torch.Tensor, tokens: torch.Tensor, step: torch.Tensor, n: int) -> torch.Tensor:
    """NoRepeatNGramLogitsProcessor on tokens[:, :step]: a token that would repeat an n-gram seen so far is banned."""
    rows, width = tokens.shape
    vocab = scores.shape[-1]
    if n <= 0 or width < n:
        return scores
    windows = tokens.unfold(1, n, 1)  # (rows, width - n + 1, n)
    starts = torch.arange(windows.shape[1], device=tokens.device)
    complete = starts + n <= step  # the window lies inside the generated tokens
    prefix_at = (step - n + 1 + torch.arange(n - 1, device=tokens.device)).clamp(min=0)
    prefix = tokens.index_select(1, prefix_at)  # the last n - 1 tokens
    matches = (windows[..., :-1] == prefix[:, None, :]).all(-1) & complete
    banned = scores.new_zeros((rows, vocab + 1), dtype=torch.bool)
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab), vocab), True)
    return scores.masked_fill(banned[:, :vocab], -math.inf)


def ban_early_eos(scores: torch.Tensor, step: torch.Tensor, min_new_tokens: int, eos_id: int) -> torch.Tensor:
    """MinNewTokensLengthLogitsProcessor: EOS is impossible before `min_new_tokens` new tokens."""
    if min_new_tokens <= 0:
        return scores
    is_eos = torch.arange(scores.shape[-1], device=scores.device) == eos_id
    return scores.masked_fill(is_eos & (step < min_new_tokens), -math.inf)


def keep_top_k(scores: torch.Tensor, k: int, min_keep: int = 1) -> torch.Tensor:
    """TopKLogitsWarper."""
    k = min(max(k, min_keep), scores.shape[-1])
    kth = torch.topk(scores, k).values[..., -1:]
    return scores.masked_fill(scores < kth, -math.inf)


def keep_top_p(scores: torch.Tensor, p: float, min_keep: int = 1) -> torch.Tensor:
    """TopPLogitsWarper: the smallest set of most likely tokens whose probabilities add up to at least p."""
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - p)
    remove[..., -min_keep:] = False
    remove = remove.scatter(1, order, remove)
    return scores.masked_fill(remove, -math.inf)


def process_scores(s: SearchSettings, scores: torch.Tensor, tokens: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """transformers' processor list for these settings, in its order."""
    scores = ban_repeated_ngrams(scores, tokens, step, s.no_repeat_ngram_size)
    scores = ban_early_eos(scores, step, s.min_new_tokens, s.eos_id)
    if s.do_sample:
        min_keep = 2 if s.num_beams > 1 else 1  # beams keep one non-EOS continuation
        if s.temperature != 1.0:
            scores = scores / s.temperature
        if s.top_k:
            scores = keep_top_k(scores, s.top_k, min_keep)
        if s.top_p < 1.0:
            scores = keep_top_p(scores, s.top_p, min_keep)
    return scores


def gumbel_noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """-log(Exp(1)): argmax(scores + noise) samples softmax(scores); top-k of it samples k without replacement."""
    e = torch.empty_like(like).exponential_(generator=generator)
    return -e.clamp_(min=torch.finfo(e.dtype).tiny).log()


# ---- the LLM on the fixed cache


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
    """transformers' LlamaForCausalLM forward written out over a fixed cache, layer by layer (gpt-fast style).

    `compile=True` compiles, for decoding steps, the two halves of a layer around attention (norms, projections,
    rotary, MLP, adapter: many small kernels fused); cache writes and attention stay eager, so no compiled code
    mutates the cache. The prefill runs eagerly: once per batch, and its length varies.
    """

    def __init__(self, llm, compile: bool = False):
        self.llm = llm
        self.rotary = float32_rotary(llm)
        self.qkv, self.rest = decoder_layer_qkv, decoder_layer_rest
        if compile:
            self.qkv = torch.compile(decoder_layer_qkv, fullgraph=True, dynamic=False)
            self.rest = torch.compile(decoder_layer_rest, fullgraph=True, dynamic=False)

    def __call__(self, hidden, positions, k_caches, v_caches, slots, mask, prefill=False) -> torch.Tensor:
        """Float32 logits of `hidden` (batch, length, dim) at `positions` (prefill: of the last slot only); its keys
        and values go to `slots`."""
        model = self.llm.model
        qkv, rest = (decoder_layer_qkv, decoder_layer_rest) if prefill else (self.qkv, self.rest)
        cos, sin = self.rotary(hidden, positions)
        for layer, k_cache, v_cache in zip(model.layers, k_caches, v_caches):
            q, k, v = qkv(layer, hidden, cos, sin)
            attended = attend(q, k, v, k_cache, v_cache, slots, mask, layer.self_attn.scaling)
            hidden = rest(layer, hidden, attended)
        if prefill:
            hidden = hidden[:, -1:]
        return self.llm.lm_head(model.norm(hidden)).float()


# ---- buffers of one batch shape, and the search on them


class Workspace:
    """Everything a batch shape needs, allocated once: the KV cache, the search state, the step counter.

    All updates are in place, so CUDA graphs captured on these tensors replay on new batches.
    """

    def __init__(self, llm, batch: int, prompt_len: int, beams: int, max_new: int, device, dtype):
        cfg = llm.config
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        slots = _round16(prompt_len + beams * max_new)  # aligned rows for the attention kernels; spares stay masked
        self.slots = slots
        self.shape = (batch, prompt_len, beams, max_new)
        self.batch, self.prompt_len, self.beams, self.max_new = batch, prompt_len, beams, max_new
        self.k = [torch.zeros(batch, kv_heads, slots, head_dim, device=device, dtype=dtype)
                  for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros_like(t) for t in self.k]
        vocab = llm.lm_head.out_features
        z = dict(device=device)
        self.prompt_mask = torch.zeros(batch, prompt_len, dtype=torch.bool, **z)
        self.n_real = torch.zeros(batch, dtype=torch.long, **z)  # attended prompt tokens: positions continue here
        self.first_logits = torch.zeros(batch, vocab, **z)
        self.logits = torch.zeros(batch, beams, vocab, **z)
        self.step = torch.zeros((), dtype=torch.long, **z)
        self.done = torch.zeros((), dtype=torch.bool, **z)
        self.seqs = torch.zeros(batch, beams, max_new, dtype=torch.long, **z)  # running sequences
        self.history = torch.zeros(batch, beams, max_new, dtype=torch.long, **z)  # which beam slot holds token t
        self.parent = torch.zeros(batch, beams, dtype=torch.long, **z)
        self.unfinished = torch.ones(batch, dtype=torch.bool, **z)  # greedy / sampling
        self.gen_len = torch.zeros(batch, dtype=torch.long, **z)
        self.scores = torch.zeros(batch, beams, **z)  # beams: running scores
        self.fin_seqs = torch.zeros(batch, beams, max_new, dtype=torch.long, **z)
        self.fin_scores = torch.zeros(batch, beams, **z)
        self.fin_done = torch.zeros(batch, beams, dtype=torch.bool, **z)
        self.fin_len = torch.zeros(batch, beams, dtype=torch.long, **z)
        self.unsatisfied = torch.ones(batch, 1, dtype=torch.bool, **z)  # the early-stop heuristic
        self.penalties: dict[float, torch.Tensor] = {}
        self.graphs: dict[SearchSettings, dict] = {}  # per settings: {slots attended: step graph, "last": graph}
        self.pool = None

    def keys_at(self, step: int) -> int:
        """Slots a step attends over: the prompt and the generated slots up to the end of the step's block of
        BLOCK steps (step-major layout), so early steps read less of the cache. One CUDA graph per block."""
        block_end = min(self.max_new, (step // BLOCK + 1) * BLOCK)
        return min(self.slots, _round16(self.prompt_len + block_end * self.beams))

    def penalty(self, length_penalty: float) -> torch.Tensor:
        """n ** length_penalty for n = 0..max_new, as the Python floats transformers divides by."""
        if length_penalty not in self.penalties:
            table = [1.0] + [float(n ** length_penalty) for n in range(1, self.max_new + 1)]
            self.penalties[length_penalty] = torch.tensor(table, device=self.step.device)
        return self.penalties[length_penalty]

    def reset(self, s: SearchSettings) -> None:
        """Search state for a new batch (in place); the prompt's cache, first_logits and n_real are set already."""
        self.step.zero_()
        self.done.zero_()
        self.logits.copy_(self.first_logits[:, None, :].expand_as(self.logits))
        self.seqs.fill_(s.fill_id if s.num_beams > 1 else s.pad_id)
        self.history.zero_()
        self.parent.zero_()
        self.unfinished.fill_(True)
        self.gen_len.zero_()
        self.scores.zero_()
        self.scores[:, 1:] = NEG
        self.fin_seqs.fill_(s.fill_id)
        self.fin_scores.fill_(NEG)
        self.fin_done.zero_()
        self.fin_len.zero_()
        self.unsatisfied.fill_(True)


def select_greedy(ws: Workspace, s: SearchSettings, generator=None) -> None:
    """transformers' `_sample` step: the next token of every row (argmax, or a sample), pad after EOS."""
    i = ws.step
    seqs = ws.seqs[:, 0]
    scores = process_scores(s, ws.logits[:, 0], seqs, i)
    if s.do_sample:
        scores = scores + gumbel_noise(scores, generator)
    tokens = torch.where(ws.unfinished, scores.argmax(-1), s.pad_id)
    at = i.view(1, 1).expand(ws.batch, 1)
    seqs.scatter_(1, at, tokens[:, None])
    ws.gen_len.add_(ws.unfinished.long())
    ws.unfinished.logical_and_(~((tokens == s.eos_id) | (i + 1 >= s.max_new_tokens)))
    ws.done.copy_(~ws.unfinished.any())


def select_beams(ws: Workspace, s: SearchSettings, generator=None) -> None:
    """transformers' `_beam_search` step (top-k continuations, running beams, finished hypotheses, early stop),
    or its beam sampling variant: 2 * num_beams continuations drawn without replacement instead of the top ones."""
    b, k, t = ws.seqs.shape
    i = ws.step
    vocab = ws.logits.shape[-1]
    keep = 2 * k  # one EOS id: at least num_beams continuations are not finished
    log_probs = F.log_softmax(ws.logits, dim=-1).view(b * k, vocab)
    log_probs = process_scores(s, log_probs, ws.seqs.view(b * k, t), i)
    scores = (log_probs.view(b, k, vocab) + ws.scores[..., None]).view(b, k * vocab)
    if s.do_sample:
        picked = (scores + gumbel_noise(scores, generator)).topk(keep).indices
        top = scores.gather(1, picked)
        top, order = top.sort(dim=-1, descending=True)
        picked = picked.gather(1, order)
    else:
        top, picked = scores.topk(keep)
    source = picked // vocab
    ids = picked % vocab
    candidates = ws.seqs.gather(1, source[..., None].expand(b, keep, t))
    candidates.scatter_(2, i.view(1, 1, 1).expand(b, keep, 1), ids[..., None])
    hit = (ids == s.eos_id) | (i + 1 >= s.max_new_tokens)

    # running beams: the best continuations that did not finish
    running = top + hit.to(torch.float32) * NEG
    best = running.topk(k).indices
    ws.seqs.copy_(candidates.gather(1, best[..., None].expand(b, k, t)))
    ws.scores.copy_(running.gather(1, best))
    ws.parent.copy_(source.gather(1, best))

    # finished hypotheses: the best num_beams of the old ones and the ones that just finished among the top k
    penalty = ws.penalty(s.length_penalty)
    just_done = hit & (torch.arange(keep, device=hit.device) < k)
    final = top / penalty.index_select(0, (i + 1).view(1))
    if s.early_stopping is True:
        final = final + (ws.fin_done.all(-1, keepdim=True)).to(torch.float32) * NEG
    final = final + (~ws.unsatisfied).to(torch.float32) * NEG
    final = final + (~just_done) * NEG
    merged_scores = torch.cat((ws.fin_scores, final), dim=1)
    chosen = merged_scores.topk(k).indices
    length = (i + 1).view(1, 1).expand(b, keep)
    ws.fin_seqs.copy_(torch.cat((ws.fin_seqs, candidates), 1).gather(1, chosen[..., None].expand(b, k, t)))
    ws.fin_scores.copy_(merged_scores.gather(1, chosen))
    ws.fin_done.copy_(torch.cat((ws.fin_done, just_done), 1).gather(1, chosen))
    ws.fin_len.copy_(torch.cat((ws.fin_len, length), 1).gather(1, chosen))

    # can a running beam still beat the worst finished one? (transformers' heuristic, per row, sticky)
    if s.early_stopping == "never" and s.length_penalty > 0.0:
        hypothetical = penalty[s.max_new_tokens:]
    else:
        hypothetical = penalty.index_select(0, (i + 1).view(1))
    best_possible = ws.scores[:, :1] / hypothetical
    worst = torch.where(ws.fin_done, ws.fin_scores.min(dim=1, keepdim=True).values, NEG)
    ws.unsatisfied.logical_and_((best_possible > worst).any(dim=-1, keepdim=True))
    done = ~ws.unsatisfied.any()
    if s.early_stopping is True:
        done = done | ws.fin_done.all()
    ws.done.copy_(done)


class FastGenerator:
    """`generate` for Lynx's LLM on `inputs_embeds` with a fixed-size cache and graph-replayed steps.

    cuda_graphs (default: on CUDA) captures a step as a CUDA graph per batch shape and search settings; compile
    (default: off) additionally compiles the per-layer code with torch.compile. prompt_len pads every prompt to that
    many slots, inserting pads after the first prefix_len slots (Lynx: between the visual prefix and the text, where
    they change no position and no attended token), and batch_size pads every batch to that many rows, so one graph
    serves a whole test set. check_every: steps between checks of whether every row is done (one host sync each).
    """

    def __init__(self, llm, cuda_graphs: bool | None = None, compile: bool = False, prompt_len: int | None = None,
                 batch_size: int | None = None, prefix_len: int = 0, check_every: int = 8):
        self.llm = llm
        self.device = llm.lm_head.weight.device
        self.dtype = llm.lm_head.weight.dtype
        on_cuda = self.device.type == "cuda"
        self.cuda_graphs = on_cuda if cuda_graphs is None else (cuda_graphs and on_cuda)
        self.run = LlamaRunner(llm, compile=compile)
        self.prompt_len = prompt_len
        self.batch_size = batch_size
        self.prefix_len = prefix_len
        self.check_every = max(1, check_every)
        self.workspace: Workspace | None = None

    def resolve(self, generation_config: GenerationConfig) -> SearchSettings:
        """The search settings of a generation config; UnsupportedOptions for what only `generate` does."""
        return SearchSettings.resolve(self.llm, generation_config)

    @torch.inference_mode()
    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, generation_config: GenerationConfig,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Generated ids (batch, width) without the prompt, as `LLM.generate(inputs_embeds=..., attention_mask=...)`
        returns them: after EOS, pad (greedy, sampling) or the beam filler; width = the longest answer."""
        s = SearchSettings.resolve(self.llm, generation_config)
        rows = inputs_embeds.shape[0]
        embeds, mask = self._pad(inputs_embeds.to(self.device, self.dtype), attention_mask.to(self.device))
        ws = self._workspace(embeds.shape[0], embeds.shape[1], s.num_beams, s.max_new_tokens)
        self._prefill(ws, embeds, mask)
        use_graphs = self.cuda_graphs and generator is None
        if use_graphs and s not in ws.graphs:
            self._capture(ws, s)
        ws.reset(s)
        select = select_beams if s.num_beams > 1 else select_greedy
        graphs = ws.graphs.get(s) if use_graphs else None
        for step in range(s.max_new_tokens - 1):
            if graphs is not None:
                graphs[ws.keys_at(step)].replay()
            else:
                self._step(ws, s, select, ws.keys_at(step), generator)
            if (step + 1) % self.check_every == 0 and bool(ws.done):
                break
        else:
            if graphs is not None:
                graphs["last"].replay()
            else:
                select(ws, s, generator)
        if s.num_beams > 1:
            width = int(ws.fin_len[:rows, 0].max())
            return ws.fin_seqs[:rows, 0, :width].clone()
        width = int(ws.gen_len[:rows].max())
        return ws.seqs[:rows, 0, :width].clone()

    # -- internals

    def _pad(self, embeds: torch.Tensor, mask: torch.Tensor):
        """Pad to the fixed prompt length (pads inserted after prefix_len slots) and to the fixed batch size (copies
        of row 0, dropped later)."""
        b, length, dim = embeds.shape
        target = max(self.prompt_len or length, length)
        if target > length:
            prefix, grow = self.prefix_len, target - length
            embeds = torch.cat([embeds[:, :prefix], embeds.new_zeros(b, grow, dim), embeds[:, prefix:]], dim=1)
            mask = torch.cat([mask[:, :prefix], mask.new_zeros(b, grow), mask[:, prefix:]], dim=1)
        rows = max(self.batch_size or b, b)
        if rows > b:
            embeds = torch.cat([embeds, embeds[:1].expand(rows - b, -1, -1)])
            mask = torch.cat([mask, mask[:1].expand(rows - b, -1)])
        return embeds, mask

    def _workspace(self, batch: int, prompt_len: int, beams: int, max_new: int) -> Workspace:
        shape = (batch, prompt_len, beams, max_new)
        if self.workspace is None or self.workspace.shape != shape:
            self.workspace = None  # free the old cache and graphs first
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            try:
                self.workspace = Workspace(self.llm, batch, prompt_len, beams, max_new, self.device, self.dtype)
            except torch.OutOfMemoryError:
                self.batch_size = None  # a caller that retries with fewer rows must get a smaller cache
                raise
        return self.workspace

    def _prefill(self, ws: Workspace, embeds: torch.Tensor, mask: torch.Tensor) -> None:
        """The prompt once per row: its keys and values into slots [0, prompt_len), the first logits."""
        length = embeds.shape[1]
        attended = mask.bool()
        causal = torch.ones(length, length, dtype=torch.bool, device=self.device).tril()
        allowed = causal[None] & attended[:, None, :]
        allowed |= torch.eye(length, dtype=torch.bool, device=self.device) & ~allowed.any(-1, keepdim=True)  # no NaN
        additive = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill(~allowed, -math.inf)
        slots = torch.arange(length, device=self.device)
        logits = self.run(embeds, positions_from_mask(mask), ws.k, ws.v, slots, additive[:, None], prefill=True)
        ws.first_logits.copy_(logits[:, 0])
        ws.prompt_mask.copy_(attended)
        ws.n_real.copy_(mask.long().sum(-1))

    def _step(self, ws: Workspace, s: SearchSettings, select, n_keys: int, generator=None) -> None:
        """Choose token `step` of every beam, then run the model on it (attending over the first n_keys slots): the
        logits for the next choice."""
        select(ws, s, generator)
        b, k, t = ws.seqs.shape
        i = ws.step
        at = i.view(1, 1, 1).expand(b, k, 1)
        tokens = ws.seqs.gather(2, at)[..., 0]
        # beam k now continues beam parent[k]: it sees parent's slots for earlier tokens and its own slot for this one
        history = ws.history.gather(1, ws.parent[..., None].expand(b, k, t))
        own = torch.arange(k, device=self.device)
        history.scatter_(2, at, own.view(1, k, 1).expand(b, k, 1))
        ws.history.copy_(history)
        seen = torch.arange(t, device=self.device) <= i
        generated = (history[:, :, None, :] == own.view(1, 1, k, 1)) & seen  # (b, query beam, slot beam, step)
        generated = generated.transpose(2, 3).reshape(b, k, t * k)  # slot order: step-major
        spare = ws.slots - ws.prompt_len - t * k
        allowed = torch.cat([ws.prompt_mask[:, None, :].expand(b, k, ws.prompt_len), generated,
                             generated.new_zeros(b, k, spare)], dim=-1)[..., :n_keys]
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill(~allowed, -math.inf)
        slots = ws.prompt_len + i * k + own
        positions = (ws.n_real[:, None] + i).expand(b, k)
        hidden = self.llm.get_input_embeddings()(tokens)
        ws.logits.copy_(self.run(hidden, positions, ws.k, ws.v, slots, mask[:, None]))
        ws.step.add_(1)

    def _capture(self, ws: Workspace, s: SearchSettings) -> None:
        """Record `_step` (one graph per attention width) and the final token choice as CUDA graphs on the
        workspace's tensors."""
        select = select_beams if s.num_beams > 1 else select_greedy
        widths = sorted({ws.keys_at(step) for step in range(s.max_new_tokens - 1)})
        try:
            ws.reset(s)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: compile, pick kernels, allocate workspaces
                for _ in range(2):
                    for n_keys in widths[:s.max_new_tokens - 1]:  # the step counter must stay below max_new_tokens
                        self._step(ws, s, select, n_keys)
                    ws.reset(s)
                select(ws, s)
            torch.cuda.current_stream().wait_stream(side)
            ws.reset(s)
            ws.pool = ws.pool or torch.cuda.graph_pool_handle()
            graphs = {}
            for n_keys in widths + ["last"]:
                graphs[n_keys] = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graphs[n_keys], pool=ws.pool, capture_error_mode="thread_local"):
                    if n_keys == "last":
                        select(ws, s)
                    else:
                        self._step(ws, s, select, n_keys)
            ws.graphs[s] = graphs
        except Exception as err:  # decode step by step, uncompiled, instead: same tokens, only slower
            log.warning("compiling or capturing the decoding step failed (%s: %s); decoding without CUDA graphs",
                        type(err).__name__, (str(err).splitlines() or [""])[0])
            torch.cuda.synchronize()
            self.cuda_graphs = False
            self.run = LlamaRunner(self.llm)


class MediaAhead:
    """Lynx's ViT and resampler for the next batch on a side CUDA stream, while the LLM decodes this batch.

        ahead = MediaAhead(model)
        ahead.submit(batches[0].pixel_values)
        for j, batch in enumerate(batches):
            visual = ahead.take()
            if j + 1 < len(batches):
                ahead.submit(batches[j + 1].pixel_values)
            ...decode with visual...

    Off CUDA, `submit` only keeps the pixels and `take` encodes them.
    """

    def __init__(self, model):
        self.model = model
        self.stream = torch.cuda.Stream(device=model.device) if model.device.type == "cuda" else None
        self.pending = None

    def submit(self, pixel_values: torch.Tensor) -> None:
        if self.stream is None:
            self.pending = pixel_values
            return
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            visual = self.model.encode_media(pixel_values.to(self.model.device, non_blocking=True))
            done = torch.cuda.Event()
            done.record(self.stream)
        self.pending = (visual, done)

    def take(self) -> torch.Tensor:
        pending, self.pending = self.pending, None
        if self.stream is None:
            return self.model.encode_media(pending)
        visual, done = pending
        torch.cuda.current_stream().wait_event(done)
        visual.record_stream(torch.cuda.current_stream())  # made on the side stream, used and freed on this one
        return visual


def fast_decoder_for(model, cfg, device: str, generation_config: GenerationConfig,
                     compile: bool | None = None) -> FastGenerator | None:
    """The FastGenerator a Lynx run decodes with, or None for transformers' generate: `decoder: fast`, or `auto` on
    CUDA, and options the fast path reproduces. On CUDA, prompts are padded to num_bridge_tokens + max_input_tokens
    and batches to batch_size_test, so one CUDA graph serves every batch, and the layers are compiled."""
    if cfg.resolve_decoder(device) != "fast":
        return None
    try:
        SearchSettings.resolve(model.LLM, generation_config)
    except UnsupportedOptions as err:
        log.warning("%s; decoding with transformers' generate", err)
        return None
    if not str(device).startswith("cuda"):
        return FastGenerator(model.LLM, prefix_len=cfg.num_bridge_tokens)
    return FastGenerator(model.LLM, compile=True if compile is None else compile,
                         prompt_len=cfg.num_bridge_tokens + cfg.max_input_tokens, batch_size=cfg.batch_size_test,
                         prefix_len=cfg.num_bridge_tokens)
