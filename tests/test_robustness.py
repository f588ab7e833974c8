"""What a run does with bad input: one line and exit 1 for run-level problems, the errors file and exit 2 for bad
records, halving on out-of-memory, progress reporting, and the refusal of pickled code in checkpoints.

Each row of the table in docs/errors.md ("When something goes wrong") has a test here. Runs go through generate.main
in-process (the exit status it returns is the one the command line gets), from the fixture root.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml

import generate
from dataset.batching import Collator, Item
from configs.decoding import DecodingSettings
from lynx.pipeline import Answer, LynxPipeline, OutOfMemory
from lynx.resumable import ResumableRun
from lynx.run import Progress
from tests.conftest import FIXTURE, eval_dataset, fixture_config, one_line_error, read_jsonl, run_main

IMAGES_JSONL = FIXTURE / "data" / "Open_VQA_images_tiny.jsonl"




def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the model starts loading: these errors must be found before that."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(LynxPipeline, "build", refuse)


@pytest.fixture
def no_weights_loaded(monkeypatch):
    """Fail the test if the LLM or the ViT weights start loading: checkpoint problems are found before that."""
    import models.build

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the checkpoint problem was found")

    monkeypatch.setattr(models.build, "materialise", refuse)




# ---------------------------------------------------------------- run-level problems: exit 1, one line, no traceback


def test_config_file_missing(tmp_path, in_fixture, no_model, capsys):
    missing = tmp_path / "nope.yaml"
    assert generate.main(["--config", str(missing), "--output_path", str(tmp_path / "out.jsonl")]) == 1
    assert one_line_error(capsys) == f"error: config file not found: {missing}"


def test_yaml_syntax_error_names_the_line(tmp_path, in_fixture, no_model, capsys):
    cfg_path = tmp_path / "broken.yaml"
    cfg_path.write_text("num_beams: 1\nmax_new_tokens: 24\ntop_k: top_p: 3\nmin_length: 2\n")
    assert generate.main(["--config", str(cfg_path), "--output_path", str(tmp_path / "out.jsonl")]) == 1
    assert one_line_error(capsys) == f"error: {cfg_path}:3: YAML syntax error: mapping values are not allowed here"


@pytest.mark.parametrize("key, closest", [("num_beam", "num_beams"), ("batch_size", "batch_size_test")])
def test_unknown_config_key_names_the_closest(tmp_path, in_fixture, no_model, capsys, key, closest):
    assert run_main(fixture_config(**{key: 3}), tmp_path) == 1
    message = one_line_error(capsys)
    assert f"unknown config key '{key}' (did you mean '{closest}'?)" in message
    assert str(tmp_path / "config.yaml") in message


def test_unknown_key_in_set_override(tmp_path, in_fixture, no_model, capsys):
    assert run_main(fixture_config(), tmp_path, "--set", "data.num_frame=8") == 1
    assert "unknown config key 'data.num_frame' (did you mean 'num_frames'?)" in one_line_error(capsys)


def error_lines(capsys) -> list[str]:
    """The lines of the one error a run printed (its `error: ` line and the lines under it)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error: ") == 1, err
    return err[err.index("error: "):].strip().splitlines()


RELEASE = "https://lf-robot-opensource.bytetos.com/obj/lab-robot-public/lynx_release/"


