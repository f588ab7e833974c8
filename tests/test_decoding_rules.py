"""Lynx's own decoder against transformers 4.28.1's rules, on toy logits (tests/toy_decoder.py): the same ids as the
written-out 4.28.1 decoding (tests/reference_428.py) rule by rule, sampled tokens in the warped distribution's
frequencies, seeds that change answers and repeat them, and the draws."""
import dataclasses
import math

import pytest
import torch

import decoding.search
from configs.decoding import DecodingSettings
from decoding.draws import drawing_from, exponential_race
from decoding.processors import process, warp
from decoding.search import resolve
from reference_428 import answer_ids, process as reference_process, reference_generate, warp as reference_warp
from test_reference_428 import TOY_LOGITS, chi_square_ok, drawn_counts_probs, warped_probs
from toy_decoder import BOS, EOS, decode, table_logits, toy_decoder

VOCAB, PAD = 12, 11


def settings(**changes) -> DecodingSettings:
    base = dict(max_new_tokens=6, min_length=2, num_beams=1, use_nucleus_sampling=False, temperature=1.0, top_k=0,
                top_p=1.0, no_repeat_ngram_size=0, length_penalty=1.0, repetition_penalty=1.0)
    return DecodingSettings(**{**base, **changes})


def random_table(seed: int, prompts: int = 4, eos_bias: float = 0.0) -> torch.Tensor:
    """Logits of a few prompts after each token: peaked enough for short answers, flat enough for ties to matter
    little; PAD unlikely."""
    g = torch.Generator().manual_seed(seed)
    table = 1.5 * torch.randn(prompts, VOCAB + 1, VOCAB, generator=g)
    table[..., EOS] += eos_bias
    table[..., PAD] -= 4.0
    return table


def reference_ids(table, s: DecodingSettings, seed: int | None = None, early_stopping=False) -> torch.Tensor:
    if seed is not None:
        torch.manual_seed(seed)
    rows = reference_generate(table_logits(table), table.shape[0], s, eos_id=EOS, pad_id=PAD, bos_id=BOS,
                              early_stopping=early_stopping)
    return rows[:, 1:]  # without the placeholder, as decoders return them


def our_ids(table, s: DecodingSettings, seed: int | None = None, early_stopping=False) -> torch.Tensor:
    decoder = toy_decoder(table, PAD)
    search = dataclasses.replace(decoder.search_for(s), early_stopping=early_stopping)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    embeds, mask = torch.zeros(table.shape[0], 2, 1), torch.ones(table.shape[0], 2, dtype=torch.long)
    return decoder.decode(embeds, mask, search, generator)


GREEDY = [dict(), dict(min_length=0), dict(min_length=4), dict(no_repeat_ngram_size=1), dict(no_repeat_ngram_size=2),
          dict(no_repeat_ngram_size=3, max_new_tokens=10), dict(repetition_penalty=1.4),
          dict(repetition_penalty=0.6, no_repeat_ngram_size=2), dict(max_new_tokens=1), dict(max_new_tokens=2)]
SAMPLING = [dict(top_k=3), dict(top_p=0.8), dict(temperature=0.7, top_k=4, top_p=0.9),
            dict(temperature=1.6, top_k=5, no_repeat_ngram_size=2, repetition_penalty=1.3, min_length=3)]
BEAMS = [dict(), dict(length_penalty=-2.0), dict(length_penalty=0.0), dict(length_penalty=2.5, max_new_tokens=9),
         dict(max_new_tokens=2, length_penalty=-2.0), dict(max_new_tokens=3), dict(min_length=4, num_beams=3),
         dict(no_repeat_ngram_size=2, length_penalty=-2.0), dict(repetition_penalty=1.5, num_beams=4),
         dict(num_beams=2, max_new_tokens=8, min_length=0)]


@pytest.mark.parametrize("case", GREEDY, ids=str)
def test_greedy_search_follows_428(case):
    for table_seed in range(3):
        table = random_table(table_seed, eos_bias=0.5)
        s = settings(**case)
        assert torch.equal(our_ids(table, s), reference_ids(table, s)), table_seed


