"""The search rules of Lynx's own decoder: transformers 4.28.1's (the original's) greedy search, sampling, beam search
and beam sampling, with its BeamSearchScorer, written as tensor code on the fixed buffers of a `Workspace`.

The rules (tests/reference_428.py writes them out plainly; tests/test_decoding_rules.py checks one against the other):
- lengths count the one-token BOS placeholder 4.28 put in front of the answer: `min_length`, the n-gram ban and the
  repetition penalty see it (decoding/processors.py);
- greedy search and sampling process the raw logits; beam modes process log-softmax, add the beam score, and beam
  sampling then warps that sum (so a temperature divides the running score too);
- beam search starts beams 1.. at -1e9, beam sampling starts every beam at 0;
- sampling draws `torch.multinomial` over (rows, vocab) for one token, beam sampling over (prompts, beams x vocab) for
  2 x beams candidates, sorted by score (decoding/draws.py);
- the scorer: an EOS among the first `num_beams` candidates becomes a hypothesis scored sum / L ** length_penalty
  (L = placeholder + tokens before EOS); the first `num_beams` other candidates run on; a prompt is done once it
  holds `num_beams` hypotheses and the worst of them is at least the step's best candidate score / (L + 1) **
  length_penalty; at the length limit (`finalize`) every running beam of a prompt not done becomes a hypothesis with
  L = 1 + max_new_tokens. Hypothesis scores are float64, as 4.28's Python floats.

Nothing here syncs with the host, so a decoding step can be replayed as a CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from configs.decoding import DecodingSettings
from decoding.draws import draw
from decoding.processors import process, warp
from decoding.workspace import Workspace

NEG = -1.0e9  # 4.28's starting score of beams 1.. in beam search


@dataclass(frozen=True, kw_only=True)
class Search(DecodingSettings):
    """The options of one decoding call as the search uses them: `DecodingSettings.resolved()` (options that change
    nothing for these settings take neutral values, so settings that decode alike are one Search, one set of CUDA
    graphs) with the tokenizer's ids. `min_length` counts the placeholder: EOS is banned while 1 + generated <
    min_length."""

    eos_id: int
    pad_id: int  # after EOS (4.28: the pad id, or EOS without one)
    bos_id: int  # the placeholder
    early_stopping: bool = False  # 4.28's default; a Lynx config does not set it


def resolve(settings: DecodingSettings, pad_id: int | None, eos_id: int, bos_id: int) -> Search:
    """The search for these settings, as the original passed them to 4.28's `generate`."""
    return Search(**settings.resolved(), eos_id=eos_id, pad_id=pad_id if pad_id is not None else eos_id, bos_id=bos_id)


def start(ws: Workspace, s: Search) -> None:
    """Search state for a new batch (in place); the prompt's cache, first_logits and n_real are set already."""
    ws.step.zero_()
    ws.done.zero_()
    ws.logits.copy_(ws.first_logits[:, None, :].expand_as(ws.logits))
    ws.seqs.fill_(s.pad_id)
    ws.history.zero_()
    ws.parent.zero_()
    ws.unfinished.fill_(True)
    ws.gen_len.zero_()
    ws.scores.zero_()
    if not s.do_sample:  # beam search starts from beam 0; beam sampling from all beams alike (4.28)
        ws.scores[:, 1:] = NEG
    ws.hyp_seqs.fill_(s.pad_id)
    ws.hyp_len.zero_()
    ws.hyp_scores.zero_()
    ws.hyp_order.zero_()
    ws.hyp_used.zero_()
    ws.prompt_done.zero_()


# ---- greedy search and sampling (num_beams 1)