@pytest.mark.parametrize("key, value, line", [
    ("checkpoint", "./data/pretrain_lynx.pt",
     f"  checkpoint ./data/pretrain_lynx.pt: no such file — {RELEASE}pretrain_lynx.pt"),
    ("vit_checkpoint", "./weights/eva.pth",
     "  vit_checkpoint ./weights/eva.pth: no such file (there is no folder ./weights) — EVA01_g_psz14.pt of "
     "https://huggingface.co/QuanSun/EVA-CLIP, saved under this name"),
    ("llm_path", "./data/llama",
     "  llm_path ./data/llama: no such folder — the files of https://huggingface.co/lmsys/vicuna-7b-v1.1"),
])
def test_missing_weight_file_names_where_it_goes_its_source_and_the_fetch_command(tmp_path, in_fixture, no_model,
                                                                                   capsys, key, value, line):
    assert run_main(fixture_config(**{key: value}), tmp_path, "--set", "num_beams=1") == 1
    assert error_lines(capsys) == [
        f"error: a weight file named by the config is missing (relative paths are read from the working directory, "
        f"{FIXTURE}):", line, f"fetch it with: python -m lynx.fetch --config {tmp_path}/config.yaml --set num_beams=1"]
    assert not (tmp_path / "answers.jsonl.partial.jsonl").exists()


def test_every_missing_weight_file_is_named_at_once_with_the_working_directory(tmp_path, no_model, monkeypatch,
                                                                                capsys):
    """Run from a folder that is not the project's root: the relative paths of the config point at nothing."""
    monkeypatch.chdir(tmp_path)
    assert run_main(fixture_config(test_files=[str(IMAGES_JSONL)]), tmp_path) == 1
    assert error_lines(capsys) == [
        f"error: 3 weight files named by the config are missing (relative paths are read from the working directory, "
        f"{tmp_path}):",
        "  vit_checkpoint ./data/eva_vit_g.pth: no such file (there is no folder ./data) — EVA01_g_psz14.pt of "
        "https://huggingface.co/QuanSun/EVA-CLIP, saved under this name",
        "  LLM folder ./data/vicuna-7b: no such folder (there is no folder ./data) — the files of "
        "https://huggingface.co/lmsys/vicuna-7b-v1.1",
        f"  checkpoint ./data/finetune_lynx.pt: no such file (there is no folder ./data) — {RELEASE}finetune_lynx.pt",
        f"fetch them with: python -m lynx.fetch --config {tmp_path}/config.yaml"]


def test_a_mistyped_weight_path_gets_the_close_name_not_download_advice(tmp_path, in_fixture, no_model, capsys):
    cfg = fixture_config(vit_checkpoint="./data/eva_vit_g.pht", checkpoint="./data/finetune-lynx.pt")
    assert run_main(cfg, tmp_path) == 1
    assert error_lines(capsys) == [
        f"error: 2 weight files named by the config are missing (relative paths are read from the working directory, "
        f"{FIXTURE}):",
        "  vit_checkpoint ./data/eva_vit_g.pht: no such file; did you mean ./data/eva_vit_g.pth?",
        "  checkpoint ./data/finetune-lynx.pt: no such file; did you mean ./data/finetune_lynx.pt?"]


def test_a_weight_file_still_downloading_says_so(tmp_path, in_fixture, no_model, capsys):
    (tmp_path / "eva.pth.partial").write_bytes(b"half")
    assert run_main(fixture_config(vit_checkpoint=str(tmp_path / "eva.pth")), tmp_path) == 1
    assert error_lines(capsys)[1] == (
        f"  vit_checkpoint {tmp_path}/eva.pth: not there yet: a download of it is in {tmp_path}/eva.pth.partial — "
        f"EVA01_g_psz14.pt of https://huggingface.co/QuanSun/EVA-CLIP, saved under this name")


def test_an_incomplete_llm_folder_names_what_it_lacks(tmp_path, in_fixture, no_model, capsys):
    folder = tmp_path / "vicuna"
    shutil.copytree(FIXTURE / "data" / "vicuna-7b", folder, ignore=shutil.ignore_patterns("tokenizer.model", "*.bin"))
    assert run_main(fixture_config(llm_path=str(folder)), tmp_path) == 1
    assert error_lines(capsys)[1] == (
        f"  llm_path {folder}: no tokenizer.model, no weights (model.safetensors.index.json or model.safetensors or "
        f"pytorch_model.bin.index.json or pytorch_model.bin) — the files of "
        f"https://huggingface.co/lmsys/vicuna-7b-v1.1")


