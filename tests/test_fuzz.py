"""Hostile input against the real server: property-based bodies (hypothesis) and
schemathesis over the server's own OpenAPI. Whatever arrives, the answer is one of TGI's
statuses in one of TGI's shapes, never a 5xx, and normal requests keep working."""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import pytest
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from tests.conftest import wait_idle

pytestmark = pytest.mark.engine

STATS = {"cases": 0, "5xx": 0}
ERROR_TYPES = {"validation", "overloaded", "generation", "incomplete_generation", "incomplete_generation_stream",
               "template_error", "tool_error", "suffix not supported", "batch size exceeded"}
BODY_ERROR_PREFIXES = (
    "Expected request with `Content-Type: application/json`",
    "Failed to parse the request body as JSON: ",
    "Failed to deserialize the JSON body into the target type: ",
    "Failed to buffer the request body",
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def field(valid):
    """A parameter value: usually plausible, sometimes any JSON at all."""
    return st.one_of(valid, valid, json_values)


parameters = st.fixed_dictionaries(
    {},
    optional={
        "max_new_tokens": field(st.integers(min_value=0, max_value=12)),
        "temperature": field(st.floats(min_value=-1, max_value=3, allow_nan=False)),
        "top_k": field(st.integers(min_value=-2, max_value=50)),
        "top_p": field(st.floats(min_value=-0.5, max_value=1.5, allow_nan=False)),
        "typical_p": field(st.floats(min_value=0.0, max_value=1.0)),
        "repetition_penalty": field(st.floats(min_value=-1, max_value=3, allow_nan=False)),
        "frequency_penalty": field(st.floats(min_value=-3, max_value=3, allow_nan=False)),
        "do_sample": field(st.booleans()),
        "seed": field(st.integers(min_value=0, max_value=2**64 - 1)),
        "stop": field(st.lists(st.text(max_size=5), max_size=6)),
        "details": field(st.booleans()),
        "decoder_input_details": field(st.booleans()),
        "top_n_tokens": field(st.integers(min_value=0, max_value=8)),
        "truncate": field(st.integers(min_value=0, max_value=2000)),
        "return_full_text": field(st.booleans()),
        "best_of": field(st.integers(min_value=0, max_value=3)),
        "watermark": field(st.booleans()),
        "grammar": field(st.fixed_dictionaries({"type": st.sampled_from(["json", "regex", "x"]), "value": json_values})),
        "adapter_id": field(st.text(max_size=5)),
    },
)

plausible = st.fixed_dictionaries(
    {"inputs": st.text(max_size=60)},
    optional={"parameters": parameters.map(lambda p: {**p, "max_new_tokens": p.get("max_new_tokens", 8)}), "stream": st.booleans()},
).map(lambda d: json.dumps(d).encode())

messages = st.lists(
    st.fixed_dictionaries({"role": field(st.sampled_from(["user", "assistant", "system", "tool"])),
                           "content": field(st.text(max_size=30))}),
    max_size=3,
)
openai_fields = {
    "model": field(st.text(max_size=8)),
    "max_tokens": field(st.integers(min_value=0, max_value=12)),
    "temperature": field(st.floats(min_value=-1, max_value=3, allow_nan=False)),
    "top_p": field(st.floats(min_value=-0.5, max_value=1.5, allow_nan=False)),
    "seed": field(st.integers(min_value=0, max_value=2**64 - 1)),
    "stop": field(st.lists(st.text(max_size=5), max_size=6)),
    "stream": field(st.booleans()),
    "logprobs": field(st.booleans()),
    "top_logprobs": field(st.integers(min_value=0, max_value=8)),
    "presence_penalty": field(st.floats(min_value=-3, max_value=3, allow_nan=False)),
    "response_format": field(st.fixed_dictionaries({"type": st.sampled_from(["json_object", "regex", "text"]), "value": json_values})),
    "tools": field(st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
        {"name": st.text(max_size=5), "parameters": json_values})}), max_size=2)),
    "tool_choice": field(st.sampled_from(["auto", "none", "required", "x"])),
    "stream_options": field(st.fixed_dictionaries({"include_usage": st.booleans()})),
}
plausible_chat = st.fixed_dictionaries({"messages": messages}, optional=openai_fields).map(
    lambda d: json.dumps({**d, "max_tokens": d.get("max_tokens", 8)}).encode())
plausible_completion = st.fixed_dictionaries(
    {"prompt": st.one_of(st.text(max_size=30), st.lists(st.text(max_size=10), max_size=6))},
    optional={**openai_fields, "suffix": field(st.text(max_size=3))},
).map(lambda d: json.dumps({**d, "max_tokens": d.get("max_tokens", 8)}).encode())

