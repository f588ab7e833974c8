"""transformers 4.28.1's `generate` as the original Lynx called it, written out plainly: the specification of Lynx's
decoder. Speed does not matter here; every rule is a visible line. Checked against the original's own outputs
(tests/test_reference_428.py, fixtures in tests/fixtures/tiny/expected/{sampling,maxlen}).

The original called `LLM.generate(inputs_embeds=..., attention_mask=..., do_sample, num_beams, top_p, top_k,
temperature, max_new_tokens, min_length, repetition_penalty, length_penalty, no_repeat_ngram_size,
num_return_sequences=1, pad_token_id, eos_token_id)`. How 4.28.1 (generation/utils.py, beam_search.py,
logits_process.py) decodes that, and where transformers 5.24 differs:

1. Output rows start with a BOS placeholder (`_maybe_initialize_input_ids_for_generation`); every length counts it:
   `max_length = 1 + max_new_tokens`; `min_length` bans EOS while 1 + generated < min_length (5.24 rewrites
   min_length to max(min_length - prompt length, 0): no ban); the returned rows begin with it (5.24: generated only).
2. n-gram blocking and repetition penalty look at placeholder + generated ids (5.24: generated only): after a
   generated id 1 (BOS) the answer's first token is banned; with a penalty, id 1 is always penalised.
3. Processor order: repetition penalty, n-gram ban, min length; then the warpers temperature, top-k, top-p
   (`_get_logits_processor`, `_get_logits_warper`). Greedy and sampling process raw logits; beam modes process
   log_softmax. Top-k/top-p keep at least 2 tokens with beams, 1 without (5.24: the same for one EOS id).
4. Beam search starts beams 1.. at -1e9; beam sampling starts ALL beams at 0 (5.24: -1e9 for both), so its first
   step samples from num_beams identical copies of the first distribution.
5. Beam sampling warps (processed log-probs + beam score): the temperature divides the running score too, which
   then carries on in the beam scores and hypothesis scores (5.24: the temperature divides the step's log-probs
   only). Candidates: `torch.multinomial(softmax over num_beams x vocab), 2 * num_beams)`, sorted by score.
6. `BeamSearchScorer`: a candidate EOS ranked below num_beams is dropped; a finished hypothesis is scored
   sum / L ** length_penalty with L = generated tokens incl. EOS; once num_beams are kept, `is_done`
   (early_stopping False) compares the worst with the step's best candidate score / (1 + generated) **
   length_penalty (5.24: the best running beam / generated ** length_penalty); at the length limit `finalize`
   adds every running beam of an unfinished prompt with L = 1 + max_new_tokens (5.24: only candidates ranked
   below num_beams, L = max_new_tokens).
7. Filler: pad after EOS in greedy/sampling rows; beam rows get EOS after a shorter hypothesis, then pad.
"""
from __future__ import annotations

import torch

from configs.decoding import DecodingSettings
from models.lynx import positions_from_mask

NEG_INF = -float("inf")


def llm_logits(llm, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor):
    """A logits function over the LLM without a cache: prompt rows `rows` followed by their generated ids (not the
    placeholder, which 4.28 never fed to the model), positions = cumulative mask - 1 with pads at 1."""
    embed = llm.get_input_embeddings()

    @torch.no_grad()
    def logits(rows: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        # Identical rows (beams that are copies of each other) are computed once.
        keys, back = torch.unique(torch.cat([rows[:, None], generated], dim=1), dim=0, return_inverse=True)
        rows, generated = keys[:, 0], keys[:, 1:]
        embeds, mask = inputs_embeds[rows], attention_mask[rows]
        if generated.shape[1]:
            embeds = torch.cat([embeds, embed(generated).to(embeds.dtype)], dim=1)
            mask = torch.cat([mask, mask.new_ones(generated.shape)], dim=1)
        out = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False)
        return out.logits[:, -1].float()[back]

    return logits


def settings_from_kwargs(kwargs: dict) -> DecodingSettings:
    """The DecodingSettings of the original's `generate` keyword arguments (as saved with the fixtures)."""
    return DecodingSettings(
        max_new_tokens=kwargs["max_new_tokens"], min_length=kwargs["min_length"], num_beams=kwargs["num_beams"],
        use_nucleus_sampling=kwargs["do_sample"], temperature=float(kwargs["temperature"]), top_k=kwargs["top_k"],
        top_p=float(kwargs["top_p"]), no_repeat_ngram_size=kwargs["no_repeat_ngram_size"],
        length_penalty=float(kwargs["length_penalty"]), repetition_penalty=float(kwargs["repetition_penalty"]))


# ---- logits processors: act on each row's scores given that row's ids (placeholder + generated) ----

