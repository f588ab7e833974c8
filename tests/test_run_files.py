"""The run's files and the checks before anything loads: output paths, empty test files, a disk that refuses a
write, side files that a failed start must not poison, the fingerprint, exit statuses, and the checks that answer
before torch is imported.

Runs go through generate.main in-process from the fixture root, except where the test is about the process itself.
"""
from __future__ import annotations

import builtins
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import yaml

import generate
import lynx.resumable
from configs.schema import config_from_dict
from lynx.pipeline import LynxPipeline
from lynx.resumable import run_fingerprint
from models.weight_files import run_dtype
from tests.conftest import FIXTURE, ROOT, fixture_config, one_line_error, probe_torch, read_jsonl, run_main

IMAGES_JSONL = FIXTURE / "data" / "Open_VQA_images_tiny.jsonl"
EXPECTED = FIXTURE / "expected" / "images_greedy.jsonl"  # the bytes a run of the fixture config writes


def shipped(**overrides) -> dict:
    """The fixture's config with the shipped run settings: 4 DataLoader workers, decoder auto."""
    cfg = fixture_config(**overrides)
    cfg["data"]["num_workers"] = 4
    cfg["decoder"] = "auto"
    return cfg






@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(LynxPipeline, "build", refuse)


def files_in(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- a disk that refuses a write


class FillingFile:
    """A file on a disk that fills up: after `writes` more write calls, the next writes half its text and raises."""

    def __init__(self, file, budget: dict, code: int):
        self.file, self.budget, self.code = file, budget, code

    def write(self, text: str) -> int:
        if self.budget["writes"] > 0:
            self.budget["writes"] -= 1
            return self.file.write(text)
        self.file.write(text[: len(text) // 2])
        self.file.flush()
        raise OSError(self.code, os.strerror(self.code))

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def disk_fills(monkeypatch, name_end: str, writes: int = 0, code: int = errno.ENOSPC) -> None:
    """Writes of the run to files whose name ends with `name_end` fail once `writes` of them have been made."""
    budget = {"writes": writes}

    def fake_open(path, mode="r", *args, **kwargs):
        file = builtins.open(path, mode, *args, **kwargs)
        if "r" in mode or not str(path).endswith(name_end):
            return file
        return FillingFile(file, budget, code)

    monkeypatch.setattr(lynx.resumable, "open", fake_open, raising=False)


def test_disk_full_at_start_leaves_nothing_that_refuses_the_next_run(tmp_path, in_fixture, monkeypatch, capsys):
    with monkeypatch.context() as mp:
        disk_fills(mp, ".partial.jsonl.tmp")
        mp.setattr(LynxPipeline, "build", lambda *a, **k: pytest.fail("loaded after the start failed"))
        assert run_main(shipped(), tmp_path) == 1
    partial = tmp_path / "answers.jsonl.partial.jsonl"
    assert one_line_error(capsys) == f"error: cannot write {partial}: No space left on device"
    assert files_in(tmp_path) == ["config.yaml"]
    assert run_main(shipped(), tmp_path) == 0  # space is back: the same command runs
    assert (tmp_path / "answers.jsonl").read_bytes() == EXPECTED.read_bytes()


@pytest.mark.parametrize("left", ["", '{"fingerpr'], ids=["empty", "torn-header"])
def test_a_side_file_without_header_or_answers_is_started_again(tmp_path, in_fixture, left):
    """What a start on a full disk left before side files were created in one step: not a run of other settings."""
    (tmp_path / "answers.jsonl.partial.jsonl").write_text(left)
    assert run_main(fixture_config(), tmp_path) == 0
    assert (tmp_path / "answers.jsonl").read_bytes() == EXPECTED.read_bytes()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO])
def test_a_refused_answer_write_is_one_line_and_keeps_the_answers(tmp_path, in_fixture, monkeypatch, capsys,
                                                                   code):
    cfg = shipped(batch_size_test=1)
    partial = tmp_path / "answers.jsonl.partial.jsonl"
    with monkeypatch.context() as mp:
        disk_fills(mp, ".partial.jsonl", writes=2, code=code)  # two answers, then half of the third line
        assert run_main(cfg, tmp_path) == 1
    assert one_line_error(capsys) == (f"error: cannot write {partial}: {os.strerror(code)}; finished answers are "
                                      f"kept in {partial}: run the same command again to resume")
    lines = partial.read_text().split("\n")
    assert len(lines) == 4 and lines[3] and not lines[3].endswith("}")  # header, 2 answers, a torn third
    assert not (tmp_path / "answers.jsonl").exists()

    asked = []
    real = LynxPipeline.answer_batch
    monkeypatch.setattr(LynxPipeline, "answer_batch",
                        lambda self, batch, visual=None, **kw: asked.extend(batch.positions) or real(self, batch, visual, **kw))
    assert run_main(cfg, tmp_path) == 0
    assert asked == list(range(2, 10))
    assert (tmp_path / "answers.jsonl").read_bytes() == EXPECTED.read_bytes()
    assert files_in(tmp_path) == ["answers.jsonl", "config.yaml"]


def test_a_refused_first_answer_promises_no_answers(tmp_path, in_fixture, monkeypatch, capsys):
    """The disk fills on the first answer (half its line written): the side file holds no answer, so the line says
    nothing is kept, and the same command runs once there is space."""
    partial = tmp_path / "answers.jsonl.partial.jsonl"
    with monkeypatch.context() as mp:
        disk_fills(mp, ".partial.jsonl")
        assert run_main(fixture_config(batch_size_test=1), tmp_path) == 1
    assert one_line_error(capsys) == f"error: cannot write {partial}: No space left on device"
    assert run_main(fixture_config(batch_size_test=1), tmp_path) == 0
    assert (tmp_path / "answers.jsonl").read_bytes() == EXPECTED.read_bytes()


def test_a_refused_final_write_keeps_the_side_file(tmp_path, in_fixture, monkeypatch, capsys):
    output = tmp_path / "answers.jsonl"
    with monkeypatch.context() as mp:
        disk_fills(mp, "answers.jsonl.tmp")
        assert run_main(fixture_config(), tmp_path) == 1
    partial = tmp_path / "answers.jsonl.partial.jsonl"
    assert one_line_error(capsys) == (f"error: cannot write {output}: No space left on device; finished answers "
                                      f"are kept in {partial}: run the same command again to resume")
    assert files_in(tmp_path) == ["answers.jsonl.partial.jsonl", "config.yaml"]
    assert run_main(fixture_config(), tmp_path) == 0
    assert output.read_bytes() == EXPECTED.read_bytes()


# ---------------------------------------------------------------- the output path and the test files


@pytest.mark.parametrize("extra", [(), ("--overwrite",)], ids=["plain", "overwrite"])
@pytest.mark.parametrize("kind", ["empty", "folder", "folder-slash", "test-file", "test-file-link",
                                  "test-file-other-spelling", "side-file-on-test-file"])
def test_an_output_path_the_run_must_not_write_is_refused_first(tmp_path, in_fixture, no_model, capsys, kind, extra):
    test_file = tmp_path / "records.jsonl"
    test_file.write_bytes(IMAGES_JSONL.read_bytes())
    (tmp_path / "folder").mkdir()
    (tmp_path / "link.jsonl").symlink_to(test_file)
    (tmp_path / "records.jsonl.partial.jsonl").write_bytes(IMAGES_JSONL.read_bytes())
    output, message = {
        "empty": ("", "error: --output_path is empty: give the file to write the answers to"),
        "folder": (tmp_path / "folder", f"error: --output_path {tmp_path / 'folder'} is a folder: give a file in "
                                        f"it, e.g. {tmp_path / 'folder' / 'result_0.jsonl'}"),
        "folder-slash": (f"{tmp_path}/new/", f"error: --output_path {tmp_path}/new/ is a folder"),
        "test-file": (test_file, f"error: --output_path {test_file}: the run would write {test_file}, which is the "
                                 f"test file {test_file}; write the answers elsewhere"),
        "test-file-link": (tmp_path / "link.jsonl", "which is the test file"),
        "test-file-other-spelling": (tmp_path / "folder" / ".." / "records.jsonl", "which is the test file"),
        "side-file-on-test-file": (tmp_path / "records.jsonl", "which is the test file"),
    }[kind]
    tests = [str(test_file)] if kind != "side-file-on-test-file" else [str(tmp_path / "records.jsonl.partial.jsonl")]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert run_main(fixture_config(test_files=tests), tmp_path, *extra, output=output) == 1
    assert message in one_line_error(capsys)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == {
        **before, "config.yaml": (tmp_path / "config.yaml").read_bytes()}
    assert files_in(tmp_path / "folder") == []


@pytest.mark.parametrize("text", ["", "\n\n  \n\t\n"], ids=["empty", "blank-lines"])
def test_a_test_file_set_without_records_is_refused_first(tmp_path, in_fixture, no_model, capsys, text):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(text)
    assert run_main(shipped(test_files=[str(empty)]), tmp_path) == 1
    assert one_line_error(capsys) == f"error: no records to answer: {empty} (empty, or blank lines only)"
    assert files_in(tmp_path) == ["config.yaml", "empty.jsonl"]


def test_an_empty_test_file_beside_others_is_no_error(tmp_path, in_fixture):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert run_main(fixture_config(test_files=[str(empty), str(IMAGES_JSONL)]), tmp_path) == 0
    assert (tmp_path / "answers.jsonl").read_bytes() == EXPECTED.read_bytes()


# ---------------------------------------------------------------- exit statuses


@pytest.mark.parametrize("argv, message", [
    (["--no-such-flag"], "error: unrecognized arguments: --no-such-flag (see "),
    (["--seed", "forty-two"], "error: argument --seed: not an integer: 'forty-two' (see "),
    (["--seed", "-1"], "error: argument --seed: must be from 0 to 2**63 - 1, got -1 (see "),
    (["--seed", str(2**63)], f"error: argument --seed: must be from 0 to 2**63 - 1, got {2**63} (see "),
    (["--output_path"], "error: argument --output_path: expected one argument (see "),
])
def test_usage_errors_have_their_own_exit_status(capsys, argv, message):
    with pytest.raises(SystemExit) as stopped:
        generate.main(argv)
    assert stopped.value.code == generate.EXIT_USAGE == 64
    assert one_line_error(capsys).startswith(message)


def test_the_exit_statuses_are_distinct():
    assert len({0, 1, generate.EXIT_FAILED_RECORDS, generate.EXIT_USAGE, 130}) == 5
    assert generate.EXIT_FAILED_RECORDS == 2  # the status scripts have tested for since the first version


# ---------------------------------------------------------------- before torch is imported

def probe(tmp_path, cfg: dict | None, *argv: str) -> subprocess.CompletedProcess:
    """generate.py in a fresh interpreter that says at exit whether torch was imported."""
    if cfg is not None:
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        argv = ("--config", str(tmp_path / "config.yaml"), *argv)
    return probe_torch(ROOT / "generate.py", *argv)


def early_failures(tmp_path) -> dict:
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "exists.jsonl").write_text("an earlier run\n")
    out = ("--output_path", str(tmp_path / "a.jsonl"))
    return {
        "help": (0, None, ("--help",)),
        "usage": (64, None, ("--seed", "x")),
        "config-missing": (1, None, ("--config", str(tmp_path / "nope.yaml"))),
        "config-key": (1, shipped(num_beam=2), out),
        "config-value": (1, shipped(num_beams=0), out),
        "test-file-missing": (1, shipped(test_files=[str(tmp_path / "nope.jsonl")]), out),
        "test-file-empty": (1, shipped(test_files=[str(tmp_path / "empty.jsonl")]), out),
        "output-is-test-file": (1, shipped(), ("--output_path", str(IMAGES_JSONL), "--overwrite")),
        "output-folder": (1, shipped(), ("--output_path", str(tmp_path))),
        "output-exists": (1, shipped(), ("--output_path", str(tmp_path / "exists.jsonl"))),
        "weights-missing": (1, shipped(checkpoint="./data/nope.pt"), out),
        "videos-read-as-images": (1, shipped(test_files=["./data/Open_VQA_videos_tiny.jsonl"]), out),
        "question-without-media": (64, None, ("--question", "What is it?")),
        "question-media-missing": (1, shipped(), ("--video", "videos/nope.mp4", "--question", "What is it?")),
        "question-prompt-fields": (1, shipped(prompt="{question} {answer}"),
                                   ("--image", "images/img_a.jpg", "--question", "What is it?")),
    }


