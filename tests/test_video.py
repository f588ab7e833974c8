"""Frame selection and video decoding (dataset/video.py) against the parity fixture and files made here."""

import base64
import io
import itertools
import json
import random
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision import transforms

from errors import RecordError
from dataset.video import FRAME_SAMPLING, load_video_frames, sample_frame_indices
from tests.bad_media import write_cut_video
from tests.video_helpers import frame_colour, write_test_video

FIXTURE = Path(__file__).parent / "fixtures" / "tiny"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


VIDEO_RECORDS = read_jsonl(FIXTURE / "data" / "Open_VQA_videos_tiny.jsonl")
VIDEO_META = {m["index"]: m for m in read_jsonl(FIXTURE / "expected" / "videos_meta.jsonl")}


# ---------------------------------------------------------------- frame selection, written independently


def expected_uniform(n, f):
    """Start of each chunk of np.array_split (first chunks one longer); frames dealt round-robin if n <= f."""
    if n <= f:
        # frame j is used f // n times, plus once more for the first f % n frames
        return [j for j in range(n) for _ in range(f // n + (1 if j < f % n else 0))]
    return [int(chunk[0]) for chunk in np.array_split(np.arange(n), f)]


def fits_some_segmentation(ids, n, f):
    """True when ids[i] lies in segment i for one arrangement of the f segments (n // f or n // f + 1 long)."""
    short, n_long = divmod(n, f)
    for long_positions in itertools.combinations(range(f), n_long):
        bounds = np.cumsum([0] + [short + (i in long_positions) for i in range(f)])
        if all(bounds[i] <= ids[i] < bounds[i + 1] for i in range(f)):
            return True
    return False


def test_fixture_frame_ids_hard_facts():
    assert sample_frame_indices(5, 5) == [0, 1, 2, 3, 4]
    assert sample_frame_indices(9, 5) == [0, 2, 4, 6, 8]
    assert sample_frame_indices(16, 5) == [0, 4, 7, 10, 13]
    assert sample_frame_indices(31, 5) == [0, 7, 13, 19, 25]


@pytest.mark.parametrize("index", sorted(VIDEO_META))
def test_uniform_matches_reference_meta(index):
    meta = VIDEO_META[index]
    assert sample_frame_indices(meta["num_source_frames"], 5, "uniform") == meta["frame_ids"]


def test_uniform_is_not_linspace_rounding():
    # np.linspace(0, 16, 6).astype(int) would start the segments at 0, 3, 6, 9, 12
    assert sample_frame_indices(16, 5) != [0, 3, 6, 9, 12]
    assert sample_frame_indices(7, 5) == [0, 2, 4, 5, 6]


LENGTHS = range(1, 41)  # videos of 1 to 40 frames
FRAME_COUNTS = (4, 5, 8)  # num_frames: below, at and above the fixture's 5


def test_uniform_rule_for_every_length():
    for num_frames in FRAME_COUNTS:
        for n in LENGTHS:
            ids = sample_frame_indices(n, num_frames)
            where = f"{n} frames, num_frames {num_frames}"
            assert ids == expected_uniform(n, num_frames), f"{where}: {ids}"
            if n < num_frames:
                assert ids == sorted(i % n for i in range(num_frames)), f"{where}: {ids}"


def test_short_video_repeats_sorted():
    assert sample_frame_indices(1, 5) == [0, 0, 0, 0, 0]
    assert sample_frame_indices(2, 5) == [0, 0, 0, 1, 1]
    assert sample_frame_indices(3, 5) == [0, 0, 1, 1, 2]
    assert sample_frame_indices(3, 8) == [0, 0, 0, 1, 1, 1, 2, 2]


def test_random_rule_for_every_length():
    for num_frames in FRAME_COUNTS:
        for n in LENGTHS:
            rng = random.Random(1000 * n + num_frames)
            for _ in range(20):
                ids = sample_frame_indices(n, num_frames, "random", rng)
                where = f"{n} frames, num_frames {num_frames}: {ids}"
                assert len(ids) == num_frames, where
                assert ids == sorted(ids), where
                assert all(0 <= i < n for i in ids), where
                if n <= num_frames:
                    assert set(ids) == set(range(n)), where  # every frame once, the rest random repeats
                else:
                    assert len(set(ids)) == num_frames, where
                    assert fits_some_segmentation(ids, n, num_frames), where


def test_random_reaches_every_frame_and_varies():
    rng = random.Random(0)
    draws = [tuple(sample_frame_indices(12, 5, "random", rng)) for _ in range(400)]
    assert {i for d in draws for i in d} == set(range(12))
    assert len(set(draws)) > 20
    # with 7 frames the two long segments can sit anywhere, so the last pick is sometimes 5, sometimes 6
    last = {sample_frame_indices(7, 5, "random", rng)[-1] for _ in range(200)}
    assert last == {5, 6}
    repeats = {tuple(sample_frame_indices(3, 5, "random", rng)) for _ in range(200)}
    assert repeats == {(0, 0, 0, 1, 2), (0, 0, 1, 1, 2), (0, 0, 1, 2, 2), (0, 1, 1, 1, 2), (0, 1, 1, 2, 2),
                       (0, 1, 2, 2, 2)}


def test_random_reproducible_with_seed():
    a = [sample_frame_indices(31, 5, "random", random.Random(42)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    rng1, rng2 = random.Random(7), random.Random(7)
    seq1 = [sample_frame_indices(n, 5, "random", rng1) for n in range(1, 41)]
    seq2 = [sample_frame_indices(n, 5, "random", rng2) for n in range(1, 41)]
    assert seq1 == seq2


def test_exactly_num_frames_same_in_both_modes():
    assert sample_frame_indices(5, 5, "random", random.Random(3)) == [0, 1, 2, 3, 4]
    assert sample_frame_indices(8, 8, "random", random.Random(3)) == list(range(8))


def test_bad_arguments():
    assert FRAME_SAMPLING == ("uniform", "random")
    with pytest.raises(ValueError):
        sample_frame_indices(10, 5, "middle")
    with pytest.raises(ValueError):
        sample_frame_indices(0, 5)
    with pytest.raises(ValueError):
        sample_frame_indices(10, 0)


# ---------------------------------------------------------------- decoding the parity fixture


def reference_transform():
    return transforms.Compose([
        transforms.Resize(84, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(84),
        transforms.ToTensor(),
        transforms.Normalize(mean=CLIP_MEAN, std=CLIP_STD),
    ])


@pytest.fixture(scope="module")
def expected_tensors():
    return load_file(str(FIXTURE / "expected" / "videos_tensors.safetensors"))


# Random frames equal the reference only where the video has exactly 5 frames (then both rules give 0..4).
PIXEL_CASES = [(record, sampling) for record in VIDEO_RECORDS for sampling in FRAME_SAMPLING
               if sampling == "uniform" or VIDEO_META[record["index"]]["num_source_frames"] == 5]


@pytest.mark.parametrize("record,sampling", PIXEL_CASES, ids=[f"{r['index']}-{s}" for r, s in PIXEL_CASES])
def test_fixture_pixel_values(record, sampling, expected_tensors, monkeypatch):
    meta = VIDEO_META[record["index"]]
    monkeypatch.chdir(FIXTURE)  # record paths are relative to the fixture root, opened from the cwd
    frames = load_video_frames(record["video"], 5, sampling, random.Random(0), index=record["index"])
    assert len(frames) == 5
    assert all(f.mode == "RGB" and f.size == tuple(meta["source_size_wh"]) for f in frames)
    tf = reference_transform()
    pixels = torch.stack([tf(f) for f in frames])
    expected = expected_tensors[f"{record['index']}/pixel_values"]
    assert pixels.shape == expected.shape == (5, 3, 84, 84)
    torch.testing.assert_close(pixels, expected, atol=1e-6, rtol=0)


def test_fixture_covers_all_three_forms():
    kinds = {type(r["video"]).__name__ + (Path(r["video"]).suffix if isinstance(r["video"], str) else "")
             for r in VIDEO_RECORDS}
    assert kinds == {"str.mp4", "str.json", "list"}


def test_mp4_decodes_only_sampled_frames(monkeypatch):
    import decord

    calls = []
    real = decord.VideoReader

    class Recording:
        def __init__(self, path, *args, **kwargs):
            self._reader = real(path, *args, **kwargs)

        def __len__(self):
            return len(self._reader)

        def get_batch(self, ids):
            calls.append(list(ids))
            return self._reader.get_batch(ids)

        def __getitem__(self, i):
            raise AssertionError("frames must be read with one get_batch call")

    monkeypatch.setattr(decord, "VideoReader", Recording)
    frames = load_video_frames(str(FIXTURE / "videos" / "clip_d.mp4"), 5, index=97)
    assert calls == [[0, 7, 13, 19, 25]]
    assert len(frames) == 5


def test_base64_list_decodes_only_sampled_frames():
    good = [_png_b64((10 * i, 0, 0)) for i in range(9)]
    # frames that are not picked by the uniform rule (0, 2, 4, 6, 8) may be garbage: they are never decoded
    mixed = [g if i % 2 == 0 else "!!not base64!!" for i, g in enumerate(good)]
    frames = load_video_frames(mixed, 5, index=1)
    assert [f.getpixel((0, 0))[0] for f in frames] == [0, 20, 40, 60, 80]


# ---------------------------------------------------------------- videos and frame lists made here


def _png_b64(colour, size=(8, 6), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _mean_colours(frames):
    return [np.asarray(f, dtype=np.float64).reshape(-1, 3).mean(axis=0) for f in frames]


@pytest.mark.parametrize("count, expected_ids", [(12, [0, 3, 6, 8, 10]), (3, [0, 0, 1, 1, 2]), (5, [0, 1, 2, 3, 4])])
def test_written_mp4_frames(tmp_path, count, expected_ids):
    import decord

    path = tmp_path / "clip.mp4"
    write_test_video(path, count, size=(64, 48), fps=8)
    assert len(decord.VideoReader(str(path))) == count
    frames = load_video_frames(str(path), 5, index=0)
    assert [f.size for f in frames] == [(64, 48)] * 5
    for got, frame_id in zip(_mean_colours(frames), expected_ids):
        assert np.abs(got - np.array(frame_colour(frame_id))).max() < 12, (frame_id, got)


def test_written_mp4_with_given_frames(tmp_path):
    # a bright bar that moves right one block per frame: the decoded frames must keep their order
    frames_in = []
    for i in range(8):
        f = np.zeros((32, 96, 3), dtype=np.uint8)
        f[:, 12 * i:12 * i + 12] = 255
        frames_in.append(f)
    path = tmp_path / "bar.mp4"
    write_test_video(path, frames_in, size=(96, 32), fps=4)
    frames = load_video_frames(path, 4, index="bar")  # PathLike is accepted too
    for frame, frame_id in zip(frames, [0, 2, 4, 6]):
        columns = np.asarray(frame, dtype=np.float64).mean(axis=(0, 2))
        assert int(np.argmax(columns)) // 12 == frame_id


def test_json_file_and_inline_list(tmp_path):
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200)]
    frames_b64 = [_png_b64(c) for c in colours]
    path = tmp_path / "frames.json"
    path.write_text(json.dumps(frames_b64))
    for spec in (str(path), frames_b64):
        frames = load_video_frames(spec, 5, index=3)
        assert [f.getpixel((0, 0)) for f in frames] == [colours[i] for i in [0, 0, 1, 1, 2]]


def test_json_single_image_string_and_modes(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(_png_b64((5, 6, 7, 128), mode="RGBA")))
    frames = load_video_frames(str(path), 5, index=4)
    assert len(frames) == 5
    assert all(f.mode == "RGB" and f.getpixel((0, 0)) == (5, 6, 7) for f in frames)
    grey = load_video_frames([_png_b64(90, mode="L")], 2, index=4)
    assert [f.getpixel((0, 0)) for f in grey] == [(90, 90, 90)] * 2


def test_wrapped_base64_and_data_uri_accepted():
    b64 = _png_b64((1, 2, 3))
    wrapped = "\n".join(b64[i:i + 20] for i in range(0, len(b64), 20))
    frames = load_video_frames([wrapped, "data:image/png;base64," + b64], 2, index=5)
    assert [f.getpixel((0, 0)) for f in frames] == [(1, 2, 3)] * 2


# ---------------------------------------------------------------- errors name the record and the file


def _assert_record_error(excinfo, index, path, *words):
    err = excinfo.value
    message = str(err)
    assert err.index == index
    assert f"record {index!r}" in message
    if path is not None:
        assert err.path == str(path)
        assert str(path) in message
    for word in words:
        assert word in message.lower(), message
    assert "check failed" not in message.lower() and ".cc:" not in message, message  # decord's C++ text


def test_missing_file(tmp_path):
    path = tmp_path / "nope.mp4"
    with pytest.raises(RecordError) as excinfo:
        load_video_frames(str(path), 5, index=11)
    _assert_record_error(excinfo, 11, path, "not found")


def test_empty_file(tmp_path):
    for name in ("empty.mp4", "empty.json"):
        path = tmp_path / name
        path.write_bytes(b"")
        with pytest.raises(RecordError) as excinfo:
            load_video_frames(str(path), 5, index=12)
        _assert_record_error(excinfo, 12, path, "empty")


def test_corrupt_mp4(tmp_path):
    path = tmp_path / "corrupt.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(RecordError) as excinfo:
        load_video_frames(str(path), 5, index=13)
    _assert_record_error(excinfo, 13, path, "cannot decode video: not a video file, or a damaged one")


def test_truncated_mp4(tmp_path):
    path = tmp_path / "truncated.mp4"
    path.write_bytes((FIXTURE / "videos" / "clip_d.mp4").read_bytes()[:3000])
    with pytest.raises(RecordError) as excinfo:
        load_video_frames(str(path), 5, index=14)
    _assert_record_error(excinfo, 14, path, "cannot decode video: not a video file, or a damaged one")


def test_video_without_frames(tmp_path):
    path = tmp_path / "noframes.mp4"
    write_test_video(path, 0, size=(16, 16))  # ffmpeg writes a container with no video stream
    assert path.stat().st_size > 0
    with pytest.raises(RecordError) as excinfo:
        load_video_frames(str(path), 5, index=15)
    _assert_record_error(excinfo, 15, path, "cannot decode video: the file has no video stream (audio only, or not a "
                                            "video)")


def test_audio_file_and_image_given_as_videos(tmp_path):
    """decord's own words were `Check failed: st_nb >= 0 (-1381258232 vs. 0) ERROR cannot find video stream ...`."""
    audio = tmp_path / "sound.wav"
    with wave.open(str(audio), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(bytes(16000))
    with pytest.raises(RecordError) as excinfo:
        load_video_frames(str(audio), 5, index=16)
    _assert_record_error(excinfo, 16, audio, "cannot decode video: the file has no video stream (audio only, or not a "
                                             "video)")
    image = FIXTURE / "images" / "img_a.jpg"
    with pytest.raises(RecordError) as excinfo:
        load_video_frames(str(image), 5, index=17)
    _assert_record_error(excinfo, 17, image, "cannot decode video: its length cannot be read (not a video file, or a "
                                             "damaged one)")


def test_bad_base64_entry_inline():
    frames = [_png_b64((0, 0, 0)), "@@@ definitely not base64 @@@"]
    with pytest.raises(RecordError) as excinfo:
        load_video_frames(frames, 5, index=16)
    _assert_record_error(excinfo, 16, None, "frame 1", "base64")
    assert excinfo.value.path is None


def test_bad_base64_entry_in_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([_png_b64((0, 0, 0)), "%%%"]))
    with pytest.raises(RecordError) as excinfo:
        load_video_frames(str(path), 5, index=17)
    _assert_record_error(excinfo, 17, path, "frame 1", "base64")


def test_base64_that_is_not_an_image(tmp_path):
    path = tmp_path / "text.json"
    path.write_text(json.dumps([base64.b64encode(b"hello, not a picture").decode()]))
    with pytest.raises(RecordError) as excinfo:
        load_video_frames(str(path), 5, index=18)
    _assert_record_error(excinfo, 18, path, "frame 0", "image")


@pytest.mark.parametrize("content, words", [
    ('{"frames": []}', ["list", "dict"]),
    ("42", ["list", "int"]),
    ("[1, 2]", ["frame 0", "int"]),
    ("[]", ["no frames"]),
    ("[not json", ["json"]),
])
def test_json_wrong_content(tmp_path, content, words):
    path = tmp_path / "wrong.json"
    path.write_text(content)
    with pytest.raises(RecordError) as excinfo:
        load_video_frames(str(path), 5, index=19)
    _assert_record_error(excinfo, 19, path, *words)


def test_spec_of_wrong_type():
    with pytest.raises(RecordError) as excinfo:
        load_video_frames({"path": "a.mp4"}, 5, index=20)
    _assert_record_error(excinfo, 20, None, "dict")
    with pytest.raises(RecordError):
        load_video_frames([], 5, index=20)


def test_video_whose_frames_fail_midway(tmp_path):
    """The video opens and counts its frames, then decoding the sampled frames fails."""
    path = write_cut_video(tmp_path, frames=10)
    with pytest.raises(RecordError) as excinfo:
        load_video_frames(str(path), 10, index=21)
    _assert_record_error(excinfo, 21, path, f"cannot decode frames {list(range(10))} of 10: the file is damaged there")


def test_each_frame_is_transformed_before_the_next_is_decoded(monkeypatch, tmp_path):
    """Given a transform, a frame list (inline or a .json file) holds one frame at full size at a time: each is
    transformed as soon as it is decoded; a frame sampled twice is decoded and transformed once."""
    import dataset.video as video

    events = []
    decode = video.rgb_image
    monkeypatch.setattr(video, "rgb_image", lambda *args: events.append("decode") or decode(*args))
    frames = [_png_b64((c, 0, 0)) for c in (10, 20, 30)]
    (tmp_path / "frames.json").write_text(json.dumps(frames))
    for spec in (frames, str(tmp_path / "frames.json")):
        events.clear()
        out = load_video_frames(spec, 4, index=6, transform=lambda f: events.append("transform") or f.getpixel((0, 0)))
        assert events == ["decode", "transform"] * 3
        assert out == [(10, 0, 0), (10, 0, 0), (20, 0, 0), (30, 0, 0)]
