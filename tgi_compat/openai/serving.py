"""TGI's OpenAI-compatible routes over the same generation core as its native routes.

A chat or completion request becomes one ``GenerateRequest`` per generation (TGI's
``try_into_generate``) and runs through ``TGIServing.run`` / ``TGIServing.frames``:
the same admission permits, validation, engine seam, disconnect abort, metrics and
log lines. Only the shapes of the answers differ, and those live here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import anyio
import orjson
from starlette.requests import Request
from starlette.responses import Response

from tgi_compat.chat_template import ChatTemplate, flatten_message
from tgi_compat.errors import RouteError, TemplateError, TGIError, ToolError, openai_stream_error
from tgi_compat.openai import tools as tooling
from tgi_compat.openai.protocol import ChatRequest, CompletionRequest
from tgi_compat.sse import TGIEventStream
from tgi_compat.tgi.protocol import GenerateParameters, GenerateRequest, Grammar
from tgi_compat.tgi.serving import (
    CLIENT_GONE,
    Generation,
    RequestContext,
    StopStream,
    StreamFormat,
    TGIServing,
    all_or_nothing,
    until_disconnect,
)

# huggingface_hub compares this line literally, with the space (TGI sends `data:[DONE]`).
DONE_FRAME = b"data: [DONE]\n\n"

_dumps = orjson.dumps


def openai_finish_reason(reason: str) -> str:
    """TGI's ``FinishReason::format(true)``: only EOS is renamed."""
    return "stop" if reason == "eos_token" else reason


class _NoTool(StopStream):
    """The model chose ``no_tool``: generate again without tools."""


