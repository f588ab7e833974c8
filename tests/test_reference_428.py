"""The written-out transformers 4.28.1 decoding (tests/reference_428.py) against the original's own outputs, and its
sampling rules checked by their distributions."""
import dataclasses
import json
import math
import warnings

import pytest
import torch

from configs.decoding import DecodingSettings
from conftest import FIXTURE, batch_inputs, build_tiny_lynx, saved_rows
from reference_428 import answer_ids, llm_logits, reference_generate, settings_from_kwargs

EXPECTED = FIXTURE / "expected"
BATCHES = {"images": 4, "videos": 2}
EOS, PAD = 2, 1000


@pytest.fixture(scope="module")
def llm():
    """The fixture's LLM with Lynx's adapters, float32; one thread, as the original's fixture runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build_tiny_lynx()[1].LLM
    torch.set_num_threads(threads)




def run(llm, inputs: dict, settings: DecodingSettings) -> torch.Tensor:
    logits = llm_logits(llm, inputs["inputs_embeds"], inputs["attention_mask"])
    return reference_generate(logits, len(inputs["attention_mask"]), settings, eos_id=EOS, pad_id=PAD)




# ---- the original's outputs ----

@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("kind", BATCHES)
def test_beam_sampling_gives_the_original_ids_for_every_batch_and_seed(llm, kind, seed):
    saved = torch.load(EXPECTED / "sampling" / f"{kind}_seed{seed}_ids.pt", weights_only=True)
    for b in range(BATCHES[kind]):
        inputs = batch_inputs(kind, b)
        torch.manual_seed(seed + b)  # the original seeded batch b with seed + b right before generate
        sequences = run(llm, inputs, settings_from_kwargs(inputs["generate_kwargs"]))
        assert sequences.tolist() == saved_rows(saved, "sequences", b), f"batch {b}"
        assert answer_ids(sequences, EOS) == saved_rows(saved, "generated_ids", b)


@pytest.mark.parametrize("max_new_tokens", [4, 6, 8])
@pytest.mark.parametrize("kind", BATCHES)
def test_beam_search_at_the_length_limit_gives_the_original_ids(llm, kind, max_new_tokens):
    saved = torch.load(EXPECTED / "maxlen" / f"{kind}_beam5_mnt{max_new_tokens}_ids.pt", weights_only=True)
    settings = settings_from_kwargs(saved["generate_kwargs"])
    for b in range(BATCHES[kind]):
        assert run(llm, batch_inputs(kind, b), settings).tolist() == saved_rows(saved, "sequences", b), f"batch {b}"


@pytest.mark.parametrize("mode", ["greedy", "beam5"])
@pytest.mark.parametrize("kind", BATCHES)
def test_greedy_and_beam_search_give_the_original_ids(llm, kind, mode):
    meta = [json.loads(line) for line in open(EXPECTED / f"{kind}_meta.jsonl")]
    for b in range(BATCHES[kind]):
        inputs = batch_inputs(kind, b)
        settings = dataclasses.replace(settings_from_kwargs(inputs["generate_kwargs"]), use_nucleus_sampling=False,
                                       num_beams=1 if mode == "greedy" else 5)
        want = [m[f"{mode}_ids"] for m in sorted(meta, key=lambda m: m["row"]) if m["batch"] == b]
        assert answer_ids(run(llm, inputs, settings), EOS) == want


def test_plain_sampling_draws_as_transformers_does(llm):
    """No original data for num_beams 1 sampling; transformers 5.24 draws the same way there (one multinomial over
    batch x vocab per step), so its answers must equal the reference's for the same seed."""
    from transformers import GenerationConfig

    settings = DecodingSettings(max_new_tokens=24, min_length=2, num_beams=1, use_nucleus_sampling=True,
                                temperature=0.8, top_k=5, top_p=0.9, no_repeat_ngram_size=2, length_penalty=1.0,
                                repetition_penalty=1.0)
    gen = GenerationConfig(do_sample=True, num_beams=1, top_k=5, top_p=0.9, temperature=0.8, max_new_tokens=24,
                           min_new_tokens=1, no_repeat_ngram_size=2, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=1)
    answers = set()
    for kind, b in (("images", 0), ("videos", 1)):
        inputs = batch_inputs(kind, b)
        for seed in range(3):
            torch.manual_seed(seed)
            ours = answer_ids(run(llm, inputs, settings), EOS)
            torch.manual_seed(seed)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                theirs = llm.generate(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"],
                                      generation_config=gen)
            assert ours == answer_ids(torch.cat([torch.ones_like(theirs[:, :1]), theirs], dim=1), EOS)
            answers.update(map(tuple, ours))
    assert len(answers) > 9  # 18 rows, sampled: not one fixed answer per prompt


