"""OpenAI's chat-completion request and response shapes, as far as Lynx serves them (pydantic models).

Unknown top-level fields are ignored, as OpenAI-compatible servers do, so that harnesses that send a `user` or
`metadata` field work; fields that would change an answer and that Lynx cannot honour are refused by name
(`UNSUPPORTED`). Content parts are strict: an unknown part type is an error, never silently dropped.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Beam search divides a hypothesis' score by length ** length_penalty in Python floats (as transformers 4.28
# does): within +-10 that stays finite for any answer length a server allows.
MAX_LENGTH_PENALTY = 10.0
MIN_TEMPERATURE = 1e-3


class MediaURL(BaseModel):
    model_config = ConfigDict(extra="ignore")  # `detail` (VLMEvalKit) and other hints: accepted, not used
    url: str


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: MediaURL


class VideoPart(BaseModel):
    type: Literal["video_url"]
    video_url: MediaURL


Part = Annotated[Union[TextPart, ImagePart, VideoPart], Field(discriminator="type")]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # `name`: accepted, not used
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[Part], None] = None

    def parts(self) -> list:
        if self.content is None:
            return []
        return [TextPart(type="text", text=self.content)] if isinstance(self.content, str) else list(self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's fields, plus Lynx's own decoding keys (`num_beams`, `top_k`, `length_penalty`,
    `no_repeat_ngram_size`, named as in LYNX.yaml)."""

    model_config = ConfigDict(extra="allow")
    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)  # OpenAI's range
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=-2**63, lt=2**64)  # what a torch.Generator takes
    n: int | None = 1  # null: 1, as OpenAI's clients mean it
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    num_beams: int | None = Field(default=None, ge=1)
    top_k: int | None = Field(default=None, ge=0)
    length_penalty: float | None = Field(default=None, ge=-MAX_LENGTH_PENALTY, le=MAX_LENGTH_PENALTY)
    no_repeat_ngram_size: int | None = Field(default=None, ge=0)

    @field_validator("temperature")
    @classmethod
    def sampling_temperature(cls, value: float | None) -> float | None:
        if value is not None and 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"a temperature above 0 must be at least {MIN_TEMPERATURE} (far smaller ones overflow "
                             f"the decoder's scores); 0 turns sampling off")
        return value


# Fields that change an answer in ways Lynx does not reproduce, and the value that means "not used".
UNSUPPORTED = {"stop": (None, [], ""), "logprobs": (None, False), "tools": (None, []), "tool_choice": (None, "none"),
               "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
               "top_logprobs": (None, 0), "audio": (None,), "prediction": (None,)}


def unsupported_field(request: ChatCompletionRequest) -> str | None:
    """The name of the first field the request sets to something Lynx cannot honour, or None."""
    for name, unused in UNSUPPORTED.items():
        value = (request.model_extra or {}).get(name)
        if value not in unused:
            return name
    fmt = (request.model_extra or {}).get("response_format")
    if fmt not in (None, {"type": "text"}):
        return "response_format"
    return None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lynx"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
