"""The generation core every route runs through (TGI's ``Infer``, router/src/infer/mod.rs).

One request, in order:
- ``Infer._admit``: draining and dead-engine checks, TGI's stream and best_of checks, the
  concurrency permit (``ConcurrencyLimiter.try_acquire``), then validation (text, or text
  and images) into a ``ValidRequest`` that holds the typed ``EngineRequest``.
- ``Infer._drive``: the engine loop. Each vLLM delta goes into ``Generation.absorb`` (one
  entry per token: text, logprobs, top tokens, stop sequences, finish reason); any exit
  but a natural finish aborts the engine request.
- ``Infer.frames`` (streams: where a token becomes an SSE frame, through the route's
  ``StreamFormat``) and ``Infer.run`` (whole generations): outcomes (metrics, one log
  line, trace), TGI's timings, client disconnects (``dropped``, 499).
  ``Infer.choice_frames`` / ``Infer.run_choices`` do the same for OpenAI's ``n``: one
  admission holding ``n`` permits, then ``n`` generations of the one validated prompt.
- Response glue every route shares: ``respond`` (non-stream JSON with TGI's timing
  headers), ``stream_response`` (SSE), ``refuse`` (an error before admission).

The answers' shapes live with their routes: ``tgi/serving.py`` (TGI's), ``openai/serving.py``.
The per-token work is plain Python on lists and small dicts; pydantic only parses requests.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import replace
from typing import Any

import anyio
import orjson
from starlette.requests import Request
from starlette.responses import Response

from tgi_compat.admission import ConcurrencyLimiter, Permit
from tgi_compat.engine import EngineClient, is_request_error
from tgi_compat.errors import (
    GenerationError,
    IncompleteGenerationError,
    IncompleteGenerationStreamError,
    ShuttingDownError,
    TGIError,
    ValidationError,
)
from tgi_compat.images import ImageChunk, ImageFetcher, image_token_offsets, split_markdown
from tgi_compat.lifecycle import Lifecycle
from tgi_compat.metrics import TGIMetrics
from tgi_compat.sse import TGIEventStream
from tgi_compat.tgi.protocol import GenerateParameters, GenerateRequest
from tgi_compat.tgi.validation import Limits, ValidRequest, check_best_of, check_parameters, check_stream, validate

logger = logging.getLogger("tgi_compat.tgi")

_ids = itertools.count()


def compute_type() -> str:
    """TGI's ``x-compute-type``: env ``COMPUTE_TYPE``, else TGI's default."""
    return os.environ.get("COMPUTE_TYPE") or "gpu+optimized"


class Generation:
    """Engine outputs of one request turned into TGI tokens, one entry per token."""

    __slots__ = (
        "valid", "tok", "special", "ids", "texts", "logprobs", "top", "prefill",
        "finish_reason", "_stream", "_stops", "_stop_window", "_tail", "_want_lp",
        "queue_seconds", "abort_reason", "others",
    )

    def __init__(self, valid: ValidRequest, engine: EngineClient, *, token_text: bool, token_logprobs: bool):
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
        self.others: list[Generation] = []  # best_of: the sequences that lost

    def absorb(self, out: Any) -> None:
        """Take one delta ``RequestOutput``; sets ``finish_reason`` when the request is done."""
        comp = out.outputs[0]
        if not self.queue_seconds:
            # Set on the first output (vLLM's stats ride on every output), so a request
            # that ends on a stop sequence or no_tool, before vLLM finishes it, has its queue time.
            stats = out.metrics
            if stats is not None and stats.scheduled_ts and stats.queued_ts:
                self.queue_seconds = max(stats.scheduled_ts - stats.queued_ts, 0.0)
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

    def tokens(self) -> list[dict]:
        return [self.token(i) for i in range(len(self.ids))]

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
    "template_error": "template",
    "tool_error": "tool",
    "suffix not supported": "validation",
    "batch size exceeded": "validation",
    "Input validation error": "validation",  # /vertex with no instances
}


class RequestContext:
    """One HTTP generation request: ids, route and timings for logs, metrics and headers."""

    __slots__ = ("id", "engine_id", "route", "start", "enqueued", "input_length", "headers", "trace_headers", "scope")

    def __init__(self, request: Request, route: str, request_id: str | None = None):
        self.id = request_id or request.headers.get("x-request-id") or uuid.uuid4().hex
        # Engine ids must be unique even when clients reuse an x-request-id.
        self.engine_id = f"tgi-{next(_ids)}"
        self.route = route
        self.start = time.monotonic()
        self.enqueued = self.start
        self.input_length = 0
        self.headers = {"x-request-id": self.id}
        traceparent = request.headers.get("traceparent")
        self.trace_headers = {"traceparent": traceparent} if traceparent else None
        self.scope = request.scope  # the connection guards record a close here

    def choice(self, j: int) -> RequestContext:
        """Choice ``j`` of this request (OpenAI's ``n``): the same id, route and timings,
        its own engine request id."""
        c = object.__new__(RequestContext)
        for name in self.__slots__:
            setattr(c, name, getattr(self, name))
        c.engine_id = f"{self.engine_id}-{j}"
        return c


class Timings:
    """TGI's split of a request's time: validation, queue, inference (seconds)."""

    __slots__ = ("total", "validation", "queue", "inference")

    def __init__(self, r: RequestContext, gen: Generation | None, end: float):
        self.total = end - r.start
        self.validation = r.enqueued - r.start
        queue = gen.queue_seconds if gen is not None else 0.0
        self.queue = min(queue, max(self.total - self.validation, 0.0))
        self.inference = max(self.total - self.validation - self.queue, 0.0)


class StreamFormat:
    """The event shapes of one streaming route: ``tokens`` gives the frames of the
    intermediate tokens ``start..end-1`` and, as a value, whether the format ends the
    generation there; ``final`` the last token's frame(s), ``error`` an in-band error event.

    A format ends its generation itself by returning a reason (the chat stream does when
    the model picks ``no_tool``): ``Infer.frames`` then stops the generation, records it as
    finished with that reason, and ends without an error event.
    """

    def tokens(self, gen: Generation, start: int, end: int) -> tuple[list[bytes], str | None]:
        """(frames, None), or (frames, end reason) to end the generation after them."""
        raise NotImplementedError

    def final(self, gen: Generation) -> bytes:
        raise NotImplementedError

    def error(self, e: TGIError) -> bytes:
        return e.sse_frame()


class Infer:
    """The shared core: admission, validation, the engine, outcomes, response glue."""

    def __init__(
        self,
        engine: EngineClient,
        limiter: ConcurrencyLimiter,
        limits: Limits,
        lifecycle: Lifecycle,
        metrics: TGIMetrics,
        keep_alive: float = 15.0,
        tracer=None,
        images: ImageFetcher | None = None,
        drop_record: Callable[[dict, float], dict] | None = None,
    ):
        self.engine = engine
        # How a dropped request's connection closed, from its ASGI scope: the connection
        # layer writes that record, so it reads it too (connection.drop_record).
        self.drop_record = drop_record or (lambda scope, now: {})
        self.limiter = limiter
        self.limits = limits
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.keep_alive = keep_alive
        self.tracer = tracer
        self.compute_type = compute_type()
        # Set when the model takes images: `![](...)` in inputs are fetched with it.
        self.images = images if engine.multimodal else None

    # --- admission and validation (TGI's order, §2.1) ---

    async def _admit(
        self, req: GenerateRequest, r: RequestContext, *, stream: bool, add_special_tokens: bool = True,
        choices: int = 1,
    ) -> tuple[Permit, ValidRequest]:
        """The permit (``best_of`` or ``choices`` of them, all or ``overloaded``) and the
        validated request."""
        params = req.parameters
        if self.lifecycle.draining:
            raise ShuttingDownError()
        if self.lifecycle.engine_dead or self.engine.errored:  # the watchdog polls; vLLM knows first
            raise GenerationError("the engine is not running")
        if stream:
            check_stream(params)
        best_of = 1 if stream else check_best_of(params, self.limits)
        permit = self.limiter.try_acquire(best_of * choices)
        try:
            valid = await self._validate(req.inputs, params, add_special_tokens, r.engine_id, stream)
        except BaseException:
            permit.release()
            raise
        self.metrics.request_input_length.observe(valid.input_length)
        self.metrics.request_max_new_tokens.observe(valid.max_new_tokens_checked)
        r.input_length = valid.input_length
        r.enqueued = time.monotonic()
        return permit, valid

    async def _validate(
        self, inputs: str, params: GenerateParameters, add_special_tokens: bool, request_id: str, stream: bool
    ) -> ValidRequest:
        tok = self.engine.tokenizer
        tokenize = tok.encode if add_special_tokens else tok.encode_no_special
        chunks = split_markdown(inputs) if self.images is not None else None
        if not chunks or all(isinstance(c, str) for c in chunks):
            return validate(inputs, params, self.limits, tokenize, request_id=request_id, stream=stream)
        check_parameters(inputs, params, self.limits)  # TGI's order: these fail before any fetch
        prepared = await self.prepare_images(chunks, tokenize, params.truncate)
        return validate(inputs, params, self.limits, None, prepared, request_id=request_id, stream=stream)

    async def prepare_images(self, chunks: list, tokenize, truncate: int | None) -> tuple[list[int], Any]:
        """TGI's ``prepare_input`` for a multimodal model: the images fetched (all at
        once), the text tokenized with the model's placeholder for each image, and vLLM's
        processor run on both, so the ids count the image tokens as the engine does."""
        images = await self.images.load_all([c.url for c in chunks if isinstance(c, ImageChunk)])
        placeholder = self.engine.image_placeholder
        text = "".join(c if isinstance(c, str) else placeholder for c in chunks)
        try:
            ids = tokenize(text)
        except Exception as e:
            raise ValidationError(f"tokenizer error {e}") from e
        try:
            return await self.engine.render_images(ids, images, truncate)
        except ValueError as e:
            raise ValidationError(str(e)) from e

    async def tokenize(self, inputs: str, add_special_tokens: bool = True) -> list[dict]:
        """/tokenize: ``[{"id", "text", "start", "stop"}]`` with byte offsets into ``inputs``.

        With images (multimodal model), the ids are the engine's, image tokens included;
        each image's tokens carry the span of its ``![](...)`` markdown.
        """
        tok = self.engine.tokenizer
        chunks = split_markdown(inputs) if self.images is not None else None
        if not chunks or all(isinstance(c, str) for c in chunks):
            return [{"id": i, "text": t, "start": s, "stop": e} for i, t, s, e in tok.offsets(inputs, add_special_tokens)]
        tokenize = tok.encode if add_special_tokens else tok.encode_no_special
        ids, mm_input = await self.prepare_images(chunks, tokenize, None)
        return image_token_offsets(inputs, chunks, self.engine.image_placeholder, tok, ids, mm_input, add_special_tokens)

    # --- outcomes: one log line and the metrics per finished request ---

    def _failed(self, r: RequestContext, err: str, status: int, message: str) -> None:
        self.metrics.request_failure.inc(err)
        now = time.monotonic()
        fields = {"request_id": r.id, "route": r.route, "status": status, "error": err,
                  "prompt_tokens": r.input_length, "total_ms": int((now - r.start) * 1000)}
        if err == "dropped":
            fields.update(self.drop_record(r.scope, now))
        logger.info("request failed %s", _kv(fields), extra=fields)
        if self.tracer is not None:
            self.tracer.record(r, None, Timings(r, None, time.monotonic()), error=f"{err}: {message}")

    def _failed_with(self, r: RequestContext, e: TGIError) -> None:
        self._failed(r, _ERR_LABELS.get(e.error_type, e.error_type), e.status_code, e.message)

    def _succeeded(self, r: RequestContext, gen: Generation, t: Timings) -> None:
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

    # --- whole generations (non-stream) ---

    async def run(self, req: GenerateRequest, r: RequestContext, *, add_special_tokens: bool = True) -> tuple[Generation, Timings]:
        """One whole generation: admission, validation, engine, metrics and log line.

        Raises ``TGIError`` (already counted and logged); on cancellation (the client
        left) the generation is aborted and counted as ``dropped``. Every route that
        returns a finished generation (TGI's, OpenAI's) goes through here.
        """
        self.metrics.request_count.inc()
        try:
            permit, valid = await self._admit(req, r, stream=False, add_special_tokens=add_special_tokens)
            with permit:
                if valid.best_of > 1:
                    gen = await self._best_of(valid, r)
                else:
                    gen = Generation(valid, self.engine, token_text=valid.details, token_logprobs=valid.details)
                    await self._collect(gen)
        except TGIError as e:
            self._failed_with(r, e)
            raise
        except asyncio.CancelledError:
            self._failed(r, "dropped", 499, "client disconnected")
            raise
        t = Timings(r, gen, time.monotonic())
        self._succeeded(r, gen, t)
        return gen, t

    async def _best_of(self, valid: ValidRequest, r: RequestContext) -> Generation:
        """TGI's best_of: ``n`` sampled generations, each with its own seed, run together
        (the caller holds ``n`` permits); the one with the highest mean token logprob
        wins and the others become ``details.best_of_sequences``."""
        gens = [
            Generation(_reseeded(valid, f"{r.engine_id}-{i}"), self.engine, token_text=valid.details, token_logprobs=True)
            for i in range(valid.best_of)
        ]
        await all_or_nothing([self._collect(g) for g in gens])
        scores = [sum(lp for lp in g.logprobs if lp is not None) / max(len(g.ids), 1) for g in gens]
        best = max(range(len(gens)), key=lambda i: (scores[i], -i))  # the first of equals, as TGI
        winner = gens[best]
        winner.others = [g for i, g in enumerate(gens) if i != best]
        return winner

    async def run_choices(
        self, req: GenerateRequest, r: RequestContext, n: int, *, add_special_tokens: bool = True
    ) -> list[tuple[Generation, Timings]]:
        """OpenAI's ``n``: ``n`` whole generations of one prompt, in choice order.

        One admission takes ``n`` permits at once (all, or ``overloaded`` with nothing sent
        to the engine, as best_of) and validates once; then the choices run together, each
        with its own seed when sampling (vLLM's rule: seed + choice index). Each choice is a
        generation of its own in the metrics and log lines. The first failure ends them all
        (the others are recorded with that error).
        """
        self.metrics.request_count.inc()
        try:
            permit, valid = await self._admit(req, r, stream=False, add_special_tokens=add_special_tokens, choices=n)
        except TGIError as e:
            self._failed_with(r, e)
            raise
        except asyncio.CancelledError:
            self._failed(r, "dropped", 499, "client disconnected")
            raise
        self.metrics.request_count.inc(by=n - 1)
        contexts = [r.choice(j) for j in range(n)]
        failure: list[TGIError] = []

        async def one(gen: Generation, c: RequestContext) -> tuple[Generation, Timings]:
            try:
                await self._collect(gen)
            except TGIError as e:
                failure.append(e)
                self._failed_with(c, e)
                raise
            except asyncio.CancelledError:
                if failure:  # a sibling failed: this choice ends with its error
                    self._failed_with(c, failure[0])
                else:
                    self._failed(c, "dropped", 499, "client disconnected")
                raise
            t = Timings(c, gen, time.monotonic())
            self._succeeded(c, gen, t)
            return gen, t

        with permit:
            gens = [
                Generation(_choice(valid, j, c.engine_id), self.engine, token_text=valid.details, token_logprobs=valid.details)
                for j, c in enumerate(contexts)
            ]
            return await all_or_nothing([one(g, c) for g, c in zip(gens, contexts)])

    def timing_headers(self, runs: list[tuple[Generation, Timings, int]]) -> dict[str, str]:
        """TGI's §6 headers for finished generations (summed over several, as TGI's
        /v1/completions does for a list of prompts)."""
        total = sum(t.total for _, t, _ in runs)
        inference = sum(t.inference for _, t, _ in runs)
        n = sum(len(g.ids) for g, _, _ in runs)
        return {
            "x-compute-type": self.compute_type,
            "x-compute-characters": str(sum(c for _, _, c in runs)),
            "x-compute-time": f"{total:.6f}",
            "x-total-time": str(int(total * 1000)),
            "x-validation-time": str(int(sum(t.validation for _, t, _ in runs) * 1000)),
            "x-queue-time": str(int(sum(t.queue for _, t, _ in runs) * 1000)),
            "x-inference-time": str(int(inference * 1000)),
            "x-time-per-token": str(int(inference * 1000 / n) if n else 0),
            "x-prompt-tokens": str(sum(g.valid.input_length for g, _, _ in runs)),
            "x-generated-tokens": str(n),
        }

    async def _collect(self, gen: Generation) -> None:
        async with aclosing(self._drive(gen)) as steps:
            async for _ in steps:
                pass
        if gen.finish_reason is None:
            raise IncompleteGenerationError()

    async def _drive(self, gen: Generation) -> AsyncIterator[None]:
        """Feed engine outputs into ``gen``, yielding after each, until it finishes.

        Ends early (without ``finish_reason``) if the engine's stream ends first. The
        engine request is aborted on every exit but a natural finish.
        """
        life = self.lifecycle
        request_id = gen.valid.engine.request_id
        try:
            outputs = self.engine.generate(gen.valid.engine)
        except Exception as e:  # vLLM refused the sampling parameters outright
            raise ValidationError(str(e) or type(e).__name__) from e
        life.register(request_id, gen)
        try:
            async for out in outputs:
                life.progress()
                gen.absorb(out)
                yield
                if gen.finish_reason is not None:
                    return
        except TGIError:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as e:  # EngineDeadError, EngineGenerateError, a rejected request...
            cause = e.__cause__ or e
            message = str(cause) or type(cause).__name__
            if not gen.ids and is_request_error(cause):
                # vLLM refused the request when it was added: a grammar it cannot compile...
                if gen.valid.grammar is not None:
                    message = f"grammar is not valid: {message}"
                raise ValidationError(message) from e
            life.generation_failed()
            logger.warning("engine failure on %s: %s: %s", request_id, type(cause).__name__, message)
            raise GenerationError(message) from e
        finally:
            life.unregister(request_id)
            await _close(outputs, self.engine, request_id, gen.finish_reason)

    # --- streams ---

    async def frames(
        self, req: GenerateRequest, r: RequestContext, fmt: StreamFormat, *, add_special_tokens: bool = True
    ) -> AsyncIterator[bytes]:
        """SSE frames of one streamed generation (tokens become frames in ``_stream``).

        Admission, validation, disconnect abort, metrics and logs are the same for every
        streaming route; ``fmt`` (the route's ``StreamFormat``) shapes the events. Tokens
        that arrived together (one engine delta) go out in one write, one event each.
        """
        self.metrics.request_count.inc()
        try:
            permit, valid = await self._admit(req, r, stream=True, add_special_tokens=add_special_tokens)
        except TGIError as e:
            self._failed_with(r, e)
            yield fmt.error(e)
            return
        with permit:
            gen = Generation(valid, self.engine, token_text=True, token_logprobs=True)
            async with aclosing(self._stream(gen, r, fmt)) as frames:
                async for frame in frames:
                    yield frame

    async def choice_frames(
        self, req: GenerateRequest, r: RequestContext, fmts: list[StreamFormat], *, add_special_tokens: bool = True
    ) -> AsyncIterator[bytes]:
        """OpenAI's ``n`` streamed: the frames of ``len(fmts)`` choices of one prompt, as
        they come (interleaved), choice ``j`` shaped by ``fmts[j]``.

        One admission takes the ``n`` permits at once (all, or ``fmts[0]``'s error event
        with nothing sent to the engine) and holds them until every choice ended. Each
        choice has its own seed when sampling, is a generation of its own in the metrics
        and logs, and ends on its own: a failing choice sends its error event while the
        others go on (as the prompts of a /v1/completions list do).
        """
        n = len(fmts)
        self.metrics.request_count.inc()
        try:
            permit, valid = await self._admit(req, r, stream=True, add_special_tokens=add_special_tokens, choices=n)
        except TGIError as e:
            self._failed_with(r, e)
            yield fmts[0].error(e)
            return
        self.metrics.request_count.inc(by=n - 1)
        with permit:
            streams = []
            for j, fmt in enumerate(fmts):
                c = r.choice(j)
                gen = Generation(_choice(valid, j, c.engine_id), self.engine, token_text=True, token_logprobs=True)
                streams.append(self._stream(gen, c, fmt))
            async with aclosing(merged(streams, tail=b"")) as frames:
                async for frame in frames:
                    if frame:
                        yield frame

    async def _stream(self, gen: Generation, r: RequestContext, fmt: StreamFormat) -> AsyncIterator[bytes]:
        """The frames of one admitted generation (this is where tokens become frames), and
        its outcome; the caller holds its permit."""
        finished = False
        sent = 0
        try:
            # aclosing: the driver's cleanup (abort, unregister) runs when we return.
            async with aclosing(self._drive(gen)) as steps:
                async for _ in steps:
                    done = gen.finish_reason is not None
                    if done and not gen.ids:
                        break
                    last = len(gen.ids) - 1 if done else len(gen.ids)
                    frames, ended = fmt.tokens(gen, sent, last) if last > sent else ([], None)
                    sent = max(last, sent)
                    if ended is not None:
                        # The route ends this generation itself (the chat model chose
                        # no tool): a normal outcome, without an error event.
                        gen.finish_reason = ended
                        done = True
                    elif done:
                        frames.append(fmt.final(gen))
                    if done:
                        finished = True
                        self._succeeded(r, gen, Timings(r, gen, time.monotonic()))
                        out = b"".join(frames)
                        if out or ended is None:
                            yield out
                        return
                    if frames:
                        yield b"".join(frames)
            error = IncompleteGenerationStreamError()
            self._failed_with(r, error)
            finished = True
            yield fmt.error(error)
        except TGIError as e:
            self._failed_with(r, e)
            finished = True
            yield fmt.error(e)
        finally:
            if not finished:  # the client went away mid-stream
                self._failed(r, "dropped", 499, "client disconnected")

    def stream_response(self, r: RequestContext, frames: AsyncIterator[bytes], characters: int) -> Response:
        """The SSE response of a streaming route (TGI's headers, keep-alive comments)."""
        headers = {"x-compute-type": self.compute_type, "x-compute-characters": str(characters), **r.headers}
        return TGIEventStream(frames, headers=headers, keep_alive=self.keep_alive)

    # --- response glue shared by the non-stream routes ---

    async def respond(self, request: Request, r: RequestContext, work: Awaitable, render: Callable) -> Response:
        """A non-stream answer. ``work`` (a coroutine of finished generations, from ``run``)
        runs until it ends or the client leaves; then it is cancelled, which aborts its
        engine requests. ``render(result)`` gives (JSON body, runs): the runs are the
        (generation, timings, characters) behind TGI's timing headers."""
        try:
            result = await until_disconnect(request, work)
        except TGIError as e:
            return e.response(headers=r.headers)
        if result is CLIENT_GONE:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        body, runs = render(result)
        headers = {**self.timing_headers(runs), **r.headers}
        return Response(orjson.dumps(body), media_type="application/json", headers=headers)

    def refuse(self, r: RequestContext, e: TGIError) -> Response:
        """A request refused before admission (a chat template that fails, too many
        prompts): counted and logged like any failure."""
        self.metrics.request_count.inc()
        self._failed_with(r, e)
        return e.response(headers=r.headers)


def _choice(valid: ValidRequest, j: int, request_id: str) -> ValidRequest:
    """Choice ``j`` of OpenAI's ``n``: its own engine request id and, when sampling, the
    seed + ``j`` (vLLM's parallel sampling does the same), so choices differ and a given
    seed reproduces them all."""
    engine = replace(valid.engine, request_id=request_id)
    if not valid.sampling:
        return replace(valid, engine=engine)
    seed = (valid.seed + j) % 2**64
    return replace(valid, seed=seed, engine=replace(engine, sampling=replace(engine.sampling, seed=seed)))


def _reseeded(valid: ValidRequest, request_id: str) -> ValidRequest:
    """One of best_of's sequences: its own seed and engine request id."""
    seed = random.getrandbits(64)
    engine = replace(valid.engine, request_id=request_id, sampling=replace(valid.engine.sampling, seed=seed))
    return replace(valid, seed=seed, engine=engine)


async def all_or_nothing(coros: list) -> list:
    """Results in order; the first failure cancels the rest (TGI's ``try_join_all``)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    if not tasks:  # asyncio.wait refuses an empty set (a KServe infer with no inputs)
        return []
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()
        return [t.result() for t in tasks]
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


def _kv(fields: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in fields.items())


async def _close(outputs: AsyncIterator, engine: EngineClient, request_id: str, finish_reason: str | None) -> None:
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


CLIENT_GONE = object()


async def until_disconnect(request: Request, work):
    """Await ``work``; if the client goes away first, cancel it (which aborts its engine
    requests) and return ``CLIENT_GONE``.

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
        return CLIENT_GONE
    return task.result()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def merged(streams: list[AsyncIterator[bytes]], tail: bytes) -> AsyncIterator[bytes]:
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
