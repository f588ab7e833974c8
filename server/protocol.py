"""OpenAI's chat-completion request and response shapes, as far as Lynx serves them (pydantic models).

Unknown top-level fields are ignored, as OpenAI-compatible servers do, so that harnesses that send a `user` or
`metadata` field work; fields that would change an answer and that Lynx cannot honour are refused by name
(`UNSUPPORTED`). Content parts are strict: an unknown part type is an error, never silently dropped.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from configs.decoding import DecodingSettings, request_fields

# OpenAI's ranges, on top of the settings' own checks: a temperature from 0 to 2, and none so small above 0 that
# the logits it divides overflow; beam search divides a hypothesis' score by length ** length_penalty in Python
# floats (as transformers 4.28 does): within +-10 that stays finite for any answer length a server allows.
MAX_LENGTH_PENALTY = 10.0
MIN_TEMPERATURE = 1e-3
REQUEST_RANGES = {"temperature": dict(ge=0, le=2),
                  "length_penalty": dict(ge=-MAX_LENGTH_PENALTY, le=MAX_LENGTH_PENALTY)}


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


class OpenAIRequest(BaseModel):
    """OpenAI's chat request, less the decoding options (`request_model` adds them)."""

    model_config = ConfigDict(extra="allow")
    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    max_completion_tokens: int | None = None  # max_tokens' newer name (max_tokens wins when both are given)
    seed: int | None = Field(default=None, ge=-2**63, lt=2**64)  # what a torch.Generator takes
    n: int | None = 1  # null: 1, as OpenAI's clients mean it
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    @field_validator("temperature", check_fields=False)  # a decoding field: request_model adds it
    @classmethod
    def sampling_temperature(cls, value: float | None) -> float | None:
        if value is not None and 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"a temperature above 0 must be at least {MIN_TEMPERATURE} (far smaller ones overflow "
                             f"the decoder's scores); 0 turns sampling off")
        return value


def request_model(settings: type = DecodingSettings) -> type[OpenAIRequest]:
    """The chat request with a field for every decoding option a request may set (configs/decoding.py: OpenAI's
    `max_tokens`, `temperature`, `top_p`, and Lynx's own keys named as in LYNX.yaml), each optional and typed; the
    values are checked by the settings, which name the field, within OpenAI's ranges (REQUEST_RANGES)."""
    options = settings.options()
    fields = {field: (options[name].kind | None, Field(default=None, allow_inf_nan=False, **REQUEST_RANGES.get(
        field, {})) if options[name].kind is float else None) for name, field in request_fields(settings).items()}
    return create_model("ChatCompletionRequest", __base__=OpenAIRequest, **fields)


ChatCompletionRequest = request_model()


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
