"""Server configuration: one typed object built from TGI's launcher flags and env vars.

The flags themselves (names, env vars, parsing, what each maps to) are declared in
``tgi_compat.launcher``; this module holds the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tgi_compat.logs import LogLevels, parse_log_levels

# ``--model-id embedded:<name>``: models built offline for tests and demos (module, builder).
EMBEDDED_MODELS = {
    "tiny": ("tgi_compat.tiny_model", "build_tiny_model"),
    "tiny-vlm": ("tgi_compat.tiny_vlm", "build_tiny_vlm"),
    "smollm2": ("tgi_compat.smollm2", "build_smollm2"),
}


def build_embedded_model(model_id: str) -> str:
    """The directory of ``embedded:<name>``, built on first use (``EmbeddedModelError`` if it cannot be)."""
    import importlib

    module, builder = EMBEDDED_MODELS[model_id.removeprefix("embedded:")]
    return str(getattr(importlib.import_module(module), builder)())


@dataclass
class Config:
    model_id: str | None = None  # None: serve the embedded tiny model (`embedded:tiny`)
    model_path: str | None = None  # what vLLM loads, once resolved (an embedded model's directory)
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
    cors_allow_origin: tuple[str, ...] = ()
    json_output: bool = False
    disable_grammar_support: bool = False
    keep_alive_seconds: float = 15.0
    http_keep_alive_timeout: float = 75.0
    shutdown_timeout: float = 30.0
    health_stall_timeout: float = 60.0
    health_probe_timeout: float = 10.0
    engine_failure_grace: float = 5.0
    stay_up_on_engine_failure: bool = False
    log_level: LogLevels = field(default_factory=lambda: parse_log_levels("info"))  # TGI's LOG_LEVEL
    otlp_endpoint: str | None = None
    otlp_service_name: str = "text-generation-inference.router"
    lora_adapters: str | None = None
    watermark_gamma: float | None = None
    watermark_delta: float | None = None
    sharded: bool | None = None
    quantize: str | None = None
    speculate: int | None = None
    kv_cache_dtype: str | None = None
    max_batch_prefill_tokens: int | None = None
    max_batch_total_tokens: int | None = None  # the KV-cache budget in tokens
    max_batch_size: int | None = None
    cuda_graphs: list[int] | None = None
    prometheus_port: int = 9000
    huggingface_hub_cache: str | None = None
    weights_cache_override: str | None = None
    cuda_memory_fraction: float | None = None
    rope_scaling: str | None = None
    rope_factor: float | None = None
    tokenizer_config_path: str | None = None
    print_env: bool = False  # --env
    usage_stats: str = "on"
    # Images in prompts (multimodal models): TGI's router flag, then tgi-compat's own bounds.
    max_image_fetch_size: int = 1_073_741_824
    image_fetch_timeout: float = 10.0
    max_images_per_request: int = 8
    max_image_pixels: int = 50_000_000
    image_fetch_allow: tuple[str, ...] = ()
    # Connection guards (tgi_compat/connection.py).
    send_timeout: float = 60.0
    request_read_timeout: float = 60.0
    max_connections: int | None = None  # None: max(1024, 4 x max_concurrent_requests)
    # Vertex AI (tgi_compat/vertex/env.py): AIP_PREDICT_ROUTE, AIP_HEALTH_ROUTE, AIP_STORAGE_URI.
    aip_predict_route: str | None = None
    aip_health_route: str | None = None
    storage_uri: str | None = None  # gs://...: downloaded at start-up, then served as model_id
    storage_timeout: float = 60.0
    headless: bool = False  # engines only (data parallel), for a front end on another node
    api_server_count: int = 1  # API processes over one set of engines (tgi_compat/api_servers.py)
    engine_flags: list[str] = field(default_factory=list)  # vLLM flags, as given
    # AsyncEngineArgs fields set by TGI flags (those an explicit vLLM flag also set are left out).
    engine_overrides: dict[str, Any] = field(default_factory=dict)
    engine_explicit: list[str] = field(default_factory=list)  # AsyncEngineArgs fields vLLM flags set
    notices: list[str] = field(default_factory=list)  # start-up log lines (no-effect flags, conflicts)

    @property
    def hub_cache(self) -> str | None:
        """Where Hub downloads go when a TGI flag says so (None: huggingface_hub's own default)."""
        return self.engine_overrides.get("download_dir")


class ConfigError(ValueError):
    """A configuration error: reported as one message, exit status 2, before anything starts."""


class EmbeddedModelError(RuntimeError):
    """An embedded model could not be fetched or built: one message, exit status 1 (the
    command line was valid; as TGI's launcher exits 1 when its weight download fails)."""