@pytest.mark.parametrize("case", ["help", "usage", "config-missing", "config-key", "config-value",
                                  "test-file-missing", "test-file-empty", "output-is-test-file", "output-folder",
                                  "output-exists", "weights-missing", "videos-read-as-images",
                                  "question-without-media", "question-media-missing", "question-prompt-fields"])
def test_checks_before_any_loading_answer_without_torch(tmp_path, case):
    status, cfg, argv = early_failures(tmp_path)[case]
    proc = probe(tmp_path, cfg, *argv)
    assert proc.returncode == status, proc.stderr
    assert proc.stderr.splitlines()[-1] == "torch not imported"
    assert "Traceback" not in proc.stderr


def test_videos_read_as_images_are_refused_with_the_key_to_change_then_the_fixed_config_runs(tmp_path, in_fixture,
                                                                                             capsys):
    """The usual edit half done: test_files pointed at the videos, vision_prompt_dict left at 'image'. Refused before
    anything loads (the probe above: without torch), naming the key and what fits; then the same command runs."""
    videos = "./data/Open_VQA_videos_tiny.jsonl"
    assert run_main(fixture_config(test_files=[videos]), tmp_path) == 1
    assert one_line_error(capsys) == (f"error: {videos}: vision_prompt_dict is 'image', but none of its records has "
                                      f"the field 'image'; they have 'video': set vision_prompt_dict: video (or auto, "
                                      f"which reads each record's own)")
    assert not (tmp_path / "answers.jsonl").exists()
    for fixed in ("video", "auto"):
        assert run_main(fixture_config(test_files=[videos], vision_prompt_dict=fixed), tmp_path, "--overwrite") == 0
        assert read_jsonl(tmp_path / "answers.jsonl") == read_jsonl(FIXTURE / "expected" / "videos_greedy.jsonl")


