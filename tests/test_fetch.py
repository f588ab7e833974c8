"""`python -m lynx.fetch` against a stand-in hub and release server on 127.0.0.1 (tests/hub_stand_in.py) serving the
tiny fixture's files under the released names: fetched, verified, resumed, refused, and answering as the original.

Fetch processes run with a guard that fails any name lookup or connection other than 127.0.0.1 before a packet
leaves (tests/loopback_only.py); the hub is reached only through HF_ENDPOINT, with the machine's HF settings removed.
"""
from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import FIXTURE, fixture_config, read_jsonl, run_main
from hub_stand_in import StandIn, released_files
from loopback_only import guarded_env, install

import lynx.fetch
from lynx import transfer
from lynx.fetch import llm_repo_files

HUB, RELEASE = released_files()
LLM_FILES = sorted(n for n in HUB["lmsys/vicuna-7b-v1.1"] if n != "README.md")
# Where each fetched file lands, and the bytes it must hold.
EXPECTED = {"data/eva_vit_g.pth": HUB["QuanSun/EVA-CLIP"]["EVA01_g_psz14.pt"],
            "data/finetune_lynx.pt": RELEASE["finetune_lynx.pt"],
            **{f"data/vicuna-7b/{n}": HUB["lmsys/vicuna-7b-v1.1"][n] for n in LLM_FILES}}


@pytest.fixture
def stand_in():
    server = StandIn(HUB, RELEASE)
    yield server
    server.close()


