"""A streamed answer (`stream: true`) as server-sent events in OpenAI's chunk format.

Greedy and sampled answers (one beam) stream as they are chosen: at each check of the decoder (every few tokens) the
engine hands the request's ids so far to its queue, from the model's thread (server.engine.Watcher), and the part of
their text that is final goes out as a delta (`FinalText`). Beam search chooses its answer at the end, and a config
with `apply_lemmatizer` rewrites the whole text at the end: those send the answer in one chunk once it is there, as
vLLM does for beams. Then a chunk with the finish reason, one with the usage when asked
(`stream_options.include_usage`: OpenAI's `choices: []` and `usage`), then `data: [DONE]`. The deltas put together
are the answer's text exactly.
"""
from __future__ import annotations

import json

from server.protocol import ChatCompletionChunk, ChunkChoice, Delta, Usage


class FinalText:
    """The text of a growing list of ids, given out as it becomes final: decoded, less its trailing "\ufffd" (a
    character whose bytes have not all come) and trailing whitespace (the answer's text is stripped: it goes unless
    more text follows)."""

    def __init__(self, decode):
        self.decode = decode
        self.sent = ""

    def more(self, ids: list[int]) -> str:
        """The final text of these ids (the ids sent before, and more) not given out yet."""
        text = self.decode(ids)
        end = len(text)
        while end and (text[end - 1] == "\ufffd" or text[end - 1].isspace()):
            end -= 1
        text = text[:end]
        if not text.startswith(self.sent):  # text already sent changed: hold on until the answer
            return ""
        new, self.sent = text[len(self.sent):], text
        return new

    def rest(self, answer: str) -> str | None:
        """The answer's text after what was given out; None if that is not how the answer begins (a batch decoded
        again after a failure, with other draws)."""
        return answer[len(self.sent):] if answer.startswith(self.sent) else None


class Chunks:
    """The events of one streamed completion (`id`, `created` and `model` shared by all its chunks)."""

    def __init__(self, completion_id: str, created: int, model: str):
        self.head = dict(id=completion_id, created=created, model=model)
        self.started = False

    def text(self, content: str) -> str:
        """A chunk of text; the first one also says the role."""
        delta = Delta(content=content) if self.started else Delta(role="assistant", content=content)
        self.started = True
        return self.event(ChatCompletionChunk(**self.head, choices=[ChunkChoice(delta=delta)]))

    def finish(self, reason: str) -> str:
        return self.event(ChatCompletionChunk(**self.head, choices=[ChunkChoice(delta=Delta(), finish_reason=reason)]))

    def usage(self, usage: Usage) -> str:
        return self.event(ChatCompletionChunk(**self.head, choices=[], usage=usage))

    @staticmethod
    def event(chunk) -> str:
        return f"data: {json.dumps(chunk.model_dump(exclude_none=True))}\n\n"

    @staticmethod
    def error(body: bytes) -> str:
        """An error after the stream began (its status was sent already): OpenAI's error JSON as an event."""
        return f"data: {body.decode()}\n\n"

    DONE = "data: [DONE]\n\n"
