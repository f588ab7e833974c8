"""HTTP routes: parse, check, translate. The work happens in serving.ChatService and the engine."""
from __future__ import annotations

import json
import time
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from server.errors import APIError, validation_message
from server.metrics import CONTENT_TYPE
from server.protocol import ChatCompletionRequest, ModelCard, ModelList, unsupported_field
from server.security import check_json, check_key
from server.serving import Asked

PAGE = Path(__file__).resolve().parent / "static" / "index.html"

router = APIRouter()


def state(request: Request):
    return request.app.state.lynx


def authorized(request: Request) -> None:
    check_key(request, state(request).limits)


def ready(request: Request):
    """The chat service, or 503 while the model loads and once the server stops."""
    lynx = state(request)
    if lynx.service is None:
        raise APIError(503, lynx.status_message(), code="not_ready", headers={"Retry-After": "5"})
    return lynx.service


@router.get("/", include_in_schema=False)
async def page():
    return FileResponse(PAGE, media_type="text/html")


@router.get("/health")
async def health(request: Request):
    lynx = state(request)
    body = {"status": lynx.status, "model": lynx.model_name}
    if lynx.engine is not None:
        body.update(queued=lynx.engine.queued, running=lynx.engine.busy, **lynx.engine.stats.as_dict())
    if lynx.status == "failed":
        body["error"] = lynx.error
    return JSONResponse(body, status_code=200 if lynx.status == "ready" else 503,
                        headers={"Cache-Control": "no-store"})


@router.get("/metrics")
async def metrics(request: Request):
    return Response(state(request).metrics.render(), media_type=CONTENT_TYPE, headers={"Cache-Control": "no-store"})


@router.get("/v1/models", dependencies=[Depends(authorized)])
async def models(request: Request):
    lynx = state(request)
    return ModelList(data=[ModelCard(id=lynx.model_name, created=lynx.started)]).model_dump()


@router.get("/v1/models/{model_id:path}", dependencies=[Depends(authorized)])
async def model(model_id: str, request: Request):
    lynx = state(request)
    if model_id != lynx.model_name:
        raise APIError(404, f"the model {model_id[:100]!r} does not exist here; this server serves "
                            f"{lynx.model_name!r}", "model", "model_not_found")
    return ModelCard(id=lynx.model_name, created=lynx.started).model_dump()


@router.post("/v1/chat/completions", dependencies=[Depends(authorized)])
async def chat_completions(request: Request):
    """The body is read, parsed, validated and checked on a worker thread (a large body takes the event loop no
    time), then made into an `Asked`: from there on the request holds its prompt ids and its pixels at the model's
    size, not its body, its base64 text or its decoded images, while it waits for the engine."""
    started = time.monotonic()
    check_json(request)
    service = ready(request)
    asked = await run_in_threadpool(made_ready, await body_of(request), state(request), service)
    if asked.stream:
        return StreamingResponse(await service.stream(asked, request, started), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    completion = await service.complete(asked, request)
    usage = completion.usage
    state(request).metrics.answered(time.monotonic() - started, usage.prompt_tokens, usage.completion_tokens)
    return JSONResponse(completion.model_dump())


async def body_of(request: Request) -> bytearray:
    """The body, without the copy that `Request.body()` keeps on the request for as long as it waits."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
    return body


def made_ready(body: bytearray, lynx, service) -> Asked:
    """A body parsed, checked and prepared (`ChatService.ask`) in one trip to a worker thread: each trip waits for
    the interpreter's lock while the model's thread holds it, which a second trip per request would add to every
    request's latency (about 15 % of the throughput of 8 clients on the tiny model)."""
    return service.ask(parse(body, lynx))


def parse(body: bytearray, lynx) -> ChatCompletionRequest:
    """The checked chat request of a body (on a worker thread), or APIError."""
    try:
        raw = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the body is not valid JSON: {err}") from None
    except RecursionError:
        raise APIError(400, "the body's JSON is nested too deeply") from None
    if not isinstance(raw, dict):
        raise APIError(400, f"the body must be a JSON object, got {type(raw).__name__}")
    try:
        chat = ChatCompletionRequest.model_validate(raw)
    except ValidationError as err:
        message, param = validation_message(err)
        raise APIError(400, message, param) from None
    check(chat, lynx)
    return chat


def check(chat: ChatCompletionRequest, lynx) -> None:
    """What the schema cannot say: the model's name, n, text the tokenizer can take, unsupported fields, the
    server's limits of the question's bytes and of images per message (those of media: server/media.py; of
    decoding: serving.ChatService.settings)."""
    if chat.model is not None and chat.model != lynx.model_name:
        raise APIError(404, f"the model {chat.model[:100]!r} does not exist here; this server serves "
                            f"{lynx.model_name!r}", "model", "model_not_found")
    if chat.n not in (None, 1):
        raise APIError(400, f"n must be 1 (one answer per request), got {chat.n}", "n")
    name = unsupported_field(chat)
    if name is not None:
        raise APIError(400, f"'{name}' is not supported by Lynx; leave it out", name)
    limits = lynx.limits
    for i, message in enumerate(chat.messages):
        parts = message.parts()
        size = 0  # the UTF-8 bytes of the message's text: the last message's is the question
        for j, part in enumerate(parts):
            if part.type == "text":
                where = f"messages.{i}.content" + (f".{j}.text" if isinstance(message.content, list) else "")
                size += utf8_size(part.text, where)
        if i == len(chat.messages) - 1 and size > limits.max_question_bytes:
            raise APIError(400, f"the question is {size} bytes (UTF-8), over the server's limit of "
                                f"{limits.max_question_bytes} (--max-question-bytes)", f"messages.{i}.content")
        media = sum(1 for p in parts if p.type in ("image_url", "video_url"))
        if media > limits.max_images:
            raise APIError(400, f"{media} images in one message, over the server's limit of {limits.max_images} "
                                f"(--max-images)", f"messages.{i}.content")


def utf8_size(text: str, where: str) -> int:
    """The UTF-8 bytes of a text part; 400 for a string JSON may hold but UTF-8 cannot: one with a lone surrogate
    ("\\ud800")."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise APIError(400, f"{where}: the text is not valid Unicode (it holds a lone surrogate, such as \\ud800 "
                            f"in JSON)", where) from None
