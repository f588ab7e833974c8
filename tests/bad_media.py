"""Media files that cannot be used, made small: for the tests of per-record problems."""
from __future__ import annotations

import io
import struct
import subprocess
import zlib

import numpy as np
from PIL import Image

from video_helpers import write_test_video


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height RGB pixels but holds almost none: PIL reads its size without decoding, so
    a 200-megapixel image costs a few bytes here."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def image_bytes(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def write_cut_video(folder, frames: int = 10):
    """An mp4 with its index at the front (faststart) and the end of its last frame cut off: it opens and counts
    `frames` frames, then decoding the last one fails."""
    import imageio_ffmpeg

    rng = np.random.default_rng(0)
    whole = folder / "whole.mp4"
    write_test_video(whole, [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(frames)], size=(64, 48))
    faststart = folder / "faststart.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-i", str(whole), "-c", "copy",
                    "-movflags", "+faststart", str(faststart)], check=True)
    data = faststart.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")
    path = folder / "cut.mp4"
    path.write_bytes(data[:-200])
    return path
