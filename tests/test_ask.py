"""generate.py --image / --video with --question: one question answered as a run answers the same record, the answer
printed and no file written; what cannot be asked is refused in one line before the model loads (the probes of
test_run_files.py show it is before torch is imported)."""
from __future__ import annotations

import json
import logging

import pytest
import yaml

import generate
from tests.conftest import FIXTURE, fixture_config, one_line_error, read_jsonl, run_main


def ask(capsys, *argv: str, config: str = "config.yaml") -> str:
    """What generate.py prints for one question about the fixture (run from its root)."""
    assert generate.main(["--config", config, "--device", "cpu", *argv]) == 0
    return capsys.readouterr().out


def record_and_answer(kind: str, position: int) -> tuple[dict, str]:
    """A record of the fixture's test file and the answer the original gave it (greedy)."""
    record = read_jsonl(FIXTURE / "data" / f"Open_VQA_{kind}s_tiny.jsonl")[position]
    expected = read_jsonl(FIXTURE / "expected" / f"{kind}s_greedy.jsonl")[position]
    assert expected["index"] == record["index"]
    return record, expected["text_output"]


@pytest.mark.parametrize("kind, position", [("image", 0), ("image", 2), ("video", 0), ("video", 5)],
                         ids=["image", "image-long-question", "video-mp4", "video-frame-file"])
def test_one_question_gets_the_answer_a_run_writes(in_fixture, capsys, caplog, kind, position):
    """The fixture's config (vision_prompt_dict: image) answers a video too; the long question is cut to
    max_input_tokens as in a run, and a warning says so."""
    record, expected = record_and_answer(kind, position)
    with caplog.at_level(logging.WARNING, logger="lynx"):
        assert ask(capsys, f"--{kind}", record[kind], "--question", record["question"]) == expected + "\n"
    assert not (FIXTURE / "result_0.jsonl").exists()  # nothing written: the default --output_path is not used
    cut = [r.getMessage() for r in caplog.records if "its prompt is" in r.getMessage()]
    assert cut == (["--question: its prompt is 105 tokens and max_input_tokens keeps the last 40, as the original "
                    "did: its beginning is not seen (max_input_tokens: 0 keeps every token)"] if position == 2 else [])


def test_sampled_decoding_draws_as_a_run_of_that_record_alone(tmp_path, in_fixture, capsys):
    """Beam sampling, seeded: the question gets the answer of a run whose test file holds just that record."""
    record, _ = record_and_answer("image", 1)
    test_file = tmp_path / "one.jsonl"
    test_file.write_text(json.dumps(record) + "\n")
    cfg = fixture_config(test_files=[str(test_file)], use_nucleus_sampling=True, num_beams=2)
    assert run_main(cfg, tmp_path, "--seed", "7") == 0
    [row] = read_jsonl(tmp_path / "answers.jsonl")
    capsys.readouterr()
    printed = ask(capsys, "--image", record["image"], "--question", record["question"], "--seed", "7",
                  config=str(tmp_path / "config.yaml"))
    assert printed == row["text_output"] + "\n"


@pytest.mark.parametrize("argv, message", [
    (("--image", "images/img_a.jpg"), 'error: --image needs --question, e.g. --question "What is in the image?"'),
    (("--image", "images/img_a.jpg", "--video", "videos/clip_a.mp4", "--question", "q"),
     "error: --image and --video together: one question is about one image or one video"),
    (("--question", "q"), "error: --question needs --image or --video, the media it is about"),
])
def test_flags_that_do_not_make_a_question_are_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as stopped:
        generate.parse_args(list(argv))
    assert stopped.value.code == generate.EXIT_USAGE
    assert one_line_error(capsys).startswith(message)


@pytest.mark.parametrize("media, message", [
    (("--image", "images/nope.jpg"), f"error: --image images/nope.jpg (relative to the working directory {FIXTURE}): "
                                     f"image file not found"),
    (("--image", "data/Open_VQA_images_tiny.jsonl"), "error: --image data/Open_VQA_images_tiny.jsonl: cannot read "
                                                     "the image (cannot identify image file"),
    (("--video", "images/img_a.jpg"), "error: --video images/img_a.jpg: cannot decode video: "),
])
def test_media_that_cannot_be_read_are_one_line_before_loading(in_fixture, capsys, monkeypatch, media, message):
    from lynx.pipeline import LynxPipeline

    monkeypatch.setattr(LynxPipeline, "build", lambda *a, **k: pytest.fail("loaded before the media check"))
    assert generate.main(["--config", "config.yaml", "--device", "cpu", *media, "--question", "q"]) == 1
    assert one_line_error(capsys).startswith(message)


def test_a_prompt_needing_more_than_the_question_is_refused(tmp_path, in_fixture, capsys):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(fixture_config(prompt="{question} ({class})")))
    assert generate.main(["--config", str(tmp_path / "c.yaml"), "--image", "images/img_a.jpg", "--question",
                          "q"]) == 1
    assert one_line_error(capsys) == (f"error: {tmp_path / 'c.yaml'}: the prompt needs field 'class' which the "
                                      f"record lacks; --question fills only {{question}}")
