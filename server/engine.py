"""The batching engine: one queue, one worker per device, answers through the pipeline's one core
(`LynxPipeline.answer_items`). No HTTP here.

Requests arrive prepared (`Item`s: prompt ids and pixels, made once) and wait in a bounded queue. The worker takes
the oldest one, waits up to `window` seconds for more of the same batch key (media kind, decoding settings and
`shape`), takes up to `batch_size` of them in arrival order and answers them as one batch on a thread of its own, so
the event loop keeps serving. Lynx's answers do not depend on left padding or on what else is in a batch when
decoding is deterministic, so batching changes only the speed.

Sampled decoding with a `seed` runs alone, drawing from a generator seeded with it (`answer_items(..., seed=)`):
the same request and seed give the same answer on the same server, whatever else is waiting or was asked before.
(Alone, because a row's draws depend on its place and on the other rows of its batch.) Sampled requests without a
seed batch together and draw from the device's running default generator.

Greedy and sampled requests (one beam) that differ only in `max_new_tokens` share a batch too: their answers do
not depend on the length limit, so the batch decodes to the largest and each row is cut at its own
(`LynxPipeline.answer_batch`'s `lengths`). Beam search's answers depend on the limit (length penalty, the beams
finished at it): only requests of one limit share a batch.

While a batch decodes, the decoder calls the engine back at each of its checks (every few tokens: `Watcher`): a
streamed request gets the ids chosen so far, and once every request of the batch has gone (its client left or it
timed out, so its future was cancelled) the batch stops there instead of running to its end.

A batch that runs out of GPU memory is halved by the pipeline, as generate.py's are, down to single requests; a
request that does not fit even alone gets OutOfMemory. A batch that fails otherwise is retried one request at a
time, so a request that fails, fails alone.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

log = logging.getLogger("lynx.server")


class QueueFull(Exception):
    """More requests are waiting than the queue holds."""


@dataclass(eq=False)
class Work:
    """One prepared request (a dataset.batching.Item) of a media kind, with its decoding settings (a
    DecodingSettings); it resolves to a lynx.pipeline.Answer."""

    item: object
    kind: str  # "image" | "video"
    settings: object
    seed: int | None = None
    shape: int | None = None  # requests share a batch only when this is equal too (see ChatService.shape)
    progress: asyncio.Queue | None = field(default=None, repr=False)  # streamed: the ids so far at each check
    future: asyncio.Future | None = field(default=None, repr=False)
    started: bool = False

    @property
    def alone(self) -> bool:
        return self.seed is not None and self.settings.use_nucleus_sampling

    @functools.cached_property
    def key(self):
        """What requests share a batch by (made once: the queue compares it at every arrival)."""
        settings = self.settings
        if settings.num_beams == 1:  # the length limit changes no answer: one batch decodes to the largest
            settings = dataclasses.replace(settings, max_new_tokens=0)
        return (self.kind, settings, self.shape, id(self) if self.alone else None)


@dataclass
class Stats:
    """What the worker did, for /health and the benchmark."""

    answered: int = 0
    failed: int = 0
    dropped: int = 0  # cancelled (client gone, timed out) before their batch started
    batches: int = 0
    stopped: int = 0  # batches stopped before their end: every request had gone
    batch_sizes: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        rows = sum(size * n for size, n in self.batch_sizes.items())
        return {"answered": self.answered, "failed": self.failed, "dropped": self.dropped, "batches": self.batches,
                "stopped_batches": self.stopped,
                "mean_batch_size": round(rows / self.batches, 3) if self.batches else 0.0,
                "largest_batch": max(self.batch_sizes, default=0),
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())}}


class Engine:
    def __init__(self, pipeline, batch_size: int, window: float, queue_size: int):
        self.pipeline = pipeline
        self.batch_size = batch_size
        self.window = window
        self.queue_size = queue_size
        self.waiting: deque[Work] = deque()
        self.arrived = asyncio.Event()
        self.stats = Stats()
        self.busy = 0  # requests of the batch being answered
        self.batch: list[Work] = []  # the latest batch taken (a supervisor fails it if the worker dies)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lynx-model")
        self.worker: asyncio.Task | None = None

    def start(self) -> None:
        self.worker = asyncio.get_running_loop().create_task(self._run(), name="lynx-engine")

    async def stop(self) -> None:
        """Answer what is queued and the batch that runs, then stop the worker."""
        while (self.waiting or self.busy) and self.worker is not None and not self.worker.done():
            self.arrived.set()
            await asyncio.sleep(0.01)
        if self.worker is not None:
            self.worker.cancel()
            try:
                await self.worker
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True)

    @property
    def queued(self) -> int:
        return sum(1 for w in self.waiting if not w.future.cancelled())

    def submit(self, work: Work) -> asyncio.Future:
        """Queue a request; its future resolves to the answer or to the exception that stopped it."""
        if self.queued + self.busy >= self.queue_size:
            raise QueueFull
        work.future = asyncio.get_running_loop().create_future()
        self.waiting.append(work)
        self.arrived.set()
        return work.future

    async def _run(self) -> None:
        while True:
            batch = self.batch = await self._next_batch()
            self.busy = len(batch)
            loop = asyncio.get_running_loop()
            try:
                results, stopped = await loop.run_in_executor(self.executor, self._answer, batch, loop)
            finally:
                self.busy = 0
            self.stats.batches += 1
            self.stats.stopped += stopped
            self.stats.batch_sizes[len(batch)] += 1
            for work, result in zip(batch, results):
                if work.future.done():  # cancelled while it ran: the answer has nobody to go to
                    continue
                if isinstance(result, BaseException):
                    self.stats.failed += 1
                    work.future.set_exception(result)
                else:
                    self.stats.answered += 1
                    work.future.set_result(result)

    async def _next_batch(self) -> list[Work]:
        """Wait for a request, then up to `window` seconds for more of its key; take up to batch_size of them."""
        while True:
            head = await self._head()
            deadline = time.monotonic() + self.window
            while not head.alone and self._count(head.key) < self.batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.arrived.clear()
                try:
                    await asyncio.wait_for(self.arrived.wait(), remaining)
                except TimeoutError:
                    break
            self._drop_cancelled()
            if not head.future.cancelled():  # else its client left during the window: start again
                break
        batch = [w for w in self.waiting if w.key == head.key][:self.batch_size]
        for work in batch:
            self.waiting.remove(work)
            work.started = True
        return batch

    async def _head(self) -> Work:
        """The oldest waiting request that is still wanted."""
        while True:
            self._drop_cancelled()
            if self.waiting:
                return self.waiting[0]
            self.arrived.clear()
            await self.arrived.wait()

    def _count(self, key) -> int:
        return sum(1 for w in self.waiting if w.key == key and not w.future.cancelled())

    def _drop_cancelled(self) -> None:
        for work in [w for w in self.waiting if w.future.cancelled()]:
            self.waiting.remove(work)
            self.stats.dropped += 1

    def _answer(self, batch: list[Work], loop: asyncio.AbstractEventLoop) -> tuple[list, bool]:
        """(answers or exceptions, whether it was stopped because every request had gone) of a batch, on the
        model's thread, decoded to its largest length limit; one by one on a failure other than memory (which the
        pipeline handles)."""
        watch = Watcher(batch, loop)
        lengths = [work.settings.max_new_tokens for work in batch]
        settings = batch[0].settings.replace(max_new_tokens=max(lengths))
        try:
            seed = batch[0].seed if batch[0].alone else None
            return self.pipeline.answer_items([w.item for w in batch], settings=settings, seed=seed, watch=watch,
                                              lengths=lengths), watch.stopped
        except Exception as err:  # noqa: BLE001 - every failure goes back to its request
            if len(batch) == 1:
                return [err], watch.stopped
        alone = [self._answer([work], loop) for work in batch]
        return [result for results, _ in alone for result in results], any(stopped for _, stopped in alone)


class Watcher:
    """The pipeline's watch of one batch (`LynxPipeline.answer_batch`), called on the model's thread at each check
    of the decoder: a streamed request's ids so far go to its queue on the event loop, and the decoding stops once
    every request has gone. A request has gone when its future is done before the batch ends: cancelled (its client
    left, it timed out) or failed by the supervisor. (Reading whether a future is done is one read of its state.)"""

    def __init__(self, batch: list[Work], loop: asyncio.AbstractEventLoop):
        self.batch, self.loop = batch, loop
        self.stopped = False

    def __call__(self, rows: dict[int, list[int]]) -> bool:
        for row, ids in rows.items():
            work = self.batch[row]
            if work.progress is not None and not work.future.done():
                self.loop.call_soon_threadsafe(work.progress.put_nowait, ids)
        self.stopped = all(work.future.done() for work in self.batch)
        return self.stopped
