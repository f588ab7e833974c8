"""Reading test files (jsonl) into records; errors name the file and line."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property

from errors import InputError, RecordError

MEDIA_KINDS = ("image", "video")


@dataclass(frozen=True)
class Record:
    """One line of a test file. `key` identifies it across files (Open-VQA's image and video sets share indices)
    and across edits of the file."""

    fields: dict
    path: str
    line: int
    file_no: int

    @property
    def index(self):
        return self.fields["index"]

    @cached_property
    def key(self) -> tuple:
        """(file number, index, digest of the record's content): a resumed run reuses an answer only for the
        same record unchanged, so fixing a line of the test file re-answers just that line."""
        digest = hashlib.sha1(json.dumps(self.fields, sort_keys=True).encode()).hexdigest()[:12]
        return (self.file_no, self.index, digest)

    def media_kind(self, vision_key: str) -> str:
        """'image' or 'video': the configured key, or with 'auto' whichever of the two the record holds."""
        if vision_key != "auto":
            return vision_key
        present = [kind for kind in MEDIA_KINDS if kind in self.fields]
        return present[0] if len(present) == 1 else "image"

    def media(self, vision_key: str):
        kind = self.media_kind(vision_key)
        if vision_key == "auto" and all(k in self.fields for k in MEDIA_KINDS):
            raise RecordError(self.index, "holds both 'image' and 'video'; set vision_prompt_dict to pick one")
        if kind not in self.fields:
            wanted = "'image' or 'video'" if vision_key == "auto" else f"'{kind}'"
            raise RecordError(self.index, f"has no {wanted} field ({self.path}:{self.line})")
        return self.fields[kind]


def read_json_lines(path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a bad line is an error naming file:line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err.reason})") from None
    rows = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{line_no}: not valid JSON: {err.msg} (column {err.colno})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
        rows.append((line_no, row))
    return rows


def read_jsonl(path: str, file_no: int = 0) -> list[Record]:
    """Records of one test file. Blank lines are skipped; a bad line or a repeated index stops with file:line."""
    if not os.path.isfile(path):
        raise InputError(f"test file not found: {path}")
    records, seen = [], {}
    for line_no, fields in read_json_lines(path):
        if "index" not in fields:
            raise InputError(f"{path}:{line_no}: record has no 'index'")
        index = fields["index"]
        if not isinstance(index, (int, str)) or isinstance(index, bool):
            raise InputError(f"{path}:{line_no}: 'index' must be an integer or a string, got {index!r}")
        if index in seen:
            raise InputError(f"{path}:{line_no}: duplicate index {index!r} (first on line {seen[index]})")
        seen[index] = line_no
        records.append(Record(fields, path, line_no, file_no))
    return records


def read_test_files(paths: list[str]) -> list[Record]:
    """All records of the test files, in file order then line order (the order answers are written in)."""
    records = []
    for file_no, path in enumerate(paths):
        records.extend(read_jsonl(path, file_no))
    return records
