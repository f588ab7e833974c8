"""Several processes answering one test set, started by torchrun or accelerate launch (one per GPU, on one machine
or several): which batches each answers, where its answers go, and how rank 0 writes the one final file.

    <output>.rank<R>.partial.jsonl   process R's answers, in the format of a single run's <output>.partial.jsonl
    <output>.rank<R>.errors.jsonl    the records process R could not answer, until rank 0 merges them
    <output>, <output>.errors.jsonl  written by rank 0 once every process is done

Resume rule: a run with any number of processes counts as answered every record found in a side file of the output
(a single run's and every rank's, all made with the same settings) and splits only the others between its processes.
So the same command resumes every part, and so does a command with another number of processes.

Only small Python objects pass between processes, so the gloo backend serves CPU and GPU runs alike, and a process
that dies is noticed at once by the others at their next meeting point (after loading the model, at the end).
"""
from __future__ import annotations

import json
import os
import re
from datetime import timedelta

import torch
import torch.distributed as dist

from configs.schema import LynxConfig
from dataset.batching import batches_by_media
from errors import InputError
from dataset.records import Record
from dataset.records import read_json_lines
from lynx.answers import AnswerStore, other_settings_error, read_partial, write_lines_atomically
from lynx.pipeline import check_device, default_device

# How long a process waits at a meeting point for one that is alive but silent. Shares differ by at most a batch,
# so the wait at the end is short unless a process is stuck.
WAIT = timedelta(minutes=30)


class RankLost(InputError):
    """Another process of the run failed or was stopped: reported in one line, like an input problem (exit 1)."""


def side_files(output_path: str, kind: str) -> list[str]:
    """The existing `<output>.<kind>.jsonl` of a single run, then the `<output>.rank<R>.<kind>.jsonl` by rank."""
    folder, name = os.path.dirname(output_path) or ".", os.path.basename(output_path)
    if not os.path.isdir(folder):
        return []
    pattern = re.compile(re.escape(name) + r"\.rank(\d+)\." + kind + r"\.jsonl")
    ranks = sorted(int(m.group(1)) for entry in os.listdir(folder) if (m := pattern.fullmatch(entry)))
    single = f"{output_path}.{kind}.jsonl"
    return ([single] if os.path.exists(single) else []) + [f"{output_path}.rank{r}.{kind}.jsonl" for r in ranks]


def _remove(paths) -> None:
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass  # on a shared folder another process may have removed it first


def _read_rows(path: str) -> list[dict]:
    return [row for _, row in read_json_lines(path)] if os.path.exists(path) else []


