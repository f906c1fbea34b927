"""The HTTP server: app assembly, engine lifecycle, errors mapped to HTTP in one place."""

from __future__ import annotations

import ipaddress
import os
import logging
import subprocess
from contextlib import asynccontextmanager
from pathlib import Path

import orjson
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.responses import Response

import tgi_compat
from tgi_compat import openapi
from tgi_compat.admission import ConcurrencyLimiter
from tgi_compat.body import parse_json_body
from tgi_compat.chat_template import ChatTemplate
from tgi_compat.config import Config, ConfigError
from tgi_compat.connection import ConnectionGuard, resolve_max_connections
from tgi_compat.errors import BodyError, TGIError, UnhealthyError
from tgi_compat.lifecycle import Lifecycle, Server
from tgi_compat.metrics import TGIMetrics
from tgi_compat.middleware import PayloadLimitMiddleware
from tgi_compat.openai.api_router import build_router as build_openai_router
from tgi_compat.openai.serving import OpenAIServing
from tgi_compat.tgi.api_router import build_router
from tgi_compat.tgi.protocol import ErrorResponse, GenerateRequest, Info
from tgi_compat.tgi.serving import TGIServing
from tgi_compat.tgi.validation import Limits

logger = logging.getLogger("tgi_compat")

ROUTER_NAME = "text-generation-router"


def resolve_model(config: Config) -> str:
    if config.model_id:
        return config.model_id
    from tgi_compat.tiny_model import build_tiny_model

    path = str(build_tiny_model())
    logger.info("no --model-id given: serving the embedded tiny model at %s", path)
    return path


def resolve_limits(config: Config, max_model_len: int) -> tuple[int, int]:
    """(max_input_tokens, max_total_tokens), defaulted from and checked against the engine."""
    total = config.max_total_tokens or max_model_len
    if total > max_model_len:
        raise ConfigError(
            f"`max_total_tokens` ({total}) must be <= the model's context length ({max_model_len})"
        )
    max_input = config.max_input_tokens if config.max_input_tokens is not None else total - 1
    if max_input >= total:
        raise ConfigError(f"`max_input_tokens` ({max_input}) must be < `max_total_tokens` ({total})")
    return max_input, total


def _git_sha() -> str | None:
    try:
        root = Path(tgi_compat.__file__).resolve().parent.parent
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=2
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except Exception:
        return None


