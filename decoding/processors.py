"""transformers 4.28.1's logits processors and warpers, as the original's `generate` applied them, written for fixed
buffers: the generated tokens sit in a fixed-width tensor and the step is a tensor, so no host sync is needed and a
decoding step can be replayed as a CUDA graph.

4.28 starts every output row with a one-token BOS placeholder (generating from `inputs_embeds`), and its processors
see it: the n-gram ban and the repetition penalty look at placeholder + generated ids, and `min_length` counts it.
"""
from __future__ import annotations

import math

import torch


def with_placeholder(tokens: torch.Tensor, bos_id: int) -> torch.Tensor:
    """(rows, 1 + width): the placeholder in front of the generated tokens."""
    return torch.cat([tokens.new_full((tokens.shape[0], 1), bos_id), tokens], dim=1)


def penalise_repeats(scores: torch.Tensor, ids: torch.Tensor, length: torch.Tensor, penalty: float) -> torch.Tensor:
    """RepetitionPenaltyLogitsProcessor on ids[:, :length]: the score of a token already there is divided by the
    penalty when positive, multiplied by it when negative."""
    rows, width = ids.shape
    vocab = scores.shape[-1]
    valid = torch.arange(width, device=ids.device) < length
    seen = torch.zeros((rows, vocab + 1), dtype=torch.bool, device=scores.device)
    seen.scatter_(1, torch.where(valid, ids.clamp(max=vocab), vocab), True)
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen[:, :vocab], penalised, scores)


def ban_repeated_ngrams(scores: torch.Tensor, ids: torch.Tensor, length: torch.Tensor, n: int) -> torch.Tensor:
    """NoRepeatNGramLogitsProcessor on ids[:, :length]: a token that would repeat an n-gram seen so far is banned."""
    rows, width = ids.shape
    vocab = scores.shape[-1]
    if n <= 0 or width < n:
        return scores
    windows = ids.unfold(1, n, 1)  # (rows, width - n + 1, n)
    starts = torch.arange(windows.shape[1], device=ids.device)
    complete = starts + n <= length  # the window lies inside the ids so far
    prefix_at = (length - n + 1 + torch.arange(n - 1, device=ids.device)).clamp(min=0)
    prefix = ids.index_select(1, prefix_at)  # the last n - 1 ids
    matches = (windows[..., :-1] == prefix[:, None, :]).all(-1) & complete
    banned = torch.zeros((rows, vocab + 1), dtype=torch.bool, device=scores.device)
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab), vocab), True)
    return scores.masked_fill(banned[:, :vocab], -math.inf)


def ban_early_eos(scores: torch.Tensor, length: torch.Tensor, min_length: int, eos_id: int) -> torch.Tensor:
    """MinLengthLogitsProcessor: EOS is impossible while the row (placeholder included) is shorter than
    min_length."""
    if min_length <= 1:
        return scores
    is_eos = torch.arange(scores.shape[-1], device=scores.device) == eos_id
    return scores.masked_fill(is_eos & (length < min_length), -math.inf)


def keep_top_k(scores: torch.Tensor, k: int, min_keep: int = 1) -> torch.Tensor:
    """TopKLogitsWarper: scores below the k-th best of the row are dropped (ties with it stay)."""
    k = min(max(k, min_keep), scores.shape[-1])
    kth = torch.topk(scores, k).values[..., -1:]
    return scores.masked_fill(scores < kth, -math.inf)


def keep_top_p(scores: torch.Tensor, p: float, min_keep: int = 1) -> torch.Tensor:
    """TopPLogitsWarper: sorted ascending, the low tail is dropped while its probability adds up to at most 1 - p;
    the min_keep best always stay. (4.28 forces that only for min_keep > 1; with 1 the best token stays anyway
    unless p is so small that 4.28 would drop every token and fail.)"""
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - p)
    remove[..., -min_keep:] = False
    remove = remove.scatter(1, order, remove)
    return scores.masked_fill(remove, -math.inf)


def process(s, scores: torch.Tensor, tokens: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """4.28's processors in its order (repetition penalty, n-gram ban, min length) on (rows, vocab) scores;
    tokens: (rows, width) generated ids, the first `step` of them real; s: a decoding.search.Search."""
    length = step + 1  # the placeholder counts
    if s.repetition_penalty != 1.0 or s.no_repeat_ngram_size > 0:
        ids = with_placeholder(tokens, s.bos_id)
        if s.repetition_penalty != 1.0:
            scores = penalise_repeats(scores, ids, length, s.repetition_penalty)
        scores = ban_repeated_ngrams(scores, ids, length, s.no_repeat_ngram_size)
    return ban_early_eos(scores, length, s.min_length, s.eos_id)


def warp(s, scores: torch.Tensor, min_keep: int) -> torch.Tensor:
    """4.28's warpers in its order (temperature, top-k, top-p); top-k and top-p keep at least min_keep tokens of
    each row (4.28: 2 with beams, 1 without)."""
    if s.temperature != 1.0:
        scores = scores / s.temperature
    if s.top_k:
        scores = keep_top_k(scores, s.top_k, min_keep)
    if s.top_p < 1.0:
        scores = keep_top_p(scores, s.top_p, min_keep)
    return scores
