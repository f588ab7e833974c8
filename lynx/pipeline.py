"""A Python API over Lynx for scripts and notebooks: build from a config, answer (media, question) pairs.

    from lynx import LynxPipeline
    lynx = LynxPipeline.from_config("configs/LYNX.yaml", device="cuda")
    lynx.answer([("tests/fixtures/tiny/images/img_a.jpg", "What is in the image?")])
"""
from __future__ import annotations

import functools
import logging
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from configs.decoding import DecodingSettings
from configs.schema import LynxConfig, load_config
from dataset.batching import Batch, Collator, Item, Preparer
from dataset.media import media_kind
from decoding import make_decoder
from decoding.cuda import is_out_of_memory, on_device
from errors import InputError, RecordError
from models.build import build_lynx
from models.weight_files import check_weight_files

log = logging.getLogger("lynx")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> None:
    """A device this machine has, or one clear line: before anything loads."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise InputError(f"--device {device}: not a device name (cuda, cuda:1, cpu)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device is available here; use --device cpu")
    index = torch.device(device).index
    if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices")


def on_own_device(method):
    """The pipeline's device as the current CUDA device while `method` runs: the thread that calls it (a server's
    model thread, a loading thread) starts on GPU 0, and calls that name no device would land there."""
    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        with on_device(self.device):
            return method(self, *args, **kwargs)
    return wrapped


def seed_everything(seed: int) -> None:
    """torch's, numpy's and Python's global generators. No answer draws from them (sampled decoding draws from a
    generator seeded per batch, random frames from one keyed on the record); seeded all the same, so that nothing a
    library might draw varies from run to run."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@dataclass(frozen=True)
class Answer:
    """One answer: the ids the decoder chose (EOS included when it chose one), their text, and why it stopped:
    "stop" at EOS, "length" at max_new_tokens."""

    ids: list[int]
    text: str
    finish: str


class OutOfMemory(RecordError):
    """A record or request that does not fit on the device even alone in a batch."""

    def __init__(self, index=None, reason="out of GPU memory even alone in a batch", path=None):
        super().__init__(index, reason, path)