@pytest.mark.parametrize("case", SAMPLING, ids=str)
def test_sampling_follows_428_draw_for_draw(case):
    table = random_table(7, prompts=6, eos_bias=0.5)
    s = settings(use_nucleus_sampling=True, max_new_tokens=8, **case)
    answers = set()
    for seed in range(6):
        ours = our_ids(table, s, seed)
        assert torch.equal(ours, reference_ids(table, s, seed)), seed
        answers.add(tuple(map(tuple, ours.tolist())))
    assert len(answers) > 1


@pytest.mark.parametrize("early_stopping", [False, True])
@pytest.mark.parametrize("case", BEAMS, ids=str)
def test_beam_search_follows_428(case, early_stopping):
    for table_seed in range(3):
        table = random_table(10 + table_seed, eos_bias=1.0)
        s = settings(**{"num_beams": 5, **case})
        expected = reference_ids(table, s, early_stopping=early_stopping)
        assert torch.equal(our_ids(table, s, early_stopping=early_stopping), expected), table_seed


@pytest.mark.parametrize("case", [dict(top_k=3, top_p=0.9, length_penalty=-2.0, no_repeat_ngram_size=2),
                                  dict(top_k=5, temperature=0.7), dict(top_p=0.7, temperature=1.5, num_beams=3),
                                  dict(top_k=3, max_new_tokens=3, length_penalty=-2.0, repetition_penalty=1.3)],
                         ids=str)
def test_beam_sampling_follows_428_draw_for_draw(case):
    """All beams start at 0; the temperature divides the running score too; 2 x beams candidates drawn over
    beams x vocab, sorted; the same scorer as beam search."""
    table = random_table(20, prompts=3, eos_bias=1.0)
    s = settings(**{"num_beams": 5, "use_nucleus_sampling": True, "max_new_tokens": 8, **case})
    for seed in range(5):
        assert torch.equal(our_ids(table, s, seed), reference_ids(table, s, seed)), seed


def markov(cells: dict, start: dict) -> torch.Tensor:
    """One prompt: logits -5 except `start` (first step) and `cells` {(after token, token): logit}."""
    table = torch.full((1, VOCAB + 1, VOCAB), -5.0)
    for token, value in start.items():
        table[0, 0, token] = value
    for (after, token), value in cells.items():
        table[0, after + 1, token] = value
    return table


def answer(table, s) -> list[int]:
    return answer_ids(torch.cat([torch.full((1, 1), BOS), our_ids(table, s)], dim=1), EOS)[0]


@pytest.mark.parametrize("beams", [1, 3])
def test_min_length_counts_the_placeholder(beams):
    """EOS is always the best token: min_length 1 allows it first (an empty answer), 2 bans it once, 3 twice."""
    table = torch.zeros(1, VOCAB + 1, VOCAB)
    table[..., EOS], table[..., 3], table[..., 4] = 3.0, 2.0, 1.0
    for min_length in (1, 2, 3):
        s = settings(num_beams=beams, min_length=min_length, max_new_tokens=5, no_repeat_ngram_size=1)
        assert torch.equal(our_ids(table, s), reference_ids(table, s))
        got = answer(table, s)
        assert len(got) == min_length and got[-1] == EOS, got
        if beams == 1:
            assert got == {1: [EOS], 2: [3, EOS], 3: [3, 4, EOS]}[min_length]


def test_ngram_ban_and_repetition_penalty_see_the_placeholder():
    """The placeholder <s> (id 1) stands before the answer: after 5, <s>, the bigram (<s>, 5) is seen, so 5 is banned
    (6 comes instead); with a repetition penalty, <s> is penalised from the first step."""
    table = markov({(5, BOS): 3.0, (BOS, 5): 3.0, (BOS, 6): 2.0, (6, EOS): 3.0}, {5: 3.0})
    assert answer(table, settings(min_length=0, no_repeat_ngram_size=2)) == [5, BOS, 6, EOS]
    table = markov({(4, EOS): 3.0}, {BOS: 2.0, 4: 1.5})
    assert answer(table, settings(min_length=0, max_new_tokens=3))[0] == BOS
    assert answer(table, settings(min_length=0, max_new_tokens=3, repetition_penalty=1.5)) == [4, EOS]


