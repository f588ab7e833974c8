"""Several processes (torchrun, gloo on the CPU): the same file as a single run, for images and videos; one process
failing or killed ends the other, which could not have ended by itself; a rerun, with any number of processes,
completes the file.

The multi-process runs are real torchrun launches. The single-process file they must equal is the original's answers
file, which a single run writes byte for byte (test_parity.py); one rerun calls generate.main in-process with the
same arguments (the same command, without paying for the imports again).
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

import psutil
import pytest
import yaml

import generate
from configs.schema import load_config
from dataset.records import read_test_files
from errors import InputError
from lynx.processes import Processes
from lynx.resumable import ResumableRun, share_of
from tests.conftest import FIXTURE, ROOT, fixture_config, read_jsonl

MEDIA = {
    "images": {},
    "videos": {"test_files": ["./data/Open_VQA_videos_tiny.jsonl"], "vision_prompt_dict": "video"},
}
SHARES = {"images": (6, 4), "videos": (3, 3)}  # records per rank: batches of 3, dealt in turn
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def arguments(folder, cfg: dict, *extra: str) -> list[str]:
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return ["--config", str(folder / "config.yaml"), "--output_path", str(folder / "answers.jsonl"),
            "--device", "cpu", "--seed", "42", *extra]


def torchrun(args: list[str], log_path) -> subprocess.Popen:
    """`torchrun --standalone --nproc_per_node 2 generate.py ...` from the fixture root, output in `log_path`."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", str(ROOT / "generate.py"), *args], cwd=FIXTURE, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """End a launch that is still running (torchrun and its workers: the session it leads)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def finish(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        stop(proc)


def workers(proc: subprocess.Popen) -> dict[int, psutil.Process]:
    """torchrun's generate.py processes by rank."""
    found = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except psutil.Error:
            continue
        if rank is not None and "generate.py" in " ".join(child.cmdline()):
            found[int(rank)] = child
    return found


def gone(process: psutil.Process) -> bool:
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def answered(path) -> int:
    """Complete answer lines in a side file (not the header)."""
    if not path.exists():
        return 0
    return sum(line.startswith('{"key"') and line.endswith("}") for line in path.read_text().splitlines())


def side_files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("answers.jsonl."))


@pytest.fixture(autouse=True)
def single_process_env(monkeypatch):
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def reference() -> dict[str, bytes]:
    """The single-process file for the images and for the videos: the fixture config's greedy answers, as the
    original wrote them."""
    return {name: (FIXTURE / "expected" / f"{name}_greedy.jsonl").read_bytes() for name in MEDIA}


@pytest.mark.parametrize("media", MEDIA)
def test_two_processes_write_the_single_process_file(tmp_path, reference, media):
    proc = torchrun(arguments(tmp_path, fixture_config(**MEDIA[media])), tmp_path / "log.txt")
    status = finish(proc, timeout=240)
    log = (tmp_path / "log.txt").read_text()
    assert status == 0, log
    assert (tmp_path / "answers.jsonl").read_bytes() == reference[media]
    assert side_files(tmp_path) == []
    for rank, share in enumerate(SHARES[media]):
        assert f"rank {rank}: {share}/{share} records" in log, log


def records_with(tmp_path, images: dict) -> str:
    """The fixture's image records with those at the given positions reading other images (absolute paths)."""
    rows = read_jsonl(FIXTURE / "data" / "Open_VQA_images_tiny.jsonl")
    for position, image in images.items():
        rows[position]["image"] = str(image)
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def image_of(position: int):
    """The fixture's image of the record at `position`."""
    return FIXTURE / read_jsonl(FIXTURE / "data" / "Open_VQA_images_tiny.jsonl")[position]["image"]


