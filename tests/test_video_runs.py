"""Video runs end to end: the released Open_VQA_videos.jsonl over mp4 files written here, repeatability, and
`vision_prompt_dict: auto` over images and videos in one pass."""
import json
import shutil

import numpy as np
import pytest
import torch
import yaml

import generate
from conftest import FIXTURE, ROOT, fixture_config, read_jsonl
from dataset.batching import batches_by_media
from dataset.records import Record
from video_helpers import write_test_video

TINY_WEIGHTS = {
    "vit_checkpoint": str(FIXTURE / "data" / "eva_vit_g.pth"),
    "llm_path": str(FIXTURE / "data" / "vicuna-7b"),
    "checkpoint": str(FIXTURE / "data" / "finetune_lynx.pt"),
}
DECODING = {
    "greedy": {"num_beams": 1, "use_nucleus_sampling": False},
    "beam5": {"num_beams": 5, "use_nucleus_sampling": False},
    "paper": {"num_beams": 5, "use_nucleus_sampling": True},  # beam sampling: repeats for the same --seed
}


def released_video_records(per_source: int = 2) -> list[dict]:
    """The first records of each source dataset of the released video set, unchanged."""
    chosen, counts = [], {}
    for record in read_jsonl(ROOT / "data" / "Open_VQA_videos.jsonl"):
        source = record["origin_dataset"]
        if counts.get(source, 0) < per_source:
            counts[source] = counts.get(source, 0) + 1
            chosen.append(record)
    return chosen


