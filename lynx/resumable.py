"""One run's answers on disk, resumable: streamed to a side file as they come, so a crash loses nothing and the same
command resumes; the fingerprint that keeps a resume from mixing settings; the plan of batches; the final file.

    <output>.partial.jsonl   header {"fingerprint": ...}, then one {"key", "index", "text_output"} per answer
    <output>.errors.jsonl    one {"index", "file", "line", "media", "reason"} per record that could not be answered
    <output>                 every answer in input order, written in one step at the end

With several processes (lynx/processes.py), process R streams to <output>.rankR.partial.jsonl and
<output>.rankR.errors.jsonl, and process 0 merges them into <output> and <output>.errors.jsonl. A single run is
process 0 of 1 and goes through the same steps.

Resume: every side file of the output that a process can see (a single run's and each rank's) counts, whatever
number of processes wrote it; one made with other settings is refused. The plan is the batches one process makes of
all records, numbered 0, 1, ...; process R of W takes batches R, R + W, R + 2W, ..., each without its answered
records. So a batch keeps its number and its records across resumes and process counts.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from contextlib import contextmanager
from typing import NamedTuple

from dataset.records import Record
from errors import InputError, RecordError
from lynx.processes import Processes


class CannotWrite(InputError):
    """The disk refused a write (full, read-only, over quota): one line and exit 1; answers on disk are kept."""


class Planned(NamedTuple):
    """A batch of this process's share: its number in the run's plan and the positions of its unanswered records."""

    number: int
    positions: list[int]


class SideFile(NamedTuple):
    fingerprint: str | None  # None: no header (a start that failed, or one happening now)
    answers: dict  # key -> text
    complete: int  # bytes up to the end of the last whole line
    size: int


def file_stamp(path: str) -> list:
    """Identity of a weight file or folder without reading it: name, size, modification time (of every file in a
    folder and its subfolders)."""
    if os.path.isdir(path):
        return sorted(file_stamp(os.path.join(folder, name))
                      for folder, _, names in os.walk(path) for name in names)
    if not os.path.exists(path):
        return [path, None]
    stat = os.stat(path)
    return [os.path.abspath(path), stat.st_size, int(stat.st_mtime)]


def run_fingerprint(cfg, dtype: str, seed: int) -> str:
    """A digest of everything that changes the answers: the config but its worker count, the run's dtype
    (models.weight_files.run_dtype), the seed, and the name, size and date of the weight files (of the converted
    folder, when the run reads one). Records are matched by content (their `key`), so the records themselves are
    not part of it."""
    settings = cfg.to_dict()
    settings["data"].pop("num_workers")
    weight_paths = (cfg.converted,) if cfg.converted is not None else (cfg.vit_checkpoint, cfg.llm_dir, cfg.checkpoint)
    settings.update(resolved_dtype=dtype, seed=seed,
                    weights=[file_stamp(p) for p in weight_paths])
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def answer_line(index, text: str) -> str:
    """The original's output line: json.dumps({"index", "text_output"}) with ASCII escapes."""
    return json.dumps({"index": index, "text_output": text})


def side_files(output_path: str, kind: str) -> list[str]:
    """The existing `<output>.<kind>.jsonl` of a single run, then the `<output>.rank<R>.<kind>.jsonl` by rank."""
    folder, name = os.path.dirname(output_path) or ".", os.path.basename(output_path)
    if not os.path.isdir(folder):
        return []
    pattern = re.compile(re.escape(name) + r"\.rank(\d+)\." + kind + r"\.jsonl")
    ranks = sorted(int(m.group(1)) for entry in os.listdir(folder) if (m := pattern.fullmatch(entry)))
    single = f"{output_path}.{kind}.jsonl"
    return ([single] if os.path.exists(single) else []) + [f"{output_path}.rank{r}.{kind}.jsonl" for r in ranks]


