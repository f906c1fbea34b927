"""The HTTP server: app assembly, engine lifecycle, errors mapped to HTTP in one place."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import subprocess
from contextlib import asynccontextmanager
from pathlib import Path

import orjson
import uvicorn
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
    """The path or hub id vLLM loads: ``--model-id`` as given, or an embedded model built
    on first use (no ``--model-id``: ``embedded:tiny``)."""
    model_id = config.model_id or "embedded:tiny"
    if not model_id.startswith("embedded:"):
        return model_id
    import importlib

    from tgi_compat.config import EMBEDDED_MODELS

    name = model_id.removeprefix("embedded:")

    module, builder = EMBEDDED_MODELS[name]
    path = str(getattr(importlib.import_module(module), builder)())
    logger.info("serving the embedded model %s at %s", model_id, path)
    return path


def config_engine_args(config: Config):
    """(vLLM ``AsyncEngineArgs``, LoRA paths) for the configuration: one set-up for the
    front end's engines and for headless ones on other nodes."""
    from tgi_compat.adapters import parse_lora_adapters, resolve
    from tgi_compat.engine import build_engine_args

    model = resolve_model(config)
    # The engine's processes read the watermark settings from the environment.
    if config.watermark_gamma is not None:
        os.environ["WATERMARK_GAMMA"] = str(config.watermark_gamma)
    if config.watermark_delta is not None:
        os.environ["WATERMARK_DELTA"] = str(config.watermark_delta)
    lora_paths = {a.id: resolve(a, config.hub_cache) for a in parse_lora_adapters(config.lora_adapters)}
    engine_args = build_engine_args(
        model, config.engine_flags, config.engine_overrides, lora_paths, config.max_batch_total_tokens
    )
    return engine_args, lora_paths


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


def system_fingerprint(info: dict) -> str:
    """TGI's OpenAI ``system_fingerprint``: ``"{version}-{docker_label or 'native'}"``."""
    return f"{info['version']}-{info['docker_label'] or 'native'}"


def _git_sha() -> str | None:
    try:
        root = Path(tgi_compat.__file__).resolve().parent.parent
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=2
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except Exception:
        return None


