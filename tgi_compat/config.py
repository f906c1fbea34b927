"""Server configuration: one typed object built from TGI's launcher flags and env vars.

Every TGI flag also reads its UPPER_SNAKE env var (``--max-concurrent-requests`` <->
``MAX_CONCURRENT_REQUESTS``), as TGI's clap parser does; a flag on the command line
wins over the env var. Arguments this parser does not know are vLLM engine flags and
are passed to vLLM's own parser untouched.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

TRUE = {"1", "true", "yes", "on"}


@dataclass
class Config:
    model_id: str | None = None  # None: serve the embedded tiny model
    revision: str | None = None
    hostname: str = "0.0.0.0"
    port: int = 3000
    max_input_tokens: int | None = None  # None: max_total_tokens - 1
    max_total_tokens: int | None = None  # None: the engine's context length
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_best_of: int = 2
    max_concurrent_requests: int = 128
    max_client_batch_size: int = 4
    validation_workers: int = 2
    dtype: str | None = None
    num_shard: int | None = None
    trust_remote_code: bool = False
    payload_limit: int = 2_000_000
    api_key: str | None = None
    cors_allow_origin: list[str] = field(default_factory=list)
    json_output: bool = False
    disable_grammar_support: bool = False
    keep_alive_seconds: float = 15.0
    http_keep_alive_timeout: float = 75.0
    shutdown_timeout: float = 30.0
    health_stall_timeout: float = 60.0
    health_probe_timeout: float = 10.0
    engine_failure_grace: float = 5.0
    stay_up_on_engine_failure: bool = False
    log_level: str = "info"
    otlp_endpoint: str | None = None
    otlp_service_name: str = "text-generation-inference.router"
    lora_adapters: str | None = None
    watermark_gamma: float | None = None
    watermark_delta: float | None = None
    # Connection guards (tgi_compat/connection.py); not TGI flags.
    send_timeout: float = 60.0
    request_read_timeout: float = 60.0
    max_connections: int | None = None  # None: max(1024, 4 x max_concurrent_requests)
    engine_flags: list[str] = field(default_factory=list)  # vLLM flags, untouched

    def tgi_engine_flags(self) -> list[str]:
        """TGI flags that map onto vLLM engine flags."""
        flags: list[str] = []
        if self.revision:
            flags += ["--revision", self.revision]
        if self.dtype:
            flags += ["--dtype", self.dtype]
        if self.num_shard:
            flags += ["--tensor-parallel-size", str(self.num_shard)]
        if self.trust_remote_code:
            flags.append("--trust-remote-code")
        if self.max_total_tokens and "--max-model-len" not in " ".join(self.engine_flags):
            # The engine needs no more context than TGI's total-token limit allows.
            flags += ["--max-model-len", str(self.max_total_tokens)]
        return flags


def _env(name: str, default=None):
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def _env_bool(name: str) -> bool:
    return str(_env(name, "false")).lower() in TRUE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tgi-compat",
        description="Hugging Face text-generation-inference's HTTP API on vLLM's engine. "
        "Every flag also reads its UPPER_SNAKE env var. Flags not listed here are vLLM "
        "engine flags and are passed to vLLM untouched (listed after these).",
        add_help=False,
    )
    p.add_argument("-h", "--help", action="store_true", help="Show this help, then vLLM's engine flags, and exit.")
    a = p.add_argument
    a("--model-id", default=_env("MODEL_ID"), help="Hub model id or local path (MODEL_ID). Default: the embedded tiny test model.")
    a("--revision", default=_env("REVISION"), help="Model revision on the Hub (REVISION).")
    a("--hostname", default=_env("HOSTNAME", "0.0.0.0"), help="Address to bind (HOSTNAME). Default 0.0.0.0.")
    a("-p", "--port", type=int, default=int(_env("PORT", 3000)), help="Port to listen on (PORT). Default 3000.")
    a("--max-input-tokens", "--max-input-length", dest="max_input_tokens", type=int,
      default=_int_env("MAX_INPUT_TOKENS", "MAX_INPUT_LENGTH"),
      help="Longest prompt in tokens (MAX_INPUT_TOKENS). Default max_total_tokens - 1.")
    a("--max-total-tokens", type=int, default=_int_env("MAX_TOTAL_TOKENS"),
      help="Prompt plus generated tokens per request (MAX_TOTAL_TOKENS). Default: the model's context length.")
    a("--max-stop-sequences", type=int, default=int(_env("MAX_STOP_SEQUENCES", 4)), help="Most stop sequences per request (MAX_STOP_SEQUENCES). Default 4.")
    a("--max-top-n-tokens", type=int, default=int(_env("MAX_TOP_N_TOKENS", 5)), help="Largest top_n_tokens (MAX_TOP_N_TOKENS). Default 5.")
    a("--max-best-of", type=int, default=int(_env("MAX_BEST_OF", 2)), help="Largest best_of (MAX_BEST_OF). Default 2.")
    a("--max-concurrent-requests", type=int, default=int(_env("MAX_CONCURRENT_REQUESTS", 128)),
      help="Generations in flight before new ones are answered `overloaded` (MAX_CONCURRENT_REQUESTS). Default 128.")
    a("--max-client-batch-size", type=int, default=int(_env("MAX_CLIENT_BATCH_SIZE", 4)), help="Most prompts per /v1/completions request (MAX_CLIENT_BATCH_SIZE). Default 4.")
    a("--validation-workers", type=int, default=int(_env("VALIDATION_WORKERS", 2)), help="Reported in /info (VALIDATION_WORKERS); must be > 0. Default 2.")
    a("--dtype", default=_env("DTYPE"), help="Weights dtype, e.g. float16, bfloat16 (DTYPE). Maps to vLLM --dtype.")
    a("--num-shard", type=int, default=_int_env("NUM_SHARD"), help="Number of GPUs to shard over (NUM_SHARD). Maps to vLLM --tensor-parallel-size.")
    a("--trust-remote-code", action="store_true", default=_env_bool("TRUST_REMOTE_CODE"), help="Allow custom model code from the Hub (TRUST_REMOTE_CODE).")
    a("--payload-limit", type=int, default=int(_env("PAYLOAD_LIMIT", 2_000_000)), help="Largest request body in bytes (PAYLOAD_LIMIT). Default 2000000.")
    a("--api-key", default=_env("API_KEY"), help="Require `Authorization: Bearer <key>` on generation routes (API_KEY).")
    a("--cors-allow-origin", action="append", default=[o for o in (_env("CORS_ALLOW_ORIGIN") or "").split(",") if o],
      help="Allowed CORS origin; repeatable (CORS_ALLOW_ORIGIN, comma-separated). Default: any.")
    a("--json-output", action="store_true", default=_env_bool("JSON_OUTPUT"), help="Log JSON lines (JSON_OUTPUT).")
    a("--disable-grammar-support", action="store_true", default=_env_bool("DISABLE_GRAMMAR_SUPPORT"), help="Refuse `grammar` (DISABLE_GRAMMAR_SUPPORT).")
    a("--keep-alive-seconds", type=float, default=float(_env("KEEP_ALIVE_SECONDS", 15.0)), help="SSE keep-alive comment after this much silence (KEEP_ALIVE_SECONDS). Default 15.")
    a("--http-keep-alive-timeout", type=float, default=float(_env("HTTP_KEEP_ALIVE_TIMEOUT", 75.0)),
      help="Seconds an idle keep-alive connection stays open (HTTP_KEEP_ALIVE_TIMEOUT). Default 75: longer than "
      "clients' own pool timeouts, so a client never reuses a connection the server is closing.")
    a("--shutdown-timeout", type=float, default=float(_env("SHUTDOWN_TIMEOUT", 30.0)), help="Seconds in-flight requests may run after SIGTERM (SHUTDOWN_TIMEOUT). Default 30.")
    a("--health-stall-timeout", type=float, default=float(_env("HEALTH_STALL_TIMEOUT", 60.0)),
      help="/health answers 503 when requests wait and the engine has produced nothing for this long (HEALTH_STALL_TIMEOUT). Default 60.")
    a("--health-probe-timeout", type=float, default=float(_env("HEALTH_PROBE_TIMEOUT", 10.0)),
      help="Timeout of the 1-token generation /health runs after a failed generation (HEALTH_PROBE_TIMEOUT). Default 10.")
    a("--engine-failure-grace", type=float, default=float(_env("ENGINE_FAILURE_GRACE", 5.0)),
      help="Seconds between the engine dying and the process exiting with status 1 (ENGINE_FAILURE_GRACE). Default 5.")
    a("--stay-up-on-engine-failure", action="store_true", default=_env_bool("STAY_UP_ON_ENGINE_FAILURE"),
      help="Keep serving 503s after the engine dies instead of exiting (STAY_UP_ON_ENGINE_FAILURE).")
    a("--otlp-endpoint", default=_env("OTLP_ENDPOINT"), help="OTLP/gRPC endpoint for request traces, e.g. http://127.0.0.1:4317 (OTLP_ENDPOINT).")
    a("--otlp-service-name", default=_env("OTLP_SERVICE_NAME", "text-generation-inference.router"), help="Service name of the traces (OTLP_SERVICE_NAME).")
    a("--lora-adapters", default=_env("LORA_ADAPTERS"),
      help="LoRA adapters to load, `id`, `id=path` or `id@revision`, comma-separated (LORA_ADAPTERS); "
      "requests pick one with `adapter_id` (OpenAI routes: `model`).")
    a("--watermark-gamma", type=float, default=_float_env("WATERMARK_GAMMA"),
      help="Green-list fraction of the vocabulary for `watermark` (WATERMARK_GAMMA). Default 0.5.")
    a("--watermark-delta", type=float, default=_float_env("WATERMARK_DELTA"),
      help="Logit bias of green-list tokens for `watermark` (WATERMARK_DELTA). Default 2.0.")
    a("--log-level", default=_env("LOG_LEVEL", "info"), help="Log level (LOG_LEVEL). Default info.")
    # Connection guards (tgi_compat/connection.py): our own flags, not TGI's.
    a("--send-timeout", type=float, default=float(_env("SEND_TIMEOUT", 60.0)),
      help="Close a connection whose client has read nothing for this many seconds while a response waits "
      "(SEND_TIMEOUT); its generation is aborted and its permit released. Default 60 (nginx's send_timeout).")
    a("--request-read-timeout", type=float, default=float(_env("REQUEST_READ_TIMEOUT", 60.0)),
      help="A request's headers and body must arrive within this many seconds of its first byte, else 408 "
      "(REQUEST_READ_TIMEOUT). Default 60.")
    a("--max-connections", type=int, default=_int_env("MAX_CONNECTIONS"),
      help="Open connections before the longest-idle one is closed, or, if none is idle, new requests are "
      "answered 503 `overloaded` (MAX_CONNECTIONS). Default max(1024, 4 x max_concurrent_requests).")
    return p


def _float_env(name: str) -> float | None:
    value = _env(name)
    return None if value is None else float(value)


def _int_env(*names: str) -> int | None:
    for name in names:
        value = _env(name)
        if value is not None:
            return int(value)
    return None


class ConfigError(ValueError):
    pass


def parse_config(argv: list[str] | None = None) -> tuple[Config, bool]:
    """(config, help_requested). Unknown flags become ``Config.engine_flags``."""
    parser = build_parser()
    ns, rest = parser.parse_known_args(argv)
    values = vars(ns)
    help_requested = values.pop("help")
    config = Config(**values, engine_flags=rest)
    if config.validation_workers <= 0:
        raise ConfigError("`validation_workers` must be > 0")
    if config.max_concurrent_requests <= 0:
        raise ConfigError("`max_concurrent_requests` must be > 0")
    if (
        config.max_input_tokens is not None
        and config.max_total_tokens is not None
        and config.max_input_tokens >= config.max_total_tokens
    ):
        raise ConfigError("`max_input_tokens` must be < `max_total_tokens`")
    if config.max_connections is not None and config.max_connections < config.max_concurrent_requests:
        raise ConfigError("`max_connections` must be >= `max_concurrent_requests`")
    if config.send_timeout <= 0 or config.request_read_timeout <= 0:
        raise ConfigError("`send_timeout` and `request_read_timeout` must be > 0")
    from tgi_compat.adapters import parse_lora_adapters

    try:
        parse_lora_adapters(config.lora_adapters)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return config, help_requested