# ---- toy logits: the rules one by one ----

def toy(settings: dict, **changes) -> DecodingSettings:
    base = dict(max_new_tokens=1, min_length=2, num_beams=1, use_nucleus_sampling=True, temperature=1.0, top_k=0,
                top_p=1.0, no_repeat_ngram_size=0, length_penalty=1.0, repetition_penalty=1.0)
    return DecodingSettings(**{**base, **settings, **changes})


# Token 2 is EOS: the most likely token, banned as the first by min_length 2.
TOY_LOGITS = torch.tensor([0.2, -0.4, 3.0, 1.6, 1.4, 1.3, 1.1, 0.9, 0.6, 0.4])


def fixed_logits(rows, generated):
    return TOY_LOGITS.expand(len(rows), -1).clone()


def markov_logits(table):
    """Logits chosen by the last generated token (row 0 of `table` for the first step)."""
    def logits(rows, generated):
        last = generated[:, -1] + 1 if generated.shape[1] else torch.zeros(len(rows), dtype=torch.long)
        return table[last.clamp(max=len(table) - 1)].clone()
    return logits


def warped_probs(s: DecodingSettings, keep: int) -> dict[int, float]:
    """The warped first-step distribution, computed independently: EOS banned, temperature, top-k (at least `keep`),
    top-p (keep a token while the tokens above it hold less than top_p; at least `keep`)."""
    logits = {t: v / s.temperature for t, v in enumerate(TOY_LOGITS.tolist()) if t != EOS}
    ranked = sorted(logits, key=logits.get, reverse=True)
    if s.top_k:
        ranked = ranked[:max(s.top_k, keep)]
    z = sum(math.exp(logits[t]) for t in ranked)
    probs = {t: math.exp(logits[t]) / z for t in ranked}
    kept, above = [], 0.0
    for t in ranked:
        if above < s.top_p or len(kept) < keep:
            kept.append(t)
        above += probs[t]
    z = sum(probs[t] for t in kept)
    return {t: probs[t] / z for t in kept}


def drawn_counts_probs(weights: dict[int, float], copies: int, draws: int) -> dict[tuple, float]:
    """Drawing `draws` of `copies` identical beams x tokens without replacement (successive draws in proportion to
    the weights, which is what torch.multinomial without replacement does): the exact probability of each outcome,
    as (token, copies drawn) pairs of the tokens drawn, most likely token first."""
    tokens = sorted(weights, key=weights.get, reverse=True)
    states = {tuple([0] * len(tokens)): 1.0}
    for _ in range(draws):
        following = {}
        for counts, p in states.items():
            left = [(copies - c) * weights[t] for c, t in zip(counts, tokens)]
            for i, w in enumerate(left):
                if w:
                    nxt = counts[:i] + (counts[i] + 1,) + counts[i + 1:]
                    following[nxt] = following.get(nxt, 0.0) + p * w / sum(left)
        states = following
    return {tuple((t, c) for t, c in zip(tokens, counts) if c): p for counts, p in states.items()}


def chi_square_ok(counts: dict[int, int], probs: dict[int, float]) -> tuple[float, float]:
    """Pearson's statistic (categories under 5 expected merged) and a bound it exceeds with probability ~1e-5."""
    n = sum(counts.values())
    assert set(counts) <= set(probs), f"drawn outside the kept tokens: {set(counts) - set(probs)}"
    cells, rest_o, rest_e = [], 0, 0.0
    for t, p in probs.items():
        if n * p >= 5:
            cells.append((counts.get(t, 0), n * p))
        else:
            rest_o, rest_e = rest_o + counts.get(t, 0), rest_e + n * p
    if rest_e:
        cells.append((rest_o, rest_e))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    df = max(len(cells) - 1, 1)
    z = 4.26  # Wilson-Hilferty quantile of chi-square at 1 - 1e-5
    return stat, df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


