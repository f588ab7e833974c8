"""The loop over a whole test set: batches in, answers streamed out, failures recorded, progress shown. Each batch
is answered by the pipeline's one core (`LynxPipeline.answer_batch`, which also halves a batch that runs out of
memory)."""
from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from dataset.batching import Batch, LynxEvalDataset
from decoding.cuda import is_out_of_memory
from errors import InputError, RecordError
from dataset.records import Record
from lynx.media_ahead import MediaAhead
from lynx.pipeline import LynxPipeline
from lynx.resumable import Planned, ResumableRun

log = logging.getLogger("lynx")


class StopRun(InputError):
    """--strict: the first failed record ends the run (one line, exit 1)."""


class Progress:
    """A tqdm bar on a terminal; otherwise a plain log line every `every` seconds."""

    def __init__(self, total: int, done: int, every: float = 30.0):
        self.total, self.done, self.every = total, done, every
        self.resumed = done  # answered by an earlier run: not part of this run's rate
        self.start = self.last = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="rec", dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            rate = (self.done - self.resumed) / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            log.info("%d/%d records, %.2f rec/s, eta %.0f s", self.done, self.total, rate, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def with_media_ahead(loader, model) -> Iterator[tuple[Batch, torch.Tensor | None]]:
    """(batch, its visual prefix or None): on CUDA the next batch's ViT and resampler run on a side stream while
    the current batch decodes. A prefix that could not be computed ahead (out of memory) is computed inline."""
    ahead = MediaAhead(model)
    batches = iter(loader)
    current = next(batches, None)
    queued = _submit(ahead, current)
    while current is not None:
        following = next(batches, None)
        with torch.inference_mode():
            visual = ahead.take() if queued else None
        queued = _submit(ahead, following)
        yield current, visual
        current = following


def _submit(ahead: MediaAhead, batch: Batch | None) -> bool:
    if batch is None or not len(batch):
        return False
    try:
        with torch.inference_mode():
            ahead.submit(batch.pixel_values)
    except RuntimeError as err:
        if not is_out_of_memory(err):
            raise
        return False
    return True


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity, as the DataLoader counts them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this system
        return os.cpu_count() or 1


def worker_count(wanted: int) -> int:
    """The config's DataLoader workers, at most one per usable CPU: more only compete for the same cores."""
    cpus = usable_cpus()
    if wanted <= cpus:
        return wanted
    log.info("data.num_workers: %d lowered to %d, the CPUs this process may use", wanted, cpus)
    return cpus


def answer_records(pipeline: LynxPipeline, records: list[Record], run: ResumableRun, plan: list[Planned],
                   seed: int, strict: bool = False) -> None:
    """Answer the records of the planned batches, streaming each batch's answers to the run's side file. Batch b of
    the plan draws its samples from a generator seeded with `seed + b`, as the original seeded its batches: the draws
    of a batch depend on its records only, not on the process that answers it or on what that process did before."""
    cfg = pipeline.cfg
    dataset = LynxEvalDataset(records, pipeline.prepare, cfg.vision_prompt_dict, seed)
    loader = DataLoader(
        dataset,
        batch_sampler=[planned.positions for planned in plan],
        collate_fn=pipeline.collate,
        num_workers=worker_count(cfg.data.num_workers),
        persistent_workers=False,
    )

    def on_failure(position: int, error: RecordError) -> None:
        record = records[position]
        error.index = record.index
        run.fail(record, error)
        reason = f"{error.reason}: {error.path}" if error.path else error.reason
        log.warning("record %r (%s:%d) skipped: %s", record.index, record.path, record.line, reason)
        if strict:
            raise StopRun(f"record {record.index!r} ({record.path}:{record.line}): {reason}")

    progress = Progress(total=sum(len(planned.positions) for planned in plan), done=0)
    try:
        # The loader yields the planned batches in order; `planned.number` is the batch's number in the run's plan.
        for planned, (batch, visual) in zip(plan, with_media_ahead(loader, pipeline.model)):
            for position, error in batch.failures:
                on_failure(position, error)
            if len(batch):
                answers = pipeline.answer_batch(batch, visual, seed=seed + planned.number)
                answered = []
                for position, answer in zip(batch.positions, answers):
                    if isinstance(answer, RecordError):  # out of memory even alone
                        on_failure(position, answer)
                    else:
                        answered.append((records[position], answer.text))
                run.add([record for record, _ in answered], [text for _, text in answered])
            progress.update(len(batch) + len(batch.failures))
    finally:
        progress.close()