def create_app(config: Config, engine=None, metrics_socket: socket.socket | None = None) -> FastAPI:
    """The ASGI app. The engine is built in the lifespan, so the port opens only once
    it is ready (TGI's router likewise starts only after the model is warmed up).
    ``metrics_socket`` (bound to --prometheus-port) serves /metrics' exposition once ready."""
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
            from tgi_compat.engine import Engine

            engine = Engine(*config_engine_args(config))
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
        metrics.set_engines(getattr(engine, "num_engines", 1), engine.kv_capacity_tokens)
        engine.on_step = metrics.engine_step
        app.state.metrics = metrics
        tracer = None
        if config.otlp_endpoint:
            from tgi_compat.tracing import Tracer

            tracer = Tracer(config.otlp_endpoint, config.otlp_service_name)
        images = None
        if getattr(engine, "multimodal", False):
            from tgi_compat.images import FetchPolicy, ImageFetcher

            images = ImageFetcher(FetchPolicy.with_allow(
                config.image_fetch_allow,
                max_fetch_size=config.max_image_fetch_size,
                timeout=config.image_fetch_timeout,
                # vLLM refuses more than its own per-prompt limit anyway
                max_images=min(config.max_images_per_request, engine.max_images),
                max_pixels=config.max_image_pixels,
            ))
        app.state.tgi = TGIServing(
            engine, limiter, limits, lifecycle, metrics, keep_alive=config.keep_alive_seconds, tracer=tracer,
            images=images,
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
            "version": tgi_compat.TGI_VERSION,  # clients gate features on TGI's release
            "sha": _git_sha(),
            "docker_label": None,
            "tgi_compat_version": tgi_compat.__version__,  # ours; TGI's clients ignore unknown fields
        }
        if config.tokenizer_config_path:  # TGI's --tokenizer-config-path: its chat template wins
            template = ChatTemplate.from_tokenizer_config(config.tokenizer_config_path)
        else:
            template = ChatTemplate.from_tokenizer(engine.tokenizer.hf)
        app.state.openai = OpenAIServing(
            app.state.tgi,
            template,
            model_id=model_id,
            fingerprint=system_fingerprint(app.state.info),
            max_client_batch_size=config.max_client_batch_size,
            adapters=limits.adapters,
        )
        # TGI's `/` defaults return_full_text to true for text-generation or unknown tags.
        app.state.full_text_default = app.state.info["model_pipeline_tag"] in (None, "text-generation")
        logger.info(
            "ready: %s model=%s max_input_tokens=%d max_total_tokens=%d max_concurrent_requests=%d",
            tgi_compat.version_text(), model_id, max_input, max_total, config.max_concurrent_requests,
        )
        metrics_listener = None
        if metrics_socket is not None:
            metrics_listener = await start_metrics_listener(metrics_socket, lambda: render_metrics(app.state))
        try:
            yield
        finally:
            if metrics_listener is not None:
                metrics_listener.close()
            await lifecycle.stop()
            if images is not None:
                await images.aclose()
            if tracer is not None:
                tracer.shutdown()
            if owned:
                try:
                    engine.shutdown()
                except Exception:  # a dead engine may fail to shut down cleanly
                    logger.exception("engine shutdown failed")

    app = FastAPI(
        title="tgi-compat",
        version=tgi_compat.TGI_VERSION,  # TGI's document carries its release too
        description=f"Text Generation Inference's HTTP API on vLLM ({tgi_compat.version_text()})",
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
        try:
            body = await request.app.state.tgi.tokenize(req.inputs)
        except TGIError as e:
            return e.response()
        return Response(orjson.dumps(body), media_type="application/json")

    @app.get("/metrics", summary="Prometheus metrics", tags=["Text Generation Inference"])
    async def metrics(request: Request) -> Response:
        return Response(render_metrics(request.app.state), media_type=METRICS_CONTENT_TYPE)

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
        allow_origins=list(config.cors_allow_origin) or ["*"],
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


METRICS_CONTENT_TYPE = "text/plain; version=0.0.4"


def render_metrics(state) -> bytes:
    """The Prometheus exposition: TGI's series, ours, then vLLM's own."""
    from prometheus_client import REGISTRY, generate_latest

    tgi = state.metrics.render()
    own = (
        "# HELP tgi_compat_permits_in_use Concurrency permits held by generations in flight.\n"
        "# TYPE tgi_compat_permits_in_use gauge\n"
        f"tgi_compat_permits_in_use {state.limiter.in_use}\n"
        "# HELP tgi_compat_engine_requests Requests the engine has not finished (running or queued).\n"
        "# TYPE tgi_compat_engine_requests gauge\n"
        f"tgi_compat_engine_requests {state.engine.num_unfinished_requests()}\n"
        + connection_metrics(state.connections.stats)
    ).encode() + state.metrics.render_engines()
    # vLLM's own `vllm:*` engine metrics live in prometheus_client's default registry.
    return tgi + b"\n" + own + generate_latest(REGISTRY)


async def start_metrics_listener(sock: socket.socket, render) -> asyncio.Server:
    """--prometheus-port: the exposition on every GET path of its own listener, as a
    Prometheus exporter serves it (TGI binds this port but never serves it)."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    async def exposition(request: Request) -> Response:
        return Response(render(), media_type=METRICS_CONTENT_TYPE)

    app = Starlette(routes=[Route("/{path:path}", exposition, methods=["GET"])])
    config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False, http="httptools")
    config.load()
    protocol = config.http_protocol_class
    state = uvicorn.server.ServerState()
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: protocol(config=config, server_state=state, app_state={}, _loop=loop), sock=sock
    )


def bind_socket(host: str, port: int, flag: str) -> socket.socket:
    """The listening address, taken before anything starts: a port in use is a start-up error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"`{flag} {port}`: cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


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
    from sse_starlette.sse import AppStatus

    # sse-starlette cancels every stream as soon as shutdown begins; we drain instead
    # (Lifecycle ends what is left after --shutdown-timeout with an error event).
    AppStatus.disable_automatic_graceful_drain()
    config.max_connections = resolve_max_connections(config.max_connections, config.max_concurrent_requests)
    host = bind_host(config.hostname)
    if config.prometheus_port == config.port:
        raise ConfigError(
            f"`--prometheus-port {config.prometheus_port}` is the same as `--port`: Prometheus metrics get "
            "their own port (also served at /metrics on the main port); choose another `--prometheus-port`"
        )
    main_socket = bind_socket(host, config.port, "--port")
    metrics_socket = bind_socket(host, config.prometheus_port, "--prometheus-port")
    app = create_app(config, metrics_socket=metrics_socket)
    server = Server(
        uvicorn.Config(
            app,
            host=host,
            port=config.port,
            loop="uvloop",
            # httptools, with the connection guards (send/read timeouts, cap, keepalive).
            http=app.state.connections.protocol_class(),
            log_level=config.log_level,
            log_config=log_config,
            access_log=False,
            # uvicorn's default (5 s) is shorter than clients' pool timeouts (aiohttp 15 s):
            # under load a client then sends on a connection the server just closed.
            server_header=False,  # TGI (axum) sends no `server` header
            timeout_keep_alive=int(config.http_keep_alive_timeout),
            # Our drain ends streams after shutdown_timeout; uvicorn's limit is a backstop.
            timeout_graceful_shutdown=int(config.shutdown_timeout) + 10,
        ),
        app.state.lifecycle,
    )
    server.run(sockets=[main_socket])
    if not server.started and server.lifecycle.exit_code == 0:
        return 3  # start-up failed (uvicorn logged why)
    return server.lifecycle.exit_code
