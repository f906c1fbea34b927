"""One error hierarchy, mapped to TGI's wire shapes in one place.

TGI answers every failure after body parsing with ``{"error": str, "error_type": str}``:
as a JSON response with a status on non-stream routes, and as an in-band SSE ``data:``
event (HTTP 200) on stream routes. Clients (huggingface_hub, text-generation) branch on
``error_type``, so the strings here are TGI's exactly (router/src/infer/mod.rs,
router/src/server.rs).
"""

from __future__ import annotations

import orjson
from starlette.responses import Response


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
        return b"data:" + orjson.dumps(self.body()) + b"\n\n"


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


def openai_stream_error(e: TGIError) -> bytes:
    """How TGI's OpenAI routes put an error in a stream (``InferError::into_openai_event``):
    OpenAI's ``{"error": {...}}`` shape, always with ``http_status_code`` 422."""
    return b"data:" + orjson.dumps({"error": {"message": e.message, "http_status_code": 422}}) + b"\n\n"


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
