"""A scripted stand-in for ``tgi_compat.engine.Engine``: no vLLM process, real output shapes.

``ScriptedEngine`` offers the app exactly what ``Engine`` offers it (tokenizer, limits,
``generate(EngineRequest)`` returning delta ``RequestOutput``s, ``abort``, health, counts,
shutdown) and replays a ``Script`` per request: steps of one or several token ids each
(vLLM merges deltas when the consumer lags), per-token logprobs with ranks and top-n
alternatives, prompt logprobs, and vLLM's finish reason. Failures are injected the way
vLLM produces them: refused at add (``ValueError`` raised by ``generate()`` or on the
first iteration), raised mid-stream (``EngineDeadError``, ``RuntimeError``), a stream that
ends without finishing, or a request that blocks until it is aborted.

Outputs are vLLM's own classes (``RequestOutput``, ``CompletionOutput``, ``Logprob``,
``RequestStateStats``), so the app reads the same shapes as from the engine. Every
``EngineRequest`` received and every abort is recorded for assertions.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tgi_compat.engine import EngineRequest
from tgi_compat.tokens import Tokenizer

# Finish reasons vLLM reports: "stop" (EOS or a stop id), "length", "abort".
STOP, LENGTH, ABORT = "stop", "length", "abort"


@dataclass
class Lp:
    """One generated token's logprob: its own ``logprob`` and ``rank``, and ranked
    alternatives ``top`` as (token id, logprob), best first (vLLM's top-n)."""

    logprob: float
    rank: int = 1
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Script:
    """What the engine does with one request.

    ``steps``: one engine output per entry, each a list of token ids (several = merged
    deltas). ``logprobs``: one ``Lp`` (or a float) per generated token, in order; absent,
    every token gets -1.0 at rank 1 plus made-up alternatives. ``prompt_logprobs``: one
    float per prompt token after the first (vLLM has none for the first). ``finish``:
    vLLM's finish reason on the last step, or None to end the stream unfinished.
    ``refuse``: raised when the request is added (``at_call``: by ``generate()`` itself,
    as a bad SamplingParams would; otherwise on the first iteration, as vLLM's AsyncLLM
    does). ``fail``: raised after ``fail_after`` steps. ``block``: after the steps, wait
    until the request is aborted (vLLM then ends it with finish reason "abort").
    """

    steps: list[list[int]] = field(default_factory=list)
    finish: str | None = LENGTH
    logprobs: list[Lp | float] | None = None
    prompt_logprobs: list[float] | None = None
    refuse: BaseException | None = None
    refuse_at_call: bool = False
    fail: BaseException | None = None
    fail_after: int = 0
    block: bool = False
    queue: float = 0.0  # seconds the request waits before its first step (vLLM's queued -> scheduled)

    @classmethod
    def tokens(cls, ids: list[int], finish: str | None = LENGTH, **kw) -> Script:
        """One token per step."""
        return cls(steps=[[i] for i in ids], finish=finish, **kw)


class ScriptedEngine:
    """The engine seam the app uses, replaying ``Script``s.

    Scripts are taken from ``queue`` (``push``) in request order, else from
    ``script_for(req)``; the default generates ``max_tokens`` copies of ``filler`` and
    finishes with "length".
    """

    def __init__(self, tokenizer: Tokenizer, *, max_model_len: int = 1024, model: str = "scripted/tiny",
                 adapters: dict[str, Any] | None = None):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.kv_capacity_tokens = 4096
        self.num_engines = 1
        self.adapters = dict(adapters or {})
        self.multimodal = False
        self.image_placeholder = ""
        self.max_images = 0
        self.dtype = "torch.float32"
        self.engine_args = SimpleNamespace(model=model)
        self.on_step = None
        self.errored = False
        self.remote_engines = 0
        self.queue: deque[Script] = deque()
        self.script_for: Callable[[EngineRequest], Script] | None = None
        self.filler = tokenizer.encode_no_special(" a")[0]
        self.requests: list[EngineRequest] = []  # every request generate() was called with
        self.aborts: list[str] = []  # every request id abort() was called with
        self.closed: list[str] = []  # request ids whose output iterator was closed before it finished
        self.live: dict[str, asyncio.Event] = {}  # request id -> set when aborted
        self.shut_down = False
        self.health_checks = 0

    # --- scripting ---

    def push(self, *scripts: Script) -> None:
        self.queue.extend(scripts)

    def _script(self, req: EngineRequest) -> Script:
        if self.queue:
            return self.queue.popleft()
        if self.script_for is not None:
            return self.script_for(req)
        return Script.tokens([self.filler] * req.sampling.max_tokens, LENGTH)

    def request(self, request_id: str) -> EngineRequest:
        return next(r for r in self.requests if r.request_id == request_id)

    async def wait_live(self, n: int, timeout: float = 30.0) -> None:
        """Until ``n`` requests are in the engine (e.g. blocked ones holding permits)."""
        async with asyncio.timeout(timeout):
            while len(self.live) < n:
                await asyncio.sleep(0.005)

    # --- the Engine interface ---

    def generate(self, req: EngineRequest) -> AsyncIterator:
        self.requests.append(req)
        script = self._capped(self._script(req), req.sampling.max_tokens)
        if script.refuse is not None and script.refuse_at_call:
            raise script.refuse
        return self._replay(req, script)

    @staticmethod
    def _capped(script: Script, max_tokens: int) -> Script:
        """As vLLM does: no more than ``max_tokens`` tokens, then finish reason "length"."""
        steps, n = [], 0
        for ids in script.steps:
            if n + len(ids) >= max_tokens:
                steps.append(list(ids[: max_tokens - n]))
                if n + len(ids) > max_tokens or script.finish is None:
                    return replace(script, steps=steps, finish=LENGTH, block=False)
                return replace(script, steps=steps)
            steps.append(list(ids))
            n += len(ids)
        return script

    async def _replay(self, req: EngineRequest, script: Script) -> AsyncIterator:
        from vllm.outputs import CompletionOutput, RequestOutput
        from vllm.v1.metrics.stats import RequestStateStats

        rid = req.request_id
        aborted = asyncio.Event()
        self.live[rid] = aborted
        finished = False
        try:
            await asyncio.sleep(0)
            if script.refuse is not None:
                raise script.refuse
            queued = time.monotonic()
            want_lp = req.sampling.logprobs
            lps = list(script.logprobs or [])
            n_done = 0
            prompt_lp = self._prompt_logprobs(req, script) if req.sampling.prompt_logprobs is not None else None
            last = len(script.steps) - 1
            # A failure after the last step means the last step is not the finish.
            fails_at_end = script.fail is not None and script.fail_after >= len(script.steps)
            # vLLM attaches its request's stats object to every output, finished or not.
            stats = RequestStateStats(queued_ts=queued, scheduled_ts=queued + script.queue)
            if script.queue:
                await asyncio.sleep(script.queue)  # the engine's queue, as the stats say
            for k, ids in enumerate(script.steps):
                if script.fail is not None and k == script.fail_after:
                    raise script.fail
                if aborted.is_set():
                    break
                done = k == last and script.finish is not None and not script.block and not fails_at_end
                token_lps = None
                if want_lp is not None:
                    token_lps = [self._logprob(tid, lps[n_done + j] if n_done + j < len(lps) else None, want_lp)
                                 for j, tid in enumerate(ids)]
                n_done += len(ids)
                comp = CompletionOutput(index=0, text="", token_ids=list(ids), cumulative_logprob=None,
                                        logprobs=token_lps, finish_reason=script.finish if done else None)
                stats.num_generation_tokens = n_done
                out = RequestOutput(rid, None, req.prompt_ids, prompt_lp if k == 0 else None, [comp], done,
                                    metrics=stats)
                if done:
                    finished = True
                yield out
                await asyncio.sleep(0)  # another engine step
            if script.fail is not None and script.fail_after >= len(script.steps):
                raise script.fail
            if script.block:
                await aborted.wait()
            if script.block or aborted.is_set():
                finished = True
                yield RequestOutput(rid, None, req.prompt_ids, None,
                                    [CompletionOutput(0, "", [], None, [] if want_lp is not None else None,
                                                      finish_reason=ABORT)], True)
        finally:
            self.live.pop(rid, None)
            if not finished:
                self.closed.append(rid)

    def _logprob(self, tid: int, given: Lp | float | None, n: int) -> dict:
        from vllm.logprobs import Logprob

        if given is None:
            given = Lp(-1.0, 1, [(tid, -1.0)] + [(tid + j, -1.0 - j) for j in range(1, n)])
        elif not isinstance(given, Lp):
            given = Lp(float(given), 1, [(tid, float(given))])
        entries = {alt: Logprob(lp, rank, None) for rank, (alt, lp) in enumerate(given.top[:n], start=1)}
        entries[tid] = Logprob(given.logprob, given.rank, None)
        return entries

    def _prompt_logprobs(self, req: EngineRequest, script: Script) -> list:
        from vllm.logprobs import Logprob

        given = script.prompt_logprobs or []
        values = [given[i] if i < len(given) else -0.25 * (i + 1) for i in range(len(req.prompt_ids) - 1)]
        return [None] + [{tid: Logprob(lp, 1, None)} for tid, lp in zip(req.prompt_ids[1:], values)]

    async def render_images(self, prompt_ids: list[int], images: list, truncate: int | None):
        raise NotImplementedError("the scripted engine takes no images (multimodal is False)")

    async def warm_up(self) -> None:
        pass

    async def watch_remote_engines(self) -> None:
        pass  # no remote engines (remote_engines is 0)

    async def abort(self, request_id: str | list[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            self.aborts.append(rid)
            event = self.live.get(rid)
            if event is not None:
                event.set()

    def release_all(self) -> None:
        """End every blocked request as vLLM ends an aborted one."""
        for event in list(self.live.values()):
            event.set()

    async def check_health(self) -> None:
        self.health_checks += 1
        if self.errored:
            from vllm.v1.engine.exceptions import EngineDeadError

            raise EngineDeadError()

    def num_unfinished_requests(self) -> int:
        return len(self.live)

    def shutdown(self, timeout: float = 30.0) -> None:
        self.shut_down = True
        self.release_all()


def preload() -> None:
    """Import vLLM's output classes once, up front (seconds of CPU), rather than inside
    the first test that times a generation."""
    import vllm.logprobs  # noqa: F401
    import vllm.outputs  # noqa: F401
    import vllm.v1.engine.exceptions  # noqa: F401
    import vllm.v1.metrics.stats  # noqa: F401
    from vllm.exceptions import VLLMClientError  # noqa: F401  (the app's is_request_error)


def tiny_tokenizer_dir() -> Path:
    """The embedded tiny model's tokenizer files: the built model's when it is cached,
    else only its tokenizer (~10 s to train, vs ~70 s for the whole model), cached
    beside it under ``$TGI_COMPAT_CACHE``."""
    import shutil
    import tempfile

    from tgi_compat import tiny_model

    root = tiny_model.default_cache_dir()
    model = root / f"tiny-llama-{tiny_model._key()}"
    if (model / "tokenizer.json").exists():
        return model
    target = root / f"tiny-tokenizer-{tiny_model._key()}"
    if (target / "tokenizer_config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        tiny_model._build_tokenizer(tmp)
        try:
            tmp.rename(target)
        except OSError:  # a concurrent build won; its copy is identical
            if not (target / "tokenizer_config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def tiny_tokenizer() -> Tokenizer:
    from transformers import AutoTokenizer

    return Tokenizer(AutoTokenizer.from_pretrained(tiny_tokenizer_dir()))
