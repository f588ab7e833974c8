"""Shared helpers: the tiny parity fixture (tests/fixtures/tiny, copied from ../shared/parity) and generate.py runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "tiny"
sys.path.insert(0, str(ROOT))
if os.environ.get("PYTEST_XDIST_WORKER"):  # one test process per core (pytest.ini): one torch thread in each, and
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # in the runs it starts (torch reads it when first imported)


# The files that take longest (half a minute or more on 2 cores: torchrun, servers, fresh interpreters, the written-out
# decoding), longest first. They start first: the test processes take whole files (pytest.ini), and a long file
# taken last would leave the other processes idle at the end.
LONG_FILES = ("test_distributed.py", "test_release_files.py", "test_parity.py", "test_reference_428.py",
              "test_benchmark.py", "test_run_files.py", "test_serve_lmms_eval.py", "test_sampled_runs.py",
              "test_serve_other_fixture.py", "test_shipped_defaults.py", "test_serve_startup.py", "test_decoding.py",
              "test_serve_decoding.py", "test_serve_api.py", "test_fetch.py", "test_serve_benchmark.py",
              "test_resume.py")


def pytest_collection_modifyitems(items):
    """LONG_FILES first, in that order; the other files after them, as collected."""
    rank = {name: position for position, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))


def fixture_config(**overrides) -> dict:
    """The fixture's config.yaml with keys replaced (paths in it are relative to FIXTURE)."""
    cfg = yaml.safe_load((FIXTURE / "config.yaml").read_text())
    cfg["data"]["num_workers"] = 0
    cfg.update(overrides)
    return cfg


def fixture_cases(name: str = "cases.yaml") -> list[dict]:
    """The runs of a cases file of the fixture (cases.yaml; cases_paper_decoding.yaml: the original's seeded beam
    sampling and beam search at the length limit), each with its expected answers."""
    return yaml.safe_load((FIXTURE / name).read_text())["cases"]


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def run_generate(cfg: dict, tmp_path: Path, *extra: str, output: Path | None = None, cwd: Path = FIXTURE,
                 timeout: int = 300) -> subprocess.CompletedProcess:
    """Write `cfg` to a file and run generate.py on it from `cwd` (the fixture root by default) on the CPU."""
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    output = output or tmp_path / "answers.jsonl"
    cmd = [sys.executable, str(ROOT / "generate.py"), "--config", str(cfg_path), "--output_path", str(output),
           "--device", "cpu", "--seed", "42", *extra]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def run_main(cfg: dict, tmp_path: Path, *extra: str, output: Path | None = None) -> int:
    """generate.py's main in this process on `cfg` (written to tmp_path/config.yaml); returns the exit status."""
    import generate

    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    output = tmp_path / "answers.jsonl" if output is None else output  # "" is a case of its own
    return generate.main(["--config", str(cfg_path), "--output_path", str(output), "--device", "cpu",
                          "--seed", "42", *extra])


PROBE = """
import os, runpy, sys
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))  # as `python script.py` does
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as stop:
    status = stop.code
print("torch imported" if "torch" in sys.modules else "torch not imported", file=sys.stderr)
sys.exit(status)
"""


def probe_torch(script: Path, *argv: str, cwd: Path = FIXTURE) -> subprocess.CompletedProcess:
    """`python script argv...` in a fresh interpreter that says at exit (stderr's last line) whether torch was
    imported."""
    return subprocess.run([sys.executable, "-c", PROBE, str(script), *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def one_line_error(capsys) -> str:
    """The one `error: ` line a run printed, asserting there was exactly one and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def batch_inputs(kind: str, b: int) -> dict:
    """What the original's `LLM.generate` received for batch b of the sampling fixture (kind: images, videos)."""
    import torch

    return torch.load(FIXTURE / "expected" / "sampling" / f"{kind}_batch{b}_inputs.pt", weights_only=True)


def saved_rows(saved: dict, key: str, b: int) -> list:
    """The rows of `saved[key]` that belong to batch b."""
    return [row for row, batch in zip(saved[key], saved["batch"]) if batch == b]


def build_tiny_lynx(**overrides):
    """(config, model, tokenizer) of the fixture with keys replaced, built from the fixture root where its
    relative paths resolve."""
    from configs.schema import config_from_dict
    from models.build import build_lynx

    cwd = os.getcwd()
    os.chdir(FIXTURE)
    try:
        cfg = config_from_dict(fixture_config(**overrides))
        model, tokenizer = build_lynx(cfg, "cpu")
    finally:
        os.chdir(cwd)
    return cfg, model, tokenizer


def eval_dataset(records, cfg, tokenizer, seed: int = 0):
    """generate.py's dataset of `records` for a config and tokenizer (a pipeline makes its Preparer once)."""
    from dataset.batching import LynxEvalDataset, Preparer

    return LynxEvalDataset(records, Preparer.from_config(cfg, tokenizer), cfg.vision_prompt_dict, seed)


def image_batcher(cfg, tokenizer):
    """`batch(positions)`: the fixture's image records at those positions, collated (left-padded) into a Batch."""
    from dataset.batching import Collator
    from dataset.records import read_jsonl

    cwd = os.getcwd()
    os.chdir(FIXTURE)
    try:
        records = read_jsonl("./data/Open_VQA_images_tiny.jsonl")
        dataset = eval_dataset(records, cfg, tokenizer)
        items = [dataset[p] for p in range(len(records))]
    finally:
        os.chdir(cwd)
    return lambda positions: Collator(tokenizer.pad_id, True)([items[p] for p in positions])


@pytest.fixture
def in_fixture(monkeypatch):
    """Run a test from the fixture root, where the relative paths of its config and jsonl resolve."""
    monkeypatch.chdir(FIXTURE)
    return FIXTURE
