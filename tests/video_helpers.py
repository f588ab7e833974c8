"""Small video files for tests, written with the ffmpeg binary that imageio-ffmpeg ships."""

from __future__ import annotations

import numpy as np


def frame_colour(i):
    """A distinct, saturated-enough RGB colour for frame i, easy to tell apart after lossy coding."""
    palette = [
        (220, 40, 40), (40, 200, 40), (40, 40, 220), (230, 230, 40), (40, 220, 220),
        (220, 40, 220), (240, 240, 240), (20, 20, 20), (240, 140, 20), (120, 60, 200),
    ]
    return palette[i % len(palette)]


def write_test_video(path, frames_or_count, size=(64, 48), fps=8):
    """Write an H.264 (libx264, yuv420p) .mp4 and return the frames written, as uint8 (H, W, 3) arrays.

    frames_or_count is either a list of uint8 RGB arrays of shape (height, width, 3), or a frame count,
    in which case frame i is a flat frame_colour(i). size is (width, height); keep both even (yuv420p).
    """
    import imageio_ffmpeg

    width, height = size
    if isinstance(frames_or_count, int):
        frames = [np.full((height, width, 3), frame_colour(i), dtype=np.uint8) for i in range(frames_or_count)]
    else:
        frames = [np.ascontiguousarray(f, dtype=np.uint8) for f in frames_or_count]
        for f in frames:
            if f.shape != (height, width, 3):
                raise ValueError(f"frame shape {f.shape} does not match size {size}")

    writer = imageio_ffmpeg.write_frames(
        str(path),
        (width, height),
        fps=fps,
        codec="libx264",
        pix_fmt_in="rgb24",
        pix_fmt_out="yuv420p",
        macro_block_size=1,
        ffmpeg_log_level="error",
    )
    writer.send(None)  # start the generator
    for f in frames:
        writer.send(f)
    writer.close()
    return frames
