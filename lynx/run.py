"""The loop over a whole test set: batches in, answers streamed out, failures recorded, progress shown."""
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


def split_batch(batch: Batch, rows: slice, left_pad: bool) -> Batch:
    """Rows of a collated batch, re-trimmed so that it equals collating those records alone."""
    ids, mask = batch.input_ids[rows], batch.attention_mask[rows]
    keep = mask.any(dim=0)
    span = keep.nonzero()
    cols = slice(int(span.min()), int(span.max()) + 1) if left_pad else slice(0, int(span.max()) + 1)
    return Batch(batch.positions[rows], batch.pixel_values[rows], ids[:, cols], mask[:, cols])


def answer_with_retry(pipeline: LynxPipeline, batch: Batch, on_failure, visual: torch.Tensor | None = None,
                      rows: int | None = None, seed: int | None = None) -> list[tuple[int, str]]:
    """Answers of a batch; on running out of GPU memory, the batch is retried in halves down to one record, each
    half decoded as a batch of its own size (`rows`: the decoder would otherwise pad it back to its fixed shape)
    with its rows of the visual prefix, when there is one (a few MB: not worth computing again). `seed`: sampled
    draws come from a generator seeded with it, afresh for every try and half."""
    try:
        generator = pipeline.generator(seed) if seed is not None else None
        return list(zip(batch.positions, pipeline.answer_batch(batch, visual, generator=generator, rows=rows)))
    except RuntimeError as err:
        if not is_out_of_memory(err):
            raise
    # Retried outside the except block: the error's traceback holds the failed attempt's tensors until it ends.
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if len(batch) == 1:
        on_failure(batch.positions[0], RecordError(None, "out of GPU memory even alone in a batch"))
        return []
    log.warning("out of GPU memory on a batch of %d; retrying in halves", len(batch))
    answered = []
    for rows_of_half in (slice(0, len(batch) // 2), slice(len(batch) // 2, None)):
        half = split_batch(batch, rows_of_half, pipeline.cfg.use_left_pad)
        half_visual = None if visual is None else visual[rows_of_half]
        answered += answer_with_retry(pipeline, half, on_failure, half_visual, rows=len(half), seed=seed)
    return answered


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
    dataset = LynxEvalDataset(records, cfg, pipeline.tokenizer, seed)
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
                answered = answer_with_retry(pipeline, batch, on_failure, visual, seed=seed + planned.number)
                run.add([records[p] for p, _ in answered], [text for _, text in answered])
            progress.update(len(batch) + len(batch.failures))
    finally:
        progress.close()