def test_a_file_with_some_records_of_the_key_goes_on(tmp_path, in_fixture):
    """Only a file with no record of the configured key is refused: one record without it fails on its own."""
    lines = IMAGES_JSONL.read_text().splitlines()
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join(lines[:2] + [json.dumps({"index": 900, "video": "videos/clip_a.mp4",
                                                        "question": "q"})]) + "\n")
    assert run_main(fixture_config(test_files=[str(mixed)]), tmp_path) == generate.EXIT_FAILED_RECORDS
    assert [row["index"] for row in read_jsonl(tmp_path / "answers.jsonl.errors.jsonl")] == [900]


def test_cut_prompts_are_one_warning_before_the_model_loads(tmp_path, in_fixture, monkeypatch, caplog):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(LynxPipeline, "build", interrupt)
    with caplog.at_level(logging.WARNING, logger="lynx"):
        assert run_main(fixture_config(), tmp_path) == 130
    assert [r.getMessage().split(":")[0] for r in caplog.records if "its prompt is" in r.getMessage()] == [
        "record 42 (./data/Open_VQA_images_tiny.jsonl"]


def test_the_probe_sees_torch_once_the_run_gets_that_far(tmp_path):
    """The same probe after the checks pass: a device this machine lacks is found once torch is there."""
    proc = probe(tmp_path, shipped(), "--output_path", str(tmp_path / "a.jsonl"), "--device", "tpu")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines()[-2:] == ["error: --device tpu: not a device name (cuda, cuda:1, cpu)",
                                             "torch imported"]


