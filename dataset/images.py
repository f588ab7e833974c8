"""One image to RGB: from a file, base64 text (plain or a `data:` URI) or a PIL image. Any PIL mode is converted to
RGB as the original did (palette, CMYK, alpha dropped without compositing)."""
from __future__ import annotations

import base64
import io
import os

from PIL import Image

from errors import RecordError


class ImageProblem(Exception):
    """Why bytes or a PIL image cannot be used; the caller says which record and which frame."""


def decode_base64(text: str) -> bytes:
    """The bytes of base64 text: plain, line-wrapped, or a data URI (`data:image/png;base64,...`).
    Raises ValueError (binascii.Error is one) for anything else."""
    text = text.strip()
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    return base64.b64decode("".join(text.split()), validate=True)


def rgb_image(source) -> Image.Image:
    """An RGB image from a PIL image, a file path or bytes; raises ImageProblem with the reason."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:  # UnidentifiedImageError is an OSError
        raise ImageProblem(_first_line(err)) from None


def open_image(value, index=None) -> Image.Image:
    """An RGB image from a record's image value: a file path (str or Path), base64 text, a data URI or a PIL image
    (the original's two forms are a path and base64). Anything wrong is a RecordError naming the record."""
    if isinstance(value, Image.Image):
        return rgb_image(value)
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise RecordError(index, f"the image must be a path or a base64 string, got {type(value).__name__}")
    if os.path.exists(value):
        try:
            return rgb_image(value)
        except ImageProblem as problem:
            raise RecordError(index, f"cannot read the image ({problem})", value) from None
    try:
        return rgb_image(decode_base64(value))
    except (ValueError, ImageProblem):
        if _looks_like_path(value):
            raise RecordError(index, "image file not found", value) from None
        raise RecordError(index, "image is neither an existing file nor valid base64",
                          value if len(value) < 256 else None) from None


def _looks_like_path(spec: str) -> bool:
    """A short string with a folder separator or a file suffix, not a data URI: a path whose file is missing."""
    return len(spec) < 1024 and not spec.startswith("data:") and (os.sep in spec or "." in spec[-6:])


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