def process(scores: torch.Tensor, seqs: torch.Tensor, s: DecodingSettings, eos_id: int) -> torch.Tensor:
    """Repetition penalty, then the n-gram ban, then the min-length ban (4.28's order), in place."""
    if s.repetition_penalty != 1.0:
        for r in range(len(scores)):
            seen = torch.unique(seqs[r])
            old = scores[r, seen]
            scores[r, seen] = torch.where(old < 0, old * s.repetition_penalty, old / s.repetition_penalty)
    n = s.no_repeat_ngram_size
    if n > 0:
        for r in range(len(scores)):
            ids = seqs[r].tolist()
            tail = ids[len(ids) - n + 1:] if n > 1 else []
            for i in range(len(ids) - n + 1):
                if ids[i:i + n - 1] == tail:
                    scores[r, ids[i + n - 1]] = NEG_INF
    if seqs.shape[1] < s.min_length:
        scores[:, eos_id] = NEG_INF
    return scores


def warp(scores: torch.Tensor, s: DecodingSettings, keep: int) -> torch.Tensor:
    """Temperature, top-k, top-p (4.28's order); top-k and top-p keep at least `keep` tokens of each row."""
    if s.temperature != 1.0:
        scores = scores / s.temperature
    if s.top_k != 0:
        k = min(max(s.top_k, keep), scores.shape[-1])
        kth_best = torch.topk(scores, k).values[..., -1:]
        scores = scores.masked_fill(scores < kth_best, NEG_INF)  # ties with the k-th score stay
    if s.top_p < 1.0:
        # Sort ascending; drop the low tail while its total probability is at most 1 - top_p, except the `keep` best.
        ascending, order = torch.sort(scores, descending=False)
        tail_mass = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = tail_mass <= (1 - s.top_p)
        if keep > 1:
            drop_sorted[..., -keep:] = False
        drop = drop_sorted.scatter(1, order, drop_sorted)
        scores = scores.masked_fill(drop, NEG_INF)
    return scores


# ---- greedy and sampling (num_beams 1) ----

def decode_rows(logits_fn, batch_size: int, s: DecodingSettings, eos_id: int, pad_id: int, bos_id: int):
    """Greedy (argmax) or sampling (one `torch.multinomial` draw per row, all rows in one call, finished rows
    included) on processed raw logits; finished rows get `pad_id`; stops when every row has ended or at the limit."""
    rows = torch.arange(batch_size)
    seqs = torch.full((batch_size, 1), bos_id, dtype=torch.long)
    running = torch.ones(batch_size, dtype=torch.bool)
    while True:
        scores = process(logits_fn(rows, seqs[:, 1:]), seqs, s, eos_id)
        if s.use_nucleus_sampling:
            probs = warp(scores, s, keep=1).softmax(dim=-1)
            tokens = torch.multinomial(probs, num_samples=1)[:, 0]
        else:
            tokens = scores.argmax(dim=-1)
        tokens = torch.where(running, tokens, torch.full_like(tokens, pad_id))
        seqs = torch.cat([seqs, tokens[:, None]], dim=1)
        running &= tokens != eos_id
        if not running.any() or seqs.shape[1] >= 1 + s.max_new_tokens:
            return seqs


# ---- beam search and beam sampling ----

class Finished:
    """The finished hypotheses of one prompt (4.28's BeamHypotheses): at most num_beams, the worst dropped."""

    def __init__(self, num_beams: int, length_penalty: float, early_stopping):
        self.num_beams, self.length_penalty, self.early_stopping = num_beams, length_penalty, early_stopping
        self.items: list[tuple[float, torch.Tensor]] = []
        self.worst = 1e9

    def add(self, ids: torch.Tensor, sum_logprobs: float):
        """`ids`: placeholder + tokens before EOS, so its length is the number of generated tokens incl. EOS."""
        score = sum_logprobs / (ids.shape[-1] ** self.length_penalty)
        if len(self.items) < self.num_beams or score > self.worst:
            self.items.append((score, ids))
            if len(self.items) > self.num_beams:
                ranked = sorted((item_score, i) for i, (item_score, _) in enumerate(self.items))
                del self.items[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_candidate_score: float, cur_len: int) -> bool:
        """cur_len: placeholder + generated tokens after this step."""
        if len(self.items) < self.num_beams:
            return False
        if self.early_stopping is True:
            return True
        return self.worst >= best_candidate_score / cur_len ** self.length_penalty

    def best(self) -> torch.Tensor:
        """Highest score; among equal scores the one added last."""
        return sorted(self.items, key=lambda item: item[0])[-1][1]