def new_project(root: Path, have=()) -> Path:
    """A folder to fetch into: the fixture's config (paths relative to it), test files and media, and of the weight
    files those in `have` ('vit', 'llm', 'checkpoint') copied from the fixture."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(yaml.safe_dump(fixture_config(), sort_keys=False))
    (root / "data").mkdir()
    for name in ("Open_VQA_images_tiny.jsonl", "Open_VQA_videos_tiny.jsonl"):
        shutil.copy(FIXTURE / "data" / name, root / "data" / name)
    for folder in ("images", "videos"):
        shutil.copytree(FIXTURE / folder, root / folder)
    copies = {"vit": "eva_vit_g.pth", "llm": "vicuna-7b", "checkpoint": "finetune_lynx.pt"}
    for what in have:
        source, target = FIXTURE / "data" / copies[what], root / "data" / copies[what]
        shutil.copytree(source, target) if source.is_dir() else shutil.copy(source, target)
    return root


def fetch_command(server: StandIn, *flags: str) -> list[str]:
    return [sys.executable, "-m", "lynx.fetch", "--config", "config.yaml", "--release-url", f"{server.url}/release",
            *flags]


def run_fetch(project: Path, server: StandIn, *flags: str, **env: str) -> subprocess.CompletedProcess:
    """The command a user types, from the project folder, with HF_ENDPOINT at the stand-in."""
    env = guarded_env(HF_ENDPOINT=server.url, HF_HOME=str(project / "hf_home"), **env)
    return subprocess.run(fetch_command(server, *flags), cwd=project, env=env, capture_output=True, text=True,
                          timeout=300)


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def byte_identical(project: Path) -> bool:
    return all((project / path).read_bytes() == data for path, data in EXPECTED.items())


@pytest.fixture(scope="module")
def fetched(tmp_path_factory):
    """The issue's scenario: the first download of EVA01_g_psz14.pt has a byte flipped and the first download of
    finetune_lynx.pt stops halfway. A fetch, then a second run."""
    server = StandIn(HUB, RELEASE)
    server.faults = {"EVA01_g_psz14.pt": ["flip"], "finetune_lynx.pt": ["cut"]}
    project = new_project(tmp_path_factory.mktemp("fetched") / "project")
    first = run_fetch(project, server, HF_TOKEN="hf_standin")
    first_log = list(server.log)
    second = run_fetch(project, server)
    yield project, server, first, first_log, second, server.log[len(first_log):]
    server.close()


def test_one_run_brings_every_file_byte_identical_through_a_flipped_byte_and_a_cut(fetched):
    project, server, first, *_ = fetched
    assert first.returncode == 0, first.stderr
    assert byte_identical(project)
    assert not [name for name in files_under(project) if name.endswith(".partial")]
    eva = EXPECTED["data/eva_vit_g.pth"]
    flipped = bytearray(eva)
    flipped[len(eva) // 2] ^= 0xFF
    assert (f"./data/eva_vit_g.pth: sha256 {hashlib.sha256(flipped).hexdigest()} is not the hub's "
            f"{hashlib.sha256(eva).hexdigest()}; deleted, fetching it once more") in first.stdout
    assert server.downloads("EVA01_g_psz14.pt") == [None, None]  # deleted, then fetched afresh
    half = len(RELEASE["finetune_lynx.pt"]) // 2
    assert server.downloads("finetune_lynx.pt") == [None, f"bytes={half}-"]  # resumed where the cut left it
    assert "checking ./data/finetune_lynx.pt.partial against the model" in first.stdout


def test_the_hub_is_asked_through_huggingface_hub_with_the_token_and_the_release_server_without(fetched):
    _, _, _, first_log, *_ = fetched
    hub = [(path, auth) for _, path, _, auth in first_log if not path.startswith("/release/")]
    assert ("/api/models/lmsys/vicuna-7b-v1.1", "Bearer hf_standin") in hub
    assert all(auth == "Bearer hf_standin" for path, auth in hub if "/resolve/" in path)
    assert all(auth is None for _, path, _, auth in first_log if path.startswith("/release/"))


def test_checksums_are_recorded_beside_the_files(fetched):
    project = fetched[0]
    for path in EXPECTED:
        assert transfer.recorded_sha256(str(project / path)) == transfer.sha256_of(str(project / path))
    sums = (project / "data" / "SHA256SUMS").read_text().splitlines()
    assert len(sums) == 2 and sums[0].endswith("  eva_vit_g.pth")  # sha256sum -c reads this format


def test_a_second_run_downloads_nothing_and_asks_nothing(fetched):
    project, _, _, _, second, second_log = fetched
    assert second.returncode == 0, second.stderr
    assert second_log == []
    assert "./data/finetune_lynx.pt: there, sha256 as when fetched" in second.stdout
    assert byte_identical(project)


def test_fetched_files_give_the_original_answers(fetched, tmp_path, monkeypatch):
    project = fetched[0]
    monkeypatch.chdir(project)
    videos = {"test_files": ["./data/Open_VQA_videos_tiny.jsonl"], "vision_prompt_dict": "video"}
    for case, overrides in (("images_greedy", {}), ("videos_greedy", videos)):
        output = tmp_path / f"{case}.jsonl"
        assert run_main(fixture_config(**overrides), tmp_path, output=output) == 0
        assert read_jsonl(output) == read_jsonl(FIXTURE / "expected" / f"{case}.jsonl")


def test_an_interrupted_download_resumes_on_the_next_run(tmp_path, stand_in):
    project = new_project(tmp_path / "project", have=("llm", "checkpoint"))
    stand_in.faults = {"EVA01_g_psz14.pt": ["stall"]}
    env = guarded_env(HF_ENDPOINT=stand_in.url, HF_HOME=str(tmp_path / "hf_home"))
    proc = subprocess.Popen(fetch_command(stand_in), cwd=project, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    partial = project / "data" / "eva_vit_g.pth.partial"
    half = len(EXPECTED["data/eva_vit_g.pth"]) // 2
    deadline = time.monotonic() + 60
    while not (partial.exists() and partial.stat().st_size == half) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "run the same command again to resume" in err
    assert partial.stat().st_size == half and not (project / "data" / "eva_vit_g.pth").exists()
    again = run_fetch(project, stand_in)
    assert again.returncode == 0, again.stderr
    assert stand_in.downloads("EVA01_g_psz14.pt") == [None, f"bytes={half}-"]
    assert (project / "data" / "eva_vit_g.pth").read_bytes() == EXPECTED["data/eva_vit_g.pth"]
    assert not partial.exists()


def test_a_hub_file_corrupted_twice_fails_clearly_and_leaves_nothing(tmp_path, stand_in):
    project = new_project(tmp_path / "project", have=("llm", "checkpoint"))
    stand_in.faults = {"EVA01_g_psz14.pt": ["flip", "flip"]}
    proc = run_fetch(project, stand_in)
    assert proc.returncode == 1
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ./data/eva_vit_g.pth: the hub's checksum did not match twice (sha256 ")
    assert "the downloads were deleted" in error
    assert not [p for p in files_under(project / "data") if p.startswith("eva_vit_g")]


def test_a_file_changed_after_it_was_fetched_is_caught_and_kept(tmp_path, stand_in):
    project = new_project(tmp_path / "project", have=("llm", "checkpoint"))
    assert run_fetch(project, stand_in).returncode == 0
    vit = project / "data" / "eva_vit_g.pth"
    data = bytearray(vit.read_bytes())
    data[1000] ^= 1
    vit.write_bytes(data)
    proc = run_fetch(project, stand_in)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: changed since they were fetched (sha256 other than SHA256SUMS records): "
                                  "./data/eva_vit_g.pth — corrupted")
    assert vit.read_bytes() == data


def test_dry_run_lists_every_file_its_source_and_size_and_downloads_nothing(tmp_path, stand_in):
    project = new_project(tmp_path / "project", have=("checkpoint",))
    (project / "data" / "eva_vit_g.pth.partial").write_bytes(EXPECTED["data/eva_vit_g.pth"][:1000])
    proc = run_fetch(project, stand_in, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "  there                ./data/finetune_lynx.pt" in lines
    assert (f"  partial 1.0 kB of   411.8 kB  ./data/eva_vit_g.pth  <- hub QuanSun/EVA-CLIP/EVA01_g_psz14.pt"
            in lines)
    for name in LLM_FILES:
        assert any(f"./data/vicuna-7b/{name}  <- hub lmsys/vicuna-7b-v1.1/{name}" in line for line in lines), name
    assert any(line.startswith("to download: 0.00 GB into ") for line in lines)
    assert [entry for entry in stand_in.log if entry[0] == "GET" and not entry[1].startswith("/api/")] == []
    assert files_under(project / "data") == {"Open_VQA_images_tiny.jsonl", "Open_VQA_videos_tiny.jsonl",
                                             "finetune_lynx.pt", "eva_vit_g.pth.partial"}


# ---------------------------------------------------------------- in this process: the release server only

@pytest.fixture
def loopback_only(monkeypatch):
    install(monkeypatch.setattr)


def fetch_here(project: Path, server: StandIn, monkeypatch, *flags: str) -> int:
    monkeypatch.chdir(project)
    return lynx.fetch.main(["--config", "config.yaml", "--release-url", f"{server.url}/release", *flags])


def test_a_full_disk_is_refused_before_any_download(tmp_path, stand_in, monkeypatch, loopback_only, capsys):
    project = new_project(tmp_path / "project", have=("vit", "llm"))
    monkeypatch.setattr(transfer, "free_bytes", lambda folder: 1_500_000)  # the checkpoint is 2.0 MB
    assert fetch_here(project, stand_in, monkeypatch) == 1
    err = capsys.readouterr().err
    assert err == (f"error: not enough free disk space: the downloads need 0.00 GB in {project / 'data'}, where "
                   f"0.00 GB are free; nothing was downloaded — free some space or point vit_checkpoint, llm_path "
                   f"and checkpoint at a larger disk\n")
    assert [entry[:2] for entry in stand_in.log] == [("HEAD", "/release/finetune_lynx.pt")]
    assert not (project / "data" / "finetune_lynx.pt.partial").exists()


def test_a_release_download_left_by_an_earlier_run_is_resumed(tmp_path, stand_in, monkeypatch, loopback_only):
    project = new_project(tmp_path / "project", have=("vit", "llm"))
    (project / "data" / "finetune_lynx.pt.partial").write_bytes(RELEASE["finetune_lynx.pt"][:1000])
    assert fetch_here(project, stand_in, monkeypatch) == 0
    assert stand_in.downloads("finetune_lynx.pt") == ["bytes=1000-"]
    assert (project / "data" / "finetune_lynx.pt").read_bytes() == RELEASE["finetune_lynx.pt"]


def test_both_checkpoints_each_checked_against_the_model(tmp_path, stand_in, monkeypatch, loopback_only):
    project = new_project(tmp_path / "project", have=("vit", "llm"))
    assert fetch_here(project, stand_in, monkeypatch, "--both-checkpoints") == 0
    assert (project / "data" / "pretrain_lynx.pt").read_bytes() == RELEASE["pretrain_lynx.pt"]
    assert (project / "data" / "finetune_lynx.pt").read_bytes() == RELEASE["finetune_lynx.pt"]


def test_a_release_file_that_does_not_fit_the_model_stays_partial(tmp_path, monkeypatch, loopback_only, capsys):
    server = StandIn(HUB, {"finetune_lynx.pt": HUB["QuanSun/EVA-CLIP"]["EVA01_g_psz14.pt"]})  # a ViT file instead
    try:
        project = new_project(tmp_path / "project", have=("vit", "llm"))
        assert fetch_here(project, server, monkeypatch) == 1
    finally:
        server.close()
    err = capsys.readouterr().err
    assert err.startswith("error: ./data/finetune_lynx.pt: the downloaded file does not fit this config, so it stays "
                          "./data/finetune_lynx.pt.partial: ./data/finetune_lynx.pt.partial: missing ")
    assert (project / "data" / "finetune_lynx.pt.partial").exists()
    assert not (project / "data" / "finetune_lynx.pt").exists()


def test_a_mistyped_path_is_refused_before_anything_is_asked(tmp_path, stand_in, monkeypatch, loopback_only, capsys):
    project = new_project(tmp_path / "project", have=("vit", "llm", "checkpoint"))
    (project / "config.yaml").write_text(yaml.safe_dump(fixture_config(vit_checkpoint="./data/eva_vit_g.pht")))
    assert fetch_here(project, stand_in, monkeypatch) == 1
    assert capsys.readouterr().err.splitlines()[1:] == [
        "  vit_checkpoint ./data/eva_vit_g.pht: no such file; did you mean ./data/eva_vit_g.pth?"]
    assert stand_in.log == []


def test_the_guard_refuses_other_addresses_before_a_packet_leaves():
    code = "import socket\ntry:\n    socket.getaddrinfo('huggingface.co', 443)\nexcept OSError as e:\n    print(e)"
    proc = subprocess.run([sys.executable, "-c", code], env=guarded_env(), capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "test guard: 'huggingface.co' is not this machine (only 127.0.0.1, ::1, localhost)"


# ---------------------------------------------------------------- which files of a repo

def test_llm_files_are_the_config_tokenizer_and_one_form_of_the_weights():
    names = ["README.md", ".gitattributes", "config.json", "tokenizer.model", "pytorch_model.bin.index.json",
             "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "training_args.bin"]
    assert llm_repo_files("r", names) == ["config.json", "tokenizer.model", "pytorch_model.bin.index.json",
                                          "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    both = names + ["model.safetensors.index.json", "model-00001-of-00002.safetensors",
                    "model-00002-of-00002.safetensors"]
    assert llm_repo_files("r", both)[2:] == ["model.safetensors.index.json", "model-00001-of-00002.safetensors",
                                             "model-00002-of-00002.safetensors"]
    with pytest.raises(lynx.fetch.InputError, match="r holds no LLM weights"):
        llm_repo_files("r", ["config.json", "tokenizer.model"])