def test_fillers_after_eos():
    """Greedy rows: pad after EOS up to the longest row. Beam rows: EOS after a shorter hypothesis, then pad; no EOS
    after a hypothesis cut at the length limit."""
    table = random_table(3, prompts=2)
    table[0, 0], table[1, 0] = -5.0, -5.0
    table[0, 0, 3], table[1, 0, 4] = 3.0, 3.0
    table[:, 4, EOS] = 9.0  # after 3: EOS
    table[:, 5, 6], table[:, 7, 7], table[:, 8, EOS] = 9.0, 9.0, 9.0  # after 4: 6 7 EOS
    greedy = settings(min_length=0)
    assert our_ids(table, greedy).tolist() == [[3, EOS, PAD, PAD], [4, 6, 7, EOS]]
    beams = settings(min_length=0, num_beams=2, length_penalty=0.0)
    assert our_ids(table, beams).tolist() == [[3, EOS, PAD, PAD], [4, 6, 7, EOS]]
    cut = dataclasses.replace(beams, max_new_tokens=2)
    assert our_ids(table, cut).tolist() == reference_ids(table, cut).tolist() == [[3, EOS], [4, 6]]


def test_processors_and_warpers_equal_the_reference():
    """On random scores and ids at every step: the repetition penalty, the n-gram ban and min length (the
    placeholder included), then temperature, top-k and top-p keeping 1 or 2."""
    g = torch.Generator().manual_seed(0)
    rows, width, vocab = 6, 9, 40
    tokens = torch.randint(0, 5, (rows, width), generator=g)  # few ids: many repeats
    scores = torch.randn(rows, vocab, generator=g)
    for case in (dict(no_repeat_ngram_size=2), dict(no_repeat_ngram_size=3, repetition_penalty=1.3),
                 dict(no_repeat_ngram_size=1, repetition_penalty=0.8, min_length=4), dict(min_length=0)):
        s = settings(**case)
        search = resolve(s, PAD, EOS, BOS)
        for step in range(width + 1):
            ids = torch.cat([torch.full((rows, 1), BOS), tokens[:, :step]], dim=1)
            expected = reference_process(scores.clone(), ids, s, EOS)
            assert torch.equal(process(search, scores, tokens, torch.tensor(step)), expected), (case, step)
    for case in (dict(top_k=3), dict(top_p=0.9), dict(top_p=0.3, top_k=7), dict(top_p=0.01, temperature=0.5),
                 dict(top_k=50, temperature=2.0)):
        s = settings(use_nucleus_sampling=True, **case)
        for keep in (1, 2):
            expected = reference_warp(scores, s, keep)
            assert torch.equal(warp(resolve(s, PAD, EOS, BOS), scores, keep), expected), (case, keep)


# ---- sampled tokens follow the warped distribution, whichever draw is used

WARPS = [dict(top_k=3), dict(top_p=0.81), dict(temperature=0.6, top_k=5, top_p=0.8),
         dict(temperature=1.7, top_k=6, top_p=0.9)]


@pytest.fixture(params=["multinomial", "exponential_race"])
def draws(request, monkeypatch):
    """The CPU's draw (torch.multinomial) or the one CUDA uses (decoding.draws.exponential_race), on the CPU."""
    if request.param == "exponential_race":
        monkeypatch.setattr(decoding.search, "draw", exponential_race)
    return request.param


def fixed(prompts: int) -> torch.Tensor:
    """TOY_LOGITS (EOS the most likely token, banned first by min_length 2) for every prompt and step."""
    table = torch.zeros(prompts, 11, 10)
    table[:] = TOY_LOGITS
    return table


def toy(warp_keys: dict, beams: int) -> DecodingSettings:
    return DecodingSettings(max_new_tokens=1, min_length=2, num_beams=beams, use_nucleus_sampling=True,
                            temperature=1.0, top_k=0, top_p=1.0, no_repeat_ngram_size=0, length_penalty=1.0,
                            repetition_penalty=1.0).replace(**warp_keys)


@pytest.mark.parametrize("warp_keys", WARPS, ids=str)
def test_sampled_tokens_follow_the_warped_distribution(warp_keys, draws):
    s = toy(warp_keys, 1)
    first = decode(toy_decoder(fixed(4000), pad_id=9), 4000, s, torch.Generator().manual_seed(1))[:, 0].tolist()
    counts = {t: first.count(t) for t in set(first)}
    stat, bound = chi_square_ok(counts, warped_probs(s, keep=1))
    assert stat < bound, (counts, stat, bound)