class OpenAIServing:
    def __init__(self, tgi: TGIServing, template: ChatTemplate | None, *, model_id: str, fingerprint: str,
                 max_client_batch_size: int, adapters: frozenset[str] = frozenset()):
        self.tgi = tgi
        self.template = template
        self.model_id = model_id
        self.fingerprint = fingerprint
        self.max_client_batch_size = max_client_batch_size
        self.adapters = adapters

    # --- request mapping (TGI's ChatRequest::try_into_generate) ---

    def _adapter(self, model: str | None) -> str | None:
        # TGI passes any model name as adapter_id and silently falls back to the base
        # model for unknown ones; clients send names like "dummy" or "gpt-4", so only a
        # loaded adapter's name selects it.
        return model if model in self.adapters else None

    def render(self, chat: ChatRequest, *, with_tools: bool = True) -> tuple[str, Grammar | None, bool]:
        """(templated prompt, grammar, using_tools)."""
        if self.template is None:
            raise TemplateError("template not found")
        messages = [flatten_message(m.role, _content(m.content), _dump_calls(m.tool_calls)) for m in chat.messages]
        fmt = chat.response_format.grammar() if chat.response_format is not None else None
        if fmt is not None and chat.tools is not None and with_tools:
            raise ToolError("Grammar and tools are mutually exclusive")
        if fmt is not None:
            return self.template.render(messages), fmt, False
        if chat.tools is not None and with_tools:
            applied = tooling.tool_grammar(chat.tools, chat.tool_choice_value())
            if applied is not None:
                tools, schema = applied
                prompt = self.template.render(messages, tools, chat.tool_prompt or tooling.DEFAULT_TOOL_PROMPT)
                grammar = Grammar(type="json", value=tooling.engine_schema(schema))
                return prompt, grammar, True
        return self.template.render(messages), None, False

    def chat_request(self, chat: ChatRequest, *, with_tools: bool = True) -> tuple[GenerateRequest, bool]:
        prompt, grammar, using_tools = self.render(chat, with_tools=with_tools)
        params = GenerateParameters(
            **_sampling(chat.temperature),
            repetition_penalty=None if chat.presence_penalty is None else chat.presence_penalty + 2.0,
            frequency_penalty=chat.frequency_penalty,
            top_p=chat.top_p,
            max_new_tokens=chat.max_tokens,
            stop=chat.stop or [],
            details=True,
            seed=chat.seed,
            top_n_tokens=chat.top_logprobs,
            grammar=grammar,
            adapter_id=self._adapter(chat.model),
        )
        return GenerateRequest(inputs=prompt, parameters=params), using_tools

    def completion_requests(self, req: CompletionRequest) -> list[GenerateRequest]:
        if req.suffix is not None:
            raise RouteError("Suffix is not supported and can be achieved by preprocessing the prompt.",
                             "suffix not supported")
        prompts = req.prompts()
        if len(prompts) > self.max_client_batch_size:
            raise RouteError(
                f"Number of prompts exceeds the maximum allowed batch size of {self.max_client_batch_size}",
                "batch size exceeded",
            )
        params = GenerateParameters(
            **_sampling(req.temperature),
            repetition_penalty=req.repetition_penalty,
            frequency_penalty=req.frequency_penalty,
            top_p=req.top_p,
            max_new_tokens=req.max_tokens,
            stop=req.stop or [],
            details=True,
            seed=req.seed,
            adapter_id=self._adapter(req.model),
        )
        return [GenerateRequest(inputs=p, parameters=params) for p in prompts]

    def _model(self, chat: ChatRequest) -> str:
        return self.model_id if chat.model in (None, "tgi") else chat.model

    # --- /v1/chat/completions ---

    async def chat(self, chat: ChatRequest, request: Request, *, route: str = "/v1/chat/completions") -> Response:
        r = RequestContext(request, route)
        try:
            gen_req, using_tools = self.chat_request(chat)
        except TGIError as e:
            self.tgi.reject(r, e)
            return e.response(headers=r.headers)
        if chat.stream:
            return TGIEventStream(
                self._chat_frames(chat, gen_req, using_tools, r, request),
                headers=self.tgi.stream_headers(r, len(gen_req.inputs)),
                keep_alive=self.tgi.keep_alive,
            )
        try:
            result = await until_disconnect(request, self._chat_run(chat, gen_req, using_tools, r, request))
        except TGIError as e:
            return e.response(headers=r.headers)
        if result is CLIENT_GONE:
            return Response(status_code=499)
        gen, t, message = result
        choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None,
                                  "finish_reason": openai_finish_reason(gen.finish_reason)}
        if chat.logprobs:
            choice["logprobs"] = {"content": [_logprob(gen, i) for i in range(len(gen.ids))]}
        n = len(gen.ids)
        body = {
            "object": "chat.completion",
            "id": "",
            "created": int(time.time()),
            "model": self._model(chat),
            "system_fingerprint": self.fingerprint,
            "choices": [choice],
            "usage": _usage(gen.valid.input_length, n),
        }
        headers = {**self.tgi.timing_headers([(gen, t, len(gen_req.inputs))]), **r.headers}
        return Response(_dumps(body), media_type="application/json", headers=headers)

    async def _chat_run(self, chat: ChatRequest, gen_req: GenerateRequest, using_tools: bool,
                        r: RequestContext, request: Request):
        gen, t = await self.tgi.run(gen_req, r, add_special_tokens=False)
        text = gen.generated_text()
        if not using_tools:
            return gen, t, {"role": "assistant", "content": text}
        name, args = tooling.parse_output(text)
        if name == tooling.NO_TOOL:
            # TGI generates again, without tools, under a new permit.
            gen_req, _ = self.chat_request(chat, with_tools=False)
            r2 = RequestContext(request, r.route, request_id=r.id)
            gen, t = await self.tgi.run(gen_req, r2, add_special_tokens=False)
            return gen, t, {"role": "assistant", "content": gen.generated_text()}
        call = {"id": "0", "type": "function",
                "function": {"description": None, "name": name, "arguments": tooling.compact_json(args)}}
        return gen, t, {"role": "assistant", "tool_calls": [call]}

    async def _chat_frames(self, chat: ChatRequest, gen_req: GenerateRequest, using_tools: bool,
                           r: RequestContext, request: Request) -> AsyncIterator[bytes]:
        include_usage = chat.stream_options is not None and chat.stream_options.include_usage
        fmt = ChatStreamFormat(self._model(chat), self.fingerprint, bool(chat.logprobs), include_usage)
        if using_tools:
            fmt.start_tools(tooling.next_tool_call_id(chat.messages))
        try:
            async with aclosing(self.tgi.frames(gen_req, r, fmt, add_special_tokens=False)) as frames:
                async for frame in frames:
                    yield frame
        except _NoTool:
            try:
                gen_req, _ = self.chat_request(chat, with_tools=False)
            except TGIError as e:
                yield openai_stream_error(e)
            else:
                fmt = ChatStreamFormat(self._model(chat), self.fingerprint, bool(chat.logprobs), include_usage)
                r2 = RequestContext(request, r.route, request_id=r.id)
                async with aclosing(self.tgi.frames(gen_req, r2, fmt, add_special_tokens=False)) as frames:
                    async for frame in frames:
                        yield frame
        yield DONE_FRAME

    # --- /v1/completions ---

    async def completions(self, req: CompletionRequest, request: Request, *, route: str = "/v1/completions") -> Response:
        r = RequestContext(request, route)
        try:
            gen_reqs = self.completion_requests(req)
        except TGIError as e:
            self.tgi.reject(r, e)
            return e.response(headers=r.headers)
        contexts = [r] + [RequestContext(request, route, request_id=r.id) for _ in gen_reqs[1:]]
        if req.stream:
            streams = [
                self.tgi.frames(g, c, CompletionStreamFormat(i, self.model_id, self.fingerprint))
                for i, (g, c) in enumerate(zip(gen_reqs, contexts))
            ]
            return TGIEventStream(
                _merged(streams, tail=DONE_FRAME),
                headers=self.tgi.stream_headers(r, sum(len(g.inputs) for g in gen_reqs)),
                keep_alive=self.tgi.keep_alive,
            )
        try:
            result = await until_disconnect(
                request, all_or_nothing([self.tgi.run(g, c) for g, c in zip(gen_reqs, contexts)])
            )
        except TGIError as e:
            return e.response(headers=r.headers)
        if result is CLIENT_GONE:
            return Response(status_code=499)
        choices = []
        prompt_tokens = completion_tokens = 0
        for i, (gen, _t) in enumerate(result):
            choices.append({"index": i, "text": gen.generated_text(), "logprobs": None,
                            "finish_reason": openai_finish_reason(gen.finish_reason)})
            prompt_tokens += gen.valid.input_length
            completion_tokens += len(gen.ids)
        body = {
            "object": "text_completion",
            "id": "",
            "created": int(time.time()),
            "model": self.model_id,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
            "usage": _usage(prompt_tokens, completion_tokens),
        }
        runs = [(gen, t, len(g.inputs)) for (gen, t), g in zip(result, gen_reqs)]
        headers = {**self.tgi.timing_headers(runs), **r.headers}
        return Response(_dumps(body), media_type="application/json", headers=headers)

    # --- /chat_tokenize ---

    async def chat_tokenize(self, chat: ChatRequest) -> Response:
        """The templated prompt and its tokens (with a VLM, its images' tokens too)."""
        gen_req, _ = self.chat_request(chat)
        text = gen_req.inputs
        body = {"tokenize_response": await self.tgi.tokenize(text, add_special_tokens=False), "templated_text": text}
        return Response(_dumps(body), media_type="application/json")