def read_side_file(path: str) -> SideFile:
    """The header and answers of a side file, read once. A line torn by a crash is skipped: answered again."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror or err}") from None
    complete = data.rfind(b"\n") + 1
    header, answers = None, {}
    for n, line in enumerate(data[:complete].splitlines()):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if n == 0 and isinstance(row, dict) and "fingerprint" in row:
            header = row["fingerprint"]
        elif isinstance(row, dict) and "key" in row:
            answers[tuple(row["key"])] = row["text_output"]
    return SideFile(header, answers, complete, len(data))


def other_settings_error(path: str) -> InputError:
    return InputError(f"{path} holds answers of a run with other settings (weights, decoding, prompt, dtype or "
                      f"data changed); pass --overwrite to discard them and start again")


def write_atomically(path: str, lines: list[str]) -> None:
    """Replace `path` in one step: readers see the old file or the whole new one, never a part; a failed write
    leaves the old file and no temporary one."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove([tmp])
        raise


def _append(path: str, lines: list[str]) -> None:
    if not lines:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())


def _remove(paths) -> None:
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass  # on a shared folder another process may have removed it first


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def share_of(records: list[Record], done: set, vision_key: str, batch_size: int,
             processes: Processes) -> list[Planned]:
    """The plan: the batches one process makes of all records, numbered; process R of W takes numbers R, R + W, ...,
    each without the records in `done` (their keys), and none left empty."""
    from dataset.batching import batches_by_media  # imports torch: the plan is made once the model is loaded

    batches = batches_by_media(records, list(range(len(records))), vision_key, batch_size)
    share = (Planned(number, [p for p in batches[number] if records[p].key not in done])
             for number in range(processes.rank, len(batches), processes.world_size))
    return [planned for planned in share if planned.positions]


