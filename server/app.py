"""The FastAPI application: routes, error handlers, the body limit, and the model's life (load, serve, drain).

The server listens at once and answers /health with 503 while the model loads on a thread; a model that cannot
load stops the server (`on_failure`). On shutdown (SIGTERM, Ctrl-C) uvicorn stops accepting connections and waits
for the requests in flight; then the engine answers what is left in its queue and stops.
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Callable

from fastapi import FastAPI

from server.engine import Engine
from server.errors import install_error_handlers
from server.routes import router
from server.security import BodyLimit, Limits
from server.serving import ChatService

log = logging.getLogger("lynx.server")


@dataclass
class LynxState:
    """What the routes see: the status, and once loaded the engine and the chat service."""

    limits: Limits
    model_name: str
    status: str = "loading"  # loading | ready | failed | stopping
    error: str | None = None
    engine: Engine | None = None
    service: ChatService | None = None
    started: int = field(default_factory=lambda: int(time.time()))

    def status_message(self) -> str:
        return {"loading": "the model is loading; try again shortly",
                "failed": f"the model could not be loaded: {self.error}",
                "stopping": "the server is stopping"}.get(self.status, self.status)


def create_app(load: Callable[[], object], limits: Limits, model_name: str, batch_size: int | None = None,
               window: float = 0.005, on_failure: Callable[[], None] = lambda: None) -> FastAPI:
    """`load()` builds the LynxPipeline (on a thread); `batch_size` None = the config's batch_size_test."""
    lynx = LynxState(limits=limits, model_name=model_name)

    async def start() -> None:
        try:
            pipeline = await asyncio.to_thread(load)
        except Exception as err:  # noqa: BLE001 - any failure to load is reported and stops the server
            log.error("the model could not be loaded: %s", err, exc_info=not isinstance(err, ValueError))
            lynx.status, lynx.error = "failed", str(err)
            on_failure()
            return
        lynx.engine = Engine(pipeline, batch_size or pipeline.cfg.batch_size_test, window, limits.queue_size)
        lynx.engine.start()
        lynx.service = ChatService(pipeline, lynx.engine, limits, model_name)
        lynx.status = "ready"
        log.info("ready: %s answers on %s, batches of up to %d", model_name, pipeline.device, lynx.engine.batch_size)

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
    install_error_handlers(app)
    app.include_router(router)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    return app