def select_rows(ws: Workspace, s: Search, generator=None) -> None:
    """4.28's `greedy_search` / `sample` step: the next token of every row (argmax, or one draw per row over the
    warped distribution, finished rows included), pad after EOS."""
    i = ws.step
    seqs = ws.seqs[:, 0]
    scores = process(s, ws.logits[:, 0], seqs, i)
    if s.do_sample:
        tokens = draw(warp(s, scores, min_keep=1).softmax(dim=-1), 1, generator)[:, 0]
    else:
        tokens = scores.argmax(dim=-1)
    tokens = torch.where(ws.unfinished, tokens, s.pad_id)
    seqs.scatter_(1, i.view(1, 1).expand(ws.batch, 1), tokens[:, None])
    ws.gen_len.add_(ws.unfinished.long())
    ws.unfinished.logical_and_((tokens != s.eos_id) & (i + 1 < s.max_new_tokens))
    ws.done.copy_(~ws.unfinished.any())


# ---- beam search and beam sampling


def candidates(ws: Workspace, s: Search, generator=None):
    """The step's 2 x num_beams candidates of every prompt, best first: (scores, source beams, token ids)."""
    b, k, t = ws.seqs.shape
    vocab = ws.logits.shape[-1]
    log_probs = F.log_softmax(ws.logits, dim=-1).view(b * k, vocab)
    scores = process(s, log_probs, ws.seqs.view(b * k, t), ws.step) + ws.scores.view(b * k, 1)
    if s.do_sample:
        flat = warp(s, scores, min_keep=2).view(b, k * vocab)
        picked = draw(flat.softmax(dim=-1), 2 * k, generator)
        top, order = torch.sort(flat.gather(1, picked), descending=True, dim=1)
        picked = picked.gather(1, order)
    else:
        top, picked = torch.topk(scores.view(b, k * vocab), 2 * k, dim=1, largest=True, sorted=True)
    return top, picked // vocab, picked % vocab


def add_hypotheses(ws: Workspace, s: Search, take: torch.Tensor, tokens: torch.Tensor, n_tokens,
                   sums: torch.Tensor, rank: int) -> None:
    """4.28's BeamHypotheses.add for every prompt where `take` (b,): `tokens` (b, max_new), the first `n_tokens`
    real, summed log-probs `sums` (b,), scored sums / L ** length_penalty in float64, L = n_tokens + 1 (the
    placeholder counts). A prompt keeps num_beams hypotheses; when full, a new one must beat the worst, which it
    replaces (the earliest added among equal worst). `rank`: the candidate's (or beam's) place among those added at
    this length, so additions are numbered n_tokens * num_beams + rank, for ties."""
    length, order = n_tokens + 1, n_tokens * ws.beams + rank
    used = ws.hyp_used
    score = sums.double() / ws.penalty(s.length_penalty).index_select(0, torch.as_tensor(length).view(1))
    full = used.all(dim=-1)
    worst = torch.where(used, ws.hyp_scores, torch.inf).min(dim=-1).values
    accept = take & (~full | (score > worst))
    first_free = (~used).long().argmax(dim=-1)
    at_worst = used & (ws.hyp_scores == worst[:, None])
    victim = torch.where(at_worst, ws.hyp_order, torch.iinfo(torch.long).max).argmin(dim=-1)
    slot = torch.where(full, victim, first_free)
    put = (torch.arange(ws.beams, device=used.device) == slot[:, None]) & accept[:, None]  # (b, k)
    ws.hyp_seqs.copy_(torch.where(put[..., None], tokens[:, None, :], ws.hyp_seqs))
    ws.hyp_scores.copy_(torch.where(put, score[:, None], ws.hyp_scores))
    ws.hyp_len.copy_(torch.where(put, n_tokens, ws.hyp_len))
    ws.hyp_order.copy_(torch.where(put, order, ws.hyp_order))
    ws.hyp_used.logical_or_(put)


