"""The Python API (lynx/pipeline.py): every media form `answer` takes gives the pixels the dataset gives the same
media, frame lists of any length are sampled like videos, and misuse is one clear error."""
from __future__ import annotations

import base64
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from bad_media import image_bytes
from conftest import FIXTURE, fixture_config, read_jsonl
from configs.schema import config_from_dict
from dataset.media import image_transform
from dataset.video import sample_frame_indices
from errors import InputError, RecordError
from lynx.pipeline import LynxPipeline
from video_helpers import frame_colour

IMAGES = {r["index"]: r for r in read_jsonl(FIXTURE / "data" / "Open_VQA_images_tiny.jsonl")}
VIDEOS = {r["index"]: r for r in read_jsonl(FIXTURE / "data" / "Open_VQA_videos_tiny.jsonl")}


@pytest.fixture(scope="module")
def lynx():
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(FIXTURE)
        return LynxPipeline.from_config(config_from_dict(fixture_config()), device="cpu")


@pytest.fixture(scope="module")
def expected_pixels():
    """(kind, index) -> the pixels the original fed the ViT for that fixture record."""
    pixels = {}
    for kind in ("image", "video"):
        tensors = load_file(str(FIXTURE / "expected" / f"{kind}s_tensors.safetensors"))
        pixels.update({(kind, int(key.split("/")[0])): value for key, value in tensors.items()
                       if key.endswith("/pixel_values")})
    return pixels


def image_forms(path: str):
    data = (FIXTURE / path).read_bytes()
    encoded = base64.b64encode(data).decode()
    return {"str": path, "Path": Path(path), "PIL": Image.open(FIXTURE / path), "base64": encoded,
            "data URI": "data:image/jpeg;base64," + encoded}


@pytest.mark.parametrize("form", ["str", "Path", "PIL", "base64", "data URI"])
def test_image_forms_give_the_original_pixels(lynx, expected_pixels, in_fixture, form):
    media = image_forms(IMAGES[17]["image"])[form]
    pixels = lynx.item(media, "What is it?").pixel_values
    torch.testing.assert_close(pixels, expected_pixels[("image", 17)], atol=1e-6, rtol=0)


@pytest.mark.parametrize("index, form", [(1, "str"), (1, "Path"), (2, "str"), (2, "Path"), (129, "list")])
def test_video_forms_give_the_original_pixels(lynx, expected_pixels, in_fixture, index, form):
    """An .mp4 path, a .json frame file (str or Path) and an inline list of base64 frames."""
    video = VIDEOS[index]["video"]
    media = Path(video) if form == "Path" else video
    assert isinstance(video, list) == (form == "list")
    pixels = lynx.item(media, "What is it?").pixel_values
    torch.testing.assert_close(pixels, expected_pixels[("video", index)], atol=1e-6, rtol=0)


@pytest.mark.parametrize("count", [1, 2, 3, 5, 7, 12])
@pytest.mark.parametrize("as_base64", [False, True])
def test_frame_lists_of_any_length_are_sampled_like_a_video(lynx, count, as_base64):
    frames = [Image.new("RGB", (96, 64), frame_colour(i)) for i in range(count)]
    media = frames
    if as_base64:
        media = [base64.b64encode(image_bytes(frame, "PNG")).decode() for frame in frames]
    pixels = lynx.item(media, "What is it?").pixel_values
    assert pixels.shape == (5, 3, 84, 84)
    transform = image_transform(84, lynx.cfg.image_mean, lynx.cfg.image_std)
    ids = sample_frame_indices(count, 5)
    for row, frame_id in enumerate(ids):
        assert torch.equal(pixels[row], transform(frames[frame_id])), f"{count} frames: row {row} is not {frame_id}"


def test_answers_equal_the_original_for_paths_paths_and_pil_images(lynx, in_fixture):
    expected = {r["index"]: r["text_output"] for r in read_jsonl(FIXTURE / "expected" / "images_greedy.jsonl")}
    records = [IMAGES[17], IMAGES[3], IMAGES[42]]
    media = [records[0]["image"], Path(records[1]["image"]), Image.open(records[2]["image"])]
    answers = lynx.answer([(m, r["question"]) for m, r in zip(media, records)])
    assert answers == [expected[r["index"]] for r in records]


def test_video_answers_equal_the_original_for_a_path_and_for_its_frames(lynx, in_fixture):
    import decord

    expected = {r["index"]: r["text_output"] for r in read_jsonl(FIXTURE / "expected" / "videos_greedy.jsonl")}
    record = VIDEOS[1]
    frames = [Image.fromarray(f) for f in decord.VideoReader(record["video"]).get_batch([0, 1, 2, 3, 4]).asnumpy()]
    answers = lynx.answer([(Path(record["video"]), record["question"]), (frames, record["question"])])
    assert answers == [expected[1], expected[1]]
    assert len(lynx.answer([(frames[:3], "What moves?"), (frames + frames[:2], "What moves?")])) == 2


def test_no_pairs_no_answers(lynx):
    assert lynx.answer([]) == []
    assert lynx.answer(iter([])) == []


def test_images_and_videos_in_one_call_are_refused_before_any_media_is_read(lynx, in_fixture):
    with pytest.raises(ValueError, match="either images or videos in one call, not both"):
        lynx.answer([("images/missing.jpg", "Why?"), ("videos/missing.mp4", "Why?")])


def test_a_pair_that_is_not_a_pair(lynx):
    with pytest.raises(ValueError, match=r"a list of \(media, question\) pairs"):
        lynx.answer(("images/img_a.jpg", "What is it?"))


def test_a_pair_that_cannot_be_used_is_named_by_its_place(lynx, in_fixture):
    with pytest.raises(RecordError) as excinfo:
        lynx.answer([("images/img_a.jpg", "Why?"), ("images/missing.jpg", "Why?")])
    assert (excinfo.value.index, excinfo.value.path, excinfo.value.reason) == (1, "images/missing.jpg",
                                                                                "image file not found")
    with pytest.raises(RecordError, match="record 0: 'question' must be text or a number, got null"):
        lynx.answer([("images/img_a.jpg", None)])


def test_a_device_this_machine_lacks_is_one_line_before_anything_loads(monkeypatch, in_fixture):
    import lynx.pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the device was checked")

    monkeypatch.setattr(lynx.pipeline, "build_lynx", refuse)
    cfg = config_from_dict(fixture_config())
    device = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(InputError) as excinfo:
        LynxPipeline.from_config(cfg, device=device)
    assert str(excinfo.value) == (f"--device {device}: no CUDA device is available here; use --device cpu"
                                  if not torch.cuda.is_available() else
                                  f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices")
    with pytest.raises(InputError, match="not a device name"):
        LynxPipeline.from_config(cfg, device="tpu")
