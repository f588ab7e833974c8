"""A Python API over Lynx for scripts and notebooks: build from a config, answer (media, question) pairs.

    from lynx import LynxPipeline
    lynx = LynxPipeline.from_config("configs/LYNX.yaml", device="cuda")
    lynx.answer([("images/cat.jpg", "What is in the image?")])
"""
from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image

from configs.schema import LynxConfig, load_config
from dataset.batching import Batch, Collator
from errors import InputError
from dataset.media import image_transform, open_image, pixels_of_frames
from dataset.prompt import format_prompt
from dataset.video import load_video_frames
from configs.decoding import DecodingSettings
from decoding import make_decoder
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


def seed_everything(seed: int) -> None:
    """The original seeds torch, numpy and random with --seed + rank."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".json")  # answer(): a path that is a video


class LynxPipeline:
    def __init__(self, cfg: LynxConfig, model, tokenizer, device: str):
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.settings = DecodingSettings.from_config(cfg)
        self.decoder = make_decoder(cfg, model.LLM, tokenizer, device)
        self.collate = Collator(tokenizer.pad_id, cfg.use_left_pad)
        self.transform = image_transform(cfg.image_res, cfg.image_mean, cfg.image_std)
        self.lemmatizer = load_lemmatizer() if cfg.apply_lemmatizer else None

    @classmethod
    def from_config(cls, config: str | LynxConfig, device: str | None = None, overrides=()) -> "LynxPipeline":
        cfg = config if isinstance(config, LynxConfig) else load_config(config, overrides)
        device = device or default_device()
        model, tokenizer = build_lynx(cfg, device)
        return cls(cfg, model, tokenizer, device)

    @torch.inference_mode()
    def answer_batch(self, batch: Batch, visual: torch.Tensor | None = None, settings: DecodingSettings | None = None,
                     generator: torch.Generator | None = None, rows: int | None = None) -> list[str]:
        """Answers for the usable rows of a collated batch, in row order. `visual`: its visual prefix, if computed
        already; `settings`: decoding for this call (default: the config's); `generator`: the sampling draws;
        `rows`: the batch shape to decode at (see decoding.Decoder)."""
        settings = self.settings if settings is None else settings.checked()
        if visual is None:
            visual = self.model.encode_media(batch.pixel_values)
        embeds, mask = self.model.fuse(visual, batch.input_ids, batch.attention_mask)
        ids = self.decoder.generate(embeds, mask, settings, generator=generator, rows=rows)
        answers = [self.tokenizer.decode(row) for row in ids.tolist()]
        return [lemmatize(self.lemmatizer, a) for a in answers] if self.lemmatizer else answers

    def answer(self, pairs, settings: DecodingSettings | None = None, **fields) -> list[str]:
        """Answer [(media, question), ...]. Media: an image path, a PIL image, a base64 image, a video path, or a
        list of frames (PIL images or base64 strings). `settings`: decoding for this call (default: the config's,
        e.g. `lynx.settings.replace(num_beams=1, use_nucleus_sampling=False)` for greedy). Extra `fields` fill other
        placeholders of the prompt."""
        items = []
        for media, question in pairs:
            text = format_prompt(self.cfg.prompt, {**fields, "question": question}, self.cfg.lower_text)
            items.append({"position": len(items), "error": None, "pixel_values": self._pixels(media),
                          "input_ids": self.tokenizer.encode(text, self.cfg.max_input_tokens)})
        kinds = {item["pixel_values"].ndim for item in items}
        if len(kinds) > 1:
            raise ValueError("answer() takes either images or videos in one call, not both")
        return self.answer_batch(self.collate(items), settings=settings)

    def _pixels(self, media) -> torch.Tensor:
        if isinstance(media, Image.Image):
            return self.transform(media.convert("RGB"))
        if isinstance(media, (list, tuple)) and media and isinstance(media[0], Image.Image):
            return pixels_of_frames([f.convert("RGB") for f in media], self.transform)
        if isinstance(media, str) and not media.lower().endswith(VIDEO_SUFFIXES):
            return self.transform(open_image(media))
        frames = load_video_frames(media, self.cfg.data.num_frames, self.cfg.data.frame_sampling)
        return pixels_of_frames(frames, self.transform)



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
