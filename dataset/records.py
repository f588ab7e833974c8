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
    """(line number, object) for each non-blank line; a bad line is an error naming file:line and the column. A
    byte-order mark starting a line is skipped: an editor saving "UTF-8 with BOM" writes one first, and joining such
    files leaves them inside."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err.reason})") from None
    rows = []
    for line_no, line in enumerate(lines, start=1):
        line = line.removeprefix("\ufeff").rstrip("\r\n")
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            where = "at the end of the line" if err.pos >= len(line) else f"column {err.pos + 1}"
            raise InputError(f"{path}:{line_no}: not valid JSON: {err.msg} ({where})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
        rows.append((line_no, row))
    return rows


def index_key(index) -> str:
    """What makes two indices the same: their text, so `1` and `"1"` are one index. generate.py refuses them as a
    duplicate in one test file, and evaluate.py pairs an answer `"1"` with the record `1`."""
    return str(index)


def checked_index(row: dict, where: str):
    """The row's `index`, or InputError at `where` (file:line) when it is missing or neither integer nor string."""
    if "index" not in row:
        raise InputError(f"{where}: record has no 'index'")
    index = row["index"]
    if not isinstance(index, (int, str)) or isinstance(index, bool):
        raise InputError(f"{where}: 'index' must be an integer or a string, got {index!r}")
    return index


class IndexBook:
    """The indices met so far and where (test files, annotations, answers alike): a second one is an error naming
    both places."""

    def __init__(self):
        self.first: dict[str, tuple] = {}  # index_key -> (index, path, line)

    def add(self, index, path, line: int) -> str:
        """Note `index` at path:line and return its key; InputError if an index with the same key came before."""
        key = index_key(index)
        if key in self.first:
            first_index, first_path, first_line = self.first[key]
            place = f"line {first_line}" if str(first_path) == str(path) else f"{first_path}:{first_line}"
            written = "" if repr(first_index) == repr(index) else f", written {first_index!r}"
            raise InputError(f"{path}:{line}: duplicate index {index!r} (first on {place}{written})")
        self.first[key] = (index, path, line)
        return key


def read_jsonl(path: str, file_no: int = 0) -> list[Record]:
    """Records of one test file. Blank lines are skipped; a bad line or a repeated index stops with file:line."""
    if not os.path.isfile(path):
        raise InputError(f"test file not found: {path}")
    records, seen = [], IndexBook()
    for line_no, fields in read_json_lines(path):
        seen.add(checked_index(fields, f"{path}:{line_no}"), path, line_no)
        records.append(Record(fields, path, line_no, file_no))
    return records


def read_test_files(paths: list[str]) -> list[Record]:
    """All records of the test files, in file order then line order (the order answers are written in)."""
    records = []
    for file_no, path in enumerate(paths):
        records.extend(read_jsonl(path, file_no))
    return records


def check_media_key(records: list[Record], vision_key: str) -> None:
    """Refuse, before anything loads, a test file none of whose records holds the configured media key: test_files
    pointed at videos with `vision_prompt_dict: image` left as it was would load the model only to fail every
    record. A file where some records hold it goes on: the others fail one by one, named."""
    if vision_key == "auto":
        return
    files: dict[int, list[Record]] = {}
    for record in records:
        files.setdefault(record.file_no, []).append(record)
    for rows in files.values():
        if any(vision_key in record.fields for record in rows):
            continue
        held = [kind for kind in MEDIA_KINDS if any(kind in record.fields for record in rows)]
        problem = (f"{rows[0].path}: vision_prompt_dict is '{vision_key}', but none of its records has the field "
                   f"'{vision_key}'")
        if not held:
            raise InputError(f"{problem} (nor 'image' or 'video')")
        raise InputError(f"{problem}; they have '{held[0]}': set vision_prompt_dict: {held[0]} (or auto, which reads "
                         f"each record's own)")
