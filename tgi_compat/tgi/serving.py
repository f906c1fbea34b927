"""TGI's native generation routes: the shapes of their answers over the generation core.

``TGIServing`` turns a ``GenerateRequest`` into TGI's ``GenerateResponse`` (a JSON object,
or a list of one on ``/``) or a stream of ``StreamResponse`` events (``TGIStreamFormat``);
admission, validation, the engine, outcomes and disconnects are ``tgi/infer.py``'s.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from tgi_compat.sse import data_frame
from tgi_compat.tgi.infer import Generation, Infer, RequestContext, StreamFormat
from tgi_compat.tgi.protocol import CompatGenerateRequest, GenerateParameters, GenerateRequest


class TGIServing:
    """``/generate``, ``/generate_stream`` and ``/`` (also SageMaker's ``/invocations``)."""

    def __init__(self, infer: Infer, full_text_default: bool):
        self.infer = infer
        # TGI's `/` defaults return_full_text to true for text-generation or unknown tags.
        self.full_text_default = full_text_default

    async def generate(
        self, req: GenerateRequest, request: Request, *, route: str, full_text_default: bool = False,
        as_list: bool = False,
    ) -> Response:
        r = RequestContext(request, route)
        full_text = _full_text(req.parameters, full_text_default)

        def render(result: tuple) -> tuple[Any, list]:
            gen, t = result
            body = _generate_response(req, gen, full_text)
            return ([body] if as_list else body), [(gen, t, len(req.inputs))]

        return await self.infer.respond(request, r, self.infer.run(req, r), render)

    def generate_stream(self, req: GenerateRequest, request: Request, *, route: str,
                        full_text_default: bool = False) -> Response:
        r = RequestContext(request, route)
        prefix = req.inputs if _full_text(req.parameters, full_text_default) else ""
        fmt = TGIStreamFormat(prefix, bool(req.parameters.details))
        return self.infer.stream_response(r, self.infer.frames(req, r, fmt), len(req.inputs))

    async def compat(self, req: CompatGenerateRequest, request: Request, *, route: str) -> Response:
        """``/`` (and ``/invocations`` with ``inputs``): a stream or a list of one answer."""
        if req.stream:
            return self.generate_stream(req, request, route=route, full_text_default=self.full_text_default)
        return await self.generate(req, request, route=route, full_text_default=self.full_text_default, as_list=True)


def _generate_response(req: GenerateRequest, gen: Generation, full_text: bool) -> dict[str, Any]:
    """TGI's ``GenerateResponse`` (§2.3)."""
    valid = gen.valid
    text = gen.generated_text()
    if full_text:
        text = req.inputs + text
    body: dict[str, Any] = {"generated_text": text}
    if valid.details:
        details: dict[str, Any] = {
            "finish_reason": gen.finish_reason,
            "generated_tokens": len(gen.ids),
            "seed": gen.reported_seed(),
            "prefill": gen.prefill or [],
            "tokens": gen.tokens(),
        }
        if gen.others:
            prompt = req.inputs if full_text else ""
            details["best_of_sequences"] = [_best_of_sequence(o, prompt) for o in gen.others]
        if valid.top_n_tokens:
            details["top_tokens"] = gen.top
        body["details"] = details
    return body


class TGIStreamFormat(StreamFormat):
    """TGI's ``StreamResponse`` events (§3.1): one per token, ``generated_text`` and
    ``details`` on the last. Built from what the request settled up front (the prompt
    prefix of ``return_full_text``, whether ``details`` were asked for)."""

    __slots__ = ("text_prefix", "details")

    def __init__(self, text_prefix: str, details: bool):
        self.text_prefix = text_prefix
        self.details = details

    def tokens(self, gen: Generation, start: int, end: int) -> tuple[list[bytes], None]:
        dumps = orjson.dumps
        top_n = gen.valid.top_n_tokens
        frames = []
        for i in range(start, end):
            event = {"index": i + 1, "token": gen.token(i)}
            if top_n:
                event["top_tokens"] = gen.top[i]
            event["generated_text"] = None
            event["details"] = None
            frames.append(data_frame(dumps(event)))
        return frames, None

    def final(self, gen: Generation) -> bytes:
        i = len(gen.ids) - 1
        event: dict[str, Any] = {"index": i + 1, "token": gen.token(i)}
        if gen.valid.top_n_tokens:
            event["top_tokens"] = gen.top[i]
        event["generated_text"] = self.text_prefix + gen.generated_text()
        event["details"] = (
            {
                "finish_reason": gen.finish_reason,
                "generated_tokens": len(gen.ids),
                "seed": gen.reported_seed(),
                "input_length": gen.valid.input_length,
            }
            if self.details
            else None
        )
        return data_frame(orjson.dumps(event))


def _best_of_sequence(gen: Generation, prompt: str) -> dict[str, Any]:
    seq: dict[str, Any] = {
        "generated_text": prompt + gen.generated_text(),
        "finish_reason": gen.finish_reason,
        "generated_tokens": len(gen.ids),
        "seed": gen.reported_seed(),
        "prefill": gen.prefill or [],
        "tokens": gen.tokens(),
    }
    if gen.valid.top_n_tokens:
        seq["top_tokens"] = gen.top
    return seq


def _full_text(params: GenerateParameters, default: bool) -> bool:
    return default if params.return_full_text is None else params.return_full_text
