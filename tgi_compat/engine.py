"""The engine seam: everything the spec layers know about vLLM lives here.

Spec layers (``tgi_compat.tgi``, ``tgi_compat.openai``) hand ``Engine.generate`` one typed
``EngineRequest`` (prompt ids, ``Sampling``, adapter, structured-output constraint, request
id) and get vLLM ``RequestOutput`` deltas back; they never import vLLM themselves. Only
vLLM's top-level exports are used where they exist, since internal paths move between
releases.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from tgi_compat.tokens import Tokenizer

logger = logging.getLogger("tgi_compat.engine")

GiB = 1 << 30


@dataclass(frozen=True, slots=True)
class Sampling:
    """vLLM ``SamplingParams`` fields, with vLLM's meanings and defaults (temperature 0 is
    greedy). The engine produces token ids only: detokenization and stop strings are the
    spec layer's (one event per token, TGI's stop-sequence rules)."""

    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # top-n alternatives per token (0: the chosen token's only)
    prompt_logprobs: int | None = None
    extra_args: dict[str, Any] | None = None  # settings for our logits processors (logits.py)


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One generation as the engine runs it: built once by validation, used by every
    caller (the routes, best_of's sequences, the health probe)."""

    request_id: str
    prompt_ids: list[int]
    sampling: Sampling
    adapter: str | None = None  # a loaded LoRA adapter's name
    # ("json", schema) | ("json_object", True) | ("regex", pattern)
    structured: tuple[str, Any] | None = None
    # vLLM's processed multimodal prompt from ``Engine.render_images`` (prompt_ids are its ids)
    mm_input: Any = None


def engine_arg_parser():
    """vLLM's own engine-flag parser (used for pass-through flags and --help)."""
    from vllm import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(prog="tgi-compat", add_help=False, allow_abbrev=False))


# TGI's typical_p and watermark run inside vLLM's sampler (tgi_compat/logits.py).
LOGITS_PROCESSORS = ["tgi_compat.logits:TypicalPLogitsProcessor", "tgi_compat.logits:WatermarkLogitsProcessor"]


def build_engine_args(
    model: str,
    passthrough: list[str],
    overrides: dict[str, Any] | None = None,
    lora_paths: dict[str, str] | None = None,
    kv_token_budget: int | None = None,
):
    """``AsyncEngineArgs`` from untouched vLLM flags plus the fields TGI flags map onto.

    ``overrides`` (``Config.engine_overrides``) holds only fields no explicit vLLM flag set,
    so an explicit vLLM flag wins. ``lora_paths`` (adapter id -> local directory) switches
    vLLM's LoRA support on. ``kv_token_budget`` (TGI's --max-batch-total-tokens) sizes the
    KV cache in tokens.
    """
    from vllm import AsyncEngineArgs

    parser = engine_arg_parser()
    ns = parser.parse_args(["--model", model, *passthrough])
    args = AsyncEngineArgs.from_cli_args(ns)
    for action in parser._actions:  # what the vLLM flags set explicitly
        action.default = argparse.SUPPRESS
    given = set(vars(parser.parse_args(passthrough)))
    for name, value in (overrides or {}).items():
        setattr(args, name, value)
    given |= set(overrides or {})
    if args.speculative_config is None:  # vLLM refuses custom logits processors with speculation
        args.logits_processors = [*(args.logits_processors or []), *LOGITS_PROCESSORS]
    if lora_paths:
        from tgi_compat.adapters import lora_rank, vllm_max_rank

        args.enable_lora = True
        if "max_lora_rank" not in given:
            args.max_lora_rank = vllm_max_rank([lora_rank(p) for p in lora_paths.values()])
        if "max_loras" not in given:
            # One slot more than adapters: vLLM's CPU LoRA kernels read slot -1 for
            # "no adapter", i.e. the last slot, which must stay empty (vLLM #48421).
            args.max_loras = len(lora_paths) + 1
    if "structured_outputs_config" not in given:
        # JSON grammars are generated compact: TGI's outlines regex allows at most one
        # space between tokens, and a model free to emit unbounded whitespace (vLLM's
        # default) may never close the object.
        # vLLM allows that only with a named backend; llguidance covers the most JSON
        # schema and regex.
        so = args.structured_outputs_config
        if so.backend == "auto":
            so.backend = "guidance"
        so.disable_any_whitespace = True
        # outlines (TGI) allows only the listed properties unless told otherwise.
        so.disable_additional_properties = True
    if _on_cpu() and not given & {"gpu_memory_utilization", "kv_cache_memory_bytes"}:
        # On CPU, gpu_memory_utilization is a share of NUMA node 0's RAM and vLLM's
        # default (0.92) fails on small hosts; a fixed KV cache is the portable default
        # (a block count from --max-batch-total-tokens still decides the size).
        if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            args.kv_cache_memory_bytes = GiB
    if kv_token_budget is not None and "num_gpu_blocks_override" not in given:
        args.num_gpu_blocks_override = kv_blocks_for(args, kv_token_budget)
    return args


