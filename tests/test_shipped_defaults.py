"""The shipped run settings (configs/LYNX.yaml: 4 DataLoader workers, decoder auto) end to end, through generate.py
as a user runs it: a record that cannot be answered does not stop the run, and a run killed with SIGKILL resumes to
the same bytes.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import yaml

from tests.conftest import FIXTURE, ROOT, read_jsonl, run_generate
from tests.test_run_files import EXPECTED, IMAGES_JSONL, shipped

HANG_GUARD = 300  # seconds: a wait that should end long before, so that a hang fails the test instead of blocking it


def records_with(folder, position: int, image) -> str:
    rows = read_jsonl(IMAGES_JSONL)
    rows[position]["image"] = str(image)
    path = folder / "records.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def answered(partial) -> int:
    if not partial.exists():
        return 0
    return sum(line.startswith('{"key"') and line.endswith("}") for line in partial.read_text().splitlines())


def test_a_missing_image_is_listed_and_the_others_answered(tmp_path):
    missing = tmp_path / "gone.jpg"
    test_file = records_with(tmp_path, 4, missing)
    proc = run_generate(shipped(test_files=[test_file]), tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "worker processes in total" not in proc.stderr  # no DataLoader warning about too many workers
    output = tmp_path / "answers.jsonl"
    lost = read_jsonl(IMAGES_JSONL)[4]["index"]
    assert read_jsonl(output) == [row for row in read_jsonl(EXPECTED) if row["index"] != lost]
    assert read_jsonl(f"{output}.errors.jsonl") == [
        {"index": lost, "file": test_file, "line": 5, "media": str(missing), "reason": "image file not found"}]


def test_killed_with_sigkill_then_the_same_command_writes_the_same_file(tmp_path):
    stuck = tmp_path / "stuck.jpg"
    os.mkfifo(stuck)  # nobody writes it: the run cannot end before it is killed
    cfg = shipped(test_files=[records_with(tmp_path, 6, stuck)])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    output, partial = tmp_path / "answers.jsonl", tmp_path / "answers.jsonl.partial.jsonl"
    cmd = [sys.executable, str(ROOT / "generate.py"), "--config", str(tmp_path / "config.yaml"), "--output_path",
           str(output), "--device", "cpu", "--seed", "42"]
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, cwd=FIXTURE, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + HANG_GUARD
        while answered(partial) < 1:
            assert proc.poll() is None, (tmp_path / "log.txt").read_text()
            assert time.monotonic() < deadline, (tmp_path / "log.txt").read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its DataLoader workers, one of them waiting on the pipe
        except ProcessLookupError:
            pass
        proc.wait()
    assert 1 <= answered(partial) < 10
    assert not output.exists()

    stuck.unlink()
    shutil.copy(FIXTURE / read_jsonl(IMAGES_JSONL)[6]["image"], stuck)
    rerun = subprocess.run(cmd, cwd=FIXTURE, capture_output=True, text=True, timeout=HANG_GUARD)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming: " in rerun.stderr
    assert output.read_bytes() == EXPECTED.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.jsonl", "config.yaml", "log.txt", "records.jsonl",
                                                          "stuck.jpg"]
