"""Which media files of a config's test files are there, grouped by the data set each comes from, with the page to
download it from: `python -m lynx.fetch --check-media --config configs/LYNX.yaml` (exit 1 when any is missing).

Open-VQA's records name their media by a path relative to the working directory (`images/vqav2/val2014/...`) and
their data set (`origin_dataset`). The media are not redistributed: each comes from its data set's own page.
"""
from __future__ import annotations

import os
from collections import Counter, defaultdict

from dataset.records import MEDIA_KINDS, read_test_files

# origin_dataset -> (name, the download page the original release names for it)
DATASETS = {
    "places365": ("Places365 (256x256)", "http://places2.csail.mit.edu/download.html"),
    "vqav2": ("VQAv2", "https://visualqa.org/download.html"),
    "ocrvqa": ("OCR-VQA", "https://ocr-vqa.github.io/"),
    "sthsthv2cap": ("Something-Something v2",
                    "https://developer.qualcomm.com/software/ai-datasets/something-something"),
    "msvdqa": ("MSVD-QA", "https://github.com/xudejing/video-question-answering"),
    "nextqa": ("NExT-QA", "https://github.com/doc-doc/NExT-QA"),
    "msrvttqa": ("MSRVTT-QA", "https://github.com/xudejing/video-question-answering"),
}
SHOWN = 2  # missing names shown per folder without --list-missing


def is_path(value) -> bool:
    """A media value that names a file (not base64 text, a data URI or a list of inline frames)."""
    return isinstance(value, str) and 0 < len(value) < 1024 and not value.startswith("data:") and \
        ("/" in value or os.sep in value or "." in value[-6:])


def media_paths(records) -> list[tuple[str, str, str]]:
    """(kind, data set, path) of each media file a record names; the data set is its `origin_dataset`, else the
    file's folder."""
    found = []
    for record in records:
        for kind in MEDIA_KINDS:
            value = record.fields.get(kind)
            if is_path(value):
                found.append((kind, str(record.fields.get("origin_dataset") or os.path.dirname(value)), value))
    return found


def check_media(cfg, list_missing: bool = False) -> int:
    """Print what is there and what is missing; 1 when anything is missing."""
    found = media_paths(read_test_files(cfg.test_files))
    there = {path: os.path.isfile(path) for _, _, path in found}
    print(f"media of {', '.join(cfg.test_files)} (paths relative to {os.getcwd()}):")
    for kind in MEDIA_KINDS:
        paths = [path for k, _, path in found if k == kind]
        if paths:
            print(f"  {kind}s: {sum(there[p] for p in paths)} of {len(paths)} present "
                  f"({files(len(set(paths)))}, {sum(not there[p] for p in set(paths))} missing)")
    missing = defaultdict(dict)  # data set -> {path: None}, in order
    for _, name, path in found:
        if not there[path]:
            missing[name][path] = None
    if not missing:
        print("every media file is there")
        return 0
    print("missing, by data set (download from its page; put each file at the path its record names):")
    order = [n for n in list(DATASETS) + sorted(set(missing) - set(DATASETS)) if n in missing]
    for name in order:
        title, page = DATASETS.get(name, (name, None))
        in_set = {path for _, n, path in found if n == name}
        print(f"  {title}: {len(missing[name])} of {files(len(in_set))} missing" + (f" — {page}" if page else ""))
        for folder, count in Counter(os.path.dirname(p) for p in missing[name]).items():
            names = [os.path.basename(p) for p in missing[name] if os.path.dirname(p) == folder]
            more = f", ... ({count - SHOWN} more)" if count > SHOWN else ""
            print(f"      {folder}/: {count}, e.g. {', '.join(names[:SHOWN])}{more}")
    if list_missing:
        print("\n".join(path for name in order for path in missing[name]))
    else:
        print(f"{files(sum(map(len, missing.values())))} missing in all (--list-missing lists every path)")
    return 1


def files(count: int) -> str:
    return f"{count} file" + "s" * (count != 1)
