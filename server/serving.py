"""From a checked chat request to an answer: the question and media of the conversation, the decoding settings,
the request prepared once, the engine's answer, the OpenAI response (or its stream of chunks).

Lynx is a single-turn VQA model: its prompt holds one question about one image or video. The question is the text
of the last message, which must be the user's (several text parts are joined by newlines); the media are the
image/video parts of that message or, when it has none, of the latest earlier user message that has some. Other
turns (system prompts, earlier questions, the assistant's answers) are not shown to the model. The question fills
the config's `prompt` as `{question}`, exactly as generate.py fills it from a record, and is tokenized with the
media read, once, on a worker thread (`prepare`). What waits for the engine (`Asked`) holds the prompt's ids and the
pixels at the model's size, never the request itself (its base64 text) or the images as sent.

Decoding: the config's, changed by the request's fields, one per decoding option (configs/decoding.py).
`max_tokens` (or `max_completion_tokens`) is `max_new_tokens`; `temperature: 0` turns sampling off (beam search
with the config's `num_beams`, greedy when 1); a temperature above 0 turns sampling on with that temperature; the
other options (`top_p`, and Lynx's own `num_beams`, `top_k`, `length_penalty`, ...) replace the config's values;
`seed` makes sampled answers repeatable. The usage and the finish reason come from the answer's ids.
"""
from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from configs.decoding import request_fields
from dataset.batching import Item, Preparer
from errors import InputError, RecordError
from lynx.pipeline import Answer, OutOfMemory
from server.engine import Engine, QueueFull, Work
from server.errors import APIError, error_response
from server.media import load_media
from server.protocol import AssistantMessage, ChatCompletion, ChatCompletionRequest, Choice, Usage, completion_id
from server.security import Limits
from server.streaming import Chunks, FinalText

DISCONNECT_POLL_S = 0.1
LARGE_MEDIA_BYTES = 2**20  # a request that held more media than this has the heap trimmed once they are freed
MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None) if os.name == "posix" else None  # glibc's


@dataclass
class Asked:
    """A request made ready for the engine: what it needs and how to reply, nothing of the request as sent."""

    kind: str
    item: Item
    settings: object  # DecodingSettings
    seed: int | None
    stream: bool
    include_usage: bool
    media_bytes: int  # what the request's media took before it was prepared: the URLs' text and the bytes read