class ResumableRun:
    """The files of one run, for one process or many. In order: `check_output` (before torch is imported),
    `open` (before the model loads), `plan`, then `add` / `fail` for each batch, then `finish`."""

    def __init__(self, output_path: str, processes: Processes = Processes()):
        self.output_path = output_path
        self.processes = processes
        suffix = f".rank{processes.rank}" if processes.several else ""
        self.partial_path = f"{output_path}{suffix}.partial.jsonl"
        self.errors_path = f"{output_path}{suffix}.errors.jsonl"
        self.answers: dict[tuple, str] = {}  # this process's, and those of the side files it took over
        self.failures: list[dict] = []  # this process's rows of the errors file
        self.taken: list[str] = []  # other side files whose answers this process took over
        self.resumed = 0  # records answered before this run started, all processes together

    @property
    def whole_errors_path(self) -> str:
        return f"{self.output_path}.errors.jsonl"

    # ---- before torch is imported
    def check_output(self, test_files: list[str], overwrite: bool) -> None:
        """Refuse, before anything loads, an output the run could not write or must not overwrite."""
        path = self.output_path
        if not path.strip():
            raise InputError("--output_path is empty: give the file to write the answers to")
        if os.path.isdir(path) or path.endswith(("/", os.sep)):
            raise InputError(f"--output_path {path} is a folder: give a file in it, e.g. "
                             f"{os.path.join(path, 'result_0.jsonl')}")
        for test_file in test_files:
            for written in (path, self.partial_path, self.errors_path, self.whole_errors_path):
                if _same_file(written, test_file):
                    raise InputError(f"--output_path {path}: the run would write {written}, which is the test "
                                     f"file {test_file}; write the answers elsewhere")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise InputError(f"output folder does not exist: {folder}")
        if not os.access(folder, os.W_OK):
            raise InputError(f"output folder is not writable: {folder}")
        resuming = bool(side_files(path, "partial"))  # any process's side file
        if os.path.exists(path) and not resuming and not overwrite:
            raise InputError(f"{path} already exists; pass --overwrite to replace it")

    # ---- before the model loads
    def open(self, fingerprint: str, overwrite: bool) -> None:
        """Read every side file of the output once, refuse those of other settings, and start or resume this
        process's side file. Earlier errors files go: failed records are tried again."""
        output = self.output_path
        ours = {f"{output}.rank{r}.{kind}.jsonl" for r in range(self.processes.world_size)
                for kind in ("partial", "errors")} if self.processes.several else set()
        _remove(p for p in side_files(output, "errors") if p == self.errors_path or p not in ours)
        partials = side_files(output, "partial")
        if overwrite:  # every earlier answer goes; this run's other processes start their own files again
            _remove(p for p in partials if p != self.partial_path and p not in ours)
            partials = []
        mine = None
        for path in partials:
            side = read_side_file(path)
            if not side.answers:
                # Nothing to keep, whatever its settings: a start that failed or was stopped, or a run that answered
                # nothing (this process's own is written afresh below), or another process of this run creating its.
                if path not in ours and path != self.partial_path:
                    _remove([path])  # an earlier run's
                continue
            if side.fingerprint != fingerprint:
                raise other_settings_error(path)
            for key, text in side.answers.items():
                self.answers.setdefault(key, text)
            if path == self.partial_path:
                mine = side
            else:
                self.taken.append(path)
        with self._writing(self.partial_path):
            if mine is None:
                write_atomically(self.partial_path, [json.dumps({"fingerprint": fingerprint})])
            elif mine.complete < mine.size:
                os.truncate(self.partial_path, mine.complete)  # a torn last line: appends start on a fresh line

    # ---- after the model loads
    def plan(self, records: list[Record], vision_key: str, batch_size: int) -> list[Planned]:
        """This process's batches. The processes meet here: each learns what all of them hold."""
        done = set().union(*self.processes.all_gather(set(self.answers)))
        self.resumed = sum(record.key in done for record in records)
        return share_of(records, done, vision_key, batch_size, self.processes)

    # ---- while answering
    def add(self, records: list[Record], texts: list[str]) -> None:
        """Record answers and flush them to disk before returning."""
        lines = []
        for record, text in zip(records, texts):
            self.answers[record.key] = text
            lines.append(json.dumps({"key": list(record.key), "index": record.index, "text_output": text}))
        with self._writing(self.partial_path):
            _append(self.partial_path, lines)

    def fail(self, record: Record, error: RecordError) -> None:
        row = {"index": record.index, "file": record.path, "line": record.line, "media": error.path,
               "reason": error.reason}
        self.failures.append(row)
        with self._writing(self.errors_path):
            _append(self.errors_path, [json.dumps(row)])

    # ---- at the end
    def finish(self, records: list[Record]) -> int:
        """Once every process is done, process 0 writes the final file (input order, in one step) and one errors
        file; the side files go once no record is missing. Returns how many records lack an answer (on every
        process); on process 0, `answers` then holds the whole run's."""
        parts = self.processes.gather((self.answers, self.failures))
        missing = None
        if self.processes.is_main:
            for answers, _ in parts:
                for key, text in answers.items():
                    self.answers.setdefault(key, text)
            answered = [r for r in records if r.key in self.answers]
            order = {(record.path, record.line): n for n, record in enumerate(records)}
            rows = sorted((row for _, failures in parts for row in failures),
                          key=lambda row: order[row["file"], row["line"]])
            with self._writing(self.output_path):
                write_atomically(self.output_path, [answer_line(r.index, self.answers[r.key]) for r in answered])
            if rows:
                with self._writing(self.whole_errors_path):
                    write_atomically(self.whole_errors_path, [json.dumps(row) for row in rows])
            missing = len(records) - len(answered)
        missing = self.processes.broadcast(missing)
        if self.errors_path != self.whole_errors_path:
            _remove([self.errors_path])  # its rows are in the merged file now
        if not missing:
            _remove([self.partial_path, *self.taken])
        self.processes.leave()
        return missing

    def kept(self) -> int:
        """How many answers this process's side file holds: what a stopped run leaves to resume (0: none, or none
        yet)."""
        try:
            return len(read_side_file(self.partial_path).answers) if os.path.exists(self.partial_path) else 0
        except InputError:
            return 0

    @contextmanager
    def _writing(self, path: str):
        """Turn a refused write into one line that says what is kept."""
        try:
            yield
        except OSError as err:
            kept = (f"; finished answers are kept in {self.partial_path}: run the same command again to resume"
                    if self.kept() else "")
            raise CannotWrite(f"cannot write {path}: {err.strerror or err}{kept}") from None