@pytest.fixture(scope="module")
def released_videos(tmp_path_factory):
    """A working directory holding mp4 files at the released jsonl's paths (images/<source>/.../*.mp4)."""
    root = tmp_path_factory.mktemp("openvqa_videos")
    records = released_video_records()
    rng = np.random.default_rng(0)
    for n, record in enumerate(records):
        path = root / record["video"]
        path.parent.mkdir(parents=True, exist_ok=True)
        count = 3 + 7 * n  # 3..52 frames: shorter and longer than num_frames
        frames = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(count)]
        write_test_video(path, frames, size=(64, 48))
    with open(root / "videos.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return root, records


def run(cfg: dict, workdir, output, monkeypatch) -> int:
    monkeypatch.chdir(workdir)
    path = output.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return generate.main(["--config", str(path), "--output_path", str(output), "--device", "cpu", "--seed", "0"])


@pytest.mark.parametrize("decoding", sorted(DECODING))
def test_released_video_jsonl_runs_and_repeats_byte_for_byte(released_videos, decoding, tmp_path, monkeypatch):
    root, records = released_videos
    cfg = fixture_config(test_files=["./videos.jsonl"], vision_prompt_dict="video", **TINY_WEIGHTS,
                         **DECODING[decoding])
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    assert run(cfg, root, first, monkeypatch) == 0
    assert run(cfg, root, second, monkeypatch) == 0
    answers = read_jsonl(first)
    assert [a["index"] for a in answers] == [r["index"] for r in records]
    assert all(a["text_output"] for a in answers)
    assert first.read_bytes() == second.read_bytes()


def test_auto_mode_answers_images_and_videos_in_one_pass(tmp_path, monkeypatch):
    """Both fixture files in one run: each record uses the media it holds, batches never mix kinds, so the
    answers equal the two separate runs' (the original's answers), one after the other."""
    cfg = fixture_config(test_files=["./data/Open_VQA_images_tiny.jsonl", "./data/Open_VQA_videos_tiny.jsonl"],
                         vision_prompt_dict="auto")
    output = tmp_path / "both.jsonl"
    assert run(cfg, FIXTURE, output, monkeypatch) == 0
    expected = (FIXTURE / "expected" / "images_greedy.jsonl").read_bytes() + \
        (FIXTURE / "expected" / "videos_greedy.jsonl").read_bytes()
    assert output.read_bytes() == expected


def test_batches_never_mix_images_and_videos():
    kinds = ["image", "image", "video", "image", "video", "video", "video", "image"]
    records = [Record({"index": i, kind: "x"}, "t.jsonl", i + 1, 0) for i, kind in enumerate(kinds)]
    batches = batches_by_media(records, list(range(len(records))), "auto", batch_size=2)
    assert batches == [[0, 1], [2], [3], [4, 5], [6], [7]]
    for batch in batches:
        assert len({kinds[p] for p in batch}) == 1


def test_random_frame_sampling_is_reproducible_for_a_seed(tmp_path, monkeypatch):
    """The original's random frame choice is available, seeded by --seed, so a rerun repeats it."""
    workdir = tmp_path / "work"
    shutil.copytree(FIXTURE, workdir, ignore=shutil.ignore_patterns("*.pt", "*.pth", "vicuna-7b", "expected"))
    write_test_video(workdir / "videos" / "long.mp4", 23, size=(64, 48))
    records = read_jsonl(workdir / "data" / "Open_VQA_videos_tiny.jsonl")[:2]
    records[0]["video"] = "videos/long.mp4"
    (workdir / "v.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = fixture_config(test_files=["./v.jsonl"], vision_prompt_dict="video", **TINY_WEIGHTS,
                         data={"num_frames": 5, "frame_sampling": "random", "num_workers": 0})
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert run(cfg, workdir, first, monkeypatch) == 0
    assert run(cfg, workdir, second, monkeypatch) == 0
    assert first.read_bytes() == second.read_bytes()


@pytest.fixture(scope="module")
def long_video_files(tmp_path_factory):
    """A working directory with a 23-frame video (more than num_frames) alone in one file, and second in another."""
    workdir = tmp_path_factory.mktemp("random_frames")
    shutil.copytree(FIXTURE / "videos", workdir / "videos")
    write_test_video(workdir / "videos" / "long.mp4", 23, size=(64, 48))
    long = {"index": 7, "question": "What changes?", "video": "videos/long.mp4"}
    other = {"index": 1, "question": "What moves?", "video": "videos/clip_b.mp4"}  # 9 frames: it draws too
    (workdir / "alone.jsonl").write_text(json.dumps(long) + "\n")
    (workdir / "second.jsonl").write_text(json.dumps(other) + "\n" + json.dumps(long) + "\n")
    return workdir


def pixels_reaching_the_model(workdir, test_file, sampling, seed, tmp_path, monkeypatch):
    """The pixel rows the model encodes in a generate.py run with the shipped num_workers: 4, one per record."""
    from models.lynx import Lynx

    seen = []
    real = Lynx.encode_media

    def encode_media(self, pixel_values):
        seen.append(pixel_values.detach().clone())
        return real(self, pixel_values)

    monkeypatch.setattr(Lynx, "encode_media", encode_media)
    cfg = fixture_config(test_files=[f"./{test_file}"], vision_prompt_dict="video", **TINY_WEIGHTS,
                         data={"num_frames": 5, "frame_sampling": sampling, "num_workers": 4})
    output = tmp_path / f"run{len(list(tmp_path.glob('*.yaml')))}.jsonl"
    path = output.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(workdir)
    status = generate.main(["--config", str(path), "--output_path", str(output), "--device", "cpu",
                            "--seed", str(seed)])
    monkeypatch.undo()
    assert status == 0
    return torch.cat(seen)


def test_random_frame_sampling_follows_the_seed_and_the_record_not_its_place(long_video_files, tmp_path,
                                                                              monkeypatch):
    def pixels(test_file, sampling, seed):
        return pixels_reaching_the_model(long_video_files, test_file, sampling, seed, tmp_path, monkeypatch)

    uniform = pixels("alone.jsonl", "uniform", 0)[0]
    drawn = pixels("alone.jsonl", "random", 0)[0]
    assert uniform.shape == drawn.shape == (5, 3, 84, 84)
    assert not torch.equal(drawn, uniform), "random sampling gave the uniform frames"
    assert torch.equal(pixels("alone.jsonl", "random", 0)[0], drawn), "the same seed drew other frames"
    assert not torch.equal(pixels("alone.jsonl", "random", 1)[0], drawn), "another seed drew the same frames"
    moved = pixels("second.jsonl", "random", 0)
    assert len(moved) == 2
    assert torch.equal(moved[1], drawn), "the record drew other frames at another place in the file"