def wait_for(condition, proc, log_path, seconds: float = 300) -> None:
    """Wait for a state of the run; `seconds` only guards against a hang."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.05)


# The 10 image records in batches of 3 are [0 1 2] [3 4 5] [6 7 8] [9]; rank 0 answers the 1st and 3rd, rank 1 the
# 2nd and 4th, so position 3 is the first record rank 1 loads and position 6 the first of rank 0's second batch.
RANK1_FIRST = 3
RANK0_SECOND = 6
HANG_GUARD = 300  # seconds: a wait that should end long before, so that a hang fails the test instead of blocking it


def test_a_failing_process_ends_both_and_the_same_command_completes(tmp_path, reference):
    late = tmp_path / "late" / "img_d.png"  # not there yet: rank 1 fails with --strict
    stuck = tmp_path / "stuck.jpg"
    os.mkfifo(stuck)  # nobody writes it: rank 0 waits on its second batch until it is stopped
    cfg = fixture_config(test_files=[records_with(tmp_path, {RANK1_FIRST: late, RANK0_SECOND: stuck})])
    args = arguments(tmp_path, cfg, "--strict")
    log_path = tmp_path / "log.txt"
    proc = torchrun(args, log_path)
    try:
        wait_for(lambda: len(workers(proc)) == 2, proc, log_path)
        ranks = workers(proc)
        wait_for(lambda: (tmp_path / "answers.jsonl.rank1.errors.jsonl").exists(), proc, log_path)
        status = finish(proc, timeout=HANG_GUARD)
    finally:
        stop(proc)
    assert all(gone(process) for process in ranks.values())  # rank 0 was stopped: alone it waits for ever
    assert status != 0
    log = log_path.read_text()
    assert "error: rank 1: record 5 (" in log and "image file not found" in log
    assert not (tmp_path / "answers.jsonl").exists()

    late.parent.mkdir()
    shutil.copy(image_of(RANK1_FIRST), late)
    stuck.unlink()
    shutil.copy(image_of(RANK0_SECOND), stuck)
    assert finish(torchrun(args, log_path), timeout=HANG_GUARD) == 0, log_path.read_text()
    assert (tmp_path / "answers.jsonl").read_bytes() == reference["images"]
    assert side_files(tmp_path) == []


def test_a_killed_process_ends_the_other_and_one_process_completes(tmp_path, reference, caplog, monkeypatch):
    stuck = tmp_path / "stuck.png"
    os.mkfifo(stuck)  # nobody writes it: rank 1 waits on its first record until it is killed
    args = arguments(tmp_path, fixture_config(test_files=[records_with(tmp_path, {RANK1_FIRST: stuck})]))
    log_path = tmp_path / "log.txt"
    proc = torchrun(args, log_path)
    try:
        wait_for(lambda: answered(tmp_path / "answers.jsonl.rank0.partial.jsonl") == 6, proc, log_path)
        ranks = workers(proc)
        ranks[1].send_signal(signal.SIGKILL)
        status = finish(proc, timeout=HANG_GUARD)
    finally:
        stop(proc)
    assert gone(ranks[0])  # done with its share, it waits for rank 1's answers: only the kill can end it
    assert status != 0
    assert not (tmp_path / "answers.jsonl").exists()

    # One process takes over both parts: only rank 1's records are answered again.
    stuck.unlink()
    shutil.copy(image_of(RANK1_FIRST), stuck)
    monkeypatch.chdir(FIXTURE)
    caplog.set_level(logging.INFO, logger="lynx")
    assert generate.main(args) == 0
    assert "resuming: 6 of 10 records already answered" in caplog.text
    assert (tmp_path / "answers.jsonl").read_bytes() == reference["images"]
    assert side_files(tmp_path) == []


# ---------------------------------------------------------------- without processes


def planned(records, answered: set, batch_size: int, processes=Processes(), vision_key="image") -> list[tuple]:
    done = {records[p].key for p in answered}
    return [(p.number, p.positions) for p in share_of(records, done, vision_key, batch_size, processes)]


def test_the_plan_is_the_single_run_batches_of_all_records_dealt_in_turn(in_fixture):
    """Batches of all records, numbered; process R of W takes numbers R, R + W, ...; answered records drop out of
    their batch without moving the others, so a batch keeps its number and records across resumes and process
    counts."""
    records = read_test_files(load_config("config.yaml").test_files)
    assert planned(records, set(), 2) == [(0, [0, 1]), (1, [2, 3]), (2, [4, 5]), (3, [6, 7]), (4, [8, 9])]
    assert planned(records, {1, 4, 6, 7}, 2) == [(0, [0]), (1, [2, 3]), (2, [5]), (4, [8, 9])]
    shares = [planned(records, {1, 4, 6, 7}, 2, Processes(rank, 3)) for rank in range(3)]
    assert shares == [[(0, [0])], [(1, [2, 3]), (4, [8, 9])], [(2, [5])]]


def test_the_plan_keeps_images_and_videos_apart(tmp_path):
    rows = [{"index": n, "question": "q", **({"video": "v.mp4"} if n in (2, 3) else {"image": "i.jpg"})}
            for n in range(6)]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    records = read_test_files([str(path)])
    assert planned(records, set(), 4, vision_key="auto") == [(0, [0, 1]), (1, [2, 3]), (2, [4, 5])]
    assert planned(records, {0}, 4, Processes(1, 2), vision_key="auto") == [(1, [2, 3])]


def test_side_files_of_other_settings_are_refused_and_new_ones_waited_for(tmp_path):
    """With answers, another run's side file is refused; without any (its run stopped or failed before the first)
    it goes silently; a file of this run's other process, being created now, is left to it."""
    output = str(tmp_path / "answers.jsonl")
    rank1, rank3 = (tmp_path / f"answers.jsonl.rank{r}.partial.jsonl" for r in (1, 3))
    rank1.write_text("")  # its process is creating it right now
    rank3.write_text('{"fingerprint": "old"}\n')
    ResumableRun(output, Processes(0, 2)).open("abc", overwrite=False)
    assert rank1.exists() and not rank3.exists()  # a run of 2: rank 3's file was left over, with nothing to keep
    rank3.write_text('{"fingerprint": "old"}\n{"key": [0, 1, "d"], "index": 1, "text_output": "a"}\n')
    with pytest.raises(InputError, match=r"rank3\.partial\.jsonl holds answers of a run with other settings"):
        ResumableRun(output, Processes(0, 2)).open("abc", overwrite=False)
    ResumableRun(output, Processes(0, 2)).open("abc", overwrite=True)
    assert not rank3.exists()