broken = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    plausible.map(lambda b: b[: len(b) // 2]),
    st.integers(min_value=1, max_value=400).map(lambda n: b"[" * n + b"]" * n),
)


def check_response(r: httpx.Response, stream_like: bool) -> None:
    STATS["cases"] += 1
    if r.status_code >= 500:
        STATS["5xx"] += 1
    assert r.status_code in {200, 400, 413, 415, 422, 424, 429}, (r.status_code, r.text[:300])
    ctype = r.headers.get("content-type", "")
    if r.status_code == 200:
        if ctype == "text/event-stream":
            events = r.content.rstrip(b"\n").split(b"\n\n")
            if events[-1] == b"data: [DONE]":  # an OpenAI stream
                for e in events[:-1]:
                    assert e.startswith(b"data:{"), e[:100]
                    event = json.loads(e[5:])
                    assert "choices" in event or set(event) == {"error"}, event
                return
            for e in events:
                assert e.startswith(b"data:{"), e[:100]
            last = json.loads(events[-1][5:])
            assert "generated_text" in last or (set(last) == {"error", "error_type"} and last["error_type"] in ERROR_TYPES), last
        else:
            body = r.json()
            assert isinstance(body, (dict, list))
    elif ctype == "application/json":
        body = r.json()
        assert set(body) == {"error", "error_type"} and body["error_type"] in ERROR_TYPES, body
    else:
        assert r.text.startswith(BODY_ERROR_PREFIXES), r.text[:200]


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(body=st.one_of(plausible, plausible, broken, plausible_chat, plausible_completion),
       path=st.sampled_from(["/generate", "/generate_stream", "/", "/tokenize", "/v1/chat/completions",
                             "/v1/completions", "/invocations", "/chat_tokenize"]),
       ctype=st.sampled_from(["application/json", "application/json", "application/json; charset=utf-8", "text/plain", None]))
def test_fuzzed_bodies(http, body, path, ctype):
    headers = {"content-type": ctype} if ctype else {}
    r = http.post(path, content=body, headers=headers)
    check_response(r, path != "/generate")


def test_fuzz_summary_and_server_still_serves(http):
    print(f"\nfuzz: {STATS['cases']} bodies, {STATS['5xx']} answered 5xx")
    assert STATS["cases"] >= 400 and STATS["5xx"] == 0
    assert wait_idle(http, timeout=30) == (0, 0)
    r = http.post("/generate", json={"inputs": "still fine?", "parameters": {"max_new_tokens": 4, "details": True}})
    assert r.status_code == 200 and r.json()["details"]["generated_tokens"] == 4


def _shorten(case) -> None:
    """Keep generated generations short: the point is the input space, not long outputs."""
    if isinstance(case.body, dict):
        value = case.body.get("max_tokens")
        case.body["max_tokens"] = min(value, 16) if isinstance(value, int) and not isinstance(value, bool) else 8
        params = case.body.get("parameters")
        if isinstance(params, dict):
            value = params.get("max_new_tokens")
            params["max_new_tokens"] = min(value, 16) if isinstance(value, int) and not isinstance(value, bool) else 8
        if isinstance(case.body.get("outputs"), list) and "parameters" not in case.body:
            case.body["parameters"] = {"max_new_tokens": 8}  # KServe infer: absent means fill the context
        instances = case.body.get("instances")  # /vertex: each instance is a generation
        for instance in instances if isinstance(instances, list) else []:
            if isinstance(instance, dict):
                if "inputs" in instance and not isinstance(instance.get("parameters"), dict):
                    instance["parameters"] = {}
                _shorten(SimpleNamespace(body=instance))


# /vertex and KServe's infer answer TGI's 500 when any of their generations fails (e.g. a
# fuzzed instance's parameters fail validation): TGI's contract, not a server error.
_TGI_INCOMPLETE = {"error": "Incomplete generation", "error_type": "Incomplete generation"}
_INCOMPLETE_ROUTES = {"/vertex", "/v2/models/{model_name}/versions/{model_version}/infer"}


@schemathesis.check
def not_a_server_error_but_tgis_incomplete(ctx, response, case):
    if response.status_code == 500 and case.operation.path in _INCOMPLETE_ROUTES:
        assert response.json() == _TGI_INCOMPLETE, response.text[:300]
        return None
    return not_a_server_error(ctx, response, case)


def test_schemathesis_over_own_openapi(server_url, http):
    """Every operation of /api-doc/openapi.json, with schemathesis-generated requests
    (valid and invalid per the schema): never a server error."""
    schema = schemathesis.openapi.from_url(f"{server_url}/api-doc/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} >= {
        ("POST", "/generate"), ("POST", "/generate_stream"), ("POST", "/"), ("GET", "/health"), ("GET", "/info"),
    }
    cases = 0
    runs = [(op, GenerationMode.POSITIVE) for op in operations]
    # Schema-violating bodies too (operations without a body have no negative cases).
    runs += [(op, GenerationMode.NEGATIVE) for op in operations if op.method.upper() == "POST"]
    for op, mode in runs:

        @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case):
            nonlocal cases
            _shorten(case)
            cases += 1
            check = not_a_server_error_but_tgis_incomplete if op.path in _INCOMPLETE_ROUTES else not_a_server_error
            case.call_and_validate(base_url=server_url, checks=[check], timeout=120)

        run()
    print(f"\nschemathesis: {cases} cases over {len(operations)} operations, 0 server errors")
    assert cases >= 100
    assert wait_idle(http, timeout=30) == (0, 0)
