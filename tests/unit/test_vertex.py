"""TGI's ``POST /vertex`` and Vertex AI's ``AIP_PREDICT_ROUTE`` / ``AIP_HEALTH_ROUTE`` on the
scripted engine: shapes, instance order, parameters reaching the engine, permits, TGI's
errors, ``--api-key``, metrics, the OpenAPI document, disconnects."""

from __future__ import annotations

import contextlib
import logging

import httpx
import pytest

from tests.unit.conftest import Harness, metric_values
from tests.unit.scripted_engine import LENGTH, STOP, ScriptedEngine, Script

from tgi_compat.launcher import parse_config
from tgi_compat.server import create_app

INCOMPLETE = {"error": "Incomplete generation", "error_type": "Incomplete generation"}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def ids(h, text: str) -> list[int]:
    return h.engine.tokenizer.encode_no_special(text)


@pytest.fixture
async def vertex_app(tokenizer):
    """``await vertex_app(environ, *flags)``: the app as Vertex AI starts it (AIP_* variables)."""
    stack = contextlib.AsyncExitStack()

    async def make(environ: dict[str, str], *flags: str) -> Harness:
        config, _ = parse_config(list(flags), environ=environ)
        engine = ScriptedEngine(tokenizer)
        app = create_app(config, engine=engine)
        await stack.enter_async_context(app.router.lifespan_context(app))
        client = await stack.enter_async_context(
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=30))
        return Harness(app, engine, client)

    try:
        yield make
    finally:
        await stack.aclose()


async def test_instances_generate_and_chat_in_order(h):
    one_two = ids(h, " one two")
    h.engine.push(Script.tokens(one_two, LENGTH), Script.tokens(ids(h, " three") + [2], STOP))
    r = await h.client.post("/vertex", json={"instances": [
        {"inputs": "Hi", "parameters": {"max_new_tokens": len(one_two)}},
        {"messages": ASK, "max_tokens": 5, "temperature": 0},
    ]})
    assert r.status_code == 200, r.text
    assert r.json() == {"predictions": [" one two", " three"]}
    assert r.headers["content-type"] == "application/json"
    assert "x-compute-time" not in r.headers  # TGI's /vertex sends no timing headers
    gen, chat = h.engine.requests
    # The generate instance keeps its BOS; the chat one is the templated prompt, as /v1/chat/completions.
    assert h.engine.tokenizer.decode(gen.prompt_ids, skip_special_tokens=False) == "<s>Hi"
    assert h.engine.tokenizer.decode(chat.prompt_ids, skip_special_tokens=False) == (
        "<s><|user|>\nWhat is the weather in Paris?</s>\n<|assistant|>\n")
    assert (chat.sampling.temperature, chat.sampling.max_tokens) == (0.0, 5)


async def test_parameters_are_honoured(h):
    r = await h.client.post("/vertex", json={"instances": [
        {"inputs": "a", "parameters": {"max_new_tokens": 3, "temperature": 0.5, "top_p": 0.9, "top_k": 7, "seed": 11,
                                       "repetition_penalty": 1.2}},
        {"inputs": "b"},                                              # no parameters: TGI samples
        {"inputs": "c", "parameters": {"max_new_tokens": 2}},         # sampling unless do_sample is given
        {"inputs": "d", "parameters": {"max_new_tokens": 2, "do_sample": False}},
        {"inputs": "e", "parameters": {"max_new_tokens": 2, "stop": [" a a"], "return_full_text": True}},
    ]})
    assert r.status_code == 200, r.text
    a, b, c, d, e = (q.sampling for q in h.engine.requests)
    assert (a.temperature, a.top_p, a.top_k, a.seed, a.max_tokens, a.repetition_penalty) == (
        pytest.approx(0.5), pytest.approx(0.9), 7, 11, 3, pytest.approx(1.2))
    assert b.temperature == 1.0 and b.seed is not None
    assert c.temperature == 1.0 and c.seed is not None and c.max_tokens == 2
    assert d.temperature == 0.0
    predictions = r.json()["predictions"]
    assert predictions[4] == "e a a"  # return_full_text, and the stop sequence ended it
    assert predictions[2] == " a a"


