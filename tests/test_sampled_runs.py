"""Sampled runs repeat: batch b of the run's plan draws from a generator seeded with --seed + b, as the original seeded
its batches. So the paper's decoding (beam sampling) writes the original's seeded answers with two processes
(torchrun, gloo on the CPU) as with one, and after a run killed part-way is resumed; the Python API's `seed=` gives a
call the same draws; the lemmatizer comes before the strip, as in the original."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import generate
from conftest import FIXTURE, ROOT, build_tiny_lynx, fixture_config, read_jsonl
from lynx.pipeline import LynxPipeline
from test_distributed import RANK_VARIABLES, arguments, finish, torchrun
from test_resume import BLOCKED, answered, with_blocked_image

PAPER = dict(use_nucleus_sampling=True, num_beams=5, top_k=3, top_p=0.9, length_penalty=-2.0,
             no_repeat_ngram_size=2, min_length=2, max_new_tokens=24)
VIDEOS = dict(test_files=["./data/Open_VQA_videos_tiny.jsonl"], vision_prompt_dict="video")
SAMPLING = FIXTURE / "expected" / "sampling"


@pytest.fixture(autouse=True)
def single_process_env(monkeypatch):
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("kind,seed,extra", [("images", 5, {}), ("videos", 13, VIDEOS)], ids=["images", "videos"])
def test_two_processes_write_the_originals_seeded_answers(tmp_path, kind, seed, extra):
    """Process 0 answers batches 0, 2, ..., process 1 batches 1, 3, ...: each batch still draws from seed + b, so
    the file is the one the original wrote with --seed (one process, batches in order). Media are read by
    DataLoader workers, as the shipped config does."""
    cfg = fixture_config(**PAPER, **extra)
    args = arguments(tmp_path, cfg, "--seed", str(seed), "--set", "data.num_workers=2")
    proc = torchrun(args, tmp_path / "log.txt")
    status = finish(proc, timeout=300)
    assert status == 0, (tmp_path / "log.txt").read_text()
    assert (tmp_path / "answers.jsonl").read_bytes() == (SAMPLING / f"{kind}_seed{seed}.jsonl").read_bytes()


def test_a_resumed_sampled_run_writes_the_uninterrupted_file(tmp_path, monkeypatch):
    """Killed while it waits on record 6 (batch 2; its image is a named pipe nobody writes), then run again: the
    batches answered before the kill are kept and the others draw from their own seeds, so the file is the
    original's for that seed."""
    seed = 3
    test_file, image = with_blocked_image(tmp_path)
    os.mkfifo(tmp_path / "blocked.jpg")
    args = arguments(tmp_path, fixture_config(test_files=[test_file], **PAPER), "--seed", str(seed))
    partial = tmp_path / "answers.jsonl.partial.jsonl"
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "generate.py"), *args], cwd=FIXTURE, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300  # a guard against a hang, not a measure
            while answered(partial) < 3:  # batch 0 on disk
                assert proc.poll() is None, (tmp_path / "log.txt").read_text()
                assert time.monotonic() < deadline, "no answer on disk"
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    kept = answered(partial)
    assert 3 <= kept < BLOCKED and not (tmp_path / "answers.jsonl").exists()
    (tmp_path / "blocked.jpg").unlink()
    shutil.copy(image, tmp_path / "blocked.jpg")
    monkeypatch.chdir(FIXTURE)
    assert generate.main(args) == 0
    assert (tmp_path / "answers.jsonl").read_bytes() == (SAMPLING / f"images_seed{seed}.jsonl").read_bytes()


@pytest.fixture(scope="module")
def pipeline():
    cfg, model, tokenizer = build_tiny_lynx(**PAPER)
    return LynxPipeline(cfg, model, tokenizer, "cpu")


def test_the_python_api_seeds_a_call(pipeline, monkeypatch):
    """`answer(pairs, seed=s)` draws from a generator seeded with s and leaves torch's global generator alone: the
    fixture's batch 1 (records 5, 8, 21) with seed 4 + 1 gives the original's answers of --seed 4."""
    monkeypatch.chdir(FIXTURE)
    records = read_jsonl(FIXTURE / "data" / "Open_VQA_images_tiny.jsonl")[3:6]
    pairs = [(record["image"], record["question"]) for record in records]
    expected = {row["index"]: row["text_output"] for row in read_jsonl(SAMPLING / "images_seed4.jsonl")}
    torch.manual_seed(0)
    state = torch.get_rng_state()
    answers = pipeline.answer(pairs, seed=4 + 1)
    assert answers == [expected[record["index"]] for record in records]
    assert torch.equal(torch.get_rng_state(), state)
    assert pipeline.answer(pairs, seed=5) == answers
    others = {tuple(pipeline.answer(pairs, seed=s)) for s in range(6, 12)}
    assert len(others | {tuple(answers)}) > 1  # other seeds, other answers
    generator = torch.Generator().manual_seed(5)
    assert pipeline.answer(pairs, generator=generator) == answers


class StandInNLP:
    """A stand-in for spaCy's pipeline: records what it is given; words become tokens, 'cats' a NOUN with lemma
    'cat', and every space kept as a token of its own (so stripping before or after shows)."""

    def __init__(self):
        self.texts = []

    def __call__(self, text):
        self.texts.append(text)
        tokens = []
        for part in text.split(" "):
            if part == "cats":
                tokens.append(SimpleNamespace(text=part, lemma_="cat", pos_="NOUN"))
            else:
                tokens.append(SimpleNamespace(text=part, lemma_=part, pos_="X"))
        return tokens


class OneRowBatch(SimpleNamespace):
    """A collated batch's fields, of one row."""

    def __len__(self) -> int:
        return 1


def test_the_lemmatizer_sees_the_decoded_text_before_the_strip(pipeline, monkeypatch):
    """The original lemmatized the decoded text, then stripped the answer: a decoded ' two  cats ' (the text of
    pieces ending in a space) reaches the lemmatizer with its spaces and comes back stripped."""
    tokenizer = pipeline.tokenizer
    ids = tokenizer.sp.encode("two  cats ")
    decoded = tokenizer.decode(ids, strip=False)
    assert decoded != decoded.strip()  # the pieces carry spaces the strip removes
    monkeypatch.setattr(pipeline.decoder, "generate", lambda *a, **k: torch.tensor([ids]))
    nlp = StandInNLP()
    monkeypatch.setattr(pipeline, "lemmatizer", nlp)
    batch = OneRowBatch(pixel_values=torch.zeros(1, 3, 84, 84), input_ids=torch.tensor([[1, 2]]),
                        attention_mask=torch.ones(1, 2, dtype=torch.long))
    answers = pipeline.answer_batch(batch)
    assert nlp.texts[0] == decoded  # what the pipeline handed the lemmatizer
    assert [answer.text for answer in answers] == [" ".join(t.lemma_ for t in nlp(decoded)).strip()]
    assert pipeline.answer_batch(batch)[0].text.endswith("cat")