def test_the_package_imports_its_torch_free_modules_without_torch():
    code = ("import sys, lynx, lynx.resumable, lynx.processes, generate; "
            "print('torch' in sys.modules); from lynx import LynxPipeline; print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["False", "True"], proc.stderr


def test_importing_the_api_prints_nothing_but_other_pytree_warnings_still_show():
    """torch logged two deprecation lines when transformers imported torchao (its KernelPreference and
    ScaleCalculationMode Enums); only those are dropped."""
    code = ("import logging; from lynx import LynxPipeline; import torchao.quantization; "
            "logging.getLogger('torch.utils._pytree').warning('another pytree warning')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == ""
    assert [line.split("] ", 1)[-1] for line in proc.stderr.splitlines()] == ["another pytree warning"], proc.stderr


# ---------------------------------------------------------------- generate.sh


def fake_python(folder, name: str):
    """An executable that records how it was called instead of running generate.py."""
    path = folder / name
    path.write_text(f'#!/bin/sh\necho "{name} $*" > {folder}/called\n')
    path.chmod(0o755)
    return path


def test_generate_sh_runs_the_interpreter_in_PYTHON_else_python_on_PATH(tmp_path):
    chosen = fake_python(tmp_path, "chosen")
    subprocess.run(["bash", str(ROOT / "generate.sh")], cwd=tmp_path, check=True,
                   env=dict(os.environ, PYTHON=str(chosen)))
    assert (tmp_path / "called").read_text().startswith(f"chosen {ROOT}/generate.py --config ./configs/LYNX.yaml")
    (tmp_path / "bin").mkdir()
    fake_python(tmp_path / "bin", "python")
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    subprocess.run(["bash", str(ROOT / "generate.sh"), "c.yaml", "o.jsonl", "--strict"], cwd=tmp_path, check=True,
                   env=dict(env, PATH=f"{tmp_path / 'bin'}:{env['PATH']}"))
    assert (tmp_path / "bin" / "called").read_text() == (
        f"python {ROOT}/generate.py --config c.yaml --output_path o.jsonl --seed 42 --strict\n")


# ---------------------------------------------------------------- the fingerprint

CHANGES = {  # key -> another value: each changes answers, so each must change the fingerprint
    "max_new_tokens": 25, "min_length": 3, "num_beams": 2, "use_nucleus_sampling": True, "temperature": 0.7,
    "top_k": 5, "top_p": 0.5, "no_repeat_ngram_size": 3, "length_penalty": 1.0, "repetition_penalty": 1.2,
    "prompt": "Question: {question} Answer:", "dtype": "bfloat16", "lower_text": False, "use_left_pad": False,
    "max_input_tokens": 30, "image_res": 98, "vision_prompt_dict": "auto", "apply_lemmatizer": True,
    "decoder": "fast", "adapter_freq": 1, "image_mean": [0.5, 0.5, 0.5],
    "data.num_frames": 4, "data.frame_sampling": "random",
}


def fingerprint_of(device="cpu", seed=42, **changes) -> str:
    raw = fixture_config()
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        (raw[section] if section else raw)[name] = value
    cfg = config_from_dict(raw)
    return run_fingerprint(cfg, run_dtype(cfg, device), seed)


@pytest.mark.parametrize("key", CHANGES)
def test_a_setting_that_changes_answers_changes_the_fingerprint(in_fixture, key):
    changed = fingerprint_of(**{key: CHANGES[key]})
    assert changed != fingerprint_of()
    assert changed == fingerprint_of(**{key: CHANGES[key]})


def test_the_seed_and_the_device_dtype_change_the_fingerprint(in_fixture):
    assert fingerprint_of(seed=43) != fingerprint_of(seed=42)
    assert fingerprint_of(device="cuda") != fingerprint_of(device="cpu")  # dtype null: bfloat16 on CUDA
    assert fingerprint_of(device="cuda", dtype="float32") == fingerprint_of(device="cpu", dtype="float32")


@pytest.mark.parametrize("which", ["vit_checkpoint", "llm_path", "checkpoint"])
@pytest.mark.parametrize("how", ["date", "size"])
def test_other_weight_files_change_the_fingerprint(tmp_path, in_fixture, which, how):
    paths = {"vit_checkpoint": tmp_path / "eva.pth", "llm_path": tmp_path / "llm", "checkpoint": tmp_path / "l.pt"}
    shutil.copy(FIXTURE / "data" / "eva_vit_g.pth", paths["vit_checkpoint"])
    shutil.copytree(FIXTURE / "data" / "vicuna-7b", paths["llm_path"])
    shutil.copy(FIXTURE / "data" / "finetune_lynx.pt", paths["checkpoint"])
    settings = {key: str(path) for key, path in paths.items()}
    before = fingerprint_of(**settings)
    changed = paths[which] / "pytorch_model.bin" if which == "llm_path" else paths[which]
    touch(changed, how)
    assert fingerprint_of(**settings) != before


def touch(path, how: str) -> None:
    """Change a file as a new copy of it would: its date ("date") or its size ("size")."""
    if how == "date":
        stat = path.stat()
        os.utime(path, (stat.st_atime, stat.st_mtime + 10))
    else:
        with open(path, "ab") as f:
            f.write(b"\0")


def test_the_worker_count_does_not_change_the_fingerprint(in_fixture):
    assert fingerprint_of(**{"data.num_workers": 0}) == fingerprint_of(**{"data.num_workers": 4})


def test_a_resume_with_another_worker_count_keeps_the_answers(tmp_path, in_fixture, monkeypatch):
    partial = tmp_path / "answers.jsonl.partial.jsonl"
    rows = read_jsonl(IMAGES_JSONL)[:3]
    rows[2]["image"] = "images/nope.jpg"
    test_file = tmp_path / "records.jsonl"
    test_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert run_main(fixture_config(test_files=[str(test_file)]), tmp_path) == 2
    assert len(partial.read_text().splitlines()) == 3
    assert run_main(shipped(test_files=[str(test_file)]), tmp_path) == 2  # not refused: the same settings
    assert len(partial.read_text().splitlines()) == 3


# ---------------------------------------------------------------- DataLoader workers


@pytest.mark.parametrize("cpus, wanted, used", [(2, 4, 2), (8, 4, 4), (1, 0, 0), (2, 2, 2)])
def test_workers_are_capped_to_the_usable_cpus_and_said_once(monkeypatch, caplog, cpus, wanted, used):
    from lynx import run

    monkeypatch.setattr(run.os, "sched_getaffinity", lambda pid: set(range(cpus)))
    caplog.set_level(logging.INFO, logger="lynx")
    assert run.worker_count(wanted) == used
    expected = [f"data.num_workers: {wanted} lowered to {used}, the CPUs this process may use"] if used < wanted else []
    assert caplog.messages == expected


def test_the_shipped_workers_raise_no_dataloader_warning(tmp_path, in_fixture, caplog):
    """With 4 workers, on any machine: more than it has are lowered before the DataLoader sees them."""
    caplog.set_level(logging.INFO, logger="lynx")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_main(shipped(), tmp_path) == 0
    assert not [w for w in caught if "worker processes in total" in str(w.message)]
    cpus = len(os.sched_getaffinity(0))
    lowered = [m for m in caplog.messages if m.startswith("data.num_workers")]
    assert lowered == ([f"data.num_workers: 4 lowered to {cpus}, the CPUs this process may use"] if cpus < 4 else [])
    assert (tmp_path / "answers.jsonl").read_bytes() == EXPECTED.read_bytes()


@pytest.mark.parametrize("how", ["date", "size"])
def test_a_converted_folder_changes_the_fingerprint(tmp_path, in_fixture, how):
    """A folder converted again in place is another model: its files are stamped, not the release files'."""
    folder = tmp_path / "converted"
    (folder / "llm").mkdir(parents=True)
    (folder / "llm" / "config.json").write_text("{}")
    weights = folder / "model.safetensors"
    weights.write_bytes(b"\0" * 64)
    before = fingerprint_of(converted=str(folder))
    touch(weights, how)
    assert fingerprint_of(converted=str(folder)) != before
