"""The HTTP server: app assembly (``create_app``), the engine's life in the app
(``lifespan``), the sockets and the uvicorn server (``run``).

Routes live in routers (``tgi/api_router.py``, ``openai/api_router.py``,
``info_router.py``); errors are mapped to HTTP in ``errors.py``; the generation core is
``tgi/infer.py``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import subprocess
import time
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from starlette.responses import Response

import tgi_compat
from tgi_compat import openapi
from tgi_compat.admission import ConcurrencyLimiter, SharedConcurrencyLimiter
from tgi_compat.chat_template import load_chat_template
from tgi_compat.config import Config, ConfigError
from tgi_compat.connection import ConnectionGuard, drop_record, resolve_max_connections
from tgi_compat.errors import install_handlers
from tgi_compat.info_router import METRICS_CONTENT_TYPE, publish_live_values, render_metrics
from tgi_compat.info_router import build_router as build_info_router
from tgi_compat.kserve import build_router as build_kserve_router
from tgi_compat.lifecycle import Lifecycle, Server
from tgi_compat.metrics import TGIMetrics
from tgi_compat.middleware import HeadAsGetMiddleware, PayloadLimitMiddleware, bearer_auth
from tgi_compat.openai.api_router import build_router as build_openai_router
from tgi_compat.openai.serving import OpenAIServing
from tgi_compat.tgi.api_router import build_router as build_tgi_router
from tgi_compat.tgi.infer import Infer
from tgi_compat.tgi.serving import TGIServing
from tgi_compat.tgi.validation import Limits
from tgi_compat.vertex.api_router import VertexServing, mount_aip_routes
from tgi_compat.vertex.api_router import build_router as build_vertex_router

logger = logging.getLogger("tgi_compat")

ROUTER_NAME = "text-generation-router"


def resolve_model(config: Config) -> str:
    """The path or hub id vLLM loads: ``--model-id`` as given, or an embedded model built
    on first use (no ``--model-id``: ``embedded:tiny``). Resolved once per config; a build
    that fails raises ``EmbeddedModelError`` (one line, exit status 1)."""
    if config.model_path:
        return config.model_path
    model_id = config.model_id or "embedded:tiny"
    if not model_id.startswith("embedded:"):
        return model_id
    from tgi_compat.config import build_embedded_model

    started = time.monotonic()
    config.model_path = path = build_embedded_model(model_id)
    logger.info("serving the embedded model %s at %s (ready in %.1f s)", model_id, path, time.monotonic() - started)
    return path


def model_identity(config: Config, engine) -> dict:
    """/info's ``model_id``, ``model_sha`` and ``model_pipeline_tag``: for an embedded
    model that stands for a Hub model, that model's (what a TGI user would pass); else
    ``--model-id`` as given (or the embedded tiny model's directory)."""
    identity = {"model_id": config.model_id or engine.engine_args.model, "model_sha": None, "model_pipeline_tag": None}
    if config.model_id and config.model_id.startswith("embedded:"):
        import importlib

        from tgi_compat.config import EMBEDDED_MODELS

        module, _ = EMBEDDED_MODELS[config.model_id.removeprefix("embedded:")]
        identity.update(getattr(importlib.import_module(module), "INFO", {}))
    return identity


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


def create_app(config: Config, engine=None, metrics_socket: socket.socket | None = None, seat=None) -> FastAPI:
    """The ASGI app: routers, error handlers, middleware; the engine and everything over
    it are built by ``lifespan`` (so the port opens only once the engine is ready, as
    TGI's router starts only after the model is warmed up). ``engine``: one already
    built (the caller owns it), e.g. the in-process tests' scripted engine.
    ``metrics_socket`` (bound to --prometheus-port) serves the exposition once ready.
    ``seat``: this is one of several API processes (``api_servers.Seat``)."""
    app = FastAPI(
        title="tgi-compat",
        version=tgi_compat.TGI_VERSION,  # TGI's document carries its release too
        description=f"Text Generation Inference's HTTP API on vLLM ({tgi_compat.version_text()})",
        lifespan=partial(lifespan, config=config, engine=engine, metrics_socket=metrics_socket, seat=seat),
        docs_url="/docs",
        openapi_url="/api-doc/openapi.json",
        default_response_class=Response,
    )
    install_handlers(app)
    auth = bearer_auth(config.api_key)
    app.include_router(build_tgi_router(auth))
    app.include_router(build_openai_router(auth))
    app.include_router(build_info_router(auth))
    app.include_router(build_vertex_router(auth))
    app.include_router(build_kserve_router(auth))
    mount_aip_routes(app, config)
    app.state.lifecycle = Lifecycle(
        shutdown_timeout=config.shutdown_timeout,
        stall_timeout=config.health_stall_timeout,
        probe_timeout=config.health_probe_timeout,
        engine_failure_grace=config.engine_failure_grace,
        stay_up_on_engine_failure=config.stay_up_on_engine_failure,
    )
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
    app.add_middleware(HeadAsGetMiddleware)  # outermost: HEAD on every GET route
    return app


@asynccontextmanager
async def lifespan(app: FastAPI, *, config: Config, engine=None, metrics_socket: socket.socket | None = None,
                   seat=None):
    """Build the engine (unless given) and the serving objects over it, serve, then stop
    them in reverse order. With a ``seat`` (one of several API processes) the engine is a
    client of the shared engines, and the permits and metrics are shared."""
    owned = engine is None
    if owned:
        from tgi_compat.engine import Engine

        engine = Engine(*config_engine_args(config), client=seat.client if seat is not None else None)
        started = time.monotonic()
        if seat is None:
            await engine.warm_up()  # before the port opens: /health is never ready before it
        else:
            await seat.warm_up(engine)
        logger.info("warm-up done in %.1f s", time.monotonic() - started)
    state = app.state
    lifecycle: Lifecycle = state.lifecycle
    max_input, max_total = resolve_limits(config, engine.max_model_len)
    limits = Limits(
        max_best_of=config.max_best_of,
        max_stop_sequences=config.max_stop_sequences,
        max_top_n_tokens=config.max_top_n_tokens,
        max_input_tokens=max_input,
        max_total_tokens=max_total,
        grammar_enabled=not config.disable_grammar_support,
        adapters=frozenset(engine.adapters),
    )
    state.engine = engine
    if seat is None:
        state.limiter = ConcurrencyLimiter(config.max_concurrent_requests)
        state.metrics = metrics = TGIMetrics(max_input, max_total)
    else:
        state.limiter = SharedConcurrencyLimiter(config.max_concurrent_requests, seat.permits)
        state.metrics = metrics = TGIMetrics(max_input, max_total, store=seat.metrics_store())
    metrics.set_engines(engine.num_engines, engine.kv_capacity_tokens)
    engine.on_step = metrics.engine_step
    tracer = None
    if config.otlp_endpoint:
        from tgi_compat.tracing import Tracer

        tracer = Tracer(config.otlp_endpoint, config.otlp_service_name)
    images = _image_fetcher(config, engine)
    state.infer = Infer(
        engine, state.limiter, limits, lifecycle, metrics, keep_alive=config.keep_alive_seconds, tracer=tracer,
        images=images, drop_record=drop_record,
    )
    lifecycle.start(engine)
    state.info = info = _info(config, engine, max_input, max_total)
    # TGI's `/` defaults return_full_text to true for text-generation or unknown tags.
    state.tgi = TGIServing(state.infer, full_text_default=info["model_pipeline_tag"] in (None, "text-generation"))
    template, template_origin = load_chat_template(engine.tokenizer.hf, config.tokenizer_config_path,
                                                   **_tokenizer_location(engine.engine_args))
    logger.info("chat template: %s", template_origin)
    state.openai = OpenAIServing(
        state.infer,
        template,
        model_id=info["model_id"],
        fingerprint=system_fingerprint(info),
        max_client_batch_size=config.max_client_batch_size,
        adapters=limits.adapters,
    )
    state.vertex = VertexServing(state.infer, state.openai)
    logger.info(
        "ready: %s model=%s max_input_tokens=%d max_total_tokens=%d max_concurrent_requests=%d",
        tgi_compat.version_text(), info["model_id"], max_input, max_total, config.max_concurrent_requests,
    )
    metrics_listener = None
    if metrics_socket is not None:
        metrics_listener = await start_metrics_listener(metrics_socket, lambda: render_metrics(state))
    publisher = None
    if seat is not None:  # this process's live values, for a scrape of any API process
        publisher = asyncio.ensure_future(publish_live_values(state))
    try:
        yield
    finally:
        if publisher is not None:
            publisher.cancel()
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


def _tokenizer_location(engine_args) -> dict:
    """Where the served tokenizer's files come from (revision, hub cache), for its chat_template.json."""
    return {
        "revision": getattr(engine_args, "tokenizer_revision", None) or getattr(engine_args, "revision", None),
        "cache_dir": getattr(engine_args, "download_dir", None),
    }


def _image_fetcher(config: Config, engine):
    """The image fetcher of a model that takes images (TGI's `![](url)`), else None."""
    if not engine.multimodal:
        return None
    from tgi_compat.images import FetchPolicy, ImageFetcher

    return ImageFetcher(FetchPolicy.with_allow(
        config.image_fetch_allow,
        max_fetch_size=config.max_image_fetch_size,
        timeout=config.image_fetch_timeout,
        # vLLM refuses more than its own per-prompt limit anyway
        max_images=min(config.max_images_per_request, engine.max_images),
        max_pixels=config.max_image_pixels,
    ))


def _info(config: Config, engine, max_input: int, max_total: int) -> dict:
    """TGI's ``/info`` body."""
    return {
        **model_identity(config, engine),
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


def bind_socket(host: str, port: int, flag: str, reuse_port: bool = False, probe_free: bool = True) -> socket.socket:
    """The listening address, taken before anything starts: a port in use is a start-up
    error. ``reuse_port``: several API processes each listen on the port with a socket of
    their own, and the kernel spreads new connections over them (SO_REUSEPORT)."""
    if reuse_port and probe_free:
        # SO_REUSEPORT would also let this share a port that another server with several API
        # processes listens on: prove the port free first, with a plain bind.
        bind_socket(host, port, flag).close()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
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


def run(config: Config, log_config: dict | None = None, engine=None) -> int:
    """Serve until SIGTERM/SIGINT (exit status 0) or engine death (exit status 1).
    ``engine``: one already built (the caller owns it), e.g. the socket tests' scripted
    engine; else the lifespan builds vLLM's. ``--api-server-count`` above 1: this process
    supervises that many API processes over one set of engines (``api_servers.py``)."""
    main_socket, metrics_socket = open_ports(config)
    try:
        prepare_model(config, build_embedded=engine is None)
    except BaseException:
        main_socket.close()
        metrics_socket.close()
        raise
    if config.api_server_count > 1 and engine is None:
        from tgi_compat.api_servers import supervise

        return supervise(config, log_config, main_socket, metrics_socket)
    return serve(config, log_config, main_socket, metrics_socket, engine=engine)


def open_ports(config: Config) -> tuple[socket.socket, socket.socket]:
    """The main and metrics listening sockets, bound before anything starts (a port in use
    is a start-up error)."""
    config.max_connections = resolve_max_connections(config.max_connections, config.max_concurrent_requests)
    host = bind_host(config.hostname)
    if config.prometheus_port == config.port:
        raise ConfigError(
            f"`--prometheus-port {config.prometheus_port}` is the same as `--port`: Prometheus metrics get "
            "their own port (also served at /metrics on the main port); choose another `--prometheus-port`"
        )
    main_socket = bind_socket(host, config.port, "--port", reuse_port=config.api_server_count > 1)
    try:
        metrics_socket = bind_socket(host, config.prometheus_port, "--prometheus-port")
    except BaseException:
        main_socket.close()
        raise
    return main_socket, metrics_socket


def prepare_model(config: Config, build_embedded: bool = True) -> None:
    """What must exist before an engine starts: Vertex AI's AIP_STORAGE_URI copied here
    (then served as the model), an embedded model built. A failed fetch or build is one
    line and exit status 1, not a lifespan traceback."""
    if config.storage_uri:
        from tgi_compat.gcs import download_model

        config.model_id = str(download_model(config.storage_uri, timeout=config.storage_timeout))
    if build_embedded:
        resolve_model(config)


def serve(config: Config, log_config: dict | None, main_socket: socket.socket, metrics_socket: socket.socket,
          engine=None, seat=None) -> int:
    """Serve the app on the bound sockets. ``seat``: this is one of several API processes
    (``api_servers.Seat``)."""
    from sse_starlette.sse import AppStatus

    # sse-starlette cancels every stream as soon as shutdown begins; we drain instead
    # (Lifecycle ends what is left after --shutdown-timeout with an error event).
    AppStatus.disable_automatic_graceful_drain()
    if seat is not None:  # one of several API processes: a listening socket of its own on the port
        host, port = main_socket.getsockname()[:2]
        main_socket = bind_socket(host, port, "--port", reuse_port=True, probe_free=False)
    app = create_app(config, engine=engine, metrics_socket=metrics_socket, seat=seat)
    server = Server(
        uvicorn.Config(
            app,
            host=bind_host(config.hostname),
            port=config.port,
            loop="uvloop",
            # httptools, with the connection guards (send/read timeouts, cap, keepalive).
            http=app.state.connections.protocol_class(),
            log_level=config.log_level.levels["uvicorn"],
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
