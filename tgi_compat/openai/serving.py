"""TGI's OpenAI-compatible routes over the same generation core as its native routes.

A chat or completion request becomes one ``GenerateRequest`` per prompt (TGI's
``try_into_generate``) and runs through ``Infer.run`` / ``Infer.frames`` (tgi/infer.py):
the same admission permits, validation, engine seam, disconnect abort, metrics and log
lines. With OpenAI's ``n`` > 1 (beyond TGI, which ignores it) a prompt runs through
``Infer.run_choices`` / ``Infer.choice_frames`` instead: ``n`` generations under ``n``
permits taken at once. Only the shapes of the answers differ, and those live here: the
chat and completion bodies, and their stream events (``ChatStreamFormat``,
``CompletionStreamFormat``).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from tgi_compat.chat_template import ChatTemplate, ToolCallIn
from tgi_compat.errors import RouteError, TemplateError, TGIError, ToolError, ValidationError, openai_stream_error
from tgi_compat.openai import tools as tooling
from tgi_compat.openai.protocol import ChatRequest, CompletionRequest
from tgi_compat.sse import data_frame, frame_template
from tgi_compat.tgi.infer import Generation, Infer, RequestContext, StreamFormat, all_or_nothing, merged
from tgi_compat.tgi.protocol import GenerateParameters, GenerateRequest, Grammar

# huggingface_hub compares this line literally, with the space (TGI sends `data:[DONE]`).
DONE_FRAME = data_frame(b" [DONE]")
# Pre-encoded ends of the per-token chat chunks (the JSON between them varies).
_FRAME_HEAD, _CHOICE_TAIL = frame_template(b"", b'}],"usage":null}')
_USAGE_TAIL = frame_template(b"", b"}")[1]

_dumps = orjson.dumps


def openai_finish_reason(reason: str) -> str:
    """TGI's ``FinishReason::format(true)``: only EOS is renamed."""
    return "stop" if reason == "eos_token" else reason


