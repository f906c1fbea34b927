"""TGI's KServe v2 routes on the scripted engine: metadata, liveness, readiness from the
engine's health, inference with byte-array data, TGI's errors, permits, ``--api-key``,
the OpenAPI document."""

from __future__ import annotations

import pytest

from tests.unit.conftest import metric_values
from tests.unit.scripted_engine import STOP, Script

import tgi_compat
from tgi_compat.kserve import utf8_error

INFER = "/v2/models/tgi/versions/1/infer"
INCOMPLETE = {"error": "Incomplete generation", "error_type": "Incomplete generation"}


def ids(h, text: str) -> list[int]:
    return h.engine.tokenizer.encode_no_special(text)


def infer_body(*prompts: str, outputs: int | None = None, **extra) -> dict:
    n = len(prompts) if outputs is None else outputs
    return {
        "id": "req-1",
        "inputs": [{"name": f"in{i}", "shape": [1, len(p.encode())], "datatype": "BYTES", "data": list(p.encode())}
                   for i, p in enumerate(prompts)],
        "outputs": [{"name": f"out{i}"} for i in range(n)],
        **extra,
    }


async def test_metadata_and_liveness(h):
    r = await h.client.get("/v2")
    assert r.json() == {"name": "text-generation-inference", "version": tgi_compat.TGI_VERSION,
                        "extensions": ["health", "models", "metrics"]}
    assert (await h.client.get("/v2/health/live")).json() == {"live": True}
    # TGI checks no model name or version: they are echoed.
    r = await h.client.get("/v2/models/any-name/versions/7")
    assert r.json() == {"name": "any-name", "version": "7", "extensions": ["infer", "ready"]}


async def test_readiness_follows_the_engine(h):
    for path in ("/v2/health/ready", "/v2/models/m/versions/1/ready"):
        r = await h.client.get(path)
        assert (r.status_code, r.json()) == (200, {"live": True})
    h.app.state.lifecycle.begin_drain()
    for path in ("/v2/health/ready", "/v2/models/m/versions/1/ready"):
        r = await h.client.get(path)
        assert (r.status_code, r.json()) == (503, {"error": "unhealthy", "error_type": "healthcheck"})
        assert r.headers["x-health-problem"] == "draining"
    assert (await h.client.get("/v2/health/live")).status_code == 200  # still alive


async def test_infer_outputs_bytes_in_input_order(h):
    first, second = ids(h, " héllo"), ids(h, " wörld")
    n = max(len(first), len(second))
    h.engine.push(Script.tokens(first, STOP), Script.tokens(second, STOP))
    r = await h.client.post(INFER, json=infer_body("Hi", "Ho", parameters={"max_new_tokens": n}))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "req-1"
    for i, text in enumerate((" héllo", " wörld")):
        data = list(text.encode())  # multi-byte UTF-8, as bytes
        assert body["outputs"][i] == {"name": f"out{i}", "shape": [1, len(data)], "datatype": "BYTES", "data": data}
    a, b = h.engine.requests
    assert h.engine.tokenizer.decode(a.prompt_ids, skip_special_tokens=False) == "<s>Hi"
    assert a.sampling.max_tokens == n and a.sampling.temperature == 0.0  # parameters as given
    assert "x-compute-time" not in r.headers


async def test_infer_without_inputs(h):
    r = await h.client.post(INFER, json=infer_body())
    assert (r.status_code, r.json()) == (200, {"id": "req-1", "outputs": []})
    assert h.engine.requests == []


async def test_infer_default_parameters_sample(h):
    r = await h.client.post(INFER, json=infer_body("Hi"))
    assert r.status_code == 200, r.text
    req = h.engine.requests[-1]
    assert req.sampling.temperature == 1.0 and req.sampling.seed is not None  # TGI's default_parameters


