"""``--api-server-count 2`` on the real engine: the shared LoRA server runs two API
processes over one vLLM engine (vLLM's own multi-process machinery). Here: both serve,
TGI's cap holds exactly over both, every scrape gives the sums of what both did, and a
grammar and the watermark act whichever process takes the request. The same server's
adapter and gateway-metrics tests run through both processes, and its engine-death test
(tests/test_lifecycle.py) kills the engine under them. The VLM server runs with two
behind --api-key, and its last test kills one API process (tests/test_vlm.py); the
one-node data-parallel server runs two over its two engines, its SIGTERM drain test
included (tests/test_data_parallel.py). What they share, on its own:
tests/unit/test_api_servers.py."""

from __future__ import annotations

import http.client
import json
import re

import httpx
import pytest

from tests.conftest import LORA_API_SERVERS, LORA_MAX_CONCURRENT_REQUESTS, LORA_MAX_TOTAL_TOKENS
from tests.helpers import PausedEngines, StreamReader, api_processes, connection_owner, metric_values, wait_for

pytestmark = pytest.mark.engine

CAP = LORA_MAX_CONCURRENT_REQUESTS
# The tiny model (eager) reaches EOS at 1,407 tokens: these streams run to their length.
NEW_TOKENS = LORA_MAX_TOTAL_TOKENS - 16
LONG = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": NEW_TOKENS}}
OVERLOADED = b'data:{"error":"Model is overloaded","error_type":"overloaded"}\n\n'
PERMITS = "tgi_compat_permits_in_use"


def scrape(url: str) -> str:
    return httpx.get(url + "/metrics", timeout=30).text


def series(text: str, name: str, labels: str = "") -> float:
    return metric_values(text, name).get(labels, 0.0)


def test_both_api_processes_serve(lora_server_process):
    server = lora_server_process
    workers = api_processes(server.proc.pid, server.port)
    assert len(workers) == LORA_API_SERVERS and server.proc.pid not in {p.pid for p in workers}
    # The kernel hands each new connection to one API process (SO_REUSEPORT): 16 all on one
    # would be a 1 in 32,768 event, and a round is repeated if so.
    for _ in range(3):
        owners = set()
        conns = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=60) for _ in range(16)]
        try:
            for conn in conns:
                conn.request("GET", "/info")
                response = conn.getresponse()
                assert response.status == 200 and json.loads(response.read())["max_concurrent_requests"] == CAP
                owners.add(connection_owner(workers, conn.sock.getsockname()[1]))
        finally:
            for conn in conns:
                conn.close()
        if len(owners) == LORA_API_SERVERS:
            break
    assert owners == {p.pid for p in workers}


