"""The search rules of Lynx's own decoder: the options of one call, transformers' logits processors, and the token
choice of greedy search, sampling, beam search and beam sampling, as transformers' `generate` (5.24) makes them.

Everything here is plain tensor code on the fixed buffers of a `Workspace` with the step as a tensor: no host sync,
so a decoding step can be replayed as a CUDA graph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from configs.decoding import DecodingSettings

if TYPE_CHECKING:
    from decoding.workspace import Workspace

NEG = -1.0e9  # transformers' score for a beam that must not be chosen


@dataclass(frozen=True)
class Search:
    """The options of one decoding call as the search uses them: a DecodingSettings with the tokenizer's ids, and
    the options a Lynx config does not set at transformers' defaults. Keys that change nothing for these settings
    (sampling keys without sampling, length_penalty with one beam) take neutral values, so settings that decode
    alike are one Search (one set of CUDA graphs)."""

    max_new_tokens: int
    min_new_tokens: int
    num_beams: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    no_repeat_ngram_size: int
    length_penalty: float
    eos_id: int
    pad_id: int  # written after EOS by greedy search and sampling
    fill_id: int  # beam search's filler after EOS (transformers: `pad_token_id or eos_token_id`)
    early_stopping: bool | str = False  # transformers' default; a Lynx config does not set it


def unsupported(settings: DecodingSettings) -> str | None:
    """Why the fast decoder cannot reproduce these settings, or None when it can."""
    if settings.repetition_penalty != 1.0:
        return f"the fast decoder does not support repetition_penalty {settings.repetition_penalty}"
    return None


def resolve(settings: DecodingSettings, pad_id: int, eos_id: int) -> Search:
    """The search for these settings, as decoding.hf hands them to `generate`. `min_length` counts the original's
    one-token placeholder (configs/decoding.py), so min_new_tokens = min_length - 1."""
    sampling = settings.use_nucleus_sampling
    beams = settings.num_beams
    return Search(
        max_new_tokens=settings.max_new_tokens,
        min_new_tokens=max(settings.min_length - 1, 0),
        num_beams=beams,
        do_sample=sampling,
        temperature=float(settings.temperature) if sampling else 1.0,
        top_k=settings.top_k if sampling else 0,
        top_p=float(settings.top_p) if sampling else 1.0,
        no_repeat_ngram_size=settings.no_repeat_ngram_size,
        length_penalty=float(settings.length_penalty) if beams > 1 else 1.0,
        eos_id=eos_id,
        pad_id=pad_id,
        fill_id=pad_id or eos_id,
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


def process_scores(s: Search, scores: torch.Tensor, tokens: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
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


# ---- token choice: one step of the search, in place on the workspace


def select_greedy(ws: Workspace, s: Search, generator=None) -> None:
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


def select_beams(ws: Workspace, s: Search, generator=None) -> None:
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


def selector(s: Search):
    """The token choice for these settings."""
    return select_beams if s.num_beams > 1 else select_greedy