async def test_instances_run_concurrently_each_with_a_permit(app_factory):
    h = await app_factory("--max-concurrent-requests", "3")
    a = ids(h, " a")
    h.engine.push(*[Script(steps=[a], block=True) for _ in range(3)])
    s = h.open_stream("/vertex", {"instances": [{"inputs": "x"}, {"inputs": "y"}, {"messages": ASK}]})
    await h.engine.wait_live(3)  # all three in the engine at once
    assert await h.metric("tgi_compat_permits_in_use") == 3
    await s.disconnect()  # the client left: every instance aborted, every permit back
    assert sorted(h.engine.aborts) == sorted(q.request_id for q in h.engine.requests)
    assert await h.metric("tgi_compat_permits_in_use") == 0
    assert await h.metric("tgi_request_failure", '{err="dropped"}') == 3


async def test_instance_over_the_cap_fails_the_request(app_factory):
    h = await app_factory("--max-concurrent-requests", "1")
    r = await h.client.post("/vertex", json={"instances": [{"inputs": "x", "parameters": {"max_new_tokens": 2}},
                                                           {"inputs": "y", "parameters": {"max_new_tokens": 2}}]})
    assert (r.status_code, r.json()) == (500, INCOMPLETE)
    text = await h.metrics()
    assert metric_values(text, "tgi_request_failure") == {'{err="overloaded"}': 1}
    assert metric_values(text, "tgi_request_success") == {"": 1}  # the other one ran to its end (join_all)
    assert await h.metric("tgi_compat_permits_in_use") == 0


async def test_errors(h):
    r = await h.client.post("/vertex", json={"instances": []})
    assert (r.status_code, r.json()) == (422, {"error": "Input validation error", "error_type": "Input validation error"})
    # One instance failing validation fails the whole request with TGI's 500.
    r = await h.client.post("/vertex", json={"instances": [{"inputs": "x", "parameters": {"max_new_tokens": 2}},
                                                           {"inputs": "x", "parameters": {"temperature": 0}}]})
    assert (r.status_code, r.json()) == (500, INCOMPLETE)
    h.engine.push(Script(steps=[ids(h, " a")], fail=RuntimeError("boom"), fail_after=1))
    r = await h.client.post("/vertex", json={"instances": [{"inputs": "x", "parameters": {"max_new_tokens": 3}}]})
    assert (r.status_code, r.json()) == (500, INCOMPLETE)
    # A chat instance TGI cannot turn into a generation: its own error, before anything runs.
    n = len(h.engine.requests)
    chat = {"messages": ASK, "response_format": {"type": "json", "value": {"type": "object"}},
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}
    r = await h.client.post("/vertex", json={"instances": [{"inputs": "x"}, chat]})
    assert (r.status_code, r.json()) == (422, {"error": "Tool error: Grammar and tools are mutually exclusive",
                                               "error_type": "tool_error"})
    assert len(h.engine.requests) == n


@pytest.mark.parametrize(("body", "message"), [
    ({}, "instances: Field required"),
    ({"instances": {"inputs": "x"}}, "instances: Input should be a valid array"),
    ({"instances": [{"foo": 1}]}, "instances[0]: data did not match any variant of untagged enum VertexInstance"),
    ({"instances": [{"inputs": "x"}, {"inputs": 3}]},
     "instances[1]: data did not match any variant of untagged enum VertexInstance"),
    ({"instances": [{"inputs": "x", "parameters": {"seed": 2**70}}]},  # beyond u64 (and orjson)
     "instances[0]: data did not match any variant of untagged enum VertexInstance"),
])
async def test_body_errors_are_plain_text(h, body, message):
    r = await h.client.post("/vertex", json=body)
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("text/plain")
    assert r.text == f"Failed to deserialize the JSON body into the target type: {message}"
    assert h.engine.requests == []


