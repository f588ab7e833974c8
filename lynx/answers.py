"""Answers on disk: streamed to a side file as they are produced, so a crash loses nothing and a rerun resumes.

    <output>.partial.jsonl   header {"fingerprint": ...}, then one {"key", "index", "text_output"} per answer
    <output>.errors.jsonl    one {"index", "file", "line", "media", "reason"} per record that could not be answered
    <output>                 written atomically, in input order, once every record is answered

The fingerprint covers everything that changes answers, so a resume never mixes answers of two settings.
"""
from __future__ import annotations

import hashlib
import json
import os

from errors import InputError, RecordError
from dataset.records import Record


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_stamp(path: str) -> list:
    """Identity of a weight file or folder without reading it: name, size, modification time."""
    if os.path.isdir(path):
        return sorted(file_stamp(os.path.join(path, name)) for name in os.listdir(path))
    if not os.path.exists(path):
        return [path, None]
    stat = os.stat(path)
    return [os.path.abspath(path), stat.st_size, int(stat.st_mtime)]


def answer_line(index, text: str) -> str:
    """The original's output line: json.dumps({"index", "text_output"}) with ASCII escapes."""
    return json.dumps({"index": index, "text_output": text})


def read_partial(path: str) -> tuple[dict, dict]:
    """The header and the answers ({key: text}) of a side file; the header is {} while the file has none yet."""
    header, answers = {}, {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash: that record is answered again
            if n == 0:
                header = row if isinstance(row, dict) else {}
            elif isinstance(row, dict) and "key" in row:
                answers[tuple(row["key"])] = row["text_output"]
    return header, answers


def other_settings_error(path: str) -> InputError:
    return InputError(f"{path} holds answers of a run with other settings (weights, decoding, prompt, dtype or "
                      f"data changed); pass --overwrite to discard them and start again")


def write_lines_atomically(path: str, lines: list[str]) -> None:
    """Replace `path` in one step: readers see the old file or the whole new one, never a part."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _append(path: str, lines: list[str]) -> None:
    if not lines:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())


class AnswerStore:
    def __init__(self, output_path: str, suffix: str = ""):
        self.output_path = output_path
        self.partial_path = f"{output_path}{suffix}.partial.jsonl"
        self.errors_path = f"{output_path}{suffix}.errors.jsonl"
        self.answers: dict[tuple, str] = {}

    # ---- before the model loads
    def check_writable(self, overwrite: bool) -> None:
        folder = os.path.dirname(os.path.abspath(self.output_path))
        if not os.path.isdir(folder):
            raise InputError(f"output folder does not exist: {folder}")
        if not os.access(folder, os.W_OK):
            raise InputError(f"output folder is not writable: {folder}")
        resuming = os.path.exists(self.partial_path)
        if os.path.exists(self.output_path) and not resuming and not overwrite:
            raise InputError(f"{self.output_path} already exists; pass --overwrite to replace it")

    def check_resume(self, run_fingerprint: str, overwrite: bool) -> None:
        """Refuse to resume a partial run made with other settings; cheap, so it can run before the model loads."""
        if overwrite or not os.path.exists(self.partial_path):
            return
        header, _ = read_partial(self.partial_path)
        if header.get("fingerprint") != run_fingerprint:
            raise other_settings_error(self.partial_path)

    def open(self, run_fingerprint: str, overwrite: bool) -> int:
        """Start or resume. Returns how many answers a previous run left. Refuses a resume with other settings."""
        if os.path.exists(self.partial_path) and not overwrite:
            header, self.answers = read_partial(self.partial_path)
            if header.get("fingerprint") != run_fingerprint:
                raise other_settings_error(self.partial_path)
        else:
            with open(self.partial_path, "w", encoding="utf-8") as f:
                f.write(json.dumps({"fingerprint": run_fingerprint}) + "\n")
        if os.path.exists(self.errors_path):
            os.remove(self.errors_path)  # failed records are tried again
        return len(self.answers)

    # ---- while running
    def is_done(self, record: Record) -> bool:
        return record.key in self.answers

    def add(self, records: list[Record], texts: list[str]) -> None:
        """Record answers and flush them to disk before returning."""
        lines = []
        for record, text in zip(records, texts):
            self.answers[record.key] = text
            lines.append(json.dumps({"key": list(record.key), "index": record.index, "text_output": text}))
        _append(self.partial_path, lines)

    def fail(self, record: Record, error: RecordError) -> None:
        _append(self.errors_path, [json.dumps({"index": record.index, "file": record.path, "line": record.line,
                                               "media": error.path, "reason": error.reason})])

    # ---- at the end
    def finish(self, records: list[Record]) -> int:
        """Write the final file in input order (atomically); keep the side file while any record is unanswered.
        Returns the number of records without an answer."""
        answered = [r for r in records if r.key in self.answers]
        write_lines_atomically(self.output_path, [answer_line(r.index, self.answers[r.key]) for r in answered])
        missing = len(records) - len(answered)
        if missing == 0 and os.path.exists(self.partial_path):
            os.remove(self.partial_path)
        return missing