WARPS = [dict(top_k=3), dict(top_p=0.81), dict(temperature=0.6, top_k=5, top_p=0.8),
         dict(temperature=1.7, top_k=6, top_p=0.9)]


@pytest.mark.parametrize("warp", WARPS, ids=str)
def test_sampled_first_tokens_follow_the_warped_distribution(warp):
    s = toy(warp)
    torch.manual_seed(0)
    first = reference_generate(fixed_logits, 4000, s, eos_id=EOS, pad_id=PAD)[:, 1].tolist()
    counts = {t: first.count(t) for t in set(first)}
    stat, bound = chi_square_ok(counts, warped_probs(s, keep=1))
    assert stat < bound, (counts, stat, bound)


@pytest.mark.parametrize("warp", WARPS, ids=str)
def test_beam_sampled_candidates_follow_the_warped_distribution(warp):
    """5 beams: all start at score 0, so the first step draws 10 candidates without replacement from 5 identical
    copies of the warped distribution (top-k/top-p keeping at least 2): which tokens, how many copies of each."""
    s = toy(warp, num_beams=5)
    expected = drawn_counts_probs(warped_probs(s, keep=2), copies=5, draws=10)
    trace = []
    torch.manual_seed(0)
    reference_generate(fixed_logits, 2000, s, eos_id=EOS, pad_id=PAD, trace=trace)
    scores, beams, tokens = trace[0]
    assert torch.isfinite(scores).all()
    drawn = [tuple((t, row.count(t)) for t in sorted(set(row), key=lambda t: -TOY_LOGITS[t])) for row in tokens.tolist()]
    counts = {outcome: drawn.count(outcome) for outcome in set(drawn)}
    stat, bound = chi_square_ok(counts, expected)
    assert stat < bound, (stat, bound)


def test_beam_sampled_answers_follow_the_warped_distribution():
    """One new token: the answer is the most likely of the 10 candidates drawn, a token other than the best one
    when none of the best one's 5 copies was drawn."""
    s = toy(dict(top_p=0.85, temperature=3.0), num_beams=5)
    expected = {}
    for outcome, p in drawn_counts_probs(warped_probs(s, keep=2), copies=5, draws=10).items():
        expected[outcome[0][0]] = expected.get(outcome[0][0], 0.0) + p
    torch.manual_seed(0)
    answers = reference_generate(fixed_logits, 2000, s, eos_id=EOS, pad_id=PAD)[:, 1].tolist()
    counts = {t: answers.count(t) for t in set(answers)}
    stat, bound = chi_square_ok(counts, expected)
    assert stat < bound, (counts, expected, stat, bound)
    assert counts[4] > 100  # expected ~13%


def test_warpers_keep_two_tokens_per_beam_and_all_beams_start_equal():
    """top_k 1 and a tiny top_p keep 2 tokens per beam with beams (1 without); at the first step the 10 candidates
    are 5 beams x those 2 tokens, every beam taking part."""
    for warp in (dict(top_k=1), dict(top_p=0.05)):
        trace = []
        torch.manual_seed(0)
        reference_generate(fixed_logits, 1, toy(warp, num_beams=5), eos_id=EOS, pad_id=PAD, trace=trace)
        scores, beams, tokens = trace[0]
        assert torch.isfinite(scores).all()
        assert sorted(zip(beams[0].tolist(), tokens[0].tolist())) == [(b, t) for b in range(5) for t in (3, 4)]
        torch.manual_seed(0)
        greedy_like = reference_generate(fixed_logits, 50, toy(warp), eos_id=EOS, pad_id=PAD)
        assert (greedy_like[:, 1] == 3).all()


def test_beam_search_starts_from_the_first_beam_only():
    trace = []
    reference_generate(fixed_logits, 1, toy({}, num_beams=5, use_nucleus_sampling=False, min_length=0),
                       eos_id=EOS, pad_id=PAD, trace=trace)
    assert trace[0][1].eq(0).all()  # beams 1.. start at -1e9