def kv_blocks_for(args, tokens: int) -> int:
    """KV-cache blocks holding ``tokens`` tokens, with the block size vLLM resolves for this
    model and platform (it depends on both)."""
    import copy
    import math

    block_size = args.block_size or copy.deepcopy(args).create_engine_config().cache_config.block_size
    return max(1, math.ceil(tokens / block_size))


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _step_logger_factory(engine: Engine):
    """A vLLM stat logger that hands each engine step's statistics to ``engine.on_step``,
    with the index of the engine (data-parallel rank) that ran the step.

    vLLM keeps its own loggers (and its Prometheus metrics) beside this one.
    """
    from vllm.v1.metrics.loggers import StatLoggerBase

    class StepLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            self.engine = engine
            # vLLM makes one of these per engine (data parallel: one per DP rank).
            self.engine_index = engine_index

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            callback = self.engine.on_step
            if callback is not None:
                callback(scheduler_stats, iteration_stats, self.engine_index)

        def log_engine_initialized(self):
            pass

    return StepLogger


def _engine_client(engine_args, client: dict, stat_loggers):
    """``AsyncLLM`` as client ``client_index`` of ``client_count`` to engines started by
    ``SharedEngines`` in another process (what vLLM's API server workers build)."""
    from vllm import AsyncLLMEngine

    client = dict(client)
    count, index = client.pop("client_count"), client.pop("client_index")
    client.pop("api_server_loads", None)  # vLLM's accept balancing, for its own uvicorn server
    engine_args._api_process_count, engine_args._api_process_rank = count, index
    vllm_config = engine_args.create_engine_config()
    return AsyncLLMEngine.from_vllm_config(
        vllm_config, stat_loggers=stat_loggers, enable_log_requests=engine_args.enable_log_requests,
        disable_log_stats=engine_args.disable_log_stats, client_addresses=client, client_count=count,
        client_index=index,
    )