# --- stream event shapes ---


class ChatStreamFormat(StreamFormat):
    """``chat.completion.chunk`` events (router/src/chat.rs ``ChatState``): one per
    token, ``content`` "" for special tokens, ``finish_reason`` on the last, then a
    ``choices: []`` usage chunk when ``stream_options.include_usage``. With tools, the
    generated call JSON is turned into ``tool_calls`` deltas as TGI does."""

    def __init__(self, model: str, fingerprint: str, logprobs: bool, include_usage: bool):
        self.model = model
        self.fingerprint = fingerprint
        self.logprobs = logprobs
        self.include_usage = include_usage
        self._head_second = -1
        self._head = b""
        self.tools = False
        self.tool_id = "0"
        self.tool_state = "buffering"
        self.tool_text = ""

    def start_tools(self, tool_id: str) -> None:
        self.tools = True
        self.tool_id = tool_id

    def _prefix(self) -> bytes:
        now = int(time.time())
        if now != self._head_second:
            self._head_second = now
            self._head = (
                b'data:{"object":"chat.completion.chunk","id":"","created":' + str(now).encode()
                + b',"model":' + _dumps(self.model) + b',"system_fingerprint":' + _dumps(self.fingerprint)
                + b',"choices":['
            )
        return self._head

    def _chunk(self, gen: Generation, i: int, finish_reason: str | None) -> bytes:
        special = gen.ids[i] in gen.special
        if self.tools:
            return self._tool_chunk(gen, i, finish_reason)
        delta = b'{"role":"assistant","content":' + (b'""' if special else _dumps(gen.texts[i])) + b"}"
        return self._frame(gen, i, delta, finish_reason)

    def _frame(self, gen: Generation, i: int, delta: bytes, finish_reason: str | None) -> bytes:
        lp = _dumps({"content": [_logprob(gen, i)]}) if self.logprobs else b"null"
        fr = b"null" if finish_reason is None else _dumps(finish_reason)
        return (self._prefix() + b'{"index":0,"delta":' + delta + b',"logprobs":' + lp
                + b',"finish_reason":' + fr + b'}],"usage":null}\n\n')

    def _tool_chunk(self, gen: Generation, i: int, finish_reason: str | None) -> bytes:
        text = gen.texts[i]
        if self.tool_state == "buffering":
            self.tool_text += text
            partial = self.tool_text.rstrip(" \t\r\n,}")
            call = tooling.parse_call(partial + "}}")
            if call is None:
                return b""
            if call[0] == tooling.NO_TOOL:
                raise _NoTool()
            self.tool_state = "tool"
            return self._tool_delta(gen, i, "{", call[0], finish_reason)
        self.tool_text += text
        if tooling.parse_call(self.tool_text) is not None:
            self.tool_state = "buffering"
            text = text.rstrip()
            if text.endswith("}"):
                text = text[:-1]
        return self._tool_delta(gen, i, text, None, finish_reason)

    def _tool_delta(self, gen: Generation, i: int, arguments: str, name: str | None, finish_reason) -> bytes:
        if gen.ids[i] in gen.special:
            delta = b'{"role":"assistant","content":""}'
        else:
            delta = _dumps({"role": "assistant", "tool_calls": [{
                "index": 0, "id": self.tool_id, "type": "function",
                "function": {"name": name, "arguments": arguments}}]})
        return self._frame(gen, i, delta, finish_reason)

    def tokens(self, gen: Generation, start: int, end: int) -> list[bytes]:
        return [self._chunk(gen, i, None) for i in range(start, end)]

    def final(self, gen: Generation) -> bytes:
        frame = self._chunk(gen, len(gen.ids) - 1, openai_finish_reason(gen.finish_reason))
        if self.include_usage:
            frame += (self._prefix() + b'],"usage":' + _dumps(_usage(gen.valid.input_length, len(gen.ids)))
                      + b"}\n\n")
        return frame

    def error(self, e: TGIError) -> bytes:
        return openai_stream_error(e)


