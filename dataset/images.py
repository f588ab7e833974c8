"""One image to RGB: from a file, base64 text (plain or a `data:` URI) or a PIL image, with the checks that keep a
bad image a problem of its record.

Refused, as a RecordError naming the record: an image of more than `MAX_IMAGE_PIXELS` pixels (decoding it would take
gigabytes, and the model sees image_res x image_res anyway), images with more than 8 bits per channel (PIL's
conversion to RGB clips them to white), and anything PIL cannot decode (truncated, empty, not an image). Any other
mode is converted by PIL as the original did (CMYK, palette, alpha dropped); an animated image gives its first frame.
"""
from __future__ import annotations

import base64
import io
import os
import re
import warnings

from PIL import Image, UnidentifiedImageError

from errors import RecordError, first_line

# PIL's own decompression-bomb threshold (it warns above this and refuses at twice this): about 89.5 megapixels,
# i.e. 268 MB of RGB pixels per image, per DataLoader worker.
MAX_IMAGE_PIXELS = 89_478_485
# Modes with more than 8 bits per channel: PIL's convert("RGB") clips their values at 255.
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


class ImageProblem(Exception):
    """Why bytes or a PIL image cannot be used; the caller says which record and which frame."""


class NotAnImage(ImageProblem):
    """PIL does not recognise the bytes as any image format."""


def decode_base64(text: str) -> bytes:
    """The bytes of base64 text: plain, line-wrapped, or a data URI (`data:image/png;base64,...`).
    Raises ValueError (binascii.Error is one) for anything else."""
    text = text.strip()
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    return base64.b64decode("".join(text.split()), validate=True)


def rgb_image(source, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An RGB image from a PIL image, a file path or bytes; raises ImageProblem with the reason."""
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageProblem("empty (0 bytes)")
        source = io.BytesIO(source)
    try:
        if isinstance(source, Image.Image):
            return _converted(source, max_pixels)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below with our own words
            with Image.open(source) as image:
                return _converted(image, max_pixels)
    except ImageProblem:
        raise
    except Image.DecompressionBombError as err:  # PIL refused it before we could see its size: take it from PIL
        size = re.search(r"\((\d+) pixels\)", str(err))
        raise ImageProblem(f"{size.group(1) + ' pixels' if size else 'too many pixels'}, more than the limit of "
                           f"{max_pixels}") from None
    except UnidentifiedImageError as err:
        raise NotAnImage(_first_line(err)) from None
    except Exception as err:  # PIL's decoders raise OSError, ValueError, SyntaxError, struct.error, EOFError, ...
        raise ImageProblem(_first_line(err)) from None


def _converted(image: Image.Image, max_pixels: int) -> Image.Image:
    width, height = image.size
    if width * height > max_pixels:
        raise ImageProblem(f"{width} x {height} pixels, more than the limit of {max_pixels}")
    if image.mode in WIDE_MODES:
        raise ImageProblem(f"mode {image.mode} has more than 8 bits per channel, which PIL would clip to white; "
                           f"save it as 8-bit")
    return image.convert("RGB")


def open_image(value, index=None, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An RGB image from a record's image value: a file path (str or Path), base64 text, a data URI, a PIL image or
    the bytes of an image file (the original's two forms are a path and base64). Anything wrong is a RecordError
    naming the record."""
    if isinstance(value, Image.Image):
        return _or_record_error(value, max_pixels, index, "cannot use the image", None)
    if isinstance(value, (bytes, bytearray)):
        try:
            return rgb_image(value, max_pixels)
        except NotAnImage:
            raise RecordError(index, "cannot read the image (not an image PIL can read)") from None
        except ImageProblem as problem:
            raise RecordError(index, f"cannot read the image ({problem})") from None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise RecordError(index, f"the image must be a path or a base64 string, got {type(value).__name__}")
    if os.path.exists(value):
        if os.path.isfile(value) and os.path.getsize(value) == 0:
            raise RecordError(index, "image file is empty (0 bytes)", value)
        return _or_record_error(value, max_pixels, index, "cannot read the image", value)
    shown = value if len(value) < 256 else None
    try:
        data = decode_base64(value)
    except ValueError:
        data = None
    if data is not None:
        try:
            return rgb_image(data, max_pixels)
        except NotAnImage as problem:
            if not _looks_like_path(value):
                raise RecordError(index, f"cannot read the base64 image ({problem})", shown) from None
        except ImageProblem as problem:
            raise RecordError(index, f"cannot read the base64 image ({problem})", shown) from None
    if _looks_like_path(value):
        raise RecordError(index, "image file not found", value)
    raise RecordError(index, "image is neither an existing file nor valid base64", shown)


def _or_record_error(source, max_pixels, index, what, path) -> Image.Image:
    try:
        return rgb_image(source, max_pixels)
    except ImageProblem as problem:
        raise RecordError(index, f"{what} ({problem})", path) from None


def _looks_like_path(spec: str) -> bool:
    """A short string with a folder separator or a file suffix, not a data URI: a path whose file is missing."""
    return len(spec) < 1024 and not spec.startswith("data:") and (os.sep in spec or "." in spec[-6:])


def _first_line(err: BaseException) -> str:
    return first_line(err) or type(err).__name__
