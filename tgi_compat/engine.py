"""The engine seam: everything the spec layers know about vLLM lives here.

Spec layers (``tgi_compat.tgi``) hand over token ids and ``SamplingParams`` keyword
arguments and get ``RequestOutput`` deltas back; they never import vLLM themselves.
Only vLLM's top-level exports are used where they exist, since internal paths move
between releases.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from tgi_compat.tokens import Tokenizer

logger = logging.getLogger("tgi_compat.engine")

GiB = 1 << 30


def engine_arg_parser():
    """vLLM's own engine-flag parser (used for pass-through flags and --help)."""
    from vllm import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(prog="tgi-compat", add_help=False))


# TGI's typical_p and watermark run inside vLLM's sampler (tgi_compat/logits.py).
LOGITS_PROCESSORS = ["tgi_compat.logits:TypicalPLogitsProcessor", "tgi_compat.logits:WatermarkLogitsProcessor"]


def build_engine_args(model: str, tgi_flags: list[str], passthrough: list[str], lora_paths: dict[str, str] | None = None):
    """``AsyncEngineArgs`` from TGI flags mapped to vLLM's names plus untouched vLLM flags.

    Pass-through flags come last, so an explicit vLLM flag wins over a mapped TGI one.
    ``lora_paths`` (adapter id -> local directory) switches vLLM's LoRA support on.
    """
    from vllm import AsyncEngineArgs

    ns = engine_arg_parser().parse_args(["--model", model, *tgi_flags, *passthrough])
    args = AsyncEngineArgs.from_cli_args(ns)
    given = " ".join(passthrough)
    if args.speculative_config is None:  # vLLM refuses custom logits processors with speculation
        args.logits_processors = [*(args.logits_processors or []), *LOGITS_PROCESSORS]
    if lora_paths:
        from tgi_compat.adapters import lora_rank, vllm_max_rank

        args.enable_lora = True
        if "--max-lora-rank" not in given:
            args.max_lora_rank = vllm_max_rank([lora_rank(p) for p in lora_paths.values()])
        if "--max-loras" not in given:
            # One slot more than adapters: vLLM's CPU LoRA kernels read slot -1 for
            # "no adapter", i.e. the last slot, which must stay empty (vLLM #48421).
            args.max_loras = len(lora_paths) + 1
    if "--structured-outputs-config" not in given:
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
    if _on_cpu() and "--gpu-memory-utilization" not in given and "--kv-cache-memory" not in given:
        # On CPU, gpu_memory_utilization is a share of NUMA node 0's RAM and vLLM's
        # default (0.92) fails on small hosts; a fixed KV cache is the portable default.
        if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            args.kv_cache_memory_bytes = GiB
    return args


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _step_logger_factory(engine: Engine):
    """A vLLM stat logger that hands each engine step's statistics to ``engine.on_step``.

    vLLM keeps its own loggers (and its Prometheus metrics) beside this one.
    """
    from vllm.v1.metrics.loggers import StatLoggerBase

    class StepLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            self.engine = engine

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            callback = self.engine.on_step
            if callback is not None:
                callback(scheduler_stats, iteration_stats)

        def log_engine_initialized(self):
            pass

    return StepLogger


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


def is_request_error(exc: BaseException) -> bool:
    """vLLM refused the request itself (e.g. a grammar it cannot compile), as opposed
    to failing while running it."""
    from vllm.exceptions import VLLMClientError

    return isinstance(exc, (ValueError, VLLMClientError))


class Engine:
    """A running vLLM ``AsyncLLM`` and the served model's tokenizer."""

    def __init__(self, engine_args, lora_paths: dict[str, str] | None = None):
        from transformers import AutoTokenizer
        from vllm import AsyncLLMEngine

        self.engine_args = engine_args
        # Called once per engine step with vLLM's (scheduler_stats, iteration_stats).
        self.on_step = None
        self.llm = AsyncLLMEngine.from_engine_args(engine_args, stat_loggers=[_step_logger_factory(self)])
        model_config = self.llm.model_config
        self.max_model_len: int = model_config.max_model_len
        cache = self.llm.vllm_config.cache_config
        self.kv_capacity_tokens: int = (cache.num_gpu_blocks or 0) * cache.block_size
        self.tokenizer = Tokenizer(
            AutoTokenizer.from_pretrained(
                engine_args.tokenizer or engine_args.model,
                revision=engine_args.tokenizer_revision or engine_args.revision,
                trust_remote_code=engine_args.trust_remote_code,
            )
        )
        self.dtype = str(model_config.dtype)
        from vllm.lora.request import LoRARequest

        self.adapters = {
            name: LoRARequest(name, index, path) for index, (name, path) in enumerate((lora_paths or {}).items(), start=1)
        }

    def generate(self, prompt_ids: list[int], sampling: dict[str, Any], request_id: str) -> AsyncIterator:
        """Delta ``RequestOutput``s; closing the iterator aborts the request in the engine."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        adapter = sampling.pop("adapter", None)
        structured = sampling.pop("structured", None)
        if structured is not None:
            sampling["structured_outputs"] = _structured_outputs(*structured)
        params = SamplingParams(output_kind=RequestOutputKind.DELTA, **sampling)
        lora = self.adapters[adapter] if adapter is not None else None
        return self.llm.generate({"prompt_token_ids": prompt_ids}, params, request_id, lora_request=lora)

    async def abort(self, request_id: str | list[str]) -> None:
        await self.llm.abort(request_id)

    @property
    def errored(self) -> bool:
        return self.llm.errored

    async def check_health(self) -> None:
        await self.llm.check_health()

    def num_unfinished_requests(self) -> int:
        return self.llm.get_num_unfinished_requests()

    def shutdown(self, timeout: float = 30.0) -> None:
        self.llm.shutdown(timeout=timeout)
