"""Request logs, JSON logs and OpenTelemetry traces of the real server."""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import ServerProcess

pytestmark = pytest.mark.engine


def test_one_log_line_per_finished_request(http, main_server):
    assert main_server.log_path, "with TGI_COMPAT_TEST_URL, set TGI_COMPAT_TEST_LOG to that server's log file"
    r = http.post("/generate", json={"inputs": "log me", "parameters": {"max_new_tokens": 3}}, headers={"x-request-id": "log-check-1"})
    assert r.status_code == 200
    http.post("/generate", json={"inputs": "x", "parameters": {"top_k": 0}}, headers={"x-request-id": "log-check-2"})
    time.sleep(0.3)
    lines = main_server.log_path.read_text(errors="replace").splitlines()
    done = [l for l in lines if "request_id=log-check-1" in l]
    assert len(done) == 1
    for field in ("request finished", "route=/generate", "status=200", "generated_tokens=3", "finish_reason=length",
                  "queue_ms=", "inference_ms=", "total_ms=", "prompt_tokens="):
        assert field in done[0], field
    failed = [l for l in lines if "request_id=log-check-2" in l]
    assert len(failed) == 1 and "status=422" in failed[0] and "error=validation" in failed[0]


def test_traces_reach_the_otlp_collector(http, otlp_collector):
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    r = http.post("/generate", json={"inputs": "trace me", "parameters": {"max_new_tokens": 2}},
                  headers={"x-request-id": "trace-check", "traceparent": traceparent})
    assert r.status_code == 200
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        roots = [s for _, s in otlp_collector.spans if s.name == "generate"
                 and any(a.key == "request_id" and a.value.string_value == "trace-check" for a in s.attributes)]
        if roots:
            break
        time.sleep(0.2)
    assert roots, "no span for the request"
    root = roots[0]
    assert root.trace_id.hex() == "0af7651916cd43dd8448eb211c80319c"  # W3C traceparent honoured
    assert root.parent_span_id.hex() == "b7ad6b7169203331"
    children = [s for _, s in otlp_collector.spans if s.parent_span_id == root.span_id]
    assert sorted(s.name for s in children) == ["inference", "queue", "validation"]
    assert all(root.start_time_unix_nano <= c.start_time_unix_nano <= c.end_time_unix_nano <= root.end_time_unix_nano for c in children)
    services = {attrs.get("service.name") for attrs, s in otlp_collector.spans if s is root}
    assert services == {"text-generation-inference.router"}


def test_json_output_makes_every_log_line_json():
    server = ServerProcess(["--max-total-tokens", "512", "--json-output"], log_name="json")
    try:
        server.wait_ready()
        import httpx

        r = httpx.post(server.url + "/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}},
                       headers={"x-request-id": "json-1"}, timeout=60)
        assert r.status_code == 200
        time.sleep(0.3)
    finally:
        server.stop()
    records = []
    for line in server.log_path.read_text(errors="replace").splitlines():
        if not line.strip() or not line.lstrip().startswith("{"):
            continue
        records.append(json.loads(line))
    ours = [rec for rec in records if rec.get("request_id") == "json-1"]
    assert ours and ours[0]["generated_tokens"] == 2 and ours[0]["status"] == 200
    assert any(rec.get("name", "").startswith("vllm") for rec in records)  # the engine's logs too
    assert any(rec.get("name", "").startswith("uvicorn") for rec in records)