def test_checkpoint_with_wrong_shape_names_file_key_and_shapes(tmp_path, in_fixture, capsys, no_weights_loaded):
    state = torch.load(FIXTURE / "data" / "finetune_lynx.pt", weights_only=True)
    state["model"]["bridge.latents"] = torch.zeros(16, 64)
    bad = tmp_path / "finetune_other.pt"
    torch.save(state, bad)
    assert run_main(fixture_config(checkpoint=str(bad)), tmp_path) == 1
    assert one_line_error(capsys) == (
        f"error: {bad}: 'bridge.latents' has shape (16, 64) in the file but the model expects (32, 64) — "
        f"the file does not fit this config")


class Extra:
    """Anything that is not a tensor: unpickling it means importing and running this module's code."""


def test_checkpoint_that_needs_pickled_code_is_refused(tmp_path, in_fixture, capsys, no_weights_loaded):
    state = torch.load(FIXTURE / "data" / "finetune_lynx.pt", weights_only=True)
    pickled = tmp_path / "pickled_lynx.pt"
    torch.save({"model": state["model"], "extra": Extra()}, pickled)
    assert run_main(fixture_config(checkpoint=str(pickled)), tmp_path) == 1
    message = one_line_error(capsys)
    assert message.startswith(f"error: {pickled}: refused: it holds the Python object {__name__}.Extra")
    assert "would execute pickled code" in message and "weights_only=True" in message


def test_unreadable_checkpoint_is_one_line(tmp_path, in_fixture, capsys, no_weights_loaded):
    broken = tmp_path / "truncated_lynx.pt"
    broken.write_bytes((FIXTURE / "data" / "finetune_lynx.pt").read_bytes()[:1000])
    assert run_main(fixture_config(checkpoint=str(broken)), tmp_path) == 1
    assert one_line_error(capsys).startswith(f"error: {broken}: cannot read this weight file")


def test_test_file_missing(tmp_path, in_fixture, no_model, capsys):
    missing = tmp_path / "nope.jsonl"
    assert run_main(fixture_config(test_files=[str(missing)]), tmp_path) == 1
    assert one_line_error(capsys) == f"error: test file not found: {missing}"


@pytest.mark.parametrize("bad_line, what", [
    ('{"index": 5, "image": "images/img_a.jpg", "question": "q"', "not valid JSON: Expecting ',' delimiter"),
    ('["a", "list"]', "expected a JSON object, got list"),
    ('{"image": "images/img_a.jpg", "question": "q"}', "record has no 'index'"),
    ('{"index": 1.5, "image": "images/img_a.jpg", "question": "q"}', "'index' must be an integer or a string"),
])
def test_malformed_jsonl_line_names_file_and_line(tmp_path, in_fixture, no_model, capsys, bad_line, what):
    lines = IMAGES_JSONL.read_text().splitlines()
    lines.insert(2, bad_line)
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("\n".join(lines) + "\n")
    assert run_main(fixture_config(test_files=[str(test_file)]), tmp_path) == 1
    message = one_line_error(capsys)
    assert message.startswith(f"error: {test_file}:3: ")
    assert what in message


def test_duplicate_index_names_both_lines(tmp_path, in_fixture, no_model, capsys):
    rows = read_jsonl(IMAGES_JSONL)[:3]
    rows.append(dict(rows[0], question="another question"))
    test_file = write_jsonl(tmp_path / "test.jsonl", rows)
    assert run_main(fixture_config(test_files=[test_file]), tmp_path) == 1
    assert one_line_error(capsys) == f"error: {test_file}:4: duplicate index 17 (first on line 1)"


def test_output_folder_missing(tmp_path, in_fixture, no_model, capsys):
    output = tmp_path / "no" / "such" / "answers.jsonl"
    assert run_main(fixture_config(), tmp_path, output=output) == 1
    assert one_line_error(capsys) == f"error: output folder does not exist: {output.parent}"


