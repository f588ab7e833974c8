"""A Python API over Lynx for scripts and notebooks: build from a config, answer (media, question) pairs.

    from lynx import LynxPipeline
    lynx = LynxPipeline.from_config("configs/LYNX.yaml", device="cuda")
    lynx.answer([("images/cat.jpg", "What is in the image?")])
"""
from __future__ import annotations

import functools
import random

import numpy as np
import torch

from configs.decoding import DecodingSettings
from configs.schema import LynxConfig, load_config
from dataset.batching import Batch, Collator, Item
from dataset.media import MediaOptions, load_pixels, media_kind
from dataset.prompt import format_prompt
from decoding import make_decoder
from decoding.cuda import on_device
from errors import InputError
from models.build import build_lynx


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


class LynxPipeline:
    def __init__(self, cfg: LynxConfig, model, tokenizer, device: str):
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.settings = DecodingSettings.from_config(cfg)
        self.decoder = make_decoder(cfg, model.LLM, tokenizer, device)
        self.collate = Collator(tokenizer.pad_id, cfg.use_left_pad)
        self.media = MediaOptions.from_config(cfg)  # transform, frame count and sampling, made once
        self.lemmatizer = load_lemmatizer() if cfg.apply_lemmatizer else None

    @classmethod
    def from_config(cls, config: str | LynxConfig, device: str | None = None, overrides=()) -> "LynxPipeline":
        cfg = config if isinstance(config, LynxConfig) else load_config(config, overrides)
        device = device or default_device()
        check_device(device)
        with on_device(device):
            model, tokenizer = build_lynx(cfg, device)
            return cls(cfg, model, tokenizer, device)

    def generator(self, seed: int) -> torch.Generator:
        """A generator for sampled decoding, on the LLM's device, seeded: `torch.manual_seed(seed)` would give the
        device's default generator the same stream."""
        return torch.Generator(device=self.model.LLM.get_input_embeddings().weight.device).manual_seed(seed)

    @on_own_device
    @torch.inference_mode()
    def answer_batch(self, batch: Batch, visual: torch.Tensor | None = None, settings: DecodingSettings | None = None,
                     generator: torch.Generator | None = None, rows: int | None = None) -> list[str]:
        """Answers for the usable rows of a collated batch, in row order. `visual`: its visual prefix, if computed
        already; `settings`: decoding for this call (default: the config's); `generator`: the sampling draws, on the
        LLM's device (None: its default generator); `rows`: the batch shape to decode at (see decoding.Decoder)."""
        settings = self.settings if settings is None else settings.checked()
        if visual is None:
            visual = self.model.encode_media(batch.pixel_values)
        embeds, mask = self.model.fuse(visual, batch.input_ids, batch.attention_mask)
        ids = self.decoder.generate(embeds, mask, settings, generator=generator, rows=rows)
        if self.lemmatizer is None:
            return [self.tokenizer.decode(row) for row in ids.tolist()]
        # the original lemmatized the decoded text, then stripped it
        return [lemmatize(self.lemmatizer, self.tokenizer.decode(row, strip=False)).strip() for row in ids.tolist()]

    def answer(self, pairs, settings: DecodingSettings | None = None, seed: int | None = None,
               generator: torch.Generator | None = None, **fields) -> list[str]:
        """Answer [(media, question), ...] in one batch ([] for no pairs). Media: an image path (str or Path), a
        PIL image, base64 text or a data URI, a video path (a suffix such as .mp4, or .json for a frame file), or a
        list of frames (PIL images or base64 strings) of any length, sampled to num_frames like a video. One call
        takes images or videos, not both. `settings`: decoding for this call (default: the config's, e.g.
        `lynx.settings.replace(num_beams=1, use_nucleus_sampling=False)` for greedy). Sampled decoding draws from a
        generator seeded with `seed` (the same call and seed, the same answers), or from `generator` (on the LLM's
        device), or else from the device's default generator. Extra `fields` fill other placeholders of the prompt.
        A pair that cannot be used raises RecordError naming it by its place."""
        pairs = list(pairs)
        if not all(isinstance(pair, (tuple, list)) and len(pair) == 2 for pair in pairs):
            raise ValueError('answer() takes a list of (media, question) pairs, e.g. [("cat.jpg", "What is it?")]')
        if not pairs:
            return []
        kinds = {media_kind(media) for media, _ in pairs}
        if len(kinds) > 1:
            raise ValueError("answer() takes either images or videos in one call, not both: call it once for each")
        items = []
        for i, (media, question) in enumerate(pairs):
            text = format_prompt(self.cfg.prompt, {**fields, "question": question}, self.cfg.lower_text, index=i)
            ids = self.tokenizer.encode(text, self.cfg.max_input_tokens)
            items.append(Item(i, self._pixels(media, index=i), ids))
        if seed is not None:
            generator = self.generator(seed)
        return self.answer_batch(self.collate(items), settings=settings, generator=generator)

    def _pixels(self, media, kind: str | None = None, index=None) -> torch.Tensor:
        """Pixels of one media value, its kind inferred unless given (see `answer`)."""
        return load_pixels(media, kind, self.media, index)


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