def select_beams(ws: Workspace, s: Search, generator=None) -> None:
    """4.28's `beam_search` / `beam_sample` step with BeamSearchScorer.process: candidates, hypotheses, the running
    beams of the next step, and whether each prompt is done."""
    b, k, t = ws.seqs.shape
    i = ws.step
    top, source, ids = candidates(ws, s, generator)
    active = ~ws.prompt_done
    is_eos = ids == s.eos_id

    # an EOS among the first num_beams candidates: a hypothesis of the tokens before it, one after another
    for rank in range(k):
        before = ws.seqs.gather(1, source[:, rank].view(b, 1, 1).expand(b, 1, t))[:, 0]
        add_hypotheses(ws, s, active & is_eos[:, rank], before, i, top[:, rank], rank)

    # the first num_beams candidates that are not EOS run on; a prompt done before: pad on beam 0, score 0 (4.28)
    rank = torch.arange(2 * k, device=ids.device)
    first = torch.where(is_eos, rank + 2 * k, rank).topk(k, largest=False, sorted=True).indices
    parent = torch.where(active[:, None], source.gather(1, first), 0)
    tokens = torch.where(active[:, None], ids.gather(1, first), s.pad_id)
    scores = torch.where(active[:, None], top.gather(1, first), 0.0)
    seqs = ws.seqs.gather(1, parent[..., None].expand(b, k, t))
    seqs.scatter_(2, i.view(1, 1, 1).expand(b, k, 1), tokens[..., None])
    ws.seqs.copy_(seqs)
    ws.scores.copy_(scores)
    ws.parent.copy_(parent)

    # done: num_beams hypotheses, none of which the best candidate could still beat (4.28's heuristic)
    full = ws.hyp_used.all(dim=-1)
    if s.early_stopping:
        finished = full
    else:
        best_possible = top.max(dim=1).values.double() / ws.penalty(s.length_penalty).index_select(0, (i + 2).view(1))
        worst = torch.where(ws.hyp_used, ws.hyp_scores, torch.inf).min(dim=-1).values
        finished = full & (worst >= best_possible)
    ws.prompt_done.logical_or_(active & finished)
    ws.done.copy_(ws.prompt_done.all())


def finalize(ws: Workspace, s: Search) -> None:
    """4.28's BeamSearchScorer.finalize: every running beam of a prompt not done (the search reached the length
    limit) becomes a hypothesis of max_new_tokens tokens, scored with L = 1 + max_new_tokens. After an early stop
    every prompt is done and nothing is added."""
    k, t = ws.beams, s.max_new_tokens
    open_prompts = ~ws.prompt_done
    for beam in range(k):
        add_hypotheses(ws, s, open_prompts, ws.seqs[:, beam], t, ws.scores[:, beam], beam)


def selector(s: Search):
    """The token choice for these settings."""
    return select_beams if s.num_beams > 1 else select_rows


def answers(ws: Workspace, s: Search, rows: int) -> torch.Tensor:
    """The first `rows` rows' generated ids (rows, T) as 4.28 returns them without the placeholder. Greedy and
    sampling: each row's tokens, pad after EOS, T = the longest. Beams (after `finalize`): each prompt's best
    hypothesis (the highest score; among equal ones the last added), then EOS where it fits, then pad; T = the
    longest hypothesis + 1, at most max_new_tokens."""
    if s.num_beams == 1:
        width = int(ws.gen_len[:rows].max())
        return ws.seqs[:rows, 0, :width].clone()
    used, scores = ws.hyp_used[:rows], ws.hyp_scores[:rows]
    best = torch.where(used, scores, -torch.inf).max(dim=-1, keepdim=True).values
    pick = torch.where(used & (scores == best), ws.hyp_order[:rows], -1).argmax(dim=-1, keepdim=True)
    tokens = ws.hyp_seqs[:rows].gather(1, pick[..., None].expand(-1, 1, ws.max_new))[:, 0]
    n = ws.hyp_len[:rows].gather(1, pick)  # (rows, 1)
    width = min(int(n.max()) + 1, ws.max_new)
    at = torch.arange(width, device=n.device)
    out = torch.where(at < n, tokens[:, :width], s.pad_id)
    return torch.where(at == n, s.eos_id, out)
