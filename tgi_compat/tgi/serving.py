"""TGI's generation routes over the engine seam.

``TGIServing`` holds the engine and turns one validated request into TGI's responses:
a ``GenerateResponse`` dict, or a stream of ``StreamResponse`` SSE frames. The per-token
work (``_Generation.absorb``) is plain Python on lists and small dicts; pydantic is
only used to parse the request.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import anyio
import orjson
from starlette.requests import Request
from starlette.responses import Response

from tgi_compat.admission import ConcurrencyLimiter, Permit
from tgi_compat.engine import Engine
from tgi_compat.errors import (
    GenerationError,
    IncompleteGenerationError,
    IncompleteGenerationStreamError,
    ShuttingDownError,
    TGIError,
)
from tgi_compat.lifecycle import Lifecycle
from tgi_compat.metrics import TGIMetrics
from tgi_compat.sse import TGIEventStream, data_frame
from tgi_compat.tgi.protocol import GenerateParameters, GenerateRequest
from tgi_compat.tgi.validation import (
    Limits,
    ValidRequest,
    check_best_of,
    check_stream,
    sampling_kwargs,
    validate,
)

logger = logging.getLogger("tgi_compat.tgi")

_ids = itertools.count()


def compute_type() -> str:
    """TGI's ``x-compute-type``: env ``COMPUTE_TYPE``, else TGI's default."""
    return os.environ.get("COMPUTE_TYPE") or "gpu+optimized"


class _Generation:
    """Engine outputs of one request turned into TGI tokens, one entry per token."""

    __slots__ = (
        "valid", "tok", "special", "ids", "texts", "logprobs", "top", "prefill",
        "finish_reason", "_stream", "_stops", "_stop_window", "_tail", "_want_lp",
        "queue_seconds", "abort_reason",
    )

    def __init__(self, valid: ValidRequest, engine: Engine, *, token_text: bool, token_logprobs: bool):
        self.valid = valid
        self.tok = engine.tokenizer
        self.special = self.tok.special_ids
        self.ids: list[int] = []
        self.texts: list[str] = []
        self.logprobs: list[float | None] = []
        self.top: list[list[dict]] = []
        self.prefill: list[dict] | None = None
        self.finish_reason: str | None = None
        self._stops = valid.stop
        # Stop sequences match on decoded text, so they need per-token text too.
        need_text = token_text or bool(valid.stop)
        self._stream = self.tok.stream(valid.input_ids) if need_text else None
        self._stop_window = max((len(s) for s in valid.stop), default=0)
        self._tail = ""
        self._want_lp = token_logprobs
        self.queue_seconds = 0.0
        self.abort_reason: str | None = None  # set when the server aborts the request

    def absorb(self, out: Any) -> None:
        """Take one delta ``RequestOutput``; sets ``finish_reason`` when the request is done."""
        comp = out.outputs[0]
        lps = comp.logprobs if self._want_lp else None
        if out.prompt_logprobs is not None and self.prefill is None:
            self._absorb_prefill(out.prompt_logprobs)
        stream = self._stream
        top_n = self.valid.top_n_tokens
        for i, tid in enumerate(comp.token_ids):
            self.ids.append(tid)
            if stream is not None:
                text = stream.step(tid)
                self.texts.append(text)
            if lps is not None:
                entries = lps[i]
                chosen = entries.get(tid)
                self.logprobs.append(chosen.logprob if chosen is not None else None)
                if top_n:
                    self.top.append(self._top_tokens(entries, top_n))
            if self._stops and text:
                tail = (self._tail + text)[-self._stop_window :]
                self._tail = tail
                for s in self._stops:
                    if tail.endswith(s):
                        self.finish_reason = "stop_sequence"
                        return
        if out.finished:
            reason = comp.finish_reason
            if reason == "length":
                self.finish_reason = "length"
            elif reason == "stop":
                # vLLM checks EOS before the length cap; TGI checks length first.
                self.finish_reason = "length" if len(self.ids) >= self.valid.max_new_tokens else "eos_token"
            else:  # "abort" or anything unexpected: the request was ended early
                raise GenerationError(self.abort_reason or f"the engine ended the request ({reason})")
            metrics = out.metrics
            if metrics is not None and metrics.scheduled_ts and metrics.queued_ts:
                self.queue_seconds = max(metrics.scheduled_ts - metrics.queued_ts, 0.0)

    def _top_tokens(self, entries: dict, n: int) -> list[dict]:
        ranked = sorted(entries.items(), key=lambda kv: kv[1].rank)[:n]
        return [
            {"id": tid, "text": self.tok.token_text(tid), "logprob": lp.logprob, "special": tid in self.special}
            for tid, lp in ranked
        ]

    def _absorb_prefill(self, prompt_logprobs: list) -> None:
        prefill = []
        for tid, entries in zip(self.valid.input_ids, prompt_logprobs):
            chosen = entries.get(tid) if entries else None
            prefill.append(
                {"id": tid, "text": self.tok.token_text(tid), "logprob": chosen.logprob if chosen else None}
            )
        self.prefill = prefill

    def token(self, i: int) -> dict:
        tid = self.ids[i]
        return {
            "id": tid,
            "text": self.texts[i] if self.texts else self.tok.token_text(tid),
            "logprob": self.logprobs[i] if self.logprobs else None,
            "special": tid in self.special,
        }

    def generated_text(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True)

    def reported_seed(self) -> int | None:
        return self.valid.seed if self.valid.sampling else None


_ERR_LABELS = {
    "validation": "validation",
    "overloaded": "overloaded",
    "generation": "generation",
    "incomplete_generation": "incomplete",
    "incomplete_generation_stream": "incomplete",
}


class _Request:
    """One HTTP generation request: ids, route and timings for logs, metrics and headers."""

    __slots__ = ("id", "engine_id", "route", "start", "enqueued", "input_length", "headers", "trace_headers")

    def __init__(self, request: Request, route: str):
        self.id = request.headers.get("x-request-id") or uuid.uuid4().hex
        # Engine ids must be unique even when clients reuse an x-request-id.
        self.engine_id = f"tgi-{next(_ids)}"
        self.route = route
        self.start = time.monotonic()
        self.enqueued = self.start
        self.input_length = 0
        self.headers = {"x-request-id": self.id}
        traceparent = request.headers.get("traceparent")
        self.trace_headers = {"traceparent": traceparent} if traceparent else None


class Timings:
    """TGI's split of a request's time: validation, queue, inference (seconds)."""

    __slots__ = ("total", "validation", "queue", "inference")

    def __init__(self, r: _Request, gen: _Generation | None, end: float):
        self.total = end - r.start
        self.validation = r.enqueued - r.start
        queue = gen.queue_seconds if gen is not None else 0.0
        self.queue = min(queue, max(self.total - self.validation, 0.0))
        self.inference = max(self.total - self.validation - self.queue, 0.0)


class TGIServing:
    def __init__(
        self,
        engine: Engine,
        limiter: ConcurrencyLimiter,
        limits: Limits,
        lifecycle: Lifecycle,
        metrics: TGIMetrics,
        keep_alive: float = 15.0,
        tracer=None,
    ):
        self.engine = engine
        self.limiter = limiter
        self.limits = limits
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.keep_alive = keep_alive
        self.tracer = tracer
        self.compute_type = compute_type()

    # --- admission and validation (TGI's order, §2.1) ---

    def _admit(self, req: GenerateRequest, r: _Request, *, stream: bool) -> tuple[Permit, ValidRequest]:
        params = req.parameters
        if self.lifecycle.draining:
            raise ShuttingDownError()
        if self.lifecycle.engine_dead:
            raise GenerationError("the engine is not running")
        if stream:
            check_stream(params)
        best_of = 1 if stream else check_best_of(params, self.limits)
        permit = self.limiter.try_acquire(best_of)
        try:
            valid = validate(req.inputs, params, self.limits, self.engine.tokenizer.encode)
        except BaseException:
            permit.release()
            raise
        self.metrics.request_input_length.observe(valid.input_length)
        self.metrics.request_max_new_tokens.observe(valid.max_new_tokens_checked)
        r.input_length = valid.input_length
        r.enqueued = time.monotonic()
        return permit, valid

    # --- outcomes: one log line and the metrics per finished request ---

    def _failed(self, r: _Request, err: str, status: int, message: str) -> None:
        self.metrics.request_failure.inc(err)
        fields = {"request_id": r.id, "route": r.route, "status": status, "error": err,
                  "prompt_tokens": r.input_length, "total_ms": int((time.monotonic() - r.start) * 1000)}
        logger.info("request failed %s", _kv(fields), extra=fields)
        if self.tracer is not None:
            self.tracer.record(r, None, Timings(r, None, time.monotonic()), error=f"{err}: {message}")

    def _failed_with(self, r: _Request, e: TGIError) -> None:
        self._failed(r, _ERR_LABELS.get(e.error_type, e.error_type), e.status_code, e.message)

    def _succeeded(self, r: _Request, gen: _Generation, t: Timings) -> None:
        n = len(gen.ids)
        self.metrics.success(validation=t.validation, queue=t.queue, inference=t.inference, total=t.total, generated=n)
        fields = {
            "request_id": r.id, "route": r.route, "status": 200, "prompt_tokens": r.input_length,
            "generated_tokens": n, "finish_reason": gen.finish_reason,
            "validation_ms": int(t.validation * 1000), "queue_ms": int(t.queue * 1000),
            "inference_ms": int(t.inference * 1000), "total_ms": int(t.total * 1000),
        }
        logger.info("request finished %s", _kv(fields), extra=fields)
        if self.tracer is not None:
            self.tracer.record(r, gen, t)

    # --- non-stream ---

    async def generate(
        self, req: GenerateRequest, request: Request, *, route: str, full_text_default: bool, as_list: bool
    ) -> Response:
        self.metrics.request_count.inc()
        r = _Request(request, route)
        try:
            permit, valid = self._admit(req, r, stream=False)
            with permit:
                gen = _Generation(valid, self.engine, token_text=valid.details, token_logprobs=valid.details)
                if await _run_until_disconnect(request, self._collect(gen, r.engine_id)):
                    self._failed(r, "dropped", 499, "client disconnected")
                    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        except TGIError as e:
            self._failed_with(r, e)
            return e.response(headers=r.headers)
        t = Timings(r, gen, time.monotonic())
        self._succeeded(r, gen, t)

        text = gen.generated_text()
        if _full_text(req.parameters, full_text_default):
            text = req.inputs + text
        body: dict[str, Any] = {"generated_text": text}
        if valid.details:
            details: dict[str, Any] = {
                "finish_reason": gen.finish_reason,
                "generated_tokens": len(gen.ids),
                "seed": gen.reported_seed(),
                "prefill": gen.prefill or [],
                "tokens": [gen.token(i) for i in range(len(gen.ids))],
            }
            if valid.top_n_tokens:
                details["top_tokens"] = gen.top
            body["details"] = details

        n = len(gen.ids)
        headers = {
            "x-compute-type": self.compute_type,
            "x-compute-characters": str(len(req.inputs)),
            "x-compute-time": f"{t.total:.6f}",
            "x-total-time": str(int(t.total * 1000)),
            "x-validation-time": str(int(t.validation * 1000)),
            "x-queue-time": str(int(t.queue * 1000)),
            "x-inference-time": str(int(t.inference * 1000)),
            "x-time-per-token": str(int(t.inference * 1000 / n) if n else 0),
            "x-prompt-tokens": str(valid.input_length),
            "x-generated-tokens": str(n),
            **r.headers,
        }
        payload = orjson.dumps([body] if as_list else body)
        return Response(payload, media_type="application/json", headers=headers)

    async def _collect(self, gen: _Generation, request_id: str) -> None:
        async with aclosing(self._drive(gen, request_id, token_logprobs=gen.valid.details)) as steps:
            async for _ in steps:
                pass
        if gen.finish_reason is None:
            raise IncompleteGenerationError()

    async def _drive(self, gen: _Generation, request_id: str, *, token_logprobs: bool) -> AsyncIterator[None]:
        """Feed engine outputs into ``gen``, yielding after each, until it finishes.

        Ends early (without ``finish_reason``) if the engine's stream ends first. The
        engine request is aborted on every exit but a natural finish.
        """
        life = self.lifecycle
        life.register(request_id, gen)
        outputs = self.engine.generate(gen.valid.input_ids, sampling_kwargs(gen.valid, token_logprobs=token_logprobs), request_id)
        try:
            async for out in outputs:
                life.last_progress = time.monotonic()
                gen.absorb(out)
                yield
                if gen.finish_reason is not None:
                    return
        except TGIError:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as e:  # EngineDeadError, EngineGenerateError, a rejected request...
            life.generation_healthy = False
            cause = e.__cause__ or e
            message = str(cause) or type(cause).__name__
            logger.warning("engine failure on %s: %s: %s", request_id, type(cause).__name__, message)
            raise GenerationError(message) from e
        finally:
            life.unregister(request_id)
            await _close(outputs, self.engine, request_id, gen.finish_reason)

    # --- stream ---

    def generate_stream(self, req: GenerateRequest, request: Request, *, route: str, full_text_default: bool) -> Response:
        self.metrics.request_count.inc()
        r = _Request(request, route)
        headers = {
            "x-compute-type": self.compute_type,
            "x-compute-characters": str(len(req.inputs)),
            **r.headers,
        }
        return TGIEventStream(self._frames(req, r, full_text_default), headers=headers, keep_alive=self.keep_alive)

    async def _frames(self, req: GenerateRequest, r: _Request, full_text_default: bool) -> AsyncIterator[bytes]:
        try:
            permit, valid = self._admit(req, r, stream=True)
        except TGIError as e:
            self._failed_with(r, e)
            yield e.sse_frame()
            return
        finished = False
        with permit:
            gen = _Generation(valid, self.engine, token_text=True, token_logprobs=True)
            dumps = orjson.dumps
            top_n = valid.top_n_tokens
            sent = 0
            try:
                # aclosing: the driver's cleanup (abort, unregister) runs when we return.
                async with aclosing(self._drive(gen, r.engine_id, token_logprobs=True)) as steps:
                    async for _ in steps:
                        done = gen.finish_reason is not None
                        if done and not gen.ids:
                            break
                        last = len(gen.ids) - 1 if done else len(gen.ids)
                        frames = []
                        for i in range(sent, last):
                            event = {"index": i + 1, "token": gen.token(i)}
                            if top_n:
                                event["top_tokens"] = gen.top[i]
                            event["generated_text"] = None
                            event["details"] = None
                            frames.append(b"data:" + dumps(event) + b"\n\n")
                        sent = max(last, sent)
                        if done:
                            frames.append(self._final_frame(gen, req, full_text_default))
                            finished = True
                            self._succeeded(r, gen, Timings(r, gen, time.monotonic()))
                            yield b"".join(frames)
                            return
                        if frames:
                            # Tokens that arrived together go out in one write, one event each.
                            yield b"".join(frames)
                error = IncompleteGenerationStreamError()
                self._failed_with(r, error)
                finished = True
                yield error.sse_frame()
            except TGIError as e:
                self._failed_with(r, e)
                finished = True
                yield e.sse_frame()
            finally:
                if not finished:  # the client went away mid-stream
                    self._failed(r, "dropped", 499, "client disconnected")

    def _final_frame(self, gen: _Generation, req: GenerateRequest, full_text_default: bool) -> bytes:
        i = len(gen.ids) - 1
        text = gen.generated_text()
        if _full_text(req.parameters, full_text_default):
            text = req.inputs + text
        event: dict[str, Any] = {"index": i + 1, "token": gen.token(i)}
        if gen.valid.top_n_tokens:
            event["top_tokens"] = gen.top[i]
        event["generated_text"] = text
        event["details"] = (
            {
                "finish_reason": gen.finish_reason,
                "generated_tokens": len(gen.ids),
                "seed": gen.reported_seed(),
                "input_length": gen.valid.input_length,
            }
            if req.parameters.details
            else None
        )
        return data_frame(orjson.dumps(event))


def _kv(fields: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in fields.items())


def _full_text(params: GenerateParameters, default: bool) -> bool:
    return default if params.return_full_text is None else params.return_full_text


async def _close(outputs: AsyncIterator, engine: Engine, request_id: str, finish_reason: str | None) -> None:
    """Stop the engine request unless it finished: a stop sequence, an error or a disconnect.

    Shielded: on a client disconnect this runs inside a cancelled anyio scope, where
    any unshielded await would be cancelled again before the abort reaches the engine.
    """
    with anyio.move_on_after(10, shield=True):
        try:
            await outputs.aclose()
        finally:
            if finish_reason not in ("length", "eos_token") and not engine.errored:
                await engine.abort(request_id)


async def _run_until_disconnect(request: Request, work) -> bool:
    """Run ``work``; if the client goes away first, cancel it (which aborts the engine
    request) and return True.

    Starlette does not cancel a non-stream handler when its client disconnects, so the
    handler watches the connection itself.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            try:
                await task
            except BaseException:
                pass
        watcher.cancel()
    if task.cancelled():
        return True
    task.result()
    return False


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