class OpenAIServing:
    def __init__(self, infer: Infer, template: ChatTemplate | None, *, model_id: str, fingerprint: str,
                 max_client_batch_size: int, adapters: frozenset[str] = frozenset()):
        self.infer = infer
        self.template = template
        self.model_id = model_id
        self.fingerprint = fingerprint
        self.max_client_batch_size = max_client_batch_size
        self.adapters = adapters

    # --- request mapping (TGI's ChatRequest::try_into_generate) ---

    def choices(self, n: int | None) -> int:
        """OpenAI's ``n``, bounded as TGI bounds ``best_of`` (the same thing: generations
        of one prompt, one permit each): 1..--max-best-of."""
        if n is None:
            return 1
        cap = self.infer.limits.max_best_of
        if not 1 <= n <= cap:
            raise ValidationError(f"`n` must be > 0 and <= {cap}. Given: {n}")
        return n

    def _adapter(self, model: str | None) -> str | None:
        # TGI passes any model name as adapter_id and silently falls back to the base
        # model for unknown ones; clients send names like "dummy" or "gpt-4", so only a
        # loaded adapter's name selects it.
        return model if model in self.adapters else None

    def render(self, chat: ChatRequest, *, with_tools: bool = True) -> tuple[str, Grammar | None, bool]:
        """(templated prompt, grammar, using_tools)."""
        if self.template is None:
            raise TemplateError("template not found")
        messages = [self.template.message(m.role, _content(m.content), _calls(m.tool_calls), m.tool_call_id)
                    for m in chat.messages]
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
            n = self.choices(chat.n)
            gen_req, using_tools = self.chat_request(chat)
            if n > 1 and using_tools:
                # A tool call per choice, each with TGI's `no_tool` second generation, is
                # not supported: refused rather than answered with one choice.
                raise ValidationError("`n` must be 1 when tools are used")
        except TGIError as e:
            return self.infer.refuse(r, e)
        if n > 1:
            return await self._chat_choices(chat, gen_req, n, r, request)
        if chat.stream:
            frames = self._chat_frames(chat, gen_req, using_tools, r, request)
            return self.infer.stream_response(r, frames, len(gen_req.inputs))

        def render(result: tuple) -> tuple[dict, list]:
            gen, t, message = result
            body = self._chat_body(chat, [_chat_choice(0, gen, message, chat.logprobs)],
                                   _usage(gen.valid.input_length, len(gen.ids)))
            return body, [(gen, t, len(gen_req.inputs))]

        return await self.infer.respond(request, r, self._chat_run(chat, gen_req, using_tools, r, request), render)

    def _chat_body(self, chat: ChatRequest, choices: list[dict], usage: dict) -> dict:
        return {
            "object": "chat.completion",
            "id": "",
            "created": int(time.time()),
            "model": self._model(chat),
            "system_fingerprint": self.fingerprint,
            "choices": choices,
            "usage": usage,
        }

    async def _chat_choices(self, chat: ChatRequest, gen_req: GenerateRequest, n: int, r: RequestContext,
                            request: Request) -> Response:
        """``n`` > 1 choices (never with tools): ``n`` generations of the one prompt."""
        if chat.stream:
            return self.infer.stream_response(r, self._chat_choice_frames(chat, gen_req, n, r), len(gen_req.inputs))

        def render(result: list) -> tuple[dict, list]:
            choices = [_chat_choice(j, gen, {"role": "assistant", "content": gen.generated_text()}, chat.logprobs)
                       for j, (gen, _t) in enumerate(result)]
            # The prompt is counted once (OpenAI's and vLLM's usage), the completions all.
            usage = _usage(result[0][0].valid.input_length, sum(len(gen.ids) for gen, _t in result))
            runs = [(gen, t, len(gen_req.inputs) if j == 0 else 0) for j, (gen, t) in enumerate(result)]
            return self._chat_body(chat, choices, usage), runs

        work = self.infer.run_choices(gen_req, r, n, add_special_tokens=False)
        return await self.infer.respond(request, r, work, render)

    async def _chat_choice_frames(self, chat: ChatRequest, gen_req: GenerateRequest, n: int,
                                  r: RequestContext) -> AsyncIterator[bytes]:
        """The chunks of ``n`` choices interleaved as they come, each with its ``index``;
        with ``include_usage``, one usage chunk summing every choice once all finished."""
        include_usage = chat.stream_options is not None and chat.stream_options.include_usage
        fmts = [ChatStreamFormat(self._model(chat), self.fingerprint, bool(chat.logprobs), False, index=j)
                for j in range(n)]
        async with aclosing(self.infer.choice_frames(gen_req, r, fmts, add_special_tokens=False)) as frames:
            async for frame in frames:
                yield frame
        if include_usage and all(f.done is not None for f in fmts):
            gens = [f.done for f in fmts]
            yield fmts[0].usage_frame(_usage(gens[0].valid.input_length, sum(len(g.ids) for g in gens)))
        yield DONE_FRAME

    async def _chat_run(self, chat: ChatRequest, gen_req: GenerateRequest, using_tools: bool,
                        r: RequestContext, request: Request):
        gen, t = await self.infer.run(gen_req, r, add_special_tokens=False)
        text = gen.generated_text()
        if not using_tools:
            return gen, t, {"role": "assistant", "content": text}
        name, args = tooling.parse_output(text)
        if name == tooling.NO_TOOL:
            # TGI generates again, without tools, under a new permit.
            gen_req, _ = self.chat_request(chat, with_tools=False)
            r2 = RequestContext(request, r.route, request_id=r.id)
            gen, t = await self.infer.run(gen_req, r2, add_special_tokens=False)
            return gen, t, {"role": "assistant", "content": gen.generated_text()}
        call = {"id": "0", "type": "function",
                "function": {"description": None, "name": name, "arguments": tooling.compact_json(args)}}
        return gen, t, {"role": "assistant", "tool_calls": [call]}

    async def _chat_frames(self, chat: ChatRequest, gen_req: GenerateRequest, using_tools: bool,
                           r: RequestContext, request: Request) -> AsyncIterator[bytes]:
        include_usage = chat.stream_options is not None and chat.stream_options.include_usage
        fmt = ChatStreamFormat(self._model(chat), self.fingerprint, bool(chat.logprobs), include_usage,
                               tool_id=tooling.next_tool_call_id(chat.messages) if using_tools else None)
        async with aclosing(self.infer.frames(gen_req, r, fmt, add_special_tokens=False)) as frames:
            async for frame in frames:
                yield frame
        if fmt.no_tool_chosen:
            # The model chose no tool: TGI generates again, without tools, under a new permit.
            try:
                gen_req, _ = self.chat_request(chat, with_tools=False)
            except TGIError as e:
                yield openai_stream_error(e)
            else:
                fmt = ChatStreamFormat(self._model(chat), self.fingerprint, bool(chat.logprobs), include_usage)
                r2 = RequestContext(request, r.route, request_id=r.id)
                async with aclosing(self.infer.frames(gen_req, r2, fmt, add_special_tokens=False)) as frames:
                    async for frame in frames:
                        yield frame
        yield DONE_FRAME

    # --- /v1/completions ---

    async def completions(self, req: CompletionRequest, request: Request, *, route: str = "/v1/completions") -> Response:
        r = RequestContext(request, route)
        try:
            n = self.choices(req.n)
            gen_reqs = self.completion_requests(req)
        except TGIError as e:
            return self.infer.refuse(r, e)
        contexts = [r] + [RequestContext(request, route, request_id=r.id) for _ in gen_reqs[1:]]
        if req.stream:
            if n == 1:
                streams = [
                    self.infer.frames(g, c, CompletionStreamFormat(i, self.model_id, self.fingerprint))
                    for i, (g, c) in enumerate(zip(gen_reqs, contexts))
                ]
            else:  # OpenAI's indices: prompt i, choice j -> i * n + j
                streams = [
                    self.infer.choice_frames(
                        g, c, [CompletionStreamFormat(i * n + j, self.model_id, self.fingerprint) for j in range(n)])
                    for i, (g, c) in enumerate(zip(gen_reqs, contexts))
                ]
            return self.infer.stream_response(r, merged(streams, tail=DONE_FRAME), sum(len(g.inputs) for g in gen_reqs))

        def render(result: list) -> tuple[dict, list]:
            per_prompt = [[run] for run in result] if n == 1 else result
            choices = []
            runs = []
            prompt_tokens = completion_tokens = 0
            for i, (prompt_runs, g) in enumerate(zip(per_prompt, gen_reqs)):
                prompt_tokens += prompt_runs[0][0].valid.input_length  # once per prompt
                for j, (gen, t) in enumerate(prompt_runs):
                    choices.append({"index": i * n + j, "text": gen.generated_text(), "logprobs": None,
                                    "finish_reason": openai_finish_reason(gen.finish_reason)})
                    completion_tokens += len(gen.ids)
                    runs.append((gen, t, len(g.inputs) if j == 0 else 0))
            body = {
                "object": "text_completion",
                "id": "",
                "created": int(time.time()),
                "model": self.model_id,
                "system_fingerprint": self.fingerprint,
                "choices": choices,
                "usage": _usage(prompt_tokens, completion_tokens),
            }
            return body, runs

        if n == 1:
            work = all_or_nothing([self.infer.run(g, c) for g, c in zip(gen_reqs, contexts)])
        else:
            work = all_or_nothing([self.infer.run_choices(g, c, n) for g, c in zip(gen_reqs, contexts)])
        return await self.infer.respond(request, r, work, render)

    # --- /chat_tokenize ---

    async def chat_tokenize(self, chat: ChatRequest) -> Response:
        """The templated prompt and its tokens (with a VLM, its images' tokens too)."""
        gen_req, _ = self.chat_request(chat)
        text = gen_req.inputs
        body = {"tokenize_response": await self.infer.tokenize(text, add_special_tokens=False), "templated_text": text}
        return Response(_dumps(body), media_type="application/json")


