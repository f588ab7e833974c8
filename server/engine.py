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

A batch that runs out of GPU memory is halved by the pipeline, as generate.py's are, down to single requests; a
request that does not fit even alone gets OutOfMemory. A batch that fails otherwise is retried one request at a
time, so a request that fails, fails alone.
"""
from __future__ import annotations

import asyncio
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
    future: asyncio.Future | None = field(default=None, repr=False)
    started: bool = False

    @property
    def alone(self) -> bool:
        return self.seed is not None and self.settings.use_nucleus_sampling

    @property
    def key(self):
        return (self.kind, self.settings, self.shape, id(self) if self.alone else None)


@dataclass
class Stats:
    """What the worker did, for /health and the benchmark."""

    answered: int = 0
    failed: int = 0
    dropped: int = 0  # cancelled (client gone, timed out) before their batch started
    batches: int = 0
    batch_sizes: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        rows = sum(size * n for size, n in self.batch_sizes.items())
        return {"answered": self.answered, "failed": self.failed, "dropped": self.dropped, "batches": self.batches,
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
            try:
                results = await asyncio.get_running_loop().run_in_executor(self.executor, self._answer, batch)
            finally:
                self.busy = 0
            self.stats.batches += 1
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

    def _answer(self, batch: list[Work]) -> list:
        """Answers (or exceptions) of a batch, on the model's thread; one by one on a failure other than memory
        (which the pipeline handles)."""
        try:
            seed = batch[0].seed if batch[0].alone else None
            return self.pipeline.answer_items([w.item for w in batch], settings=batch[0].settings, seed=seed)
        except Exception as err:  # noqa: BLE001 - every failure goes back to its request
            if len(batch) == 1:
                return [err]
        return [result for work in batch for result in self._answer([work])]