def test_cap_is_exact_over_both_and_every_scrape_sums_both(lora_server_process):
    server = lora_server_process
    workers = api_processes(server.proc.pid, server.port)
    prom = f"http://127.0.0.1:{server.prometheus_port}"
    permits = lambda: series(scrape(prom), PERMITS)  # noqa: E731
    assert wait_for(lambda: permits() == 0, 60)
    before = scrape(prom)
    with PausedEngines(server.proc.pid, exclude=tuple(p.pid for p in workers)) as engines:
        readers = [StreamReader(server.url, LONG) for _ in range(2 * CAP)]
        # Over the cap: TGI's overloaded event in-band (status 200), at once; the admitted
        # streams wait on the stopped engine.
        refused = lambda: [r for r in readers if not r.is_alive() and r.raw == OVERLOADED]  # noqa: E731
        assert wait_for(lambda: len(refused()) >= CAP, 60), [r.raw[:80] for r in readers]
        held = [r for r in readers if r not in refused()]
        assert len(held) == CAP and all(r.is_alive() for r in held)  # exactly the cap: no overshoot
        assert len({connection_owner(workers, r.local_port) for r in held}) == LORA_API_SERVERS  # both admitted some
        for url in (server.url, prom):  # whichever process answers, it counts every permit
            assert series(scrape(url), PERMITS) == CAP
        # One client leaves: one permit free. best_of=2 takes its two at once or none (429,
        # nothing taken); a one-permit request is admitted (no false 429).
        held[0].close()
        held[0].join(30)
        assert wait_for(lambda: permits() == CAP - 1, 30)
        best_of = {"inputs": "x", "parameters": {"max_new_tokens": 2, "best_of": 2, "do_sample": True}}
        r = httpx.post(server.url + "/generate", json=best_of, timeout=60)
        assert r.status_code == 429 and r.json()["error_type"] == "overloaded"
        assert permits() == CAP - 1
        one = StreamReader(server.url, {"inputs": "x", "parameters": {"max_new_tokens": 2}}, path="/generate")
        assert wait_for(lambda: permits() == CAP, 30)
        assert engines.run_until(lambda: all(r.started.is_set() for r in held[1:]) and not one.is_alive())
    assert one.status == 200 and json.loads(one.raw)["generated_text"] is not None
    for r in held[1:]:
        r.join(120)
        events = r.events()
        assert len(events) == NEW_TOKENS and events[-1]["generated_text"] is not None, r.raw[-300:]
    # TGI's series from either process and from --prometheus-port: the sums of what both
    # did, equal to what the clients saw.
    assert wait_for(lambda: permits() == 0, 60)
    for text in [scrape(prom)] + [scrape(server.url) for _ in range(4)]:
        delta = lambda name, labels="": series(text, name, labels) - series(before, name, labels)  # noqa: E731
        assert delta("tgi_request_success") == CAP
        assert delta("tgi_request_generated_tokens_sum") == (CAP - 1) * NEW_TOKENS + 2
        assert delta("tgi_request_generated_tokens_count") == CAP
        assert delta("tgi_request_duration_count") == CAP
        assert delta("tgi_request_failure", '{err="overloaded"}') == CAP + 1
        assert delta("tgi_request_count") >= 2 * CAP + 2
        assert 'tgi_request_duration_bucket{le="+Inf"}' in text
        assert "\nvllm:num_requests_running{" in text  # vLLM's own series (its multiprocess mode)


def _post_on_new_connection(server, workers, body: dict) -> tuple[int | None, dict]:
    """POST /generate on a connection of its own: (the API process that served it, the answer)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        conn.request("POST", "/generate", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        answer = json.loads(response.read())
        assert response.status == 200, answer
        return connection_owner(workers, conn.sock.getsockname()[1]), answer
    finally:
        conn.close()


def test_grammar_and_logits_processors_act_in_both_processes(lora_server_process):
    """A constraint (vLLM's structured outputs) and our logits processor (the watermark) act
    whichever API process takes the request: a seeded request answers the same from both,
    the regex matched, the watermarked tokens not those of the same request unwatermarked.
    (The watermark's statistics are tests/tgi/test_parameters.py's, on one process.)"""
    server = lora_server_process
    workers = api_processes(server.proc.pid, server.port)
    pattern = r"[a-z]{3,8}@[a-z]{2,5}\.(com|org)"
    sampled = {"do_sample": True, "seed": 7, "details": True}
    grammar = {"inputs": "email:", "parameters": {"max_new_tokens": 40, "grammar": {"type": "regex", "value": pattern},
                                                  **sampled}}
    marked = {"inputs": "Story: once upon a time", "parameters": {"max_new_tokens": 64, "watermark": True, **sampled}}
    answers: dict[str, dict[int, dict]] = {"grammar": {}, "marked": {}}
    for _ in range(16):  # a connection each, until both processes answered both (the kernel spreads them)
        for kind, body in (("grammar", grammar), ("marked", marked)):
            owner, out = _post_on_new_connection(server, workers, body)
            answers[kind][owner] = out
        if all(len(by_owner) == LORA_API_SERVERS for by_owner in answers.values()):
            break
    assert all(set(by_owner) == {p.pid for p in workers} for by_owner in answers.values())
    texts = {out["generated_text"] for out in answers["grammar"].values()}
    assert len(texts) == 1 and re.fullmatch(pattern, texts.pop()), answers["grammar"]
    ids = [[t["id"] for t in out["details"]["tokens"]] for out in answers["marked"].values()]
    assert ids[0] == ids[1] and len(ids[0]) == 64
    unmarked = {**marked, "parameters": {**marked["parameters"], "watermark": False}}
    assert [t["id"] for t in _post_on_new_connection(server, workers, unmarked)[1]["details"]["tokens"]] != ids[0]