async def test_infer_errors(h):
    bad = infer_body("x")
    bad["inputs"][0]["data"] = [0x61, 0xFF, 0x62]
    r = await h.client.post(INFER, json=bad)
    assert (r.status_code, r.json()) == (422, {"error": "invalid utf-8 sequence of 1 bytes from index 1", "error_type": "utf8"})
    bad["inputs"][0]["data"] = [0x61, 0xE2, 0x82]
    r = await h.client.post(INFER, json=bad)
    assert (r.status_code, r.json()) == (422, {"error": "incomplete utf-8 byte sequence from index 1", "error_type": "utf8"})
    r = await h.client.post(INFER, json=infer_body("x", "y", outputs=1))
    assert (r.status_code, r.json()) == (422, {"error": "Inputs and outputs length mismatch", "error_type": "length mismatch"})
    assert h.engine.requests == []
    r = await h.client.post(INFER, json=infer_body("x", parameters={"temperature": 0}))
    assert (r.status_code, r.json()) == (500, INCOMPLETE)
    r = await h.client.post(INFER, json={**infer_body("x"), "inputs": [{"name": "a", "shape": [1], "datatype": "BYTES",
                                                                         "data": "x"}]})
    assert r.status_code == 422 and r.text.startswith("Failed to deserialize the JSON body into the target type: inputs.0.data")
    r = await h.client.post(INFER, json={**infer_body("x"), "inputs": [{"name": "a", "shape": [1], "datatype": "BYTES",
                                                                         "data": [256]}]})
    assert r.status_code == 422 and r.headers["content-type"].startswith("text/plain")
    assert (await h.client.get(INFER)).status_code == 405


@pytest.mark.parametrize("data", [b"\xff", b"a\xc3", b"\xe2\x82\x28", b"\xed\xa0\x80", b"ok \xe2\x82\xac"])
def test_utf8_error_messages_match_rust(data):
    # Rust's from_utf8: valid_up_to, then error_len (None: truncated at the end).
    expected = {
        b"\xff": "invalid utf-8 sequence of 1 bytes from index 0",
        b"a\xc3": "incomplete utf-8 byte sequence from index 1",
        b"\xe2\x82\x28": "invalid utf-8 sequence of 2 bytes from index 0",
        b"\xed\xa0\x80": "invalid utf-8 sequence of 1 bytes from index 0",
        b"ok \xe2\x82\xac": None,
    }[data]
    assert utf8_error(data) == expected


async def test_infer_permits_and_counts(app_factory):
    h = await app_factory("--max-concurrent-requests", "1")
    r = await h.client.post(INFER, json=infer_body("x", "y", parameters={"max_new_tokens": 2}))
    assert (r.status_code, r.json()) == (500, INCOMPLETE)
    text = await h.metrics()
    assert metric_values(text, "tgi_request_failure").get('{err="overloaded"}') == 1
    assert await h.metric("tgi_compat_permits_in_use") == 0
    r = await h.client.post(INFER, json=infer_body("x", parameters={"max_new_tokens": 2}))
    assert r.status_code == 200
    a = ids(h, " a")
    h.engine.push(Script(steps=[a], block=True))
    s = h.open_stream(INFER, infer_body("x"))
    await h.engine.wait_live(1)
    assert (await h.client.post(INFER, json=infer_body("y"))).json() == INCOMPLETE  # the cap holds
    await s.disconnect()
    assert h.engine.requests[-1].request_id in h.engine.aborts
    assert await h.metric("tgi_compat_permits_in_use") == 0


async def test_api_key_covers_infer_only(app_factory):
    h = await app_factory("--api-key", "secret")
    assert (await h.client.post(INFER, json=infer_body("x"))).status_code == 401
    r = await h.client.post(INFER, json=infer_body("x", parameters={"max_new_tokens": 1}),
                            headers={"Authorization": "Bearer secret"})
    assert r.status_code == 200
    for path in ("/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/m/versions/1", "/v2/models/m/versions/1/ready"):
        assert (await h.client.get(path)).status_code == 200, path


async def test_openapi_documents_kserve(h):
    doc = (await h.client.get("/api-doc/openapi.json")).json()
    paths = doc["paths"]
    assert {"/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{model_name}/versions/{model_version}",
            "/v2/models/{model_name}/versions/{model_version}/ready",
            "/v2/models/{model_name}/versions/{model_version}/infer"} <= set(paths)
    op = paths["/v2/models/{model_name}/versions/{model_version}/infer"]["post"]
    assert set(op["responses"]) >= {"200", "400", "413", "415", "422", "500"}
    assert op["responses"]["500"]["content"]["application/json"]["example"] == INCOMPLETE
    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/InferenceRequest"
    assert set(paths["/v2/health/ready"]["get"]["responses"]) == {"200", "503"}
    assert {"InferenceRequest", "InferenceOutput", "OutputChunk", "ReadyResponse"} <= set(doc["components"]["schemas"])
