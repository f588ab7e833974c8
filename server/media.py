"""A request's media, made into what the pipeline's `Preparer` reads: the bytes or path of an image, a list of them
(the frames of a video), or the path of a video file. No image is decoded here, only its header read, to refuse one
over `--max-pixels` by its size; the pipeline reads each image once, by the test files' rules (dataset/images.py:
8 bits per channel, ...), when the request is prepared.

One `image_url` part is an image. Several `image_url` parts are the frames of one video, in order (lmms-eval sends
videos so); only the frames Lynx samples are decoded. A `video_url` part is a video file (mp4, webm, ...), whose
bytes go to a private temporary file that `Media.close` removes once the request is prepared, or the original's
.json list of base64 frames (`application/json`), whose frames are taken as `image_url` frames are (at most
`--max-images`).
"""
from __future__ import annotations

import io
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from dataset.images import decode_base64
from server.errors import APIError
from server.security import Limits, locate

VIDEO_SUFFIX = {"video/mp4": ".mp4", "video/webm": ".webm", "video/x-matroska": ".mkv", "video/quicktime": ".mov",
                "video/x-msvideo": ".avi", "application/json": ".json"}


@dataclass
class Media:
    kind: str  # "image" | "video"
    value: object  # what Preparer.item reads
    temporary: str | None = None  # a file of ours to remove

    @property
    def size(self) -> int:
        """The bytes held in memory (files count nothing)."""
        values = self.value if isinstance(self.value, list) else [self.value]
        return sum(len(v) for v in values if isinstance(v, bytes))

    def close(self) -> None:
        if self.temporary is not None:
            try:
                os.unlink(self.temporary)
            except FileNotFoundError:
                pass
            self.temporary = None


def load_media(images: list[tuple[str, str]], videos: list[tuple[str, str]], limits: Limits) -> Media:
    """Media of one request from its (url, param) image and video parts; APIError if they cannot be used."""
    if images and videos:
        raise APIError(400, "a request holds either images (one image, or the frames of a video) or one video_url, "
                            "not both", videos[0][1])
    if len(videos) > 1:
        raise APIError(400, "one video per request", videos[1][1])
    if videos:
        return _video(*videos[0], limits)
    if not images:
        raise APIError(400, "Lynx answers questions about an image or a video: the user message has no "
                            "image_url or video_url part", "messages")
    frames = [_image(url, param, limits) for url, param in images]
    return Media("image", frames[0]) if len(frames) == 1 else Media("video", frames)


def _image(url: str, param: str, limits: Limits) -> bytes | Path:
    """The bytes (a data: or http URL) or the path (inside the media root) of one image."""
    source = locate(url, limits, param)
    image = source.data if source.data is not None else Path(source.path)
    check_pixels(image, param, limits.max_pixels)
    return image


def check_pixels(image: bytes | Path, param: str, limit: int) -> None:
    """400 for an image over `limit` pixels, by the size in its header (before anything is decoded). What PIL
    cannot read passes: the pipeline says why it cannot be used."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
                width, height = opened.size
    except Image.DecompressionBombError:  # over twice PIL's own limit, so over any --max-pixels
        raise APIError(400, f"the image has more pixels than PIL decodes, over the server's limit of {limit} "
                            f"(--max-pixels)", param) from None
    except Exception:  # noqa: BLE001 - not an image, truncated, ...: refused when the pipeline reads it
        return
    if width * height > limit:
        raise APIError(400, f"the image is {width} x {height} = {width * height} pixels, over the server's limit of "
                            f"{limit} (--max-pixels)", param)


def _video(url: str, param: str, limits: Limits) -> Media:
    source = locate(url, limits, param)
    if source.path is not None:
        return Media("video", source.path)
    if not source.data:
        raise APIError(400, "the video has no frames (0 bytes)", param)
    if source.mime == "application/json":
        return Media("video", _frame_list(source.data, param, limits))
    fd, path = tempfile.mkstemp(prefix="lynx-video-", suffix=VIDEO_SUFFIX.get(source.mime or "", ".mp4"))
    with os.fdopen(fd, "wb") as f:
        f.write(source.data)
    return Media("video", path, temporary=path)


def _frame_list(data: bytes, param: str, limits: Limits) -> list[bytes]:
    """The frames of the original's .json video format (a list of base64 images, or one), each checked as an
    `image_url` frame is."""
    try:
        frames = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise APIError(400, f"the .json video is not valid JSON ({str(err)[:200]})", param) from None
    frames = [frames] if isinstance(frames, str) else frames
    if not isinstance(frames, list) or not frames:
        raise APIError(400, "a .json video holds a list of base64 frames (or one base64 string)", param)
    if len(frames) > limits.max_images:
        raise APIError(400, f"{len(frames)} frames in the .json video, over the server's limit of "
                            f"{limits.max_images} (--max-images)", param)
    images = []
    for i, frame in enumerate(frames):
        if not isinstance(frame, str):
            raise APIError(400, f"frame {i} of the .json video is a {type(frame).__name__}, not a base64 string",
                           param)
        try:
            image = decode_base64(frame)
        except ValueError:
            raise APIError(400, f"frame {i} of the .json video is not valid base64", param) from None
        check_pixels(image, param, limits.max_pixels)
        images.append(image)
    return images