class ChatService:
    def __init__(self, pipeline, engine: Engine, limits: Limits, model_name: str, metrics=None):
        """`metrics`: server.metrics.Metrics, which a stream tells of its answer or error when it ends."""
        self.pipeline, self.engine, self.limits, self.model_name = pipeline, engine, limits, model_name
        self.metrics = metrics
        self.visual_tokens = pipeline.cfg.num_bridge_tokens
        # The pipeline's rules with the server's pixel limit, also for what server/media.py cannot see (the frames
        # of a .json file in the media root).
        self.preparer = Preparer(pipeline.cfg, pipeline.tokenizer,
                                 dataclasses.replace(pipeline.prepare.media, max_pixels=limits.max_pixels))

    def settings(self, request: ChatCompletionRequest):
        """The config's decoding with the request's changes, checked: 400 naming the field, for a value the settings
        refuse or one over the server's limit of what a request may cost (`Limits.decoding`)."""
        fields = request_fields()  # option -> its request field
        given = dict(fields)  # option -> the field this request set it with
        changes = {name: getattr(request, field) for name, field in fields.items()
                   if getattr(request, field) is not None}
        if request.max_tokens is None and request.max_completion_tokens is not None:
            changes["max_new_tokens"] = request.max_completion_tokens
            given["max_new_tokens"] = "max_completion_tokens"
        for name, value in changes.items():
            limit = self.limits.decoding.get(fields[name])  # max_completion_tokens is bounded as max_tokens
            if limit is not None and value > limit:
                raise APIError(400, f"{given[name]} is {value}, over the server's limit of {limit} "
                                    f"(--{fields[name].replace('_', '-')}-limit)", given[name])
        temperature = changes.pop("temperature", None)
        if temperature == 0:
            changes["use_nucleus_sampling"] = False
        elif temperature is not None:
            changes.update(use_nucleus_sampling=True, temperature=temperature)
        settings = dataclasses.replace(self.pipeline.settings, **changes)
        problem = settings.problem(names=given)
        if problem:
            raise APIError(400, problem[1], given.get(problem[0]))
        return settings

    def shape(self, prompt_tokens: int) -> int | None:
        """With `use_left_pad: False` a padded row's answer depends on the longer rows of its batch (the original
        reads the next token off the row's last position, a pad): then only prompts of one length share a batch,
        so that every answer is the request's own. Left padding (the default) changes no answer."""
        return None if self.pipeline.cfg.use_left_pad else prompt_tokens

    def prepare(self, question: str, images: list, videos: list) -> tuple[str, Item, int]:
        """(media kind, Item, bytes of media read) of a request, on a worker thread: the media located, then the
        prompt tokenized and the media read into pixels by the pipeline, once. A temporary video file is removed
        once read."""
        media = load_media(images, videos, self.limits)
        try:
            item = self.preparer.item(0, media.value, media.kind, {"question": question}, index=0)
            return media.kind, item, media.size
        except RecordError as err:
            parts = images + videos
            param = parts[0][1] if len(parts) == 1 else parts[0][1].rsplit(".", 2)[0]  # the part, or the message
            raise APIError(400, err.reason, param, code="unusable_media") from None
        finally:
            media.close()

    def ask(self, request: ChatCompletionRequest) -> Asked:
        """A checked request made ready, on a worker thread: the decoding settings, the prompt and media prepared;
        the request, its base64 text and its decoded media are let go on return."""
        question, images, videos = conversation(request)
        settings = self.settings(request)
        kind, item, read = self.prepare(question, images, videos)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        held = read + sum(len(url) for url, _ in images + videos)
        return Asked(kind, item, settings, request.seed, bool(request.stream), include_usage, held)

    def streams_tokens(self, settings) -> bool:
        """Whether a streamed request gets its text as it is chosen (server.streaming): one beam, and no
        lemmatizer rewriting the text at the end."""
        return settings.num_beams == 1 and self.pipeline.lemmatizer is None

    async def submit(self, asked: Asked, streamed: bool = False) -> tuple[Work, int]:
        """(the queued request, its prompt tokens) of a request made ready; `streamed`: its ids so far come to its
        queue at each check of the decoder, where `streams_tokens` says so."""
        item = asked.item
        if asked.media_bytes > LARGE_MEDIA_BYTES:
            await run_in_threadpool(give_back_memory)
        progress = asyncio.Queue() if streamed and self.streams_tokens(asked.settings) else None
        work = Work(item, asked.kind, asked.settings, asked.seed, self.shape(len(item.input_ids)), progress=progress)
        try:
            self.engine.submit(work)
        except QueueFull:
            raise APIError(503, f"the server is busy: {self.limits.queue_size} requests are waiting or being "
                                f"answered (--queue-size); try again shortly", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        return work, self.visual_tokens + len(item.input_ids)

    async def answer(self, asked: Asked, http: Request) -> tuple[Answer, int]:
        """(answer, prompt tokens) of a request made ready; waits for the engine, gives up on a client that left."""
        work, prompt_tokens = await self.submit(asked)
        deadline = time.monotonic() + self.limits.request_timeout
        return await self._next(work, deadline, http), prompt_tokens

    async def _next(self, work: Work, deadline: float, http: Request | None = None) -> Answer | list[int]:
        """The next news of a request: its ids so far (streamed; of several waiting, the latest) or its answer.
        Gives up with 504 at the deadline, and with 499 on a client that left (`http`: before a stream begins;
        after, the stream is cancelled when its client leaves)."""
        future, progress = work.future, work.progress
        while True:
            if progress is not None and not progress.empty():
                return latest(progress, progress.get_nowait())
            if future.done():
                return self._result(future)
            if http is not None and await http.is_disconnected():
                future.cancel()  # dropped by the engine unless its batch already started; else the batch may stop
                raise APIError(499, "client closed the request", code="client_closed")
            if time.monotonic() > deadline:
                future.cancel()
                raise APIError(504, f"no answer within {self.limits.request_timeout:g} s (--request-timeout)",
                               code="timeout")
            getter = None if progress is None else asyncio.ensure_future(progress.get())
            try:
                await asyncio.wait([future] + ([getter] if getter else []), timeout=DISCONNECT_POLL_S,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                if getter is not None and not getter.done():
                    getter.cancel()
            if getter is not None and getter.done() and not getter.cancelled():
                return latest(progress, getter.result())

    @staticmethod
    def _result(future: asyncio.Future) -> Answer:
        try:
            return future.result()
        except OutOfMemory as err:
            raise APIError(503, err.reason, code="out_of_memory") from None
        except (RecordError, InputError, ValueError) as err:
            raise APIError(400, getattr(err, "reason", None) or str(err), code="unusable_media") from None

    @staticmethod
    def usage(prompt_tokens: int, answer: Answer) -> Usage:
        """Token counts from the ids: the prompt's (the visual prefix counts) and the answer's, EOS included."""
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=len(answer.ids),
                     total_tokens=prompt_tokens + len(answer.ids))

    async def complete(self, asked: Asked, http: Request) -> ChatCompletion:
        answer, prompt_tokens = await self.answer(asked, http)
        return ChatCompletion(model=self.model_name, usage=self.usage(prompt_tokens, answer), choices=[
            Choice(message=AssistantMessage(content=answer.text), finish_reason=answer.finish)])

    async def stream(self, asked: Asked, http: Request, started: float) -> AsyncIterator[str]:
        """The server-sent events of a streamed request (server.streaming). The request is prepared and queued and
        its first news awaited here, so that one refused before its first text gets its error status; the events
        follow from the returned iterator. A client that leaves cancels its request (the engine drops it, or stops
        its batch once every request of it has gone). `started`: when the request arrived (for the metrics)."""
        work, prompt_tokens = await self.submit(asked, streamed=True)
        deadline = time.monotonic() + self.limits.request_timeout
        news = await self._next(work, deadline, http)
        return self._events(work, news, deadline, prompt_tokens, asked.include_usage, started)

    async def _events(self, work: Work, news, deadline: float, prompt_tokens: int, include_usage: bool,
                      started: float) -> AsyncIterator[str]:
        chunks = Chunks(completion_id(), int(time.time()), self.model_name)
        text = FinalText(self.pipeline.tokenizer.decode)
        try:
            while not isinstance(news, Answer):
                delta = text.more(news)
                if delta or not chunks.started:
                    yield chunks.text(delta)
                news = await self._next(work, deadline)
            rest = text.rest(news.text)
            if rest is None:
                raise APIError(500, "the answer was decoded again after a failure and no longer begins with the "
                                    "text streamed; ask again", code="stream_diverged")
            if rest or not chunks.started:
                yield chunks.text(rest)
            yield chunks.finish(news.finish)
            usage = self.usage(prompt_tokens, news)
            if include_usage:
                yield chunks.usage(usage)
            if self.metrics is not None:
                self.metrics.answered(time.monotonic() - started, usage.prompt_tokens, usage.completion_tokens)
        except APIError as err:  # the status went out with the first chunk: the error is an event of the stream
            yield chunks.error(error_response(err, self.metrics, self.limits.hidden_folders).body)
        except asyncio.CancelledError:  # the client left (counted as a request that is not streamed is: 499)
            if self.metrics is not None:
                self.metrics.refused("client_closed")
            raise
        finally:
            work.future.cancel()  # a client gone: its request goes too (nothing once it has its answer)
        yield Chunks.DONE


def latest(progress: asyncio.Queue, ids: list[int]) -> list[int]:
    """`ids`, or the latest ids waiting after them: each holds the ones before."""
    while not progress.empty():
        ids = progress.get_nowait()
    return ids


def conversation(request: ChatCompletionRequest) -> tuple[str, list, list]:
    """(question, [(image url, param)], [(video url, param)]) of a request, by the rule in this module's doc."""
    last = request.messages[-1]
    if last.role != "user":
        raise APIError(400, f"the last message must be the user's question, got a {last.role!r} message",
                       f"messages.{len(request.messages) - 1}.role")
    question = "\n".join(p.text for p in last.parts() if p.type == "text")
    for i in range(len(request.messages) - 1, -1, -1):
        message = request.messages[i]
        if message.role != "user":
            continue
        images, videos = [], []
        for j, part in enumerate(message.parts()):
            if part.type == "image_url":
                images.append((part.image_url.url, f"messages.{i}.content.{j}.image_url"))
            elif part.type == "video_url":
                videos.append((part.video_url.url, f"messages.{i}.content.{j}.video_url"))
        if images or videos:
            return question, images, videos
    return question, [], []


def give_back_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim). A large request's body, base64 text and
    decoded images are freed once it is prepared, but glibc keeps freed blocks of up to 32 MB in its heaps, where
    they would count in the process's memory while the request waits (and after). No-op without glibc."""
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)
