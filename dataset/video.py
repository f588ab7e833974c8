"""Video frames for a record: pick which frames to use, then decode only those.

A record's `video` value takes one of three forms (as in the released Open-VQA files and the original's
dataset code): a path to a video container (.mp4 and whatever else decord reads), a path to a .json file
holding a list of base64-encoded frames (or a single base64 image string), or the list of base64 frames
inline. The Python API may also give a list of PIL images. Frames come back as PIL RGB images; the caller
applies the image transform to each.
"""

from __future__ import annotations

import json
import os
import random
import re

from PIL import Image

from configs.schema import FRAME_SAMPLING
from dataset.images import MAX_IMAGE_PIXELS, ImageProblem, decode_base64, rgb_image
from errors import RecordError, first_line


def _segment_lengths(num_source_frames, num_frames):
    """Lengths of the num_frames consecutive segments that cover the video.

    Every segment gets n // F frames and the first n % F segments one more, so the longer segments come
    first. (This is how the original splits; it is not np.linspace rounding, which would put the longer
    segments elsewhere: for 16 frames it starts segments at 0, 4, 7, 10, 13, not 0, 3, 6, 9, 12.)
    """
    stride, extra = divmod(num_source_frames, num_frames)
    return [stride + 1] * extra + [stride] * (num_frames - extra)


def sample_frame_indices(num_source_frames, num_frames, sampling="uniform", rng=None):
    """Indices (sorted, in range(num_source_frames)) of the num_frames frames to feed the model.

    'uniform' is the original's evaluation rule (`sample_frame_ids(..., training=False)`): the first
    frame of each segment, and when the video has no more frames than wanted, every frame repeated in
    turn and sorted, e.g. 3 frames for 5 -> [0, 0, 1, 1, 2].

    'random' is the original's training rule, which its evaluation dataset actually applies to base64
    frame lists: the longer segments are shuffled into random positions and a random frame is taken in
    each; a shorter video keeps every frame once and fills the rest with random frames, sorted. For
    exactly num_frames source frames both rules give 0..F-1. `rng` is a random.Random (the global
    generator when None), so a seeded rng repeats its choice; the original drew from numpy's global
    generator, so its actual draws are not reproduced, only their distribution.
    """
    if sampling not in FRAME_SAMPLING:
        raise ValueError(f"frame sampling must be one of {FRAME_SAMPLING}, got {sampling!r}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    if num_source_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {num_source_frames}")
    rng = random if rng is None else rng
    n, f = num_source_frames, num_frames

    if n <= f:
        if sampling == "uniform":
            ids = [i % n for i in range(f)]
        else:
            ids = list(range(n)) + [rng.randrange(n) for _ in range(f - n)]
        return sorted(ids)

    lengths = _segment_lengths(n, f)
    if sampling == "random":
        rng.shuffle(lengths)
    ids = []
    start = 0
    for length in lengths:
        ids.append(start if sampling == "uniform" else rng.randrange(start, start + length))
        start += length
    return ids


def load_video_frames(spec, num_frames, sampling="uniform", rng=None, index=None, max_pixels=MAX_IMAGE_PIXELS,
                      transform=None):
    """Decode the sampled frames of a record's `video` value into num_frames PIL RGB images, or, given a
    `transform`, into what it makes of each, applied as soon as the frame is decoded (so that a list or .json file
    of large frames holds one of them at full size at a time).

    Anything wrong with the media (missing or empty file, undecodable video, bad base64 or JSON, a frame
    that is not an image or is larger than max_pixels) raises RecordError naming the record index and the
    file, so the caller can report it and go on with the other records.
    """
    transform = transform or _as_is
    if isinstance(spec, (list, tuple)):
        return _frames_from_list(list(spec), num_frames, sampling, rng, index, None, max_pixels, transform)
    if not isinstance(spec, (str, os.PathLike)):
        raise RecordError(index, f"video must be a path or a list of base64 frames, got {type(spec).__name__}")

    path = os.fspath(spec)
    if not path:
        raise RecordError(index, "video path is empty")
    if not os.path.isfile(path):
        raise RecordError(index, "video file not found", path)
    if os.path.getsize(path) == 0:
        raise RecordError(index, "video file is empty (0 bytes)", path)
    if path.lower().endswith(".json"):
        return _frames_from_json_file(path, num_frames, sampling, rng, index, max_pixels, transform)
    return _frames_from_container(path, num_frames, sampling, rng, index, transform)


