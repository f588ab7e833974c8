"""Per-record problems (media, and questions that are not text) through a whole run with the shipped
`data.num_workers: 4`: each bad record becomes one line of the errors file (read and decoded in a DataLoader worker,
the RecordError crosses to the main process), every other record is answered, and the run ends with exit status 2."""
from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import yaml
from PIL import Image

import generate
from bad_media import image_bytes, png_header, write_cut_video
from conftest import FIXTURE, fixture_config, read_jsonl


def bad_media(folder) -> dict:
    """kind -> (the record's media fields, and its question where that is the problem; the start of the reason its
    errors line must hold)."""
    (folder / "huge.png").write_bytes(png_header(20_000, 10_000))
    whole = (FIXTURE / "images" / "img_c.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "wide.png").write_bytes(image_bytes(Image.fromarray(np.full((40, 60), 40_000, np.uint16)), "PNG"))
    cut = write_cut_video(folder, frames=5)
    return {
        "huge-image": ({"image": str(folder / "huge.png")},
                       "cannot read the image (200000000 pixels, more than the limit of 89478485)"),
        "huge-base64": ({"image": base64.b64encode(png_header(20_000, 10_000)).decode()},
                        "cannot read the base64 image (200000000 pixels, more than the limit of 89478485)"),
        "truncated-image": ({"image": str(folder / "truncated.jpg")}, "cannot read the image (image file is truncated"),
        "empty-image": ({"image": str(folder / "empty.jpg")}, "image file is empty (0 bytes)"),
        "16-bit-image": ({"image": str(folder / "wide.png")},
                         "cannot read the image (mode I;16 has more than 8 bits per channel"),
        "video-failing-midway": ({"video": str(cut)}, "cannot decode frames [0, 1, 2, 3, 4] of 5"),
        "null-question": ({"image": "images/img_b.jpg", "question": None},
                          "'question' must be text or a number, got null"),
        "list-question": ({"image": "images/img_b.jpg", "question": ["What?", "Why?"]},
                          "'question' must be text or a number, got a list"),
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("record_problems")
    kinds = bad_media(folder)
    good = [{"image": "images/img_a.jpg"}, {"video": "videos/clip_a.mp4"}]
    cmyk = folder / "cmyk.jpg"
    cmyk.write_bytes(image_bytes(Image.new("CMYK", (90, 60), (0, 255, 255, 0)), "JPEG"))
    good.append({"image": str(cmyk)})
    gif = folder / "anim.gif"
    frames = [Image.new("RGB", (90, 60), colour) for colour in ((250, 0, 0), (0, 0, 250))]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100)
    good.append({"image": str(gif)})
    good.append({"image": "images/img_b.jpg", "question": 42})  # a number is formatted, as the original does
    rows = [{"index": f"good-{n}", "question": "What is in the image?", **media} for n, media in enumerate(good)]
    for kind, (media, _) in kinds.items():
        rows.insert(len(rows) // 2, {"index": kind, "question": "What is in the image?", **media})
    test_file = folder / "mixed.jsonl"
    test_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = fixture_config(test_files=[str(test_file)], vision_prompt_dict="auto",
                         data={"num_frames": 5, "num_workers": 4})  # the shipped number of workers
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    output = folder / "answers.jsonl"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(FIXTURE)
        status = generate.main(["--config", str(folder / "config.yaml"), "--output_path", str(output),
                                "--device", "cpu", "--seed", "42"])
    return dict(status=status, kinds=kinds, rows=rows, output=output,
                errors={row["index"]: row for row in read_jsonl(str(output) + ".errors.jsonl")},
                answered=[row["index"] for row in read_jsonl(output)])


def test_uses_the_shipped_workers():
    assert yaml.safe_load((FIXTURE.parents[2] / "configs" / "LYNX.yaml").read_text())["data"]["num_workers"] == 4


def test_every_bad_record_is_its_own_error_and_the_rest_is_answered(run):
    assert run["status"] == 2
    assert sorted(run["errors"]) == sorted(run["kinds"])
    assert run["answered"] == [row["index"] for row in run["rows"] if row["index"] not in run["kinds"]]
    assert len(run["answered"]) == 5  # CMYK and animated images are answered, as the original answers them


@pytest.mark.parametrize("kind", ["huge-image", "huge-base64", "truncated-image", "empty-image", "16-bit-image",
                                  "video-failing-midway", "null-question", "list-question"])
def test_reason_in_the_errors_file(run, kind):
    reason = run["kinds"][kind][1]
    assert run["errors"][kind]["reason"].startswith(reason), run["errors"][kind]["reason"]
