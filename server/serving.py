"""From a checked chat request to an answer: the question and media of the conversation, the decoding settings,
the engine's answer, the OpenAI response (or its stream of chunks).

Lynx is a single-turn VQA model: its prompt holds one question about one image or video. The question is the text
of the last message, which must be the user's (several text parts are joined by newlines); the media are the
image/video parts of that message or, when it has none, of the latest earlier user message that has some. Other
turns (system prompts, earlier questions, the assistant's answers) are not shown to the model. The question fills
the config's `prompt` as `{question}`, exactly as generate.py fills it from a record.

Decoding: the config's, changed by the request's fields. `max_tokens` (or `max_completion_tokens`) is
`max_new_tokens`; `temperature: 0` turns sampling off (beam search with the config's `num_beams`, greedy when 1);
a temperature above 0 turns sampling on with that temperature; `top_p`, and Lynx's own `num_beams`, `top_k`,
`length_penalty`, `no_repeat_ngram_size`, replace the config's values; `seed` makes sampled answers repeatable.
"""
from __future__ import annotations

import asyncio
import json
import time

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from dataset.prompt import format_prompt
from errors import InputError, RecordError
from server.engine import Engine, OutOfMemory, QueueFull, Work
from server.errors import APIError
from server.media import load_media
from server.protocol import (AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice,
                             ChunkChoice, Delta, Usage)
from server.security import Limits

DISCONNECT_POLL_S = 0.1
LYNX_FIELDS = ("top_p", "num_beams", "top_k", "length_penalty", "no_repeat_ngram_size")


class ChatService:
    def __init__(self, pipeline, engine: Engine, limits: Limits, model_name: str):
        self.pipeline, self.engine, self.limits, self.model_name = pipeline, engine, limits, model_name
        cfg = pipeline.cfg
        self.prompt, self.lower_text, self.max_input_tokens = cfg.prompt, cfg.lower_text, cfg.max_input_tokens
        self.visual_tokens = cfg.num_bridge_tokens

    def settings(self, request: ChatCompletionRequest):
        """The config's decoding with the request's changes, checked (400 naming the key otherwise)."""
        changes = {name: getattr(request, name) for name in LYNX_FIELDS if getattr(request, name) is not None}
        max_tokens = request.max_tokens or request.max_completion_tokens
        if max_tokens is not None:
            changes["max_new_tokens"] = max_tokens
        if request.temperature == 0:
            changes["use_nucleus_sampling"] = False
        elif request.temperature is not None:
            changes.update(use_nucleus_sampling=True, temperature=request.temperature)
        try:
            return self.pipeline.settings.replace(**changes) if changes else self.pipeline.settings
        except InputError as err:
            raise APIError(400, str(err)) from None

    def prompt_tokens(self, question: str) -> int:
        """How many text tokens the prompt of `question` has, as the pipeline builds it."""
        text = format_prompt(self.prompt, {"question": question}, self.lower_text)
        return len(self.pipeline.tokenizer.encode(text, self.max_input_tokens))

    def shape(self, prompt_tokens: int) -> int | None:
        """With `use_left_pad: False` a padded row's answer depends on the longer rows of its batch (the original
        reads the next token off the row's last position, a pad): then only prompts of one length share a batch,
        so that every answer is the request's own. Left padding (the default) changes no answer."""
        return None if self.pipeline.cfg.use_left_pad else prompt_tokens

    async def answer(self, request: ChatCompletionRequest, http: Request) -> tuple[str, object, int]:
        """(answer, settings, prompt tokens) for a checked request; waits for the engine, gives up on a client
        that left."""
        question, images, videos = conversation(request)
        settings = self.settings(request)
        prompt_tokens = self.prompt_tokens(question)
        media = await run_in_threadpool(load_media, images, videos, self.limits)
        # The engine removes a temporary video once it is done with it, also when the client has left meanwhile.
        work = Work(media.value, question, media.kind, settings, request.seed, self.shape(prompt_tokens), media.close)
        try:
            future = self.engine.submit(work)
        except QueueFull:
            media.close()
            raise APIError(503, f"the server is busy: {self.limits.queue_size} requests are waiting or being "
                                f"answered (--queue-size); try again shortly", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        return await self._wait(future, http), settings, prompt_tokens

    async def _wait(self, future: asyncio.Future, http: Request) -> str:
        deadline = time.monotonic() + self.limits.request_timeout
        while not future.done():
            if await http.is_disconnected():
                future.cancel()  # dropped by the engine unless its batch already started
                raise APIError(499, "client closed the request", code="client_closed")
            if time.monotonic() > deadline:
                future.cancel()
                raise APIError(504, f"no answer within {self.limits.request_timeout:g} s (--request-timeout)",
                               code="timeout")
            await asyncio.wait([future], timeout=DISCONNECT_POLL_S)
        try:
            return future.result()
        except (RecordError, InputError, ValueError) as err:
            raise APIError(400, getattr(err, "reason", None) or str(err), code="unusable_media") from None
        except OutOfMemory as err:
            raise APIError(503, str(err), code="out_of_memory") from None

    def usage(self, prompt_tokens: int, answer: str, settings) -> tuple[Usage, str]:
        """Token counts (the visual prefix counts as prompt tokens) and the finish reason. The pipeline returns
        text, so the answer's tokens are counted by encoding it again."""
        prompt = prompt_tokens + self.visual_tokens
        completion = len(self.pipeline.tokenizer.encode(answer, 10**9)) - 1  # less the BOS encode() adds
        finish = "length" if completion >= settings.max_new_tokens else "stop"
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion), finish

    async def complete(self, request: ChatCompletionRequest, http: Request) -> ChatCompletion:
        answer, settings, prompt_tokens = await self.answer(request, http)
        usage, finish = self.usage(prompt_tokens, answer, settings)
        return ChatCompletion(model=self.model_name, usage=usage,
                              choices=[Choice(message=AssistantMessage(content=answer), finish_reason=finish)])

    def chunks(self, completion: ChatCompletion, include_usage: bool) -> list[str]:
        """The server-sent events of a finished answer: the whole answer in one chunk, then the finish reason
        (then the usage, when asked), then [DONE]."""
        head = dict(id=completion.id, created=completion.created, model=completion.model)
        choice = completion.choices[0]
        events = [ChatCompletionChunk(**head, choices=[ChunkChoice(delta=Delta(role="assistant",
                                                                               content=choice.message.content))]),
                  ChatCompletionChunk(**head, choices=[ChunkChoice(delta=Delta(),
                                                                   finish_reason=choice.finish_reason)])]
        if include_usage:
            events.append(ChatCompletionChunk(**head, choices=[], usage=completion.usage))
        return [f"data: {json.dumps(e.model_dump(exclude_none=True))}\n\n" for e in events] + ["data: [DONE]\n\n"]


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