class SharedEngines:
    """vLLM's engine processes for ``count`` API processes, and those processes: vLLM's own
    machinery of ``vllm serve --api-server-count`` (``bind_engine_zmq_listeners``,
    ``launch_core_engines``, ``APIServerProcessManager`` with our worker function as its
    ``target_server_fn``). Each API process gets ``(listen_address, sock, worker_args,
    client_config)`` and builds ``Engine(..., client=client_config)``.

    ``make_worker_args(num_engines)`` builds what the workers are handed (after vLLM's
    configuration says how many engines there are). Returns once the engines are up."""

    def __init__(self, engine_args, count: int, target, make_worker_args, listen_address: str, sock):
        from vllm.v1.engine.utils import bind_engine_zmq_listeners, launch_core_engines
        from vllm.v1.executor import Executor
        from vllm.v1.utils import APIServerProcessManager

        engine_args._api_process_count, engine_args._api_process_rank = count, -1
        vllm_config = engine_args.create_engine_config()
        self.num_engines: int = vllm_config.parallel_config.data_parallel_size
        worker_args = make_worker_args(self.num_engines)
        # Kept for the server's life: vLLM's listeners unlink their ipc socket files when
        # collected (`EngineZmqListeners.__del__`), and an engine that has not connected to
        # them yet then never does (ENOENT, retried forever: the start-up hang of issue 23).
        self.listeners = listeners = bind_engine_zmq_listeners(vllm_config, count)
        with launch_core_engines(vllm_config, Executor.get_class(vllm_config), not engine_args.disable_log_stats,
                                 listeners.addresses) as launch:
            self.engine_manager = launch.engine_manager
            self.coordinator = launch.coordinator
            self.api = APIServerProcessManager(
                listen_address=listen_address, sock=sock, args=worker_args, num_servers=count,
                input_listeners=listeners.inputs, output_listeners=listeners.outputs, target_server_fn=target,
                stats_update_address=self.coordinator.get_stats_publish_address() if self.coordinator else None,
                tensor_queue=launch.tensor_queue,
            )
            # An API process that dies while the engines start aborts the start.
            launch.watched_frontend_processes = self.api.processes

    @property
    def api_processes(self) -> list:
        return self.api.processes

    @property
    def engine_processes(self) -> list:
        """The engine (and data-parallel coordinator) processes on this node."""
        procs = list(getattr(self.engine_manager, "processes", None) or [])
        if self.coordinator is not None:
            procs.append(self.coordinator.proc)
        return procs

    def stop_engines(self, timeout: float | None = None) -> None:
        if self.engine_manager is not None:
            self.engine_manager.shutdown(timeout=timeout)
        if self.coordinator is not None:
            self.coordinator.shutdown(timeout=timeout)

    def stop_api_processes(self, timeout: float | None = None) -> None:
        """SIGTERM, then SIGKILL after ``timeout``, to whichever API process is left."""
        self.api.shutdown(timeout=timeout)
        self.listeners.cleanup()


def setup_multiprocess_prometheus() -> None:
    """vLLM's ``vllm:*`` series written to files every API process reads (prometheus_client's
    multiprocess mode, in a directory vLLM makes and removes: PROMETHEUS_MULTIPROC_DIR)."""
    from vllm.v1.metrics.prometheus import setup_multiprocess_prometheus as setup

    setup()


def _structured_outputs(kind: str, value):
    """vLLM's structured-outputs constraint for a TGI grammar."""
    from vllm.sampling_params import StructuredOutputsParams

    if kind == "regex":
        return StructuredOutputsParams(regex=value)
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    return StructuredOutputsParams(json=_objects_typed(value))


def _objects_typed(schema):
    """outlines (TGI) reads a schema with ``properties`` as an object; JSON Schema
    itself also accepts non-objects there, so say it explicitly."""
    if isinstance(schema, dict):
        out = {k: _objects_typed(v) for k, v in schema.items()}
        if "properties" in out and "type" not in out:
            out["type"] = "object"
        return out
    if isinstance(schema, list):
        return [_objects_typed(v) for v in schema]
    return schema


def _takes_images(model_config) -> bool:
    mm = model_config.multimodal_config
    # `--limit-mm-per-prompt '{"image": 0}'` switches images off.
    return mm is not None and mm.get_limit_per_prompt("image") > 0


def _image_placeholder(model_config) -> str:
    """The text that stands for one image in this model's prompts (vLLM's own, from the
    model class: ``<image>`` for Idefics 3 and LLaVA, Qwen2-VL's vision pad, ...); empty
    for models that place images themselves (PaliGemma prepends them)."""
    from vllm.model_executor.models.registry import ModelRegistry

    cls, _ = ModelRegistry.resolve_model_cls(model_config.architectures, model_config)
    try:
        return cls.get_placeholder_str("image", 1) or ""
    except ValueError:
        return ""


def is_request_error(exc: BaseException) -> bool:
    """vLLM refused the request itself (e.g. a grammar it cannot compile), as opposed
    to failing while running it."""
    from vllm.exceptions import VLLMClientError

    return isinstance(exc, (ValueError, VLLMClientError))