class CompletionStreamFormat(StreamFormat):
    """``text_completion`` events of one prompt (TGI's ``Chunk`` / ``CompletionFinal``):
    each token's own text, special tokens included; the final event carries ``usage``
    and TGI's raw finish reason (``eos_token``)."""

    def __init__(self, index: int, model: str, fingerprint: str):
        self.index = index
        self.model = model
        self.fingerprint = fingerprint

    def tokens(self, gen: Generation, start: int, end: int) -> list[bytes]:
        created = str(int(time.time())).encode()
        head = b'data:{"object":"text_completion","id":"","created":' + created + b',"choices":[{"index":' \
            + str(self.index).encode() + b',"text":'
        tail = b',"logprobs":null,"finish_reason":""}],"model":' + _dumps(self.model) \
            + b',"system_fingerprint":' + _dumps(self.fingerprint) + b"}\n\n"
        return [head + _dumps(gen.texts[i]) + tail for i in range(start, end)]

    def final(self, gen: Generation) -> bytes:
        i = len(gen.ids) - 1
        event = {
            "object": "text_completion",
            "id": "",
            "created": int(time.time()),
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": [{"index": self.index, "text": gen.texts[i], "logprobs": None,
                         "finish_reason": gen.finish_reason}],
            "usage": _usage(gen.valid.input_length, len(gen.ids)),
        }
        return b"data:" + _dumps(event) + b"\n\n"

    def error(self, e: TGIError) -> bytes:
        return openai_stream_error(e)


# --- helpers ---


def _sampling(temperature: float | None) -> dict[str, Any]:
    """TGI's OpenAI routes: temperature 0 means greedy, anything else samples."""
    if temperature == 0.0:
        return {"do_sample": False, "temperature": None}
    return {"do_sample": True, "temperature": temperature}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _logprob(gen: Generation, i: int) -> dict[str, Any]:
    top = gen.top[i] if gen.valid.top_n_tokens else []
    return {
        "token": gen.texts[i] if gen.texts else gen.tok.token_text(gen.ids[i]),
        "logprob": gen.logprobs[i] if gen.logprobs else None,
        "top_logprobs": [{"token": t["text"], "logprob": t["logprob"]} for t in top],
    }


def _content(content):
    return content if content is None or isinstance(content, str) else [c.model_dump() for c in content]


def _dump_calls(calls) -> list[dict] | None:
    if calls is None:
        return None
    return [
        {"id": c.id, "type": c.type, "function": {"description": c.function.description,
                                                   "name": c.function.name,
                                                   "arguments": tooling.compact_json(c.function.arguments)}}
        for c in calls
    ]


async def _merged(streams: list[AsyncIterator[bytes]], tail: bytes) -> AsyncIterator[bytes]:
    """Interleave several frame streams as their frames arrive, then ``tail``.

    Closing this generator (a client disconnect) cancels and closes every stream, so
    each one's cleanup aborts its engine request and releases its permit.
    """
    pending: dict[asyncio.Future, AsyncIterator[bytes]] = {
        asyncio.ensure_future(anext(s)): s for s in streams
    }
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                stream = pending.pop(fut)
                try:
                    frame = fut.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(stream))] = stream
                yield frame
        yield tail
    finally:
        # Shielded: on a disconnect this runs inside sse-starlette's cancelled scope.
        with anyio.CancelScope(shield=True):
            for fut in pending:
                fut.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            for s in streams:
                await s.aclose()