def test_output_folder_not_writable(tmp_path, in_fixture, no_model, capsys, monkeypatch):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root writes anywhere: make the check see what others would
        real_access = os.access
        monkeypatch.setattr("lynx.resumable.os.access",
                            lambda path, mode: False if str(path) == str(folder) else real_access(path, mode))
    try:
        assert run_main(fixture_config(), tmp_path, output=folder / "answers.jsonl") == 1
    finally:
        folder.chmod(0o755)
    assert one_line_error(capsys) == f"error: output folder is not writable: {folder}"


def test_existing_output_is_not_overwritten(tmp_path, in_fixture, no_model, capsys):
    output = tmp_path / "answers.jsonl"
    output.write_text('{"index": 1, "text_output": "an earlier run"}\n')
    assert run_main(fixture_config(), tmp_path) == 1
    assert one_line_error(capsys) == f"error: {output} already exists; pass --overwrite to replace it"
    assert output.read_text() == '{"index": 1, "text_output": "an earlier run"}\n'


def test_resume_with_other_settings_is_refused_before_the_model_loads(tmp_path, in_fixture, no_model, capsys):
    partial = tmp_path / "answers.jsonl.partial.jsonl"
    partial.write_text('{"fingerprint": "0000000000000000"}\n{"key": [0, 17], "index": 17, "text_output": "x"}\n')
    assert run_main(fixture_config(), tmp_path) == 1
    message = one_line_error(capsys)
    assert message.startswith(f"error: {partial} holds answers of a run with other settings")
    assert "pass --overwrite" in message
    assert partial.read_text().count("\n") == 2


def test_resume_with_other_settings_and_overwrite_starts_again(tmp_path, in_fixture):
    partial = tmp_path / "answers.jsonl.partial.jsonl"
    partial.write_text('{"fingerprint": "0000000000000000"}\n{"key": [0, 17], "index": 17, "text_output": "x"}\n')
    assert run_main(fixture_config(), tmp_path, "--overwrite") == 0
    assert read_jsonl(tmp_path / "answers.jsonl") == read_jsonl(FIXTURE / "expected" / "images_greedy.jsonl")
    assert not partial.exists()


# ---------------------------------------------------------------- bad records: listed in <output>.errors.jsonl, exit 2


BAD_KINDS = ["missing-image", "unreadable-image", "bad-base64", "missing-video", "empty-video", "unreadable-video",
             "bad-base64-frame", "no-media-key", "no-question"]


def bad_records(folder) -> dict:
    """kind -> (a record of that kind without its index, the `media` and the start of the `reason` its errors line
    must hold)."""
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    (folder / "broken.mp4").write_bytes(b"this is not an mp4 either" * 10)
    (folder / "empty.mp4").write_bytes(b"")
    question = {"question": "What is here?"}
    return {
        "missing-image": ({**question, "image": "images/nope.jpg"}, "images/nope.jpg", "image file not found"),
        "unreadable-image": ({**question, "image": str(folder / "broken.jpg")}, str(folder / "broken.jpg"),
                             "cannot read the image (cannot identify image file"),
        "bad-base64": ({**question, "image": "iVBORw0KGgo@@@@"}, "iVBORw0KGgo@@@@",
                       "image is neither an existing file nor valid base64"),
        "missing-video": ({**question, "video": str(folder / "nope.mp4")}, str(folder / "nope.mp4"),
                          "video file not found"),
        "empty-video": ({**question, "video": str(folder / "empty.mp4")}, str(folder / "empty.mp4"),
                        "video file is empty (0 bytes)"),
        "unreadable-video": ({**question, "video": str(folder / "broken.mp4")}, str(folder / "broken.mp4"),
                             "cannot decode video"),
        "bad-base64-frame": ({**question, "video": ["@@ not base64 @@"]}, None, "frame 0 is not valid base64"),
        "no-media-key": (question, None, "has no 'image' or 'video' field"),
        "no-question": ({"image": "images/img_a.jpg"}, None,
                        "the prompt needs field 'question' which the record lacks"),
    }


