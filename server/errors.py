"""Every error the server sends is OpenAI's JSON, `{"error": {"message", "type", "param", "code"}}`, with its
status; a traceback goes to the server's log, never to the client, and neither do the server's own folders (its
temporary folder and media root, which the messages of a video decoder name)."""
from __future__ import annotations

import logging
import tempfile

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from server.protocol import ErrorBody, ErrorResponse

log = logging.getLogger("lynx.server")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
         415: "invalid_request_error", 421: "invalid_request_error",
         500: "server_error", 503: "server_error", 504: "server_error"}
# The reason /metrics counts a refusal under, when the error has no code of its own.
REASONS = {400: "invalid_request", 401: "invalid_api_key", 403: "forbidden", 404: "not_found",
           405: "method_not_allowed", 413: "request_too_large", 415: "unsupported_media_type",
           421: "host_not_allowed", 500: "internal_error", 503: "unavailable", 504: "timeout"}


class APIError(Exception):
    """A request the server answers with an error: status, one-line message, and OpenAI's `param` / `code`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    @property
    def reason(self) -> str:
        return self.code or REASONS.get(self.status, f"status_{self.status}")


def error_response(error: APIError, metrics=None, hidden: tuple[str, ...] = ()) -> JSONResponse:
    """The error's JSON; `metrics` counts it; the folders in `hidden` (and the temporary folder) are cut from its
    message, which is made valid UTF-8 (a lone surrogate a client sent is shown escaped)."""
    if metrics is not None:
        metrics.refused(error.reason)
    message = error.message
    for folder in (*hidden, tempfile.gettempdir()):
        message = message.replace(folder.rstrip("/") + "/", "")
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    body = ErrorResponse(error=ErrorBody(message=message, type=TYPES.get(error.status, "invalid_request_error"),
                                         param=error.param, code=error.code))
    return JSONResponse(body.model_dump(), status_code=error.status, headers=error.headers)


def validation_message(err) -> tuple[str, str | None]:
    """(message, param) of the most specific problem pydantic found; param is a path like `messages.0.content`."""
    first = max(err.errors(), key=lambda e: len(e.get("loc", ())))  # a union reports each branch: take the deepest
    loc = []
    for part in map(str, first.get("loc", ())):
        # A union names its branch (`str`, `list[...]`) and a tagged union repeats the tag: keep fields and indices.
        if part != "body" and part != "str" and "[" not in part and (not loc or loc[-1] != part):
            loc.append(part)
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "union_tag_invalid":
        tag = first.get("ctx", {}).get("tag")
        msg = f"unknown content part type {tag!r}; this server takes 'text', 'image_url' and 'video_url'"
    elif first.get("type") == "missing":
        msg = "this field is required"
    return (f"{param}: {msg}" if param else msg), param


def install_error_handlers(app: FastAPI, metrics=None, hidden: tuple[str, ...] = ()) -> None:
    """Handlers that answer every failure with OpenAI's JSON, counted in `metrics`, without the folders `hidden`."""
    def respond(error: APIError) -> JSONResponse:
        return error_response(error, metrics, hidden)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return respond(err)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        path = request.url.path[:200]
        message = {404: f"no route {path}", 405: f"{request.method} is not allowed on {path}"}
        return respond(APIError(err.status_code, message.get(err.status_code, str(err.detail)),
                                headers=getattr(err, "headers", None)))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        message, param = validation_message(err)
        return respond(APIError(400, message, param))

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path[:200])
        return respond(APIError(500, "internal server error (see the server's log)", code="internal_error"))