@pytest.mark.parametrize("warp_keys", WARPS, ids=str)
def test_beam_sampled_candidates_follow_the_warped_distribution(warp_keys, draws):
    """5 beams, all at score 0: 10 candidates drawn without replacement from 5 identical copies of the warped
    distribution (top-k / top-p keeping 2). One new token: the 5 best candidates become the hypotheses and the best
    of them is the answer; both follow from which tokens were drawn, how many copies of each."""
    s = toy(warp_keys, 5)
    outcomes = drawn_counts_probs(warped_probs(s, keep=2), copies=5, draws=10)
    expected_kept, expected_answer = {}, {}
    for outcome, p in outcomes.items():
        kept, left = [], 5
        for token, count in outcome:  # most likely token first
            kept.append((token, min(count, left)))
            left -= kept[-1][1]
            if not left:
                break
        expected_kept[tuple(kept)] = expected_kept.get(tuple(kept), 0.0) + p
        expected_answer[outcome[0][0]] = expected_answer.get(outcome[0][0], 0.0) + p
    decoder = toy_decoder(fixed(2000), pad_id=9)
    answers = decode(decoder, 2000, s, torch.Generator().manual_seed(2))[:, 0].tolist()
    hypotheses = decoder.workspace.hyp_seqs[:, :, 0].tolist()
    kept = [tuple((t, row.count(t)) for t in sorted(set(row), key=lambda t: -TOY_LOGITS[t])) for row in hypotheses]
    for observed, expected in (({o: kept.count(o) for o in set(kept)}, expected_kept),
                               ({t: answers.count(t) for t in set(answers)}, expected_answer)):
        stat, bound = chi_square_ok(observed, expected)
        assert stat < bound, (stat, bound)


@pytest.mark.parametrize("beams", [1, 5])
def test_different_seeds_give_different_answers_and_a_seed_repeats(beams, draws):
    """The paper's warps (top-k 3, top-p 0.9, length penalty -2) on a flat toy chain of logits."""
    table = 0.3 * torch.randn(1, 11, 10, generator=torch.Generator().manual_seed(1))
    table[..., EOS] -= 1.0
    s = toy(dict(top_k=3, top_p=0.9, max_new_tokens=8, length_penalty=-2.0), beams)
    decoder = toy_decoder(table, pad_id=9)
    answers = [tuple(decode(decoder, 1, s, torch.Generator().manual_seed(seed))[0].tolist()) for seed in range(10)]
    assert len(set(answers)) >= 3, answers
    assert tuple(decode(decoder, 1, s, torch.Generator().manual_seed(3))[0].tolist()) == answers[3]


# ---- the draws


def test_the_cuda_draw_is_torch_multinomial_written_out():
    """On the CPU, exponential_race draws exactly what torch.multinomial draws from the same generator state, on
    the shapes of beam sampling (2 x beams of beams x vocab) and sampling (1 of vocab): so the CUDA path draws from
    the same distribution."""
    g = torch.Generator().manual_seed(0)
    for shape, n in (((3, 5 * 1001), 10), ((4, 1001), 1), ((2, 3 * 12), 6)):
        probs = torch.rand(shape, generator=g) ** 4
        probs[:, ::3] = 0.0  # masked tokens
        probs /= probs.sum(-1, keepdim=True)
        for seed in range(3):
            a = torch.multinomial(probs, n, generator=torch.Generator().manual_seed(seed))
            assert torch.equal(exponential_race(probs, n, torch.Generator().manual_seed(seed)), a)


def test_drawing_from_lends_the_generator_to_the_default_one():
    generator = torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    with drawing_from(generator, torch.device("cpu")):
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), state)  # the default generator is as it was
    with drawing_from(generator, torch.device("cpu")):
        second = torch.rand(4)
    expected = torch.rand(8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.cat([first, second]), expected)  # the generator's own stream, continued
    with pytest.raises(ValueError, match="cannot draw for cuda"):
        with drawing_from(generator, torch.device("cuda")):
            pass
    assert math.isfinite(float(first.sum()))