class EngineClient(Protocol):
    """What the app uses of an engine: ``Engine`` (vLLM) and the tests' ``ScriptedEngine``
    both provide exactly this (tests/unit/test_engine_client.py holds them to it)."""

    tokenizer: Tokenizer
    engine_args: Any  # vLLM's AsyncEngineArgs (``.model``: what was served)
    max_model_len: int
    kv_capacity_tokens: int
    num_engines: int  # data-parallel engines, local and remote
    adapters: dict[str, Any]  # loaded LoRA adapters by name
    multimodal: bool  # the model takes images
    image_placeholder: str
    max_images: int
    dtype: str
    # Called once per engine step with vLLM's (scheduler_stats, iteration_stats, engine index).
    on_step: Any

    @property
    def errored(self) -> bool: ...

    @property
    def remote_engines(self) -> int: ...

    def generate(self, req: EngineRequest) -> AsyncIterator: ...

    async def render_images(self, prompt_ids: list[int], images: list, truncate: int | None) -> tuple[list[int], Any]: ...

    async def warm_up(self) -> None: ...

    async def abort(self, request_id: str | list[str]) -> None: ...

    async def watch_remote_engines(self) -> None: ...

    async def check_health(self) -> None: ...

    def num_unfinished_requests(self) -> int: ...

    def shutdown(self, timeout: float = 30.0) -> None: ...