@pytest.fixture(scope="module", params=[0, 4], ids=["0-workers", "4-workers"])
def bad_run(tmp_path_factory, request):
    """One run over good records with every kind of bad record between them, with media read in the main process
    and with the shipped 4 DataLoader workers (errors then cross a process boundary)."""
    folder = tmp_path_factory.mktemp("bad_records")
    kinds = bad_records(folder)
    rows, lines = [], {}
    good = iter([{"image": "images/img_a.jpg"}, {"video": "videos/clip_a.mp4"}, {"image": "images/img_b.jpg"},
                 {"video": "videos/clip_b.mp4"}, {"image": "images/img_c.jpg"}, {"image": "images/img_d.png"},
                 {"video": "videos/clip_e.json"}, {"image": "images/img_e.png"}, {"image": "images/img_f.jpg"}])
    for kind, (fields, _, _) in kinds.items():
        rows.append({"index": f"good-{len(rows)}", "question": "What is in the image?", **next(good)})
        rows.append({"index": kind, **fields})
        lines[kind] = len(rows)
    test_file = write_jsonl(folder / "mixed.jsonl", rows)
    cfg = fixture_config(test_files=[test_file], vision_prompt_dict="auto")
    cfg["data"]["num_workers"] = request.param
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(FIXTURE)
        status = run_main(cfg, folder)
    output = folder / "answers.jsonl"
    errors = {row["index"]: row for row in read_jsonl(str(output) + ".errors.jsonl")}
    return dict(status=status, kinds=kinds, lines=lines, test_file=test_file, output=output, errors=errors,
                answered=[row["index"] for row in read_jsonl(output)])


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_record_is_listed_with_index_file_line_media_reason(bad_run, kind):
    _, media, reason = bad_run["kinds"][kind]
    row = bad_run["errors"][kind]
    assert list(row) == ["index", "file", "line", "media", "reason"]
    assert row["file"] == bad_run["test_file"]
    assert row["line"] == bad_run["lines"][kind]
    assert row["media"] == media
    assert row["reason"].startswith(reason), row["reason"]


def test_bad_records_do_not_stop_the_run(bad_run):
    assert bad_run["status"] == 2
    assert sorted(bad_run["errors"]) == sorted(BAD_KINDS) == sorted(bad_run["kinds"])
    assert bad_run["answered"] == [f"good-{2 * n}" for n in range(len(bad_run["kinds"]))]
    assert (bad_run["output"].parent / "answers.jsonl.partial.jsonl").exists()


def test_two_of_ten_missing_then_fixed(tmp_path, in_fixture, monkeypatch, caplog):
    """8 answered, 2 listed, exit 2; once the media is back, the same command answers only those 2 and ends clean."""
    media = tmp_path / "media"
    shutil.copytree(FIXTURE / "images", media)
    rows = [dict(row, image=str(media / row["image"].split("/")[-1])) for row in read_jsonl(IMAGES_JSONL)]
    test_file = write_jsonl(tmp_path / "test.jsonl", rows)
    missing = {rows[3]["index"]: rows[3]["image"], rows[7]["index"]: rows[7]["image"]}  # images used once
    for path in missing.values():
        shutil.move(path, path + ".away")
    cfg = fixture_config(test_files=[test_file])
    output = tmp_path / "answers.jsonl"
    expected = read_jsonl(FIXTURE / "expected" / "images_greedy.jsonl")

    caplog.set_level(logging.INFO, logger="lynx")
    assert run_main(cfg, tmp_path) == 2
    assert read_jsonl(output) == [row for row in expected if row["index"] not in missing]
    errors = read_jsonl(str(output) + ".errors.jsonl")
    assert [(e["index"], e["line"], e["media"], e["reason"]) for e in errors] == [
        (rows[3]["index"], 4, rows[3]["image"], "image file not found"),
        (rows[7]["index"], 8, rows[7]["image"], "image file not found")]
    assert f"2 of 10 records could not be answered: see {output}.errors.jsonl" in caplog.text

    for path in missing.values():
        shutil.move(path + ".away", path)
    asked = []
    real_answer_batch = LynxPipeline.answer_batch
    monkeypatch.setattr(LynxPipeline, "answer_batch",
                        lambda self, batch, visual=None, **kw: asked.extend(batch.positions) or real_answer_batch(self, batch, visual, **kw))
    caplog.clear()
    assert run_main(cfg, tmp_path) == 0
    assert "resuming: 8 of 10 records already answered" in caplog.text
    assert asked == [3, 7]
    assert read_jsonl(output) == expected
    assert not (tmp_path / "answers.jsonl.partial.jsonl").exists()
    assert not (tmp_path / "answers.jsonl.errors.jsonl").exists()