@pytest.mark.parametrize("beams", [1, 5])
def test_different_seeds_give_different_answers_and_a_seed_repeats(beams):
    """The paper's warps (top-k 3, top-p 0.9, length penalty -2) on a flat toy chain of logits."""
    table = 0.3 * torch.randn(11, 10, generator=torch.Generator().manual_seed(1))
    table[:, EOS] -= 1.0
    s = toy(dict(top_k=3, top_p=0.9), num_beams=beams, max_new_tokens=8, length_penalty=-2.0)
    answers = []
    for seed in range(10):
        torch.manual_seed(seed)
        answers.append(tuple(reference_generate(markov_logits(table), 1, s, eos_id=EOS, pad_id=PAD)[0].tolist()))
    assert len(set(answers)) >= 3, answers
    torch.manual_seed(3)
    assert tuple(reference_generate(markov_logits(table), 1, s, eos_id=EOS, pad_id=PAD)[0].tolist()) == answers[3]


@pytest.mark.parametrize("beams", [1, 3])
def test_min_length_counts_the_placeholder(beams):
    """EOS is always the best token: min_length 1 allows it first (empty answer), 2 bans it once, 3 twice."""
    for min_length, answer in ((1, [EOS]), (2, [3, EOS]), (3, [3, 4, EOS])):
        s = toy({}, use_nucleus_sampling=False, num_beams=beams, min_length=min_length, max_new_tokens=5,
                no_repeat_ngram_size=1)
        assert answer_ids(reference_generate(fixed_logits, 1, s, eos_id=EOS, pad_id=PAD), EOS) == [answer]


def test_ngram_ban_sees_the_placeholder():
    """Greedy wants 5, then <s> (id 1), then 5 again: the placeholder <s> before the first 5 makes (1, 5) a seen
    bigram, so the third token is the next best (6)."""
    table = torch.full((11, 10), -5.0)
    table[0, 5] = 3.0                                  # first token: 5
    table[6, 1] = 3.0                                  # after 5: <s>
    table[2, 5], table[2, 6] = 3.0, 2.0                # after <s>: 5, else 6
    table[7, EOS] = 3.0                                # after 6: EOS
    s = toy({}, use_nucleus_sampling=False, max_new_tokens=5, min_length=0, no_repeat_ngram_size=2)
    assert answer_ids(reference_generate(markov_logits(table), 1, s, eos_id=EOS, pad_id=PAD), EOS) == [[5, 1, 6, EOS]]


def test_repetition_penalty_covers_the_placeholder():
    """<s> (id 1) has the best first logit, 2.0 against 1.5; a penalty of 1.5 divides it (it is in the ids: the
    placeholder), so 4 comes first."""
    table = torch.full((11, 10), -5.0)
    table[0, 1], table[0, 4] = 2.0, 1.5
    table[5, EOS] = 3.0
    s = toy({}, use_nucleus_sampling=False, max_new_tokens=3, min_length=0)
    assert answer_ids(reference_generate(markov_logits(table), 1, s, eos_id=EOS, pad_id=PAD), EOS)[0][0] == 1
    penalised = dataclasses.replace(s, repetition_penalty=1.5)
    assert answer_ids(reference_generate(markov_logits(table), 1, penalised, eos_id=EOS, pad_id=PAD), EOS) == [[4, EOS]]


def test_filler_after_eos():
    """Greedy rows: pad after EOS up to the longest row. Beam rows: EOS after a shorter hypothesis, then pad."""
    table = torch.full((11, 10), -5.0)
    table[0, 3], table[0, 4] = 2.0, 1.0
    table[4, EOS] = 3.0                                # after 3: EOS at once
    table[5, 6] = 3.0                                  # after 4: 6, 7, EOS
    table[7, 7], table[8, EOS] = 3.0, 3.0
    rows = torch.tensor([[0.0] * 10, [0.0] * 10])
    rows[1, 4] = 5.0                                    # second prompt starts with 4 instead

    def two_prompts(prompts, generated):
        out = markov_logits(table)(prompts, generated)
        if not generated.shape[1]:
            out += rows[prompts]
        return out

    greedy = toy({}, use_nucleus_sampling=False, max_new_tokens=6, min_length=0)
    assert reference_generate(two_prompts, 2, greedy, eos_id=EOS, pad_id=PAD).tolist() == [
        [1, 3, EOS, PAD, PAD], [1, 4, 6, 7, EOS]]
    beams = dataclasses.replace(greedy, num_beams=2, length_penalty=0.0)
    assert reference_generate(two_prompts, 2, beams, eos_id=EOS, pad_id=PAD).tolist() == [
        [1, 3, EOS, PAD, PAD], [1, 4, 6, 7, EOS]]
