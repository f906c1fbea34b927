"""``HEAD`` on every GET route answers as the GET does (status, headers), without a body,
as TGI's axum ``get`` routes do; other methods and paths are untouched (``POST /`` still
generates). In-process, on the scripted engine."""

from __future__ import annotations

from fastapi.routing import APIRoute
from starlette.routing import Route

# Route paths a HEAD probe must reach; the app's own GET routes are added to these, so a
# GET route added later is covered without editing this list.
EXPECTED_GET_PATHS = {"/health", "/ping", "/", "/info", "/metrics", "/v1/models", "/docs", "/api-doc/openapi.json"}


def get_paths(app) -> set[str]:
    paths = set()
    for route in app.routes:
        if isinstance(route, (APIRoute, Route)) and "GET" in (route.methods or ()) and "{" not in route.path:
            paths.add(route.path)
    return paths


async def test_head_answers_like_get_on_every_get_route(h):
    paths = get_paths(h.app)
    assert EXPECTED_GET_PATHS <= paths, paths
    for path in sorted(paths):
        get = await h.client.get(path)
        head = await h.client.head(path)
        assert head.status_code == get.status_code == 200, (path, head.status_code, get.status_code)
        assert head.content == b"", path
        # /metrics' exposition changes between two scrapes (process CPU time), so its length may too.
        volatile = {"content-length"} if path == "/metrics" else set()
        same = {k: v for k, v in get.headers.items() if k not in volatile}
        assert {k: v for k, v in head.headers.items() if k not in volatile} == same, path
        assert int(head.headers["content-length"]) > 0 or get.content == b"", path


async def test_head_on_unhealthy_health_is_503_with_headers(h):
    h.engine.errored = True
    for path in ("/health", "/ping", "/"):
        get, head = await h.client.get(path), await h.client.head(path)
        assert get.status_code == head.status_code == 503, path
        assert head.content == b"" and get.json()["error_type"] == "healthcheck"
        assert head.headers["content-length"] == get.headers["content-length"] == str(len(get.content))
        assert head.headers["x-health-problem"] == get.headers["x-health-problem"]


async def test_head_elsewhere_answers_as_get_would_and_post_root_still_generates(h):
    for path in ("/generate", "/v1/chat/completions", "/tokenize"):  # POST-only routes: 405, as axum
        get, head = await h.client.get(path), await h.client.head(path)
        assert head.status_code == get.status_code == 405, path
        assert head.headers.get("allow") == get.headers.get("allow") and "POST" in head.headers["allow"]
        assert head.content == b""
    assert (await h.client.head("/no/such/route")).status_code == 404
    r = await h.client.post("/", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200 and isinstance(r.json(), list) and "generated_text" in r.json()[0]
    assert (await h.client.get("/")).status_code == 200