def test_strict_stops_at_the_first_bad_record(tmp_path, in_fixture, capsys):
    rows = read_jsonl(IMAGES_JSONL)[:4]
    rows[1]["image"] = "images/nope.jpg"
    test_file = write_jsonl(tmp_path / "test.jsonl", rows)
    assert run_main(fixture_config(test_files=[test_file], batch_size_test=1), tmp_path, "--strict") == 1
    assert one_line_error(capsys) == f"error: record 3 ({test_file}:2): image file not found: images/nope.jpg"
    assert not (tmp_path / "answers.jsonl").exists()
    assert [e["index"] for e in read_jsonl(tmp_path / "answers.jsonl.errors.jsonl")] == [3]
    answered = read_jsonl(tmp_path / "answers.jsonl.partial.jsonl")[1:]
    assert [row["index"] for row in answered] == [17]


# ---------------------------------------------------------------- resume bookkeeping


def test_line_torn_by_a_crash_is_answered_again(tmp_path, in_fixture):
    records = generate.read_test_files([str(IMAGES_JSONL)])
    run = ResumableRun(str(tmp_path / "answers.jsonl"))
    run.open("abc", overwrite=False)
    run.add(records[:2], ["first", "second"])
    with open(run.partial_path, "a") as f:
        f.write('{"key": [0, 42], "index": 42, "text_out')
    again = ResumableRun(str(tmp_path / "answers.jsonl"))
    again.open("abc", overwrite=False)
    assert [r.key in again.answers for r in records[:3]] == [True, True, False]
    again.add(records[2:3], ["third"])  # on a line of its own: the torn end is cut off first
    last = ResumableRun(str(tmp_path / "answers.jsonl"))
    last.open("abc", overwrite=False)
    assert [last.answers.get(r.key) for r in records[:4]] == ["first", "second", "third", None]


# ---------------------------------------------------------------- out of GPU memory: halves, down to one record


class FakePipeline(LynxPipeline):
    """A pipeline whose one try at a batch (`decode_batch`) runs out of memory on batches larger than `fits`, and
    on `always_fails` even alone: what is left to see is the core's halving."""

    def __init__(self, left_pad: bool, fits: int, always_fails=(), error=torch.OutOfMemoryError):
        self.cfg = SimpleNamespace(use_left_pad=left_pad)
        self.settings = DecodingSettings()
        self.fits, self.always_fails, self.error = fits, set(always_fails), error
        self.seen, self.rows, self.draws = [], [], []
        self.retried_inside_except = False

    def generator(self, seed):
        return torch.Generator().manual_seed(seed)

    def decode_batch(self, batch, visual, settings, generator=None, rows=None, watch=None, lengths=None):
        self.seen.append(batch)
        self.rows.append(rows)
        self.draws.append(None if generator is None else torch.rand(2, generator=generator).tolist())
        # a retry made while the previous error is being handled keeps that attempt's tensors alive
        self.retried_inside_except |= sys.exc_info()[0] is not None
        if len(batch) > self.fits or self.always_fails & set(batch.positions):
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [Answer([p], f"answer {p}", "stop") for p in batch.positions]


