"""One path from a media value to the pixels the model sees, for test files, the Python API and any other front end.

    options = MediaOptions.from_config(cfg)                 # once
    pixels = load_pixels(value, kind, options, index=...)   # (3, H, W) for an image, (F, 3, H, W) for a video

A value is a path (str or pathlib.Path) to an image, a video file or a `.json` frame file; base64 text or a data URI;
the bytes of an image file; a list of frames (base64 strings, PIL images, or the bytes or Paths of image files); or
a PIL image. `kind` is 'image' or 'video' (a record's media key); None infers it from the value (the Python API).
Every problem is a RecordError naming the record.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image
from torchvision import transforms

from dataset.images import MAX_IMAGE_PIXELS, open_image
from dataset.video import load_video_frames

# A path with one of these suffixes is a video when the kind is inferred; any other string is an image.
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".json")


def image_transform(image_res: int, mean, std) -> transforms.Compose:
    """The original's eval transform: shorter side to image_res (bicubic), center crop, [0, 1], normalise."""
    return transforms.Compose([
        transforms.Resize(image_res, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_res),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


@dataclass(frozen=True)
class MediaOptions:
    """How media become pixels: the image transform, how many video frames and which, the largest image accepted."""

    transform: Callable
    num_frames: int = 5
    frame_sampling: str = "uniform"
    max_pixels: int = MAX_IMAGE_PIXELS

    @classmethod
    def from_config(cls, cfg) -> "MediaOptions":
        return cls(image_transform(cfg.image_res, cfg.image_mean, cfg.image_std), cfg.data.num_frames,
                   cfg.data.frame_sampling)

    def frame_rng(self, seed: int, index, value) -> random.Random | None:
        """The generator of a record's random frame choice, keyed on the seed and the record's index and media
        value, not on its place in the file: a record gets the same frames in any file order, in any process of a
        run and when a run resumes. None with uniform sampling, which draws nothing."""
        if self.frame_sampling != "random":
            return None
        content = json.dumps([index, value], sort_keys=True)
        return random.Random(f"{seed}:{hashlib.sha256(content.encode()).hexdigest()}")


def media_kind(value) -> str:
    """'video' for a list of frames or a path with a video suffix (or `.json`); 'image' for anything else."""
    if isinstance(value, (list, tuple)):
        return "video"
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        if len(text) < 4096 and text.lower().endswith(VIDEO_SUFFIXES):  # longer: base64, never a path
            return "video"
    return "image"


def load_pixels(value, kind: str | None, options: MediaOptions, index=None,
                rng: random.Random | None = None) -> torch.Tensor:
    """Pixels of one media value: (3, H, W) for an image, (num_frames, 3, H, W) for a video. `rng` draws the
    frames when options.frame_sampling is 'random' (None: Python's global generator)."""
    kind = media_kind(value) if kind is None else kind
    if kind == "image":
        return options.transform(open_image(value, index, options.max_pixels))
    if kind != "video":
        raise ValueError(f"media kind must be 'image' or 'video', got {kind!r}")
    if isinstance(value, Image.Image):
        value = [value]  # one image as a one-frame video, like a .json file holding one base64 image
    return torch.stack(load_video_frames(value, options.num_frames, options.frame_sampling, rng=rng, index=index,
                                         max_pixels=options.max_pixels, transform=options.transform))

