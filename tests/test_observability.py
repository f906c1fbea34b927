"""Request logs and OpenTelemetry traces of the real server (JSON logs: tests/test_launcher.py's
env-only server, which runs with JSON_OUTPUT)."""

from __future__ import annotations

import pytest

from tests.helpers import wait_for

pytestmark = pytest.mark.engine


def test_one_log_line_per_finished_request(http, main_server):
    assert main_server.log_path, "with TGI_COMPAT_TEST_URL, set TGI_COMPAT_TEST_LOG to that server's log file"
    r = http.post("/generate", json={"inputs": "log me", "parameters": {"max_new_tokens": 3}}, headers={"x-request-id": "log-check-1"})
    assert r.status_code == 200
    http.post("/generate", json={"inputs": "x", "parameters": {"top_k": 0}}, headers={"x-request-id": "log-check-2"})

    def both_logged():  # the log line is written as the request ends, maybe after its answer
        lines = main_server.log_path.read_text(errors="replace").splitlines()
        if any("request_id=log-check-2" in l for l in lines) and any("request_id=log-check-1" in l for l in lines):
            return lines

    lines = wait_for(both_logged, timeout=10)
    assert lines, "no log line for the requests"
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
    roots = wait_for(lambda: [s for _, s in otlp_collector.spans if s.name == "generate" and any(
        a.key == "request_id" and a.value.string_value == "trace-check" for a in s.attributes)], timeout=10)
    assert roots, "no span for the request"
    root = roots[0]
    assert root.trace_id.hex() == "0af7651916cd43dd8448eb211c80319c"  # W3C traceparent honoured
    assert root.parent_span_id.hex() == "b7ad6b7169203331"
    children = [s for _, s in otlp_collector.spans if s.parent_span_id == root.span_id]
    assert sorted(s.name for s in children) == ["inference", "queue", "validation"]
    assert all(root.start_time_unix_nano <= c.start_time_unix_nano <= c.end_time_unix_nano <= root.end_time_unix_nano for c in children)
    services = {attrs.get("service.name") for attrs, s in otlp_collector.spans if s is root}
    assert services == {"text-generation-inference.router"}