def items(lengths):
    """Collate items with prompts of the given lengths (distinct ids, so a wrong trim shows)."""
    return [Item(p, torch.full((3, 4, 4), float(p)), list(range(100 * p + 1, 100 * p + 1 + n)))
            for p, n in enumerate(lengths)]


def same_batch(a, b) -> bool:
    return (a.positions == b.positions and torch.equal(a.pixel_values, b.pixel_values)
            and torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask))


@pytest.mark.parametrize("left_pad", [True, False])
@pytest.mark.parametrize("error", [torch.OutOfMemoryError, RuntimeError])
def test_out_of_memory_retries_in_halves_trimmed_as_collated(left_pad, error):
    """The one halving, which generate.py's loop and the server both go through (LynxPipeline.answer_batch)."""
    lengths = [3, 7, 2, 5, 4]
    collate = Collator(pad_id=0, left_pad=left_pad)
    pipeline = FakePipeline(left_pad, fits=1, always_fails=[3], error=error)
    answers = pipeline.answer_batch(collate(items(lengths)), seed=7)

    assert [a.text for a in answers if isinstance(a, Answer)] == ["answer 0", "answer 1", "answer 2", "answer 4"]
    assert isinstance(answers[3], OutOfMemory) and answers[3].reason == "out of GPU memory even alone in a batch"
    assert not pipeline.retried_inside_except
    tried = [[0, 1, 2, 3, 4], [0, 1], [0], [1], [2, 3, 4], [2], [3, 4], [3], [4]]
    assert [b.positions for b in pipeline.seen] == tried
    assert pipeline.rows == [None] + [len(positions) for positions in tried[1:]]  # halves decode at their own size
    for batch, positions in zip(pipeline.seen, tried):
        assert same_batch(batch, collate([items(lengths)[p] for p in positions])), positions
    # every try and every half draws from a fresh generator seeded with the batch's seed
    assert pipeline.draws == [torch.rand(2, generator=torch.Generator().manual_seed(7)).tolist()] * len(tried)


