"""A run killed part-way (SIGKILL, or Ctrl-C as SIGINT) and started again ends with the same bytes as a run that was
never interrupted: answers already on disk are kept, the rest are answered, the side file is removed.

The interrupted run is a real generate.py process. It cannot end by itself before the signal: one record's image is
a named pipe that nobody writes, so the run stops there; the test waits for a first answer on disk (a state, not a
time) and then interrupts it. The reference and the rerun call generate.main in-process with the same arguments (the same
command, without paying for the imports again). Decoding is greedy and batches hold one record, so an answer does
not depend on which run produced it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

import generate
from lynx.pipeline import LynxPipeline
from lynx.resumable import ResumableRun
from tests.conftest import FIXTURE, ROOT, fixture_config, read_jsonl

TEST_FILE = "./data/Open_VQA_images_tiny.jsonl"
RECORDS = 10
BLOCKED = 6  # the position of the record whose image is a named pipe: the run waits there


def answered(partial) -> int:
    """Complete answer lines in a side file (the header and a line torn by a kill do not count)."""
    if not partial.exists():
        return 0
    count = 0
    for line in partial.read_text().splitlines():
        try:
            count += "key" in json.loads(line)
        except json.JSONDecodeError:
            pass
    return count


def arguments(folder) -> list[str]:
    return ["--config", str(folder / "config.yaml"), "--output_path", str(folder / "answers.jsonl"),
            "--device", "cpu", "--seed", "42"]


def prepare(folder, test_file: str = TEST_FILE) -> list[str]:
    cfg = fixture_config(test_files=[test_file], batch_size_test=1, max_new_tokens=24)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return arguments(folder)


def with_blocked_image(folder):
    """The test file with the image of record BLOCKED at `folder/blocked.jpg` (its path, and the image's source)."""
    rows = read_jsonl(FIXTURE / TEST_FILE)
    source = FIXTURE / rows[BLOCKED]["image"]
    rows[BLOCKED]["image"] = str(folder / "blocked.jpg")
    path = folder / "records.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path), source


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> bytes:
    """The output of a run that was never interrupted."""
    folder = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(FIXTURE)
        assert generate.main(prepare(folder)) == 0
    output = (folder / "answers.jsonl").read_bytes()
    assert len(output.splitlines()) == RECORDS == len(read_jsonl(FIXTURE / TEST_FILE))
    return output


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_interrupted_run_resumes_to_the_same_bytes(tmp_path, in_fixture, monkeypatch, caplog, reference, sig):
    test_file, image = with_blocked_image(tmp_path)
    os.mkfifo(tmp_path / "blocked.jpg")
    args = prepare(tmp_path, test_file)
    output = tmp_path / "answers.jsonl"
    partial = tmp_path / "answers.jsonl.partial.jsonl"
    with open(tmp_path / "stdout.txt", "w") as out, open(tmp_path / "stderr.txt", "w") as err:
        # SIGINT as a terminal's Ctrl-C delivers it: a launcher that runs the tests in the background (nohup, `&`
        # without job control) passes SIGINT on ignored, and the run would then rightly not stop
        proc = subprocess.Popen([sys.executable, str(ROOT / "generate.py"), *args], cwd=FIXTURE, stdout=out,
                                stderr=err, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 300  # a guard against a hang, not a measure
            while answered(partial) < 1:
                assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
                assert time.monotonic() < deadline, "no answer on disk"
                time.sleep(0.05)
            proc.send_signal(sig)
            status = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = (tmp_path / "stderr.txt").read_text()

    if sig == signal.SIGKILL:
        assert status == -signal.SIGKILL
    else:  # Ctrl-C: a clean stop that says where the answers are
        assert status == 130, stderr
        assert "Traceback" not in stderr
        assert f"interrupted: finished answers are kept in {partial}; run the same command again" in stderr
    kept = answered(partial)
    assert 1 <= kept <= BLOCKED
    assert not output.exists()

    (tmp_path / "blocked.jpg").unlink()
    shutil.copy(image, tmp_path / "blocked.jpg")
    asked = []
    real_answer_batch = LynxPipeline.answer_batch
    monkeypatch.setattr(LynxPipeline, "answer_batch",
                        lambda self, batch, visual=None, **kw: asked.extend(batch.positions) or real_answer_batch(self, batch, visual, **kw))
    caplog.set_level(logging.INFO, logger="lynx")
    assert generate.main(args) == 0
    assert f"resuming: {kept} of {RECORDS} records already answered" in caplog.text
    assert sorted(asked) == list(range(kept, RECORDS))  # only what the interrupted run had not written
    assert output.read_bytes() == reference
    assert not partial.exists()


def test_an_edited_record_is_answered_again_and_the_others_are_kept(tmp_path, monkeypatch):
    """Answers are tied to their record's content: after fixing two lines of the test file, the same command
    answers just those two."""
    monkeypatch.chdir(FIXTURE)
    records = read_jsonl(FIXTURE / "data" / "Open_VQA_images_tiny.jsonl")[:4]
    records[3]["image"] = "images/missing.jpg"
    test_file = tmp_path / "t.jsonl"
    test_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(fixture_config(test_files=[str(test_file)], batch_size_test=1)))
    output = tmp_path / "out.jsonl"
    args = ["--config", str(cfg_path), "--output_path", str(output), "--device", "cpu", "--seed", "42"]
    assert generate.main(args) == 2  # one image missing: the side file keeps the three answers
    records[3]["image"] = "images/img_d.png"
    records[0]["question"] = "What is it?"
    test_file.write_text("".join(json.dumps(r) + "\n" for r in records))

    answered = []
    original_add = ResumableRun.add

    def spy(self, recs, texts):
        answered.extend(r.index for r in recs)
        return original_add(self, recs, texts)

    monkeypatch.setattr(ResumableRun, "add", spy)
    assert generate.main(args) == 0
    assert sorted(answered) == sorted([records[0]["index"], records[3]["index"]])
    final = read_jsonl(output)
    assert [a["index"] for a in final] == [r["index"] for r in records]
    fresh = tmp_path / "fresh.jsonl"
    monkeypatch.setattr(ResumableRun, "add", original_add)
    assert generate.main(["--config", str(cfg_path), "--output_path", str(fresh), "--device", "cpu",
                          "--seed", "42"]) == 0
    assert output.read_bytes() == fresh.read_bytes()


def test_a_run_that_answered_nothing_does_not_block_the_next_one(tmp_path, in_fixture, capsys):
    """Every image missing: exit 2, and a side file with a header but no answer. The next run, with other settings,
    replaces it without a word rather than asking for --overwrite."""
    rows = read_jsonl(FIXTURE / TEST_FILE)[:3]
    broken = tmp_path / "broken.jsonl"
    broken.write_text("".join(json.dumps({**row, "image": "images/missing.jpg"}) + "\n" for row in rows))
    args = arguments(tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(fixture_config(test_files=[str(broken)])))
    assert generate.main(args) == generate.EXIT_FAILED_RECORDS
    assert answered(tmp_path / "answers.jsonl.partial.jsonl") == 0
    capsys.readouterr()

    prepare(tmp_path)  # another test file, so another fingerprint
    assert generate.main(args) == 0
    assert "error" not in capsys.readouterr().err
    assert (tmp_path / "answers.jsonl").read_bytes() == (FIXTURE / "expected" / "images_greedy.jsonl").read_bytes()


@pytest.mark.parametrize("where", ["loading", "first-batch"])
def test_ctrl_c_before_any_answer_says_so_and_the_next_run_starts(tmp_path, in_fixture, monkeypatch, capsys, where):
    """Ctrl-C while the model loads or the first batch decodes: the side file holds a header only, so the message
    does not promise kept answers, and the next run (here with other settings) starts without --overwrite."""
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    args = prepare(tmp_path)
    with monkeypatch.context() as mp:
        mp.setattr(LynxPipeline, *("build", interrupt) if where == "loading" else ("answer_batch", interrupt))
        assert generate.main(args) == 130
    partial = tmp_path / "answers.jsonl.partial.jsonl"
    assert partial.exists() and answered(partial) == 0
    assert capsys.readouterr().err.splitlines()[-1] == ("interrupted before any answer was written; the same command "
                                                        "starts again")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(fixture_config(batch_size_test=2)))
    assert generate.main(args) == 0
    assert "error" not in capsys.readouterr().err