async def test_request_count_one_per_instance(h):
    await h.client.post("/vertex", json={"instances": [{"inputs": "x", "parameters": {"max_new_tokens": 1}}] * 3})
    await h.client.post("/vertex", json={"instances": []})
    text = await h.metrics()
    assert metric_values(text, "tgi_request_count") == {"": 4}
    assert metric_values(text, "tgi_request_success") == {"": 3}
    assert metric_values(text, "tgi_request_failure") == {'{err="validation"}': 1}


async def test_api_key(app_factory, vertex_app):
    body = {"instances": [{"inputs": "x", "parameters": {"max_new_tokens": 1}}]}
    h = await app_factory("--api-key", "secret")
    assert (await h.client.post("/vertex", json=body)).status_code == 401
    r = await h.client.post("/vertex", json=body, headers={"Authorization": "Bearer secret"})
    assert r.status_code == 200
    # Vertex AI's own routes are open, as in TGI's google build (Vertex authenticates callers itself).
    h = await vertex_app({"AIP_PREDICT_ROUTE": "/predict", "AIP_HEALTH_ROUTE": "/hc", "MODEL_ID": "m"},
                         "--api-key", "secret")
    assert (await h.client.post("/vertex", json=body)).status_code == 401
    r = await h.client.post("/predict", json=body)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 1
    assert (await h.client.get("/hc")).status_code == 200


async def test_aip_routes(vertex_app):
    h = await vertex_app({"AIP_PREDICT_ROUTE": "/v1/endpoints/1/deployedModels/2:predict",
                          "AIP_HEALTH_ROUTE": "/v1/endpoints/1/deployedModels/2", "AIP_HTTP_PORT": "8080",
                          "MODEL_ID": "m"})
    r = await h.client.post("/v1/endpoints/1/deployedModels/2:predict",
                            json={"instances": [{"inputs": "x", "parameters": {"max_new_tokens": 2}}]})
    assert (r.status_code, r.json()) == (200, {"predictions": [" a a"]})
    r = await h.client.get("/v1/endpoints/1/deployedModels/2")
    assert (r.status_code, r.content) == (200, b"")
    h.app.state.lifecycle.begin_drain()
    r = await h.client.get("/v1/endpoints/1/deployedModels/2")
    assert (r.status_code, r.json()) == (503, {"error": "unhealthy", "error_type": "healthcheck"})
    # The routes are Vertex's, not part of TGI's API document.
    paths = (await h.client.get("/api-doc/openapi.json")).json()["paths"]
    assert not [p for p in paths if p.startswith("/v1/endpoints")]


async def test_aip_route_collisions_keep_the_existing_route(vertex_app, caplog):
    caplog.set_level(logging.INFO, logger="tgi_compat")
    h = await vertex_app({"AIP_PREDICT_ROUTE": "/generate", "AIP_HEALTH_ROUTE": "/info", "MODEL_ID": "m"})
    r = await h.client.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 1}})
    assert r.status_code == 200 and "generated_text" in r.json()
    r = await h.client.get("/info")
    assert r.json()["model_id"] == "m"
    lines = [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("Vertex AI")]
    assert lines == ["Vertex AI: POST /generate is already a route (/generate); it keeps its own handler",
                     "Vertex AI: GET /info is already a route (/info); it keeps its own handler"]
    # A path taken for another method only is free for this one.
    h = await vertex_app({"AIP_PREDICT_ROUTE": "/info", "MODEL_ID": "m"})
    r = await h.client.post("/info", json={"instances": [{"inputs": "x", "parameters": {"max_new_tokens": 1}}]})
    assert r.status_code == 200 and r.json() == {"predictions": [" a"]}


async def test_openapi_documents_vertex(h):
    doc = (await h.client.get("/api-doc/openapi.json")).json()
    op = doc["paths"]["/vertex"]["post"]
    assert set(op["responses"]) >= {"200", "400", "413", "415", "422", "500"}
    assert op["responses"]["500"]["content"]["application/json"]["example"] == INCOMPLETE
    assert op["responses"]["422"]["content"]["application/json"]["example"]["error_type"] == "Input validation error"
    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/VertexRequest"
    schemas = doc["components"]["schemas"]
    assert {"VertexRequest", "VertexResponse", "VertexGenerateInstance", "ChatRequest"} <= set(schemas)
