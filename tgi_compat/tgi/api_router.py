"""TGI's native routes. Thin: parse the body, hand it to ``TGIServing``.

Each route documents every status it can answer, with an example body, as TGI's
router does (router/src/server.rs ``#[utoipa::path]``).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from tgi_compat.body import parse_json_body
from tgi_compat.openapi import (
    GENERATION_EXAMPLE as _GENERATION,
    INCOMPLETE_EXAMPLE as _INCOMPLETE,
    OVERLOADED_EXAMPLE as _OVERLOADED,
    VALIDATION_EXAMPLE as _VALIDATION,
    json_body,
    responses,
)
from tgi_compat.tgi.protocol import CompatGenerateRequest, GenerateRequest, GenerateResponse, StreamResponse
from tgi_compat.tgi.serving import TGIServing

_GENERATE_RESPONSES = responses(
    {200: ("Generated text", GenerateResponse)},
    {422: _VALIDATION, 424: _GENERATION, 429: _OVERLOADED, 500: _INCOMPLETE},
)
_STREAM_RESPONSES = responses(
    {200: ("Generated tokens as server-sent events (`data:<StreamResponse>`). Errors arrive in-band with "
           "status 200 as `data:{\"error\",\"error_type\"}`, then the stream closes.", StreamResponse)},
    {},
    stream=True,
)


def serving(request: Request) -> TGIServing:
    return request.app.state.tgi


def build_router(auth) -> APIRouter:
    router = APIRouter(tags=["Text Generation Inference"], dependencies=[Depends(auth)])

    @router.post(
        "/generate",
        summary="Generate tokens",
        responses=_GENERATE_RESPONSES,
        openapi_extra=json_body(GenerateRequest),
    )
    async def generate(request: Request) -> Response:
        req = await parse_json_body(request, GenerateRequest)
        return await serving(request).generate(req, request, route="/generate")

    @router.post(
        "/generate_stream",
        summary="Generate a stream of token using Server-Sent Events",
        responses=_STREAM_RESPONSES,
        openapi_extra=json_body(GenerateRequest),
    )
    async def generate_stream(request: Request) -> Response:
        req = await parse_json_body(request, GenerateRequest)
        return serving(request).generate_stream(req, request, route="/generate_stream")

    @router.post(
        "/",
        summary="Generate tokens if `stream == false` or a stream of token if `stream == true`",
        description="Non-stream: a JSON array holding one GenerateResponse. Stream: as /generate_stream. "
        "`return_full_text` defaults to true here (the model's pipeline tag is text-generation or unknown).",
        responses=responses(
            {200: ("A JSON array of one GenerateResponse, or a server-sent event stream", list[GenerateResponse])},
            {422: _VALIDATION, 424: _GENERATION, 429: _OVERLOADED, 500: _INCOMPLETE},
        ),
        openapi_extra=json_body(CompatGenerateRequest),
    )
    async def compat_generate(request: Request) -> Response:
        req = await parse_json_body(request, CompatGenerateRequest)
        return await serving(request).compat(req, request, route="/")

    return router