# --- stream event shapes ---


class ChatStreamFormat(StreamFormat):
    """``chat.completion.chunk`` events (router/src/chat.rs ``ChatState``): one per
    token, ``content`` "" for special tokens, ``finish_reason`` on the last, then a
    ``choices: []`` usage chunk when ``stream_options.include_usage``. With tools
    (``tool_id`` given), ``tools.ToolCallState`` turns the generated call JSON into
    ``tool_calls`` deltas as TGI does; when the model chooses ``no_tool`` ``tokens`` returns
    that end reason and sends nothing more (the route then generates again, without tools)."""

    def __init__(self, model: str, fingerprint: str, logprobs: bool, include_usage: bool,
                 tool_id: str | None = None, index: int = 0):
        self.model = model
        self._choice_head = b'{"index":' + str(index).encode() + b',"delta":'
        self.done: Generation | None = None  # the generation, once its final chunk is made
        self.fingerprint = fingerprint
        self.logprobs = logprobs
        self.include_usage = include_usage
        self._head_second = -1
        self._head = b""
        self.tool_id = tool_id
        self.tool_state = tooling.ToolCallState() if tool_id is not None else None
        # The model chose no_tool: ``tokens`` ends the generation (its return value says so
        # to the core); the route reads this afterwards to generate again without tools.
        self.no_tool_chosen = False

    def _prefix(self) -> bytes:
        """The event's bytes up to its choices, pre-encoded once per second (``created``)."""
        now = int(time.time())
        if now != self._head_second:
            self._head_second = now
            self._head = _FRAME_HEAD + (
                b'{"object":"chat.completion.chunk","id":"","created":' + str(now).encode()
                + b',"model":' + _dumps(self.model) + b',"system_fingerprint":' + _dumps(self.fingerprint)
                + b',"choices":['
            )
        return self._head

    def _chunk(self, gen: Generation, i: int, finish_reason: str | None) -> bytes:
        if self.tool_state is not None:
            return self._tool_chunk(gen, i, finish_reason)
        special = gen.ids[i] in gen.special
        delta = b'{"role":"assistant","content":' + (b'""' if special else _dumps(gen.texts[i])) + b"}"
        return self._frame(gen, i, delta, finish_reason)

    def _frame(self, gen: Generation, i: int, delta: bytes, finish_reason: str | None) -> bytes:
        lp = _dumps({"content": [_logprob(gen, i)]}) if self.logprobs else b"null"
        fr = b"null" if finish_reason is None else _dumps(finish_reason)
        return (self._prefix() + self._choice_head + delta + b',"logprobs":' + lp
                + b',"finish_reason":' + fr + _CHOICE_TAIL)

    def _tool_chunk(self, gen: Generation, i: int, finish_reason: str | None) -> bytes:
        event = self.tool_state.push(gen.texts[i])
        if event is None:  # the function's name is not known yet
            return b""
        if event is tooling.NO_TOOL_CHOSEN:
            self.no_tool_chosen = True
            return b""
        if gen.ids[i] in gen.special:
            delta = b'{"role":"assistant","content":""}'
        else:
            delta = _dumps({"role": "assistant", "tool_calls": [{
                "index": 0, "id": self.tool_id, "type": "function",
                "function": {"name": event.name, "arguments": event.arguments}}]})
        return self._frame(gen, i, delta, finish_reason)

    def tokens(self, gen: Generation, start: int, end: int) -> tuple[list[bytes], str | None]:
        if self.tool_state is None:
            return [self._chunk(gen, i, None) for i in range(start, end)], None
        frames = []
        for i in range(start, end):
            frames.append(self._chunk(gen, i, None))
            if self.no_tool_chosen:  # nothing after it is looked at; the generation ends here
                return frames, tooling.NO_TOOL
        return frames, None

    def final(self, gen: Generation) -> bytes:
        self.done = gen
        frame = self._chunk(gen, len(gen.ids) - 1, openai_finish_reason(gen.finish_reason))
        if self.include_usage and not self.no_tool_chosen:
            frame += self.usage_frame(_usage(gen.valid.input_length, len(gen.ids)))
        return frame

    def usage_frame(self, usage: dict[str, int]) -> bytes:
        """The ``choices: []`` chunk with ``usage`` (``stream_options.include_usage``)."""
        return self._prefix() + b'],"usage":' + _dumps(usage) + _USAGE_TAIL

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
        head, tail = frame_template(
            b'{"object":"text_completion","id":"","created":' + created + b',"choices":[{"index":'
            + str(self.index).encode() + b',"text":',
            b',"logprobs":null,"finish_reason":""}],"model":' + _dumps(self.model)
            + b',"system_fingerprint":' + _dumps(self.fingerprint) + b"}",
        )
        return [head + _dumps(gen.texts[i]) + tail for i in range(start, end)], None

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
        return data_frame(_dumps(event))

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


def _chat_choice(index: int, gen: Generation, message: dict, logprobs: bool | None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index, "message": message, "logprobs": None,
                              "finish_reason": openai_finish_reason(gen.finish_reason)}
    if logprobs:
        choice["logprobs"] = {"content": [_logprob(gen, i) for i in range(len(gen.ids))]}
    return choice


def _calls(calls) -> list[ToolCallIn] | None:
    if calls is None:
        return None
    return [ToolCallIn(c.id, c.type, c.function.name, c.function.description, c.function.arguments) for c in calls]
