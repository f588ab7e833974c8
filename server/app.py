"""The FastAPI application: routes, error handlers, the edge's middleware (Host, CORS, body limit), metrics, and
the model's life (load, serve, drain).

The server listens at once and answers /health with 503 while the model loads on a thread; a model that cannot
load stops the server (`on_failure`). The engine's worker is supervised: a worker that dies (a bug) fails its
batch and is started again once; if it dies again the server reports `failed` (/health 503), fails every request
still queued at once and takes no more. On shutdown (SIGTERM, Ctrl-C) uvicorn stops accepting connections and waits
for the requests in flight; then the engine answers what is left in its queue and stops.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Callable

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from server.engine import Engine
from server.errors import APIError, install_error_handlers
from server.metrics import Metrics
from server.routes import router
from server.security import BodyLimit, HostCheck, Limits
from server.serving import ChatService

log = logging.getLogger("lynx.server")


class Loading:
    """The model's load on a daemon thread: a server stopped while it loads (Ctrl-C, SIGTERM) ends without waiting
    for a load of minutes, as it would for a worker of asyncio's executor."""

    def __init__(self):
        self.thread: threading.Thread | None = None

    def run(self, load: Callable[[], object]) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def settle(result, error) -> None:
            if future.done():  # cancelled: the server stopped
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        def work() -> None:
            try:
                result, error = load(), None
            except BaseException as err:  # noqa: BLE001 - handed to the awaiting task
                result, error = None, err
            try:
                loop.call_soon_threadsafe(settle, result, error)
            except RuntimeError:  # the loop closed: the server stopped while the model loaded
                pass

        self.thread = threading.Thread(target=work, name="lynx-load", daemon=True)
        self.thread.start()
        return future

    def unfinished(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


@dataclass
class LynxState:
    """What the routes see: the status, and once loaded the engine and the chat service."""

    limits: Limits
    model_name: str
    status: str = "loading"  # loading | ready | failed | stopping
    error: str | None = None
    engine: Engine | None = None
    service: ChatService | None = None
    metrics: Metrics | None = None
    started: int = field(default_factory=lambda: int(time.time()))
    loading: Loading = field(default_factory=Loading)

    def status_message(self) -> str:
        return {"loading": "the model is loading; try again shortly",
                "failed": f"the server cannot answer: {self.error}",
                "stopping": "the server is stopping"}.get(self.status, self.status)


def create_app(load: Callable[[], object], limits: Limits, model_name: str, batch_size: int | None = None,
               window: float = 0.005, on_failure: Callable[[], None] = lambda: None) -> FastAPI:
    """`load()` builds the LynxPipeline (on a thread); `batch_size` None = the config's batch_size_test."""
    lynx = LynxState(limits=limits, model_name=model_name)

    async def start() -> None:
        try:
            pipeline = await lynx.loading.run(load)
        except Exception as err:  # noqa: BLE001 - any failure to load is reported and stops the server
            log.error("the model could not be loaded: %s", err, exc_info=not isinstance(err, ValueError))
            lynx.status, lynx.error = "failed", f"the model could not be loaded: {err}"
            on_failure()
            return
        lynx.engine = Engine(pipeline, batch_size or pipeline.cfg.batch_size_test, window, limits.queue_size)
        lynx.engine.start()
        lynx.service = ChatService(pipeline, lynx.engine, limits, model_name, lynx.metrics)
        lynx.status = "ready"
        log.info("ready: %s answers on %s, batches of up to %d", model_name, pipeline.device, lynx.engine.batch_size)
        await supervise(lynx)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(start())
        yield
        if lynx.status != "failed":
            lynx.status = "stopping"
        lynx.service = None
        loading.cancel()
        if lynx.engine is not None:
            await lynx.engine.stop()

    app = FastAPI(title="Lynx", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.lynx = lynx
    lynx.metrics = Metrics(lynx)
    install_error_handlers(app, lynx.metrics, limits.hidden_folders)
    app.include_router(router)
    # Added innermost first: a request meets the Host check, then CORS, then the body limit.
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes, metrics=lynx.metrics)
    if limits.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(limits.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    if limits.allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=limits.allowed_hosts, metrics=lynx.metrics)
    return app


async def supervise(lynx: LynxState, restarts: int = 1) -> None:
    """Watch the engine's worker until it is stopped: a worker that dies fails the batch it held and is started
    again, `restarts` times; after that the server is `failed` and every queued request fails at once."""
    engine = lynx.engine
    for attempt in range(restarts + 1):
        await asyncio.wait([engine.worker])  # not `await worker`: cancelling this task must not cancel the worker
        if engine.worker.cancelled() or engine.worker.exception() is None:  # stopped (shutdown)
            return
        err = engine.worker.exception()
        log.error("the engine's worker stopped: %s", err, exc_info=err)
        again = attempt < restarts
        fail(engine.batch, APIError(503, "the engine stopped while answering this request"
                                         + ("; it was restarted: try again" if again else ""),
                                    code="engine_failed", headers={"Retry-After": "1"} if again else None))
        if again:
            engine.start()
            continue
        lynx.status, lynx.error, lynx.service = "failed", f"the engine stopped twice (last: {err})", None
        fail(list(engine.waiting), APIError(503, "the engine stopped; this server answers no more requests",
                                            code="engine_failed"))
        engine.waiting.clear()
        engine.worker = None  # nothing left to stop


def fail(works, error: APIError) -> None:
    """Give `error` to every request of `works` that has no answer yet."""
    for work in works:
        if not work.future.done():
            work.future.set_exception(error)