class LynxPipeline:
    """Lynx built once, answering prepared items (`item`, or a DataLoader's batches) through one core,
    `answer_batch`, which every front end calls: generate.py's loop (lynx/run.py), the server's engine
    (server/engine.py) and `answer` here."""

    def __init__(self, cfg: LynxConfig, model, tokenizer, device: str):
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.settings = DecodingSettings.from_config(cfg)
        self.decoder = make_decoder(cfg, model.LLM, tokenizer, device)
        self.prepare = Preparer.from_config(cfg, tokenizer)  # the prompt's rules and the media options, made once
        self.collate = Collator(tokenizer.pad_id, cfg.use_left_pad)
        self.lemmatizer = load_lemmatizer() if cfg.apply_lemmatizer else None

    @classmethod
    def from_config(cls, config: str | LynxConfig, device: str | None = None, overrides=()) -> "LynxPipeline":
        """Lynx of a config file (with `--set`-style overrides) or a LynxConfig, on `device` (default: CUDA when
        there is one); the device and the weight files are checked first, each problem one clear line."""
        cfg = config if isinstance(config, LynxConfig) else load_config(config, overrides)
        device = device or default_device()
        check_device(device)
        check_weight_files(cfg)
        return cls.build(cfg, device)

    @classmethod
    def build(cls, cfg: LynxConfig, device: str, dtype: str | None = None) -> "LynxPipeline":
        """Lynx of a checked config on a checked device, in `dtype` (default: the config's for the device): for
        front ends that check these before torch is imported (generate.py, serve.py)."""
        with on_device(device):
            model, tokenizer = build_lynx(cfg, device, dtype)
            return cls(cfg, model, tokenizer, device)

    def generator(self, seed: int) -> torch.Generator:
        """A generator for sampled decoding, on the LLM's device, seeded: `torch.manual_seed(seed)` would give the
        device's default generator the same stream."""
        return torch.Generator(device=self.model.LLM.get_input_embeddings().weight.device).manual_seed(seed)

    def item(self, media, question: str, kind: str | None = None, position: int = 0, **fields) -> Item:
        """A (media, question) pair made ready: the prompt filled with the question (and `fields`) and tokenized,
        the media read into pixels, once. `kind`: 'image' or 'video' (None: inferred, see `answer`). RecordError,
        naming `position`, if it cannot be used."""
        return self.prepare.item(position, media, kind, {**fields, "question": question}, index=position)

    def answer_items(self, items: list[Item], settings: DecodingSettings | None = None, seed: int | None = None,
                     generator: torch.Generator | None = None, watch: Watch | None = None,
                     lengths: list[int] | None = None) -> list[Answer | RecordError]:
        """Answers of prepared items of one media kind, in one batch (see `answer_batch`)."""
        return self.answer_batch(self.collate(items), settings=settings, seed=seed, generator=generator, watch=watch,
                                 lengths=lengths)

    def answer_batch(self, batch: Batch, visual: torch.Tensor | None = None, settings: DecodingSettings | None = None,
                     seed: int | None = None, generator: torch.Generator | None = None, watch: Watch | None = None,
                     lengths: list[int] | None = None) -> list[Answer | RecordError]:
        """The answer of every row of a collated batch, in row order: an Answer, or OutOfMemory for a row that does
        not fit on the device even alone. `visual`: the batch's visual prefix, if computed already; `settings`:
        decoding for this call (default: the config's); sampled draws come from a generator seeded with `seed`
        (afresh for every try), else from `generator` (on the LLM's device), else from the device's default one.

        `lengths`: each row's own max_new_tokens, at most the settings' (one beam only: a beam's answer depends on
        the length limit; greedy and sampled rows do not): the batch decodes until every row is done or at its own
        limit, and each row is cut at its own, its answer what it would be decoded alone to that limit.
        `watch({row: its ids so far})`: called at each check of the decoder (decoding.Decoder) with the ids of the
        rows of that try (greedy and sampling: up to EOS or the row's limit; {} for beams, chosen at the end); when
        it returns True the decoding stops there and the rows are cut where it stopped.

        Out of memory, the batch is retried in halves down to single rows, each half decoded as a batch of its own
        size (the decoder would otherwise pad it back to its fixed shape) with its rows of the visual prefix."""
        settings = self.settings if settings is None else settings.checked()
        lengths = [settings.max_new_tokens] * len(batch) if lengths is None else list(lengths)
        if len(lengths) != len(batch) or not all(1 <= n <= settings.max_new_tokens for n in lengths):
            raise ValueError(f"lengths: one per row, from 1 to max_new_tokens ({settings.max_new_tokens})")
        if settings.num_beams > 1 and min(lengths) < settings.max_new_tokens:
            raise ValueError("lengths: rows of one batch share one length limit with beams")
        return self._answer_in_halves(batch, visual, settings, seed, generator, None, watch, lengths)

    def _answer_in_halves(self, batch, visual, settings, seed, generator, rows, watch,
                          lengths) -> list[Answer | RecordError]:
        try:
            draws = self.generator(seed) if seed is not None else generator
            return self.decode_batch(batch, visual, settings, draws, rows, watch, lengths)
        except RuntimeError as err:  # torch.OutOfMemoryError included
            if not is_out_of_memory(err):
                raise
        # Retried outside the except block: the error's traceback holds the failed attempt's tensors until it ends.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(batch) == 1:
            return [OutOfMemory()]
        log.warning("out of GPU memory on a batch of %d; retrying in halves", len(batch))
        answers = []
        for half in (slice(0, len(batch) // 2), slice(len(batch) // 2, None)):
            part = batch.part(half, self.cfg.use_left_pad)
            part_visual = None if visual is None else visual[half]  # a few MB: not worth computing again
            answers += self._answer_in_halves(part, part_visual, settings, seed, generator, len(part),
                                              shifted(watch, half.start or 0), lengths[half])
        return answers

    @on_own_device
    @torch.inference_mode()
    def decode_batch(self, batch: Batch, visual: torch.Tensor | None, settings: DecodingSettings,
                     generator: torch.Generator | None = None, rows: int | None = None, watch: Watch | None = None,
                     lengths: list[int] | None = None) -> list[Answer]:
        """One try at a batch, no retry: its visual prefix (unless given), the fused prompt, the decoder (`rows`: the
        batch shape to decode at, see decoding.Decoder), the answers (`watch`, `lengths`: see `answer_batch`)."""
        lengths = [settings.max_new_tokens] * len(batch) if lengths is None else lengths
        if visual is None:
            visual = self.model.encode_media(batch.pixel_values)
        embeds, mask = self.model.fuse(visual, batch.input_ids, batch.attention_mask)
        check = self._check(watch, lengths) if watch is not None or min(lengths) < settings.max_new_tokens else None
        ids = self.decoder.generate(embeds, mask, settings, generator=generator, rows=rows, watch=check)
        return [self._answer(row, limit) for row, limit in zip(ids.tolist(), lengths)]

    def _check(self, watch: Watch | None, lengths: list[int]):
        """The decoder's watch (decoding.Decoder) of a try: the caller's `watch` told each row's ids so far, and a
        stop once the caller asks or every row has ended with EOS or reached its own limit."""
        eos = self.tokenizer.eos_id

        def check(ids: torch.Tensor | None) -> bool:
            if ids is None:  # beams: nothing chosen before the end
                return watch is not None and bool(watch({}))
            rows = {r: cut(row, limit, eos)[0] for r, (row, limit) in enumerate(zip(ids.tolist(), lengths))}
            asked = watch is not None and bool(watch(rows))
            return asked or all(len(row) == limit or row[-1:] == [eos] for row, limit in zip(rows.values(), lengths))
        return check

    def _answer(self, row: list[int], limit: int) -> Answer:
        """A decoder's row: the ids up to EOS or the row's own limit (the filler after it dropped), their text, why
        it stopped."""
        ids, finish = cut(row, limit, self.tokenizer.eos_id)
        if self.lemmatizer is None:
            return Answer(ids, self.tokenizer.decode(ids), finish)
        # the original lemmatized the decoded text, then stripped it
        return Answer(ids, lemmatize(self.lemmatizer, self.tokenizer.decode(ids, strip=False)).strip(), finish)

    def answer(self, pairs, settings: DecodingSettings | None = None, seed: int | None = None,
               generator: torch.Generator | None = None, **fields) -> list[str]:
        """Answer [(media, question), ...] in one batch ([] for no pairs). Media: an image path (str or Path), a
        PIL image, base64 text or a data URI, a video path (a suffix such as .mp4, or .json for a frame file), or a
        list of frames (PIL images or base64 strings) of any length, sampled to num_frames like a video. One call
        takes images or videos, not both. `settings`: decoding for this call (default: the config's, e.g.
        `lynx.settings.replace(num_beams=1, use_nucleus_sampling=False)` for greedy). Sampled decoding draws from a
        generator seeded with `seed` (the same call and seed, the same answers), or from `generator` (on the LLM's
        device), or else from the device's default generator. Extra `fields` fill other placeholders of the prompt.
        A pair that cannot be used, or that does not fit on the device even alone, raises RecordError naming it by
        its place."""
        pairs = list(pairs)
        if not all(isinstance(pair, (tuple, list)) and len(pair) == 2 for pair in pairs):
            raise ValueError('answer() takes a list of (media, question) pairs, e.g. [("cat.jpg", "What is it?")]')
        if not pairs:
            return []
        kinds = {media_kind(media) for media, _ in pairs}
        if len(kinds) > 1:
            raise ValueError("answer() takes either images or videos in one call, not both: call it once for each")
        items = [self.item(media, question, position=i, **fields) for i, (media, question) in enumerate(pairs)]
        answers = self.answer_items(items, settings, seed, generator)
        for position, answer in enumerate(answers):
            if isinstance(answer, RecordError):
                raise type(answer)(position, answer.reason, answer.path)
        return [answer.text for answer in answers]


Watch = Callable[[dict[int, list[int]]], bool]  # see LynxPipeline.answer_batch


def cut(row: list[int], limit: int, eos: int) -> tuple[list[int], str]:
    """(ids, finish) of a decoded row: up to its EOS ("stop") or its first `limit` ids ("length")."""
    row = row[:limit]
    return (row[:row.index(eos) + 1], "stop") if eos in row else (row, "length")


def shifted(watch: Watch | None, first: int) -> Watch | None:
    """`watch` of a batch, for the part of it that starts at row `first`."""
    if watch is None or first == 0:
        return watch
    return lambda rows: watch({first + row: ids for row, ids in rows.items()})


def load_lemmatizer():
    """spaCy's English pipeline, as the original's optional `apply_lemmatizer`."""
    try:
        import spacy

        return spacy.load("en_core_web_sm")
    except (ImportError, OSError):
        raise InputError("apply_lemmatizer: True needs spaCy and its English model: "
                         "pip install spacy && python -m spacy download en_core_web_sm") from None


def lemmatize(nlp, answer: str) -> str:
    """Nouns and verbs replaced by their lemmas, other words kept, joined by spaces (the original's rule)."""
    return " ".join(t.lemma_ if t.pos_ in ("NOUN", "VERB") else t.text for t in nlp(answer))