def _cause(err: BaseException) -> str:
    """The first sentence of a torch.distributed error, without the C++ source location in front."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(err).strip())
    return re.split(r"\.\s|\n", text)[0].strip() or type(err).__name__


class Ranks:
    """This process's place in the launch, read from the variables torchrun and accelerate launch set; a plain
    `python generate.py` is rank 0 of 1 and runs exactly as a single run."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.done: set = set()  # keys of the records answered in any side file, all processes together
        self.taken: list[str] = []  # other side files whose answers this process took over

    @classmethod
    def from_env(cls, env=os.environ) -> "Ranks":
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    @property
    def several(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def suffix(self) -> str:
        """Of this process's side files: `<output><suffix>.partial.jsonl`."""
        return f".rank{self.rank}" if self.several else ""

    @property
    def prefix(self) -> str:
        """Of this process's messages, so that interleaved lines name their process."""
        return f"rank {self.rank}: " if self.several else ""

    def start(self, requested: str | None) -> str:
        """Join the other processes; returns this process's device: with several processes and --device cuda or
        unset, each one's own GPU (cuda:LOCAL_RANK)."""
        device = requested or default_device()
        check_device(device)
        if not self.several:
            return device
        if device == "cuda":
            count = torch.cuda.device_count()
            if self.local_rank >= count:
                raise InputError(f"local rank {self.local_rank} has no GPU: {count} visible on this machine; start "
                                 f"at most {count} processes per machine (--nproc_per_node)")
            device = f"cuda:{self.local_rank}"
            torch.cuda.set_device(device)
        try:
            dist.init_process_group("gloo", timeout=WAIT)
        except (RuntimeError, ValueError) as err:
            raise RankLost(f"cannot join the other processes: {_cause(err)}") from None
        return device

    # ---- side files
    def _mine(self, output_path: str, kind: str) -> set[str]:
        """The side files of this run's processes: the rest are left from runs with another number of them."""
        if not self.several:
            return {f"{output_path}.{kind}.jsonl"}
        return {f"{output_path}.rank{r}.{kind}.jsonl" for r in range(self.world_size)}

    def _others(self, store: AnswerStore) -> list[str]:
        return [path for path in side_files(store.output_path, "partial") if path != store.partial_path]

    def check_writable(self, store: AnswerStore, overwrite: bool) -> None:
        """As a single run's check, except that any process's side file, not only this one's, means a resume."""
        store.check_writable(overwrite or bool(side_files(store.output_path, "partial")))

    def check_resume(self, store: AnswerStore, run_fingerprint: str, overwrite: bool) -> None:
        """Refuse to resume from any side file made with other settings; before the model loads."""
        store.check_resume(run_fingerprint, overwrite)
        if overwrite:
            return
        for path in self._others(store):
            header, _ = read_partial(path)
            if header and header.get("fingerprint") != run_fingerprint:  # no header yet: its process starts now
                raise other_settings_error(path)

    def open(self, store: AnswerStore, run_fingerprint: str, overwrite: bool) -> int:
        """Start or resume this process's side file, take over the answers of the others it can see (check_resume
        has refused those of other settings), and agree with the other processes on which records are answered.
        Returns how many are."""
        output = store.output_path
        left = [path for kind in ("partial", "errors") for path in side_files(output, kind)
                if path not in self._mine(output, kind)]
        _remove(p for p in left if overwrite or p.endswith(".errors.jsonl"))  # failed records are tried again
        store.open(run_fingerprint, overwrite)
        if not overwrite:
            for path in self._others(store):
                header, answers = read_partial(path)
                if header.get("fingerprint") == run_fingerprint:
                    for key, text in answers.items():
                        store.answers.setdefault(key, text)
                    self.taken.append(path)
        self.done = set(store.answers)
        if self.several:
            everyone = [None] * self.world_size
            self._meet(dist.all_gather_object, everyone, self.done)
            self.done = set().union(*everyone)
        return len(self.done)

    def share(self, records: list[Record], cfg: LynxConfig) -> list[list[int]]:
        """This process's batches: the unanswered records batched as a single run batches them, then every
        world_size-th batch. Same batches, same padding: deterministic decoding gives the same answers for any
        number of processes."""
        todo = [p for p, record in enumerate(records) if record.key not in self.done]
        return batches_by_media(records, todo, cfg.vision_prompt_dict, cfg.batch_size_test)[self.rank::self.world_size]

    def finish(self, store: AnswerStore, records: list[Record]) -> tuple[AnswerStore, int]:
        """Once every process is done, rank 0 writes the final file (input order, atomically) and one errors file;
        the side files go once nothing is missing. Returns the whole run's store and how many records lack an
        answer (on every rank)."""
        if not self.several:
            missing = store.finish(records)
            if not missing:
                _remove(self.taken)
            return store, missing
        parts = [None] * self.world_size if self.is_main else None
        self._meet(dist.gather_object, (store.answers, _read_rows(store.errors_path)), parts)
        whole, outcome = store, [None]
        if self.is_main:
            whole = AnswerStore(store.output_path)
            for answers, _ in parts:
                for key, text in answers.items():
                    whole.answers.setdefault(key, text)
            outcome = [whole.finish(records)]
            order = {(record.path, record.line): n for n, record in enumerate(records)}
            rows = sorted((row for _, part in parts for row in part), key=lambda row: order[row["file"], row["line"]])
            if rows:
                write_lines_atomically(whole.errors_path, [json.dumps(row) for row in rows])
        self._meet(dist.broadcast_object_list, outcome)
        missing = outcome[0]
        _remove([store.errors_path])  # its rows are in the merged file now
        if not missing:
            _remove([store.partial_path, *self.taken])
        self._meet(dist.barrier)  # nobody exits, and so gets the others stopped, before all are tidy
        dist.destroy_process_group()
        return whole, missing

    def _meet(self, collective, *args):
        try:
            return collective(*args)
        except RuntimeError as err:
            raise RankLost(f"lost contact with the other processes ({_cause(err)}): one of them failed or was "
                           f"stopped (see its message); finished answers are kept: run the same command again to "
                           f"resume") from None