def decode_beams(logits_fn, batch_size: int, s: DecodingSettings, eos_id: int, pad_id: int, bos_id: int,
                 early_stopping=False, trace: list | None = None):
    """Beam search (top 2 * num_beams candidates) or beam sampling (2 * num_beams drawn without replacement).
    `trace`, when given, receives per step the candidates (scores, beam, token) of every prompt."""
    nb, sample = s.num_beams, s.use_nucleus_sampling
    rows = torch.arange(batch_size).repeat_interleave(nb)  # the prompt each beam row continues
    seqs = torch.full((batch_size * nb, 1), bos_id, dtype=torch.long)
    beam_scores = torch.zeros(batch_size, nb)
    if not sample:
        beam_scores[:, 1:] = -1e9
    beam_scores = beam_scores.view(-1)
    finished = [Finished(nb, s.length_penalty, early_stopping) for _ in range(batch_size)]
    done = [False] * batch_size
    while True:
        logits = logits_fn(rows, seqs[:, 1:])
        scores = process(logits.log_softmax(dim=-1), seqs, s, eos_id) + beam_scores[:, None]
        if sample:
            scores = warp(scores, s, keep=2)
        vocab = scores.shape[-1]
        flat = scores.view(batch_size, nb * vocab)
        if sample:
            picked = torch.multinomial(flat.softmax(dim=-1), num_samples=2 * nb)
            cand_scores, order = torch.sort(flat.gather(1, picked), descending=True, dim=1)
            picked = picked.gather(1, order)
        else:
            cand_scores, picked = torch.topk(flat, 2 * nb, dim=1, largest=True, sorted=True)
        cand_beams, cand_tokens = picked // vocab, picked % vocab
        if trace is not None:
            trace.append((cand_scores.clone(), cand_beams.clone(), cand_tokens.clone()))

        cur_len = seqs.shape[1]
        next_scores = torch.zeros(batch_size, nb)
        next_tokens = torch.full((batch_size, nb), pad_id, dtype=torch.long)
        next_rows = torch.zeros(batch_size, nb, dtype=torch.long)  # a finished prompt's rows all point at row 0
        for b in range(batch_size):
            if done[b]:
                continue
            kept = 0
            for rank in range(2 * nb):
                row = b * nb + int(cand_beams[b, rank])
                token = int(cand_tokens[b, rank])
                if token == eos_id:
                    if rank < nb:
                        finished[b].add(seqs[row].clone(), cand_scores[b, rank].item())
                else:
                    next_scores[b, kept], next_tokens[b, kept], next_rows[b, kept] = cand_scores[b, rank], token, row
                    kept += 1
                if kept == nb:
                    break
            done[b] = done[b] or finished[b].is_done(cand_scores[b].max().item(), cur_len + 1)
        next_rows = next_rows.view(-1)
        seqs = torch.cat([seqs[next_rows], next_tokens.view(-1, 1)], dim=1)
        rows = rows[next_rows]
        beam_scores = next_scores.view(-1)
        if all(done) or seqs.shape[1] >= 1 + s.max_new_tokens:
            break

    for b in range(batch_size):  # at the limit, every running beam of an unfinished prompt becomes a hypothesis
        if not done[b]:
            for row in range(b * nb, (b + 1) * nb):
                finished[b].add(seqs[row], beam_scores[row].item())
    best = [f.best() for f in finished]
    width = min(max(len(h) for h in best) + 1, 1 + s.max_new_tokens)
    out = torch.full((batch_size, width), pad_id, dtype=torch.long)
    for b, hyp in enumerate(best):
        out[b, :len(hyp)] = hyp
        if len(hyp) < width:
            out[b, len(hyp)] = eos_id
    return out


def reference_generate(logits_fn, batch_size: int, s: DecodingSettings, *, eos_id: int, pad_id: int, bos_id: int = 1,
                       early_stopping=False, trace: list | None = None) -> torch.Tensor:
    """The rows 4.28.1's generate returned: the placeholder `bos_id`, the generated ids, then filler. Sampled modes
    draw from torch's default generator (seed it with `torch.manual_seed` first, as the original was seeded).
    `logits_fn(rows, generated)`: next-token logits of prompt `rows` continued by `generated` (see `llm_logits`).
    `early_stopping`: 4.28's option (the original never set it: False)."""
    if s.num_beams == 1:
        return decode_rows(logits_fn, batch_size, s, eos_id, pad_id, bos_id)
    return decode_beams(logits_fn, batch_size, s, eos_id, pad_id, bos_id, early_stopping, trace)


def answer_ids(sequences: torch.Tensor, eos_id: int) -> list[list[int]]:
    """Generated ids of each row: placeholder removed, cut after the first EOS (kept)."""
    answers = []
    for row in sequences[:, 1:].tolist():
        answers.append(row[:row.index(eos_id) + 1] if eos_id in row else row)
    return answers