def _as_is(image):
    return image


def _frames_from_container(path, num_frames, sampling, rng, index, transform):
    """Read only the sampled frames of a video file with decord (RGB24, as the reference fixture was made)."""
    import decord

    decord.logging.set_level(decord.logging.QUIET)  # ffmpeg's own lines: the record's error says what went wrong
    try:
        reader = decord.VideoReader(path)
        count = len(reader)
    except Exception as exc:  # decord raises RuntimeError or its own DECORDError (an Exception)
        raise RecordError(index, f"cannot decode video: {_decord_problem(exc)}", path) from exc
    if count == 0:
        raise RecordError(index, "video has no frames", path)

    ids = sample_frame_indices(count, num_frames, sampling, rng)
    try:
        batch = reader.get_batch(ids).asnumpy()
    except Exception as exc:
        raise RecordError(index, f"cannot decode frames {ids} of {count}: {_decord_problem(exc)}", path) from exc
    return [transform(Image.fromarray(frame).convert("RGB")) for frame in batch]


def _frames_from_json_file(path, num_frames, sampling, rng, index, max_pixels, transform):
    """A .json file holds a list of base64 frames, or one base64 image used as a one-frame video."""
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecordError(index, f"not valid JSON: {exc}", path) from exc
    if isinstance(content, str):
        content = [content]
    if not isinstance(content, list):
        raise RecordError(
            index, f"JSON must hold a list of base64 frames or one base64 string, got {type(content).__name__}", path
        )
    return _frames_from_list(content, num_frames, sampling, rng, index, path, max_pixels, transform)


def _frames_from_list(frames, num_frames, sampling, rng, index, path, max_pixels, transform):
    """Frames given one by one (base64 strings, PIL images, or the bytes or path (a Path) of image files): only the
    sampled ones are decoded."""
    if not frames:
        raise RecordError(index, "video has no frames (empty base64 frame list)", path)
    ids = sample_frame_indices(len(frames), num_frames, sampling, rng)
    decoded = {}
    for i in sorted(set(ids)):
        decoded[i] = transform(_frame(frames[i], i, index, path, max_pixels))
    return [decoded[i] for i in ids]


def _frame(value, position, index, path, max_pixels):
    if isinstance(value, str):
        try:
            value = decode_base64(value)
        except ValueError as exc:
            raise RecordError(index, f"frame {position} is not valid base64: {exc}", path) from exc
    elif not isinstance(value, (Image.Image, bytes, bytearray, os.PathLike)):
        raise RecordError(index, f"frame {position} is a {type(value).__name__}, not a base64 string", path)
    try:
        return rgb_image(value, max_pixels)
    except ImageProblem as problem:
        raise RecordError(index, f"frame {position} is not a readable image: {problem}", path) from None


# decord's messages for the usual problems (its own text names C++ checks and source files), in words.
DECORD_PROBLEMS = (
    ("cannot find video stream", "the file has no video stream (audio only, or not a video)"),
    ("Error reading", "not a video file, or a damaged one"),
    ("Invalid data found", "not a video file, or a damaged one"),
    ("broken metadata", "its length cannot be read (not a video file, or a damaged one)"),
    ("Error while feeding the filter graph", "the file is damaged there"),
)


def _decord_problem(exc):
    """What went wrong, in words: a known decord problem, else its first line without the '[12:00:00]
    src/file.cc:83: ' prefixes and C++ check text it logs with."""
    text = first_line(exc) or type(exc).__name__
    for clue, problem in DECORD_PROBLEMS:
        if clue in text:
            return problem
    text = re.sub(r"(\[[\d:]+\] \S+:\d+: )+", "", text)
    return re.sub(r"^Check failed: .*?\) ", "", text)