def create_app(config: Config, engine=None) -> FastAPI:
    """The ASGI app. The engine is built in the lifespan, so the port opens only once
    it is ready (TGI's router likewise starts only after the model is warmed up)."""
    lifecycle = Lifecycle(
        shutdown_timeout=config.shutdown_timeout,
        stall_timeout=config.health_stall_timeout,
        probe_timeout=config.health_probe_timeout,
        engine_failure_grace=config.engine_failure_grace,
        stay_up_on_engine_failure=config.stay_up_on_engine_failure,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal engine
        owned = engine is None
        if engine is None:
            from tgi_compat.engine import Engine, build_engine_args

            from tgi_compat.adapters import parse_lora_adapters, resolve

            model = resolve_model(config)
            # The engine's processes read the watermark settings from the environment.
            if config.watermark_gamma is not None:
                os.environ["WATERMARK_GAMMA"] = str(config.watermark_gamma)
            if config.watermark_delta is not None:
                os.environ["WATERMARK_DELTA"] = str(config.watermark_delta)
            lora_paths = {a.id: resolve(a) for a in parse_lora_adapters(config.lora_adapters)}
            engine = Engine(
                build_engine_args(model, config.tgi_engine_flags(), config.engine_flags, lora_paths), lora_paths
            )
        max_input, max_total = resolve_limits(config, engine.max_model_len)
        limits = Limits(
            max_best_of=config.max_best_of,
            max_stop_sequences=config.max_stop_sequences,
            max_top_n_tokens=config.max_top_n_tokens,
            max_input_tokens=max_input,
            max_total_tokens=max_total,
            grammar_enabled=not config.disable_grammar_support,
            adapters=frozenset(getattr(engine, "adapters", {})),
        )
        limiter = ConcurrencyLimiter(config.max_concurrent_requests)
        app.state.engine = engine
        app.state.limiter = limiter
        metrics = TGIMetrics(max_input, max_total)
        metrics.batch_max_total_tokens.set(engine.kv_capacity_tokens)
        engine.on_step = lambda sched, it: metrics.engine_step(sched, it, engine.kv_capacity_tokens)
        app.state.metrics = metrics
        tracer = None
        if config.otlp_endpoint:
            from tgi_compat.tracing import Tracer

            tracer = Tracer(config.otlp_endpoint, config.otlp_service_name)
        app.state.tgi = TGIServing(
            engine, limiter, limits, lifecycle, metrics, keep_alive=config.keep_alive_seconds, tracer=tracer
        )
        lifecycle.start(engine)
        model_id = config.model_id or engine.engine_args.model
        app.state.info = {
            "model_id": model_id,
            "model_sha": None,
            "model_pipeline_tag": None,
            "max_concurrent_requests": config.max_concurrent_requests,
            "max_best_of": config.max_best_of,
            "max_stop_sequences": config.max_stop_sequences,
            "max_input_tokens": max_input,
            "max_total_tokens": max_total,
            "validation_workers": config.validation_workers,
            "max_client_batch_size": config.max_client_batch_size,
            "router": ROUTER_NAME,
            "version": tgi_compat.__version__,
            "sha": _git_sha(),
            "docker_label": None,
        }
        app.state.openai = OpenAIServing(
            app.state.tgi,
            ChatTemplate.from_tokenizer(engine.tokenizer.hf),
            model_id=model_id,
            version=tgi_compat.__version__,
            max_client_batch_size=config.max_client_batch_size,
            adapters=limits.adapters,
        )
        # TGI's `/` defaults return_full_text to true for text-generation or unknown tags.
        app.state.full_text_default = app.state.info["model_pipeline_tag"] in (None, "text-generation")
        logger.info(
            "ready: model=%s max_input_tokens=%d max_total_tokens=%d max_concurrent_requests=%d",
            model_id, max_input, max_total, config.max_concurrent_requests,
        )
        try:
            yield
        finally:
            await lifecycle.stop()
            if tracer is not None:
                tracer.shutdown()
            if owned:
                try:
                    engine.shutdown()
                except Exception:  # a dead engine may fail to shut down cleanly
                    logger.exception("engine shutdown failed")

    app = FastAPI(
        title="tgi-compat",
        version=tgi_compat.__version__,
        description="Text Generation Inference's HTTP API on vLLM",
        lifespan=lifespan,
        docs_url="/docs",
        openapi_url="/api-doc/openapi.json",
        default_response_class=Response,
    )

    async def auth(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "").lower()
        if given != f"bearer {config.api_key}".lower():
            raise _Unauthorized()

    @app.exception_handler(TGIError)
    async def tgi_error(request: Request, exc: TGIError) -> Response:
        return exc.response()

    @app.exception_handler(BodyError)
    async def body_error(request: Request, exc: BodyError) -> Response:
        return exc.response()

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # The connection closed before the body arrived (the client left, or the request
        # read timeout closed it): nothing was admitted, and nobody reads an answer.
        return Response(status_code=499)

    @app.exception_handler(_Unauthorized)
    async def unauthorized(request: Request, exc: _Unauthorized) -> Response:
        return Response(status_code=401)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unexpected error on %s", request.url.path)
        return Response(
            orjson.dumps({"error": f"Internal error: {type(exc).__name__}", "error_type": "internal"}),
            status_code=500,
            media_type="application/json",
        )

    app.include_router(build_router(auth))
    app.include_router(build_openai_router(auth))

    health_responses = {
        200: {"description": "Everything is working fine (empty body)"},
        503: {"description": "Text generation inference is down", "model": ErrorResponse,
              "content": {"application/json": {"example": UnhealthyError().body()}}},
    }

    async def health(request: Request) -> Response:
        problem = await lifecycle.health_problem(request.app.state.engine)
        if problem is None:
            return Response(status_code=200)
        # TGI's body is fixed; the reason goes to the log and a header.
        return UnhealthyError().response(headers={"x-health-problem": problem})

    for path in ("/health", "/ping"):
        app.add_api_route(path, health, methods=["GET"], summary="Health check", responses=health_responses, tags=["Text Generation Inference"])
    app.add_api_route("/", health, methods=["GET"], include_in_schema=False)

    @app.get("/info", summary="Text Generation Inference endpoint info", responses={200: {"model": Info}}, tags=["Text Generation Inference"])
    async def info(request: Request) -> Response:
        return Response(orjson.dumps(request.app.state.info), media_type="application/json")

    @app.post(
        "/tokenize",
        summary="Tokenize inputs",
        tags=["Text Generation Inference"],
        dependencies=[],
        openapi_extra=openapi.json_body(GenerateRequest),
        responses=openapi.responses({200: ("Tokenized ids (byte offsets)", list[dict])}, {}),
    )
    async def tokenize(request: Request) -> Response:
        await auth(request)
        req = await parse_json_body(request, GenerateRequest)
        tokens = request.app.state.engine.tokenizer.offsets(req.inputs)
        body = [{"id": i, "text": t, "start": s, "stop": e} for i, t, s, e in tokens]
        return Response(orjson.dumps(body), media_type="application/json")

    @app.get("/metrics", summary="Prometheus metrics", tags=["Text Generation Inference"])
    async def metrics(request: Request) -> Response:
        from prometheus_client import REGISTRY, generate_latest

        state = request.app.state
        tgi = state.metrics.render()
        own = (
            "# HELP tgi_compat_permits_in_use Concurrency permits held by generations in flight.\n"
            "# TYPE tgi_compat_permits_in_use gauge\n"
            f"tgi_compat_permits_in_use {state.limiter.in_use}\n"
            "# HELP tgi_compat_engine_requests Requests the engine has not finished (running or queued).\n"
            "# TYPE tgi_compat_engine_requests gauge\n"
            f"tgi_compat_engine_requests {state.engine.num_unfinished_requests()}\n"
            + connection_metrics(state.connections.stats)
        ).encode()
        # vLLM's own `vllm:*` engine metrics live in prometheus_client's default registry.
        return Response(tgi + b"\n" + own + generate_latest(REGISTRY), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", summary="Served models (OpenAI)", tags=["Text Generation Inference"])
    async def models(request: Request) -> Response:
        model_id = request.app.state.info["model_id"]
        body = {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": model_id}]}
        return Response(orjson.dumps(body), media_type="application/json")

    app.state.lifecycle = lifecycle
    app.state.connections = ConnectionGuard(
        send_timeout=config.send_timeout,
        request_read_timeout=config.request_read_timeout,
        max_connections=config.max_connections or max(1024, 4 * config.max_concurrent_requests),
    )
    openapi.install(app)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=config.cors_allow_origin or ["*"],
        allow_methods=["GET", "POST"],
        allow_headers=["content-type"],
    )
    app.add_middleware(PayloadLimitMiddleware, limit=config.payload_limit)
    return app


def connection_metrics(stats) -> str:
    lines = [
        "# HELP tgi_compat_connections_open Open HTTP connections.",
        "# TYPE tgi_compat_connections_open gauge",
        f"tgi_compat_connections_open {stats.open}",
        "# HELP tgi_compat_connections_closed Connections closed by a guard: send_timeout (client stopped "
        "reading), read_timeout (request not received in time), idle_evicted (room made at the connection "
        "cap), over_capacity (503 at the cap).",
        "# TYPE tgi_compat_connections_closed counter",
    ]
    lines += [f'tgi_compat_connections_closed{{reason="{k}"}} {v}' for k, v in stats.closed.items()]
    return "\n".join(lines) + "\n"


class _Unauthorized(Exception):
    pass


def bind_host(hostname: str) -> str:
    """TGI binds 0.0.0.0 when --hostname is not an IP address (e.g. a container's name)."""
    try:
        ipaddress.ip_address(hostname)
        return hostname
    except ValueError:
        logger.warning("invalid hostname %r, defaulting to 0.0.0.0", hostname)
        return "0.0.0.0"


def run(config: Config, log_config: dict | None = None) -> int:
    """Serve until SIGTERM/SIGINT (exit status 0) or engine death (exit status 1)."""
    import uvicorn
    from sse_starlette.sse import AppStatus

    # sse-starlette cancels every stream as soon as shutdown begins; we drain instead
    # (Lifecycle ends what is left after --shutdown-timeout with an error event).
    AppStatus.disable_automatic_graceful_drain()
    config.max_connections = resolve_max_connections(config.max_connections, config.max_concurrent_requests)
    app = create_app(config)
    server = Server(
        uvicorn.Config(
            app,
            host=bind_host(config.hostname),
            port=config.port,
            loop="uvloop",
            # httptools, with the connection guards (send/read timeouts, cap, keepalive).
            http=app.state.connections.protocol_class(),
            log_level=config.log_level,
            log_config=log_config,
            access_log=False,
            # uvicorn's default (5 s) is shorter than clients' pool timeouts (aiohttp 15 s):
            # under load a client then sends on a connection the server just closed.
            timeout_keep_alive=int(config.http_keep_alive_timeout),
            # Our drain ends streams after shutdown_timeout; uvicorn's limit is a backstop.
            timeout_graceful_shutdown=int(config.shutdown_timeout) + 10,
        ),
        app.state.lifecycle,
    )
    server.run()
    if not server.started and server.lifecycle.exit_code == 0:
        return 3  # start-up failed (uvicorn logged why)
    return server.lifecycle.exit_code
