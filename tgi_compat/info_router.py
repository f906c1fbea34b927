"""The routes that report rather than generate: ``/health`` and ``/ping``, ``GET /``,
``/info``, ``/tokenize``, ``/metrics``, ``/v1/models``; and the Prometheus exposition
(``render_metrics``), which ``/metrics`` and the ``--prometheus-port`` listener share.

Each reads what the lifespan put on ``app.state``: ``lifecycle``, ``engine``, ``info``,
``infer``, ``metrics``, ``limiter``, ``connections``.
"""

from __future__ import annotations

import os

import orjson
from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from tgi_compat import openapi
from tgi_compat.body import parse_json_body
from tgi_compat.errors import UnhealthyError
from tgi_compat.tgi.protocol import ErrorResponse, GenerateRequest, Info

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4"

_HEALTH_RESPONSES = {
    200: {"description": "Everything is working fine (empty body)"},
    503: {"description": "Text generation inference is down", "model": ErrorResponse,
          "content": {"application/json": {"example": UnhealthyError().body()}}},
}


def _json(body) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


def build_router(auth) -> APIRouter:
    router = APIRouter(tags=["Text Generation Inference"])

    async def health(request: Request) -> Response:
        state = request.app.state
        problem = await state.lifecycle.health_problem(state.engine)
        if problem is None:
            return Response(status_code=200)
        # TGI's body is fixed; the reason goes to the log and a header.
        return UnhealthyError().response(headers={"x-health-problem": problem})

    for path in ("/health", "/ping"):
        router.add_api_route(path, health, methods=["GET"], summary="Health check", responses=_HEALTH_RESPONSES)
    router.add_api_route("/", health, methods=["GET"], include_in_schema=False)

    @router.get("/info", summary="Text Generation Inference endpoint info", responses={200: {"model": Info}})
    async def info(request: Request) -> Response:
        return _json(request.app.state.info)

    @router.post(
        "/tokenize",
        summary="Tokenize inputs",
        dependencies=[Depends(auth)],
        openapi_extra=openapi.json_body(GenerateRequest),
        responses=openapi.responses({200: ("Tokenized ids (byte offsets)", list[dict])}, {}),
    )
    async def tokenize(request: Request) -> Response:
        req = await parse_json_body(request, GenerateRequest)
        return _json(await request.app.state.infer.tokenize(req.inputs))

    @router.get("/metrics", summary="Prometheus metrics")
    async def metrics(request: Request) -> Response:
        return Response(render_metrics(request.app.state), media_type=METRICS_CONTENT_TYPE)

    @router.get("/v1/models", summary="Served models (OpenAI)")
    async def models(request: Request) -> Response:
        model_id = request.app.state.info["model_id"]
        return _json({"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": model_id}]})

    return router


def render_metrics(state) -> bytes:
    """The Prometheus exposition: TGI's series, ours, then vLLM's own. With several API
    processes (--api-server-count), any of them renders the sums over all."""
    from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, multiprocess

    metrics = state.metrics.merged()
    live = state.metrics.live_totals(live_values(state))
    own = (
        "# HELP tgi_compat_permits_in_use Concurrency permits held by generations in flight.\n"
        "# TYPE tgi_compat_permits_in_use gauge\n"
        f"tgi_compat_permits_in_use {state.limiter.in_use}\n"
        "# HELP tgi_compat_engine_requests Requests the engine has not finished (running or queued).\n"
        "# TYPE tgi_compat_engine_requests gauge\n"
        f"tgi_compat_engine_requests {int(live['engine_requests'])}\n"
        + connection_metrics(int(live["connections_open"]),
                             {k.removeprefix("closed:"): int(v) for k, v in live.items() if k.startswith("closed:")})
    ).encode() + metrics.render_engines()
    # vLLM's own `vllm:*` engine metrics live in prometheus_client's default registry; with
    # several API processes, in vLLM's multiprocess directory (PROMETHEUS_MULTIPROC_DIR).
    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") and state.metrics.store is not None:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    return metrics.render() + b"\n" + own + generate_latest(registry)


def live_values(state) -> dict[str, float]:
    """This process's values that change without an event to count (read when rendered)."""
    stats = state.connections.stats
    return {
        "engine_requests": state.engine.num_unfinished_requests(),
        "connections_open": stats.open,
        **{f"closed:{reason}": n for reason, n in stats.closed.items()},
    }


async def publish_live_values(state, every: float = 0.5) -> None:
    """One of several API processes: keeps its live values current for a scrape of any of
    them (each also writes its own when it renders)."""
    import asyncio

    while True:
        state.metrics.publish_live(live_values(state))
        await asyncio.sleep(every)


def connection_metrics(open_connections: int, closed: dict[str, int]) -> str:
    lines = [
        "# HELP tgi_compat_connections_open Open HTTP connections.",
        "# TYPE tgi_compat_connections_open gauge",
        f"tgi_compat_connections_open {open_connections}",
        "# HELP tgi_compat_connections_closed Connections closed by a guard: send_timeout (client stopped "
        "reading), read_timeout (request not received in time), idle_evicted (room made at the connection "
        "cap), over_capacity (503 at the cap).",
        "# TYPE tgi_compat_connections_closed counter",
    ]
    lines += [f'tgi_compat_connections_closed{{reason="{k}"}} {v}' for k, v in closed.items()]
    return "\n".join(lines) + "\n"
