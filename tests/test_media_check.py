"""`python -m lynx.fetch --check-media`: which media files of the config's test files are there, by data set."""
from __future__ import annotations

import json

import lynx.fetch
from conftest import ROOT

OPEN_VQA = [str(ROOT / "data" / "Open_VQA_images.jsonl"), str(ROOT / "data" / "Open_VQA_videos.jsonl")]


def check_media(monkeypatch, cwd, test_files, *flags) -> int:
    monkeypatch.chdir(cwd)
    return lynx.fetch.main(["--config", str(ROOT / "configs" / "LYNX.yaml"), "--check-media",
                            "--set", f"test_files={json.dumps(test_files)}", *flags])


def test_open_vqa_in_an_empty_images_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "images").mkdir()
    assert check_media(monkeypatch, tmp_path, OPEN_VQA) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:3] == ["  images: 0 of 302 present (301 files, 301 missing)",
                          "  videos: 0 of 148 present (148 files, 148 missing)"]
    groups = [line for line in lines if line.startswith("  ") and " files missing" in line]
    assert groups == [
        "  Places365 (256x256): 14 of 14 files missing — http://places2.csail.mit.edu/download.html",
        "  VQAv2: 246 of 246 files missing — https://visualqa.org/download.html",
        "  OCR-VQA: 41 of 41 files missing — https://ocr-vqa.github.io/",
        "  Something-Something v2: 109 of 109 files missing — "
        "https://developer.qualcomm.com/software/ai-datasets/something-something",
        "  MSVD-QA: 11 of 11 files missing — https://github.com/xudejing/video-question-answering",
        "  NExT-QA: 15 of 15 files missing — https://github.com/doc-doc/NExT-QA",
        "  MSRVTT-QA: 13 of 13 files missing — https://github.com/xudejing/video-question-answering",
    ]
    assert "      images/ocrvqa/image_1w/: 4, e.g. 51rLTCtk7RL.jpg, 51PS3GY96CL.jpg, ... (2 more)" in lines
    assert lines[-1] == "449 files missing in all (--list-missing lists every path)"


def write_records(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_present_and_missing_counted_and_every_missing_path_listed(tmp_path, monkeypatch, capsys):
    (tmp_path / "images" / "vqav2").mkdir(parents=True)
    (tmp_path / "images" / "vqav2" / "a.jpg").write_bytes(b"x")
    test_file = write_records(tmp_path / "t.jsonl", [
        {"index": 1, "image": "images/vqav2/a.jpg", "origin_dataset": "vqav2"},
        {"index": 2, "image": "images/vqav2/b.jpg", "origin_dataset": "vqav2"},
        {"index": 3, "image": "images/vqav2/b.jpg", "origin_dataset": "vqav2"},
        {"index": 4, "image": "mine/c.png"},  # no origin_dataset: grouped by its folder
        {"index": 5, "image": "aGVsbG8gd29ybGQ="},  # base64: no file to look for
        {"index": 6, "video": "clips/d.mp4", "origin_dataset": "msrvttqa"},
    ])
    assert check_media(monkeypatch, tmp_path, [test_file], "--list-missing") == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:] == [
        "  images: 1 of 4 present (3 files, 2 missing)",
        "  videos: 0 of 1 present (1 file, 1 missing)",
        "missing, by data set (download from its page; put each file at the path its record names):",
        "  VQAv2: 1 of 2 files missing — https://visualqa.org/download.html",
        "      images/vqav2/: 1, e.g. b.jpg",
        "  MSRVTT-QA: 1 of 1 file missing — https://github.com/xudejing/video-question-answering",
        "      clips/: 1, e.g. d.mp4",
        "  mine: 1 of 1 file missing",
        "      mine/: 1, e.g. c.png",
        "images/vqav2/b.jpg",
        "clips/d.mp4",
        "mine/c.png",
    ]


def test_every_file_there_exits_0(tmp_path, monkeypatch, capsys):
    (tmp_path / "a.jpg").write_bytes(b"x")
    test_file = write_records(tmp_path / "t.jsonl", [{"index": 1, "image": "a.jpg"}])
    assert check_media(monkeypatch, tmp_path, [test_file]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == ["  images: 1 of 1 present (1 file, 0 missing)",
                                                        "every media file is there"]
