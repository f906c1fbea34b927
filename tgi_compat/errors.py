"""One error hierarchy, mapped to TGI's wire shapes in one place.

TGI answers every failure after body parsing with ``{"error": str, "error_type": str}``:
as a JSON response with a status on non-stream routes, and as an in-band SSE ``data:``
event (HTTP 200) on stream routes. Clients (huggingface_hub, text-generation) branch on
``error_type``, so the strings here are TGI's exactly (router/src/infer/mod.rs,
router/src/server.rs). ``install_handlers`` maps every exception a route lets escape
(ours, a body the extractor refuses, a vanished client, a missing API key, a bug) to HTTP.
"""

from __future__ import annotations

import logging

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from tgi_compat.sse import data_frame


class TGIError(Exception):
    """A failure with TGI's ``error_type`` and HTTP status."""

    status_code: int = 500
    error_type: str = "unknown"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.error_type}

    def response(self, headers: dict[str, str] | None = None) -> Response:
        # A plain Response with bytes gets a Content-Length, never chunked encoding:
        # huggingface_hub's async client parses error bodies only then.
        return Response(
            orjson.dumps(self.body()),
            status_code=self.status_code,
            media_type="application/json",
            headers=headers,
        )

    def sse_frame(self) -> bytes:
        return data_frame(orjson.dumps(self.body()))


class ValidationError(TGIError):
    status_code = 422
    error_type = "validation"

    def __init__(self, message: str):
        super().__init__(f"Input validation error: {message}")


class OverloadedError(TGIError):
    status_code = 429
    error_type = "overloaded"

    def __init__(self, message: str = "Model is overloaded"):
        super().__init__(message)


class GenerationError(TGIError):
    status_code = 424
    error_type = "generation"

    def __init__(self, message: str):
        super().__init__(f"Request failed during generation: {message}")


class ShuttingDownError(TGIError):
    """New work refused while draining. ``overloaded`` so that clients back off and retry
    (huggingface_hub raises ``OverloadedError``), with 503 as for an unavailable server."""

    status_code = 503
    error_type = "overloaded"

    def __init__(self, message: str = "Server is shutting down"):
        super().__init__(message)


class IncompleteGenerationError(TGIError):
    status_code = 500
    error_type = "incomplete_generation"

    def __init__(self, message: str = "Incomplete generation"):
        super().__init__(message)


class IncompleteGenerationStreamError(TGIError):
    status_code = 500
    error_type = "incomplete_generation_stream"

    def __init__(self, message: str = "Incomplete generation stream"):
        super().__init__(message)


class UnhealthyError(TGIError):
    status_code = 503
    error_type = "healthcheck"

    def __init__(self, message: str = "unhealthy"):
        super().__init__(message)


class TemplateError(TGIError):
    """The chat template is missing or failed to render (minijinja's error in TGI)."""

    status_code = 422
    error_type = "template_error"

    def __init__(self, message: str):
        super().__init__(f"Template error: {message}")


class ToolError(TGIError):
    status_code = 422
    error_type = "tool_error"

    def __init__(self, message: str):
        super().__init__(f"Tool error: {message}")


class RouteError(TGIError):
    """The ad-hoc 422s of TGI's OpenAI routes, each with its own ``error_type``
    (``suffix not supported``, ``batch size exceeded``)."""

    status_code = 422

    def __init__(self, message: str, error_type: str):
        super().__init__(message)
        self.error_type = error_type


class RequestIncompleteError(TGIError):
    """What TGI's /vertex and KServe infer answer when any of their generations failed,
    whatever the failure was (router/src/vertex.rs, kserve.rs)."""

    status_code = 500
    error_type = "Incomplete generation"

    def __init__(self, message: str = "Incomplete generation"):
        super().__init__(message)


def openai_stream_error(e: TGIError) -> bytes:
    """How TGI's OpenAI routes put an error in a stream (``InferError::into_openai_event``):
    OpenAI's ``{"error": {...}}`` shape, always with ``http_status_code`` 422."""
    return data_frame(orjson.dumps({"error": {"message": e.message, "http_status_code": 422}}))


class BodyError(Exception):
    """A request body the JSON extractor rejects. TGI (axum) answers these in plain text."""

    def __init__(self, status_code: int, message: str):
        super().__init__(message)
        self.status_code = status_code
        self.message = message

    def response(self) -> Response:
        return Response(self.message, status_code=self.status_code, media_type="text/plain; charset=utf-8")


def unsupported_content_type() -> BodyError:
    return BodyError(415, "Expected request with `Content-Type: application/json`")


def json_syntax_error(detail: str) -> BodyError:
    return BodyError(400, f"Failed to parse the request body as JSON: {detail}")


def json_data_error(detail: str) -> BodyError:
    return BodyError(422, f"Failed to deserialize the JSON body into the target type: {detail}")


def payload_too_large(limit: int) -> BodyError:
    return BodyError(413, f"Failed to buffer the request body: length limit exceeded ({limit} bytes)")


class Unauthorized(Exception):
    """No or a wrong ``Authorization: Bearer`` for ``--api-key``: 401 with no body, as TGI."""


logger = logging.getLogger("tgi_compat")


async def _tgi_error(request: Request, exc: TGIError) -> Response:
    return exc.response()


async def _body_error(request: Request, exc: BodyError) -> Response:
    return exc.response()


async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
    # The connection closed before the body arrived (the client left, or the request
    # read timeout closed it): nothing was admitted, and nobody reads an answer.
    return Response(status_code=499)


async def _unauthorized(request: Request, exc: Unauthorized) -> Response:
    return Response(status_code=401)


async def _unexpected(request: Request, exc: Exception) -> Response:
    logger.exception("unexpected error on %s", request.url.path)
    return Response(
        orjson.dumps({"error": f"Internal error: {type(exc).__name__}", "error_type": "internal"}),
        status_code=500,
        media_type="application/json",
    )


def install_handlers(app) -> None:
    """Every exception a route lets escape, answered in TGI's shape."""
    app.add_exception_handler(TGIError, _tgi_error)
    app.add_exception_handler(BodyError, _body_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Unauthorized, _unauthorized)
    app.add_exception_handler(Exception, _unexpected)
