"""A request's media, made into what `LynxPipeline.item` reads: the bytes or path of an image, a list of them (the
frames of a video), or the path of a video file. Nothing is decoded here: the pipeline reads each image once, by the
test files' rules (dataset/images.py: the pixel limit, 8 bits per channel), when the request is prepared.

One `image_url` part is an image. Several `image_url` parts are the frames of one video, in order (lmms-eval sends
videos so); only the frames Lynx samples are decoded. A `video_url` part is a video file (mp4, webm, ... or the
original's .json list of base64 frames); its bytes go to a private temporary file that `Media.close` removes once the
request is prepared.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from server.errors import APIError
from server.security import Limits, locate

VIDEO_SUFFIX = {"video/mp4": ".mp4", "video/webm": ".webm", "video/x-matroska": ".mkv", "video/quicktime": ".mov",
                "video/x-msvideo": ".avi", "application/json": ".json"}


@dataclass
class Media:
    kind: str  # "image" | "video"
    value: object  # what LynxPipeline.item reads
    temporary: str | None = None  # a file of ours to remove

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
    return source.data if source.data is not None else Path(source.path)


def _video(url: str, param: str, limits: Limits) -> Media:
    source = locate(url, limits, param)
    if source.path is not None:
        return Media("video", source.path)
    if not source.data:
        raise APIError(400, "the video has no frames (0 bytes)", param)
    fd, path = tempfile.mkstemp(prefix="lynx-video-", suffix=VIDEO_SUFFIX.get(source.mime or "", ".mp4"))
    with os.fdopen(fd, "wb") as f:
        f.write(source.data)
    return Media("video", path, temporary=path)
