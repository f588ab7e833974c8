"""Opening images (a path or a base64 string) and turning images and video frames into pixel tensors."""
from __future__ import annotations

import base64
import binascii
import io
import os

import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms

from errors import RecordError


def image_transform(image_res: int, mean, std) -> transforms.Compose:
    """The original's eval transform: shorter side to image_res (bicubic), center crop, [0, 1], normalise."""
    return transforms.Compose([
        transforms.Resize(image_res, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_res),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def open_image(spec, index=None) -> Image.Image:
    """An RGB image from a file path, or from a base64-encoded image (the original's two image forms; a `data:`
    URI too)."""
    if not isinstance(spec, str) or not spec:
        raise RecordError(index, f"the image must be a path or a base64 string, got {type(spec).__name__}")
    if os.path.exists(spec):
        try:
            with Image.open(spec) as image:
                return image.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise RecordError(index, f"cannot read the image ({err})", spec) from None
    text = spec.split(",", 1)[1] if spec.startswith("data:") and "," in spec else spec
    try:
        with Image.open(io.BytesIO(base64.b64decode("".join(text.split()), validate=True))) as image:
            return image.convert("RGB")
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError):
        if _looks_like_path(spec):
            raise RecordError(index, "image file not found", spec) from None
        raise RecordError(index, "image is neither an existing file nor valid base64",
                          spec if len(spec) < 256 else None) from None


def _looks_like_path(spec: str) -> bool:
    """A short string with a folder separator or a file suffix, not a data URI: a path whose file is missing."""
    return len(spec) < 1024 and not spec.startswith("data:") and (os.sep in spec or "." in spec[-6:])


def pixels_of_frames(frames: list[Image.Image], transform) -> torch.Tensor:
    """(F, 3, H, W) from RGB frames."""
    return torch.stack([transform(frame) for frame in frames])