def test_other_runtime_errors_are_not_retried():
    pipeline = FakePipeline(True, fits=0, error=lambda message: RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        pipeline.answer_batch(Collator(0, True)(items([2, 3])))
    assert len(pipeline.seen) == 1


def test_a_record_failing_alone_is_reported_by_the_run(tmp_path, in_fixture, monkeypatch):
    """Through answer_records: the record lands in the errors file and the others are answered."""
    real = LynxPipeline.decode_batch

    def decode_batch(self, batch, *args, **kw):
        if 2 in batch.positions:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(self, batch, *args, **kw)

    monkeypatch.setattr(LynxPipeline, "decode_batch", decode_batch)
    assert run_main(fixture_config(), tmp_path) == 2
    expected = read_jsonl(FIXTURE / "expected" / "images_greedy.jsonl")
    assert read_jsonl(tmp_path / "answers.jsonl") == expected[:2] + expected[3:]
    errors = read_jsonl(tmp_path / "answers.jsonl.errors.jsonl")
    assert errors == [{"index": 42, "file": "./data/Open_VQA_images_tiny.jsonl", "line": 3, "media": None,
                       "reason": "out of GPU memory even alone in a batch"}]


# ---------------------------------------------------------------- progress


def test_progress_log_lines_when_not_a_terminal(monkeypatch, caplog):
    clock = iter([100.0, 105.0, 130.0, 160.0])
    monkeypatch.setattr("lynx.run.time", SimpleNamespace(monotonic=lambda: next(clock)))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    caplog.set_level(logging.INFO, logger="lynx")
    progress = Progress(total=10, done=4)  # 4 answered by an earlier run
    assert progress.bar is None
    progress.update(1)  # 5 s: too soon for a line
    assert caplog.messages == []
    progress.update(2)  # 30 s: 3 records in 30 s, 3 left
    progress.update(3)  # the last: always a line
    progress.close()
    assert caplog.messages == ["7/10 records, 0.10 rec/s, eta 30 s", "10/10 records, 0.10 rec/s, eta 0 s"]


def test_progress_bar_on_a_terminal(monkeypatch, capsys, caplog):
    from tqdm import tqdm

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    caplog.set_level(logging.INFO, logger="lynx")
    progress = Progress(total=10, done=2)
    assert isinstance(progress.bar, tqdm)
    progress.update(3)
    progress.close()
    err = capsys.readouterr().err
    assert "5/10" in err and "rec/s" in err
    assert caplog.messages == []


def test_visual_prefix_computed_ahead_is_the_batch_own(in_fixture):
    """The loop hands each batch the prefix of its own media (computed one batch ahead on CUDA)."""
    from dataset.records import read_jsonl as read_records
    from lynx.run import with_media_ahead
    from conftest import build_tiny_lynx

    cfg, model, tokenizer = build_tiny_lynx()
    records = read_records("./data/Open_VQA_images_tiny.jsonl")
    dataset = eval_dataset(records, cfg, tokenizer)
    collate = Collator(tokenizer.pad_id, True)
    loader = [collate([dataset[p] for p in positions]) for positions in ([0, 1, 2], [3], [4, 5])]
    pairs = list(with_media_ahead(loader, model))
    assert [b.positions for b, _ in pairs] == [[0, 1, 2], [3], [4, 5]]
    with torch.no_grad():
        for batch, visual in pairs:
            assert torch.equal(visual, model.encode_media(batch.pixel_values))


@pytest.mark.parametrize("device,message", [
    ("tpu", "error: --device tpu: not a device name (cuda, cuda:1, cpu)"),
    ("cuda:7", None),
])
def test_unusable_device_is_one_line(device, message, tmp_path, in_fixture, capsys):
    import torch

    if message is None:  # a GPU index this machine does not have (here: no CUDA at all, or fewer than 8)
        message = (f"error: --device {device}: no CUDA device is available here; use --device cpu"
                   if not torch.cuda.is_available() else
                   f"error: --device {device}: this machine has {torch.cuda.device_count()} CUDA devices")
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(fixture_config()))
    status = generate.main(["--config", str(cfg_path), "--output_path", str(tmp_path / "a.jsonl"),
                            "--device", device])
    assert status == 1
    assert one_line_error(capsys) == message
    assert not (tmp_path / "a.jsonl").exists()


def test_vit_file_lacking_a_tensor_is_found_before_weights_load(tmp_path, in_fixture, capsys, no_weights_loaded):
    state = torch.load(FIXTURE / "data" / "eva_vit_g.pth", weights_only=True)
    del state["blocks.1.mlp.fc2.bias"]
    bad = tmp_path / "eva.pth"
    torch.save(state, bad)
    assert run_main(fixture_config(vit_checkpoint=str(bad)), tmp_path) == 1
    assert one_line_error(capsys) == (
        f"error: {bad}: missing 1 vision-encoder tensors the model needs, e.g. 'blocks.1.mlp.fc2.bias'")


def test_checkpoint_lacking_a_trained_part_is_found_before_weights_load(tmp_path, in_fixture, capsys,
                                                                          no_weights_loaded):
    state = torch.load(FIXTURE / "data" / "finetune_lynx.pt", weights_only=True)
    del state["model"]["LLM.model.layers.0.output_adapter.scaling"]
    bad = tmp_path / "no_adapter.pt"
    torch.save(state, bad)
    assert run_main(fixture_config(checkpoint=str(bad)), tmp_path) == 1
    assert one_line_error(capsys) == (
        f"error: {bad}: missing 1 trained tensors, e.g. 'LLM.model.layers.0.output_adapter.scaling' (adapters) — "
        f"is this a Lynx checkpoint for this config?")
