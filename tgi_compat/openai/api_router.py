"""TGI's OpenAI-compatible and SageMaker routes. Thin: parse, hand to ``OpenAIServing``.

Each route documents every status it can answer, with an example body, as TGI's
router does.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from tgi_compat.body import parse_json_body, parse_json_body_union
from tgi_compat.openai.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    ChatTokenizeResponse,
    Completion,
    CompletionRequest,
)
from tgi_compat.openai.serving import OpenAIServing
from tgi_compat.openapi import (
    GENERATION_EXAMPLE as _GENERATION,
    INCOMPLETE_EXAMPLE as _INCOMPLETE,
    OVERLOADED_EXAMPLE as _OVERLOADED,
    VALIDATION_EXAMPLE as _VALIDATION,
    json_body,
    responses,
)
from tgi_compat.tgi.protocol import CompatGenerateRequest

_TEMPLATE = {"error": "Template error: template not found", "error_type": "template_error"}
_STREAM_NOTE = ("With `stream: true`: server-sent events `data:<chunk>`, ending with `data: [DONE]`; errors after "
                "the stream started arrive in-band as `data:{\"error\":{\"message\",\"http_status_code\":422}}`.")


def serving(request: Request) -> OpenAIServing:
    return request.app.state.openai


def build_router(auth) -> APIRouter:
    router = APIRouter(tags=["Text Generation Inference"])

    @router.post(
        "/v1/chat/completions",
        summary="Generate tokens (OpenAI chat completions)",
        description=_STREAM_NOTE,
        dependencies=[Depends(auth)],
        responses=responses(
            {200: ("A chat completion, or a stream of chat completion chunks", ChatCompletion)},
            {422: _TEMPLATE, 424: _GENERATION, 429: _OVERLOADED, 500: _INCOMPLETE},
        ),
        openapi_extra=json_body(ChatRequest),
    )
    async def chat_completions(request: Request) -> Response:
        chat = await parse_json_body(request, ChatRequest)
        return await serving(request).chat(chat, request)

    @router.post(
        "/v1/completions",
        summary="Complete tokens (OpenAI completions)",
        description=_STREAM_NOTE + " Several prompts are generated concurrently; stream events carry each "
        "prompt's `index`.",
        dependencies=[Depends(auth)],
        responses=responses(
            {200: ("A completion, or a stream of completion chunks", Completion)},
            {422: {"error": "Suffix is not supported and can be achieved by preprocessing the prompt.",
                   "error_type": "suffix not supported"},
             424: _GENERATION, 429: _OVERLOADED, 500: _INCOMPLETE},
        ),
        openapi_extra=json_body(CompletionRequest),
    )
    async def completions(request: Request) -> Response:
        req = await parse_json_body(request, CompletionRequest)
        return await serving(request).completions(req, request)

    @router.post(
        "/chat_tokenize",
        summary="Template and tokenize ChatRequest",
        responses=responses({200: ("The templated prompt and its tokens", ChatTokenizeResponse)}, {422: _TEMPLATE}),
        openapi_extra=json_body(ChatRequest),
    )
    async def chat_tokenize(request: Request) -> Response:
        chat = await parse_json_body(request, ChatRequest)
        return await serving(request).chat_tokenize(chat)

    @router.post(
        "/invocations",
        summary="Generate tokens from a SageMaker request",
        description="Dispatched as TGI does: a body with `inputs` goes to `/`, with `messages` to "
        "/v1/chat/completions, with `prompt` to /v1/completions.",
        dependencies=[Depends(auth)],
        responses=responses(
            {200: ("As the route the body was dispatched to", ChatCompletionChunk)},
            {422: _VALIDATION, 424: _GENERATION, 429: _OVERLOADED, 500: _INCOMPLETE},
        ),
        openapi_extra=json_body(CompatGenerateRequest),
    )
    async def invocations(request: Request) -> Response:
        req = await parse_json_body_union(
            request, (CompatGenerateRequest, ChatRequest, CompletionRequest), "SagemakerRequest"
        )
        if isinstance(req, ChatRequest):
            return await serving(request).chat(req, request, route="/invocations")
        if isinstance(req, CompletionRequest):
            return await serving(request).completions(req, request, route="/invocations")
        return await request.app.state.tgi.compat(req, request, route="/invocations")

    return router