class Engine:
    """A running vLLM ``AsyncLLM`` and the served model's tokenizer (an ``EngineClient``)."""

    def __init__(self, engine_args, lora_paths: dict[str, str] | None = None, client: dict | None = None):
        """``client``: vLLM's ``client_config`` of one of several API processes
        (``--api-server-count``): the engines are another process's (``SharedEngines``)
        and this is one of their clients; else this starts and owns its engines."""
        from transformers import AutoTokenizer
        from vllm import AsyncLLMEngine

        self.engine_args = engine_args
        # Called once per engine step with vLLM's (scheduler_stats, iteration_stats, engine index).
        self.on_step = None
        self._closing = False
        self.owns_engines = client is None
        if client is None:
            self.llm = AsyncLLMEngine.from_engine_args(engine_args, stat_loggers=[_step_logger_factory(self)])
        else:
            self.llm = _engine_client(engine_args, client, [_step_logger_factory(self)])
        model_config = self.llm.model_config
        self.max_model_len: int = model_config.max_model_len
        cache = self.llm.vllm_config.cache_config
        # Data parallel: engines on this node and on others (headless), one scheduler each.
        self.num_engines: int = self.llm.vllm_config.parallel_config.data_parallel_size
        # vLLM sums the KV blocks of every engine (local and remote) at start-up.
        self.kv_capacity_tokens: int = (cache.num_gpu_blocks or 0) * cache.block_size
        self.tokenizer = Tokenizer(
            AutoTokenizer.from_pretrained(
                engine_args.tokenizer or engine_args.model,
                revision=engine_args.tokenizer_revision or engine_args.revision,
                cache_dir=engine_args.download_dir,
                trust_remote_code=engine_args.trust_remote_code,
            )
        )
        self.dtype = str(model_config.dtype)
        # A model that takes images: `![](...)` in prompts become images (TGI's rule).
        self.multimodal: bool = bool(model_config.is_multimodal_model) and _takes_images(model_config)
        self.image_placeholder: str = _image_placeholder(model_config) if self.multimodal else ""
        self.max_images: int = model_config.multimodal_config.get_limit_per_prompt("image") if self.multimodal else 0
        from vllm.lora.request import LoRARequest

        self.adapters = {
            name: LoRARequest(name, index, path) for index, (name, path) in enumerate((lora_paths or {}).items(), start=1)
        }

    async def render_images(self, prompt_ids: list[int], images: list, truncate: int | None) -> tuple[list[int], Any]:
        """(prompt ids with the image tokens, vLLM's processed multimodal prompt) for a
        prompt whose ``image_placeholder``s stand for ``images`` (PIL), in order.

        vLLM's own input processor expands each placeholder into the model's image tokens,
        so the ids are exactly what the engine will see. ``truncate`` keeps the last
        tokens, but never cuts into an image (``ValueError``). Raises ``ValueError`` for
        a prompt the processor refuses (e.g. more images than the model accepts).
        """
        import time
        from dataclasses import replace

        prompt = {"prompt_token_ids": prompt_ids, "multi_modal_data": {"image": images}}
        try:
            mm_input = await self.llm.renderer.process_for_engine_async(prompt, time.time())
        except Exception as e:  # vLLM's processor refusing the prompt or an image
            raise ValueError(str(e) or type(e).__name__) from e
        ids = list(mm_input["prompt_token_ids"])
        if truncate is not None and len(ids) > truncate:
            start = len(ids) - truncate
            spans = mm_input["mm_placeholders"]
            if any(p.offset < start for ranges in spans.values() for p in ranges):
                raise ValueError(
                    f"`truncate` ({truncate}) would cut into an image: the prompt has {len(ids)} tokens with its images"
                )
            mm_input["mm_placeholders"] = {
                m: [replace(p, offset=p.offset - start) for p in ranges] for m, ranges in spans.items()
            }
            ids = ids[start:]
            mm_input["prompt_token_ids"] = ids
        return ids, mm_input

    def generate(self, req: EngineRequest) -> AsyncIterator:
        """Delta ``RequestOutput``s; closing the iterator aborts the request in the engine."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        s = req.sampling
        params = SamplingParams(
            output_kind=RequestOutputKind.DELTA,
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            seed=s.seed,
            repetition_penalty=s.repetition_penalty,
            frequency_penalty=s.frequency_penalty,
            logprobs=s.logprobs,
            prompt_logprobs=s.prompt_logprobs,
            extra_args=s.extra_args,
            structured_outputs=_structured_outputs(*req.structured) if req.structured is not None else None,
            detokenize=False,
            skip_special_tokens=False,
        )
        lora = self.adapters[req.adapter] if req.adapter is not None else None
        # A copy: vLLM stamps the prompt it is given, and best_of sends one prompt several times.
        prompt = dict(req.mm_input) if req.mm_input is not None else {"prompt_token_ids": req.prompt_ids}
        return self.llm.generate(prompt, params, req.request_id, lora_request=lora)

    async def warm_up(self) -> None:
        """Run, before the server is ready, what vLLM compiles lazily on first use, so no
        user request pays for it: the logprob-rank kernel (``torch.compile`` of
        ``batched_count_greater_than``, 10-20 s on first use here), for token and prompt
        logprobs. One small greedy request on the base model per engine (data parallel:
        vLLM spreads concurrent requests over its engines); the kernel is shared by every
        adapter and batch size (vLLM marks the batch dimension dynamic)."""
        prompt = self.tokenizer.encode("warm up")

        async def one(i: int) -> None:
            req = EngineRequest(f"warm-up-{i}", prompt, Sampling(max_tokens=2, logprobs=1, prompt_logprobs=0))
            async for _ in self.generate(req):
                pass

        await asyncio.gather(*(one(i) for i in range(self.num_engines)))

    async def abort(self, request_id: str | list[str]) -> None:
        await self.llm.abort(request_id)

    @property
    def errored(self) -> bool:
        return self.llm.errored

    @property
    def remote_engines(self) -> int:
        """Engines this process did not start, connected to it: data-parallel engines on
        other nodes (headless), or every engine for one of several API processes."""
        parallel = self.llm.vllm_config.parallel_config
        if not self.owns_engines:
            return parallel.data_parallel_size
        return parallel.data_parallel_size - parallel.data_parallel_size_local

    async def watch_remote_engines(self) -> None:
        """Treat a headless engine (or, for one of several API processes, any engine)
        that went away as a dead engine.

        vLLM watches the engine processes it started itself (their death fails every
        request and marks the engine errored) but not engines another process started: a
        request on such an engine that was killed would wait forever. Every engine holds a connection
        to the front end's request socket; when one closes while we are not shutting
        down, this does what vLLM does for a local engine's death: mark the engines dead
        and shut the client down, which ends every request with an error.
        """
        import zmq
        from zmq.utils.monitor import parse_monitor_message

        core = self.llm.engine_core
        monitor = core.resources.input_socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if self._closing or self.llm.errored:
                    return
                logger.error("a data-parallel engine disconnected (%s): treating it as dead", event["endpoint"])
                core.resources.engine_dead = True
                # Blocking (it stops this node's engines too): off the event loop.
                await asyncio.to_thread(core.shutdown)
                return
        finally:
            monitor.close(linger=0)

    async def check_health(self) -> None:
        await self.llm.check_health()

    def num_unfinished_requests(self) -> int:
        return self.llm.get_num_unfinished_requests()

    def shutdown(self, timeout: float = 30.0) -> None:
        self._closing = True
        self.llm.shutdown(timeout=timeout)
