"""TGI's generation state machine over scripted engine outputs: stop sequences, EOS vs
length, multi-byte text, merged deltas, best_of, top_n_tokens / details / prefill."""

from __future__ import annotations

import pytest

from tests.unit.conftest import sse_events
from tests.unit.scripted_engine import LENGTH, STOP, Lp, Script


def ids_of(h, text: str) -> list[int]:
    return h.engine.tokenizer.encode_no_special(text)


# --- stop sequences matched across token boundaries ---

# " fooEND bar" is [' f', 'oo', 'E', 'N', 'D', ' b', 'ar']: "END" spans three tokens.
STOP_TEXT = " fooEND bar"


async def test_stop_sequence_across_tokens_generate(h):
    ids = ids_of(h, STOP_TEXT)
    assert len(ids) == 7
    h.engine.push(Script.tokens(ids, LENGTH))
    r = await h.client.post("/generate", json={"inputs": "Hi", "parameters": {
        "max_new_tokens": 7, "stop": ["END"], "details": True}})
    assert r.status_code == 200, r.text
    body = r.json()
    # TGI keeps the stop sequence in the text and stops at the token completing it.
    assert body["generated_text"] == " fooEND"
    assert body["details"]["finish_reason"] == "stop_sequence"
    assert body["details"]["generated_tokens"] == 5
    assert [t["id"] for t in body["details"]["tokens"]] == ids[:5]
    rid = h.engine.requests[-1].request_id
    assert rid in h.engine.aborts  # the engine would have gone on: aborted


async def test_queue_time_of_a_request_ended_by_a_stop_sequence(h):
    """The queue time comes from vLLM's stats on the first output: a request that ends
    on a stop sequence (before vLLM finishes it) reports it too."""
    ids = ids_of(h, STOP_TEXT)
    h.engine.push(Script.tokens(ids, LENGTH, queue=0.2))
    r = await h.client.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 7, "stop": ["END"]}})
    assert r.status_code == 200 and r.json()["generated_text"] == " fooEND"
    assert int(r.headers["x-queue-time"]) >= 199  # 0.2 s, truncated to ms after float arithmetic


async def test_stop_sequence_inside_merged_delta_stream(h):
    ids = ids_of(h, STOP_TEXT)
    # One engine output carries "E", "N", "D", " b": the tokens after the stop are dropped.
    h.engine.push(Script(steps=[ids[:2], ids[2:6], ids[6:]], finish=LENGTH))
    r = await h.client.post("/generate_stream", json={"inputs": "Hi", "parameters": {
        "max_new_tokens": 7, "stop": ["nothing", "END"], "details": True}})
    events = sse_events(r.content)
    assert [e["index"] for e in events] == [1, 2, 3, 4, 5]
    assert [e["token"]["text"] for e in events] == [" f", "oo", "E", "N", "D"]
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    assert events[-1]["generated_text"] == " fooEND"
    assert events[-1]["details"] == {"finish_reason": "stop_sequence", "generated_tokens": 5, "seed": None,
                                     "input_length": len(h.engine.requests[-1].prompt_ids)}
    assert h.engine.requests[-1].request_id in h.engine.aborts


async def test_stop_sequence_chat(h):
    ids = ids_of(h, STOP_TEXT)
    h.engine.push(Script.tokens(ids, LENGTH), Script.tokens(ids, LENGTH))
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 7, "stop": ["END"]}
    r = await h.client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": " fooEND"}
    assert choice["finish_reason"] == "stop_sequence"
    assert r.json()["usage"]["completion_tokens"] == 5
    r = await h.client.post("/v1/chat/completions", json={**body, "stream": True})
    events = sse_events(r.content)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == [" f", "oo", "E", "N", "D"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 4 + ["stop_sequence"]
    assert all(a in h.engine.aborts for a in (h.engine.requests[-2].request_id, h.engine.requests[-1].request_id))


# --- EOS vs length ---

@pytest.mark.parametrize(("n", "engine_reason", "max_new", "tgi", "openai"), [
    (3, STOP, 5, "eos_token", "stop"),   # EOS before the cap
    (3, STOP, 3, "length", "length"),    # EOS exactly at the cap: TGI checks length first
    (3, LENGTH, 3, "length", "length"),
])
async def test_eos_vs_length(h, n, engine_reason, max_new, tgi, openai):
    eos = h.engine.tokenizer.eos_token_id
    tokens = ids_of(h, " a b")[: n - 1] + ([eos] if engine_reason == STOP else ids_of(h, " c"))
    h.engine.push(Script.tokens(tokens, engine_reason), Script.tokens(tokens, engine_reason))
    r = await h.client.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": max_new, "details": True}})
    details = r.json()["details"]
    assert details["finish_reason"] == tgi
    assert details["generated_tokens"] == n
    if engine_reason == STOP:
        assert details["tokens"][-1] == {"id": eos, "text": "</s>", "logprob": -1.0, "special": True}
        assert r.json()["generated_text"] == " a b"  # special tokens skipped
    assert h.engine.aborts == []  # a natural finish is not aborted
    r = await h.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                           "max_tokens": max_new, "stream": True})
    chunks = sse_events(r.content)[:-1]
    assert chunks[-1]["choices"][0]["finish_reason"] == openai
    if engine_reason == STOP:
        assert chunks[-1]["choices"][0]["delta"]["content"] == ""  # the EOS token's content


# --- multi-byte text split across tokens ---

async def test_multibyte_character_split_across_tokens(h):
    ids = ids_of(h, "Grüße")  # 'ü' and 'ß' are two byte tokens each
    assert len(ids) == 7
    h.engine.push(Script.tokens(ids, LENGTH))
    r = await h.client.post("/generate_stream", json={"inputs": "x", "parameters": {"max_new_tokens": 7}})
    events = sse_events(r.content)
    # TGI sends "" for the token ending mid-character; the next one carries the character.
    assert [e["token"]["text"] for e in events] == ["G", "r", "", "ü", "", "ß", "e"]
    assert "".join(e["token"]["text"] for e in events) == events[-1]["generated_text"] == "Grüße"
    # Non-stream details use the same per-token text.
    h.engine.push(Script.tokens(ids, LENGTH))
    r = await h.client.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 7, "details": True}})
    assert [t["text"] for t in r.json()["details"]["tokens"]] == ["G", "r", "", "ü", "", "ß", "e"]


# --- merged deltas ---

async def test_merged_deltas_one_event_per_token(h):
    ids = ids_of(h, " hello world again")
    h.engine.push(Script(steps=[ids[:1], ids[1:4], ids[4:]], finish=LENGTH))
    s = h.open_stream("/generate_stream", {"inputs": "x", "parameters": {"max_new_tokens": len(ids)}})
    writes = await s.read_all()
    await s.task
    assert s.status == 200
    per_write = [sse_events(w) for w in writes]
    per_write = [w for w in per_write if w]
    # One write per engine output, one event per token in it.
    assert [len(w) for w in per_write] == [1, 3, len(ids) - 4]
    events = [e for w in per_write for e in w]
    assert [e["index"] for e in events] == list(range(1, len(ids) + 1))
    assert [e["token"]["id"] for e in events] == ids
    assert events[-1]["generated_text"] == " hello world again"


async def test_single_delta_with_every_token(h):
    ids = ids_of(h, " one two")
    h.engine.push(Script(steps=[ids], finish=LENGTH))
    r = await h.client.post("/generate_stream", json={"inputs": "x", "parameters": {"max_new_tokens": len(ids)}})
    events = sse_events(r.content)
    assert [e["index"] for e in events] == list(range(1, len(ids) + 1))
    assert [e["generated_text"] for e in events] == [None] * (len(ids) - 1) + [" one two"]


# --- best_of ---

async def test_best_of_highest_mean_logprob_wins(app_factory):
    h = await app_factory("--max-best-of", "3", "--max-concurrent-requests", "3")
    a, b, c = ids_of(h, " a"), ids_of(h, " b"), ids_of(h, " c")
    scripts = {  # mean logprobs: -2.0, -0.5, -0.5 (a tie: the first wins)
        "0": Script.tokens(a * 2, LENGTH, logprobs=[-1.0, -3.0]),
        "1": Script.tokens(b * 2, LENGTH, logprobs=[-0.25, -0.75]),
        "2": Script.tokens(c * 2, LENGTH, logprobs=[-0.5, -0.5]),
    }
    h.engine.script_for = lambda req: scripts[req.request_id.rsplit("-", 1)[1]]
    r = await h.client.post("/generate", json={"inputs": "Hi", "parameters": {
        "max_new_tokens": 2, "best_of": 3, "do_sample": True, "details": True}})
    assert r.status_code == 200, r.text
    body = r.json()
    reqs = h.engine.requests
    assert len(reqs) == 3
    assert len({q.request_id for q in reqs}) == 3
    seeds = [q.sampling.seed for q in reqs]
    assert len(set(seeds)) == 3 and None not in seeds
    by_suffix = {q.request_id.rsplit("-", 1)[1]: q for q in reqs}
    assert body["generated_text"] == " b b"
    assert body["details"]["seed"] == by_suffix["1"].sampling.seed
    others = body["details"]["best_of_sequences"]
    assert [o["generated_text"] for o in others] == [" a a", " c c"]
    assert [o["seed"] for o in others] == [by_suffix["0"].sampling.seed, by_suffix["2"].sampling.seed]
    assert [[t["logprob"] for t in o["tokens"]] for o in others] == [[-1.0, -3.0], [-0.5, -0.5]]
    assert all(o["finish_reason"] == "length" and o["generated_tokens"] == 2 for o in others)
    assert await h.metric("tgi_compat_permits_in_use") == 0


async def test_best_of_needs_its_permits(app_factory):
    """best_of 3 takes 3 permits at once: with one held by a stream it is overloaded."""
    h = await app_factory("--max-best-of", "3", "--max-concurrent-requests", "3")
    h.engine.push(Script(steps=[ids_of(h, " a")], block=True))
    s = h.open_stream("/generate_stream", {"inputs": "x", "parameters": {"max_new_tokens": 5}})
    await h.engine.wait_live(1)
    assert await h.metric("tgi_compat_permits_in_use") == 1
    r = await h.client.post("/generate", json={"inputs": "Hi", "parameters": {
        "max_new_tokens": 2, "best_of": 3, "do_sample": True}})
    assert r.status_code == 429
    assert r.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
    await s.disconnect()
    assert await h.metric("tgi_compat_permits_in_use") == 0
    r = await h.client.post("/generate", json={"inputs": "Hi", "parameters": {
        "max_new_tokens": 2, "best_of": 3, "do_sample": True}})
    assert r.status_code == 200


# --- top_n_tokens, details, decoder_input_details ---

async def test_top_n_tokens_and_prefill(h):
    ids = ids_of(h, " a b")
    alt = ids_of(h, " c")[0]
    lps = [Lp(-0.5, 1, [(ids[0], -0.5), (alt, -1.5), (alt + 1, -2.5)]),
           Lp(-2.0, 3, [(alt, -0.1), (alt + 1, -0.2), (alt + 2, -0.3)])]  # the sampled one ranks 3rd
    h.engine.push(Script.tokens(ids, LENGTH, logprobs=lps, prompt_logprobs=[-0.5, -1.25]))
    r = await h.client.post("/generate", json={"inputs": "Hello", "parameters": {
        "max_new_tokens": 2, "details": True, "decoder_input_details": True, "top_n_tokens": 2}})
    assert r.status_code == 200, r.text
    d = r.json()["details"]
    req = h.engine.requests[-1]
    assert req.sampling.logprobs == 2 and req.sampling.prompt_logprobs is not None
    tok = h.engine.tokenizer
    assert d["prefill"][0] == {"id": req.prompt_ids[0], "text": tok.token_text(req.prompt_ids[0]), "logprob": None}
    assert [p["id"] for p in d["prefill"]] == req.prompt_ids
    assert [p["logprob"] for p in d["prefill"][1:3]] == [-0.5, -1.25]
    assert [t["logprob"] for t in d["tokens"]] == [-0.5, -2.0]
    assert d["top_tokens"] == [
        [{"id": ids[0], "text": tok.token_text(ids[0]), "logprob": -0.5, "special": False},
         {"id": alt, "text": tok.token_text(alt), "logprob": -1.5, "special": False}],
        [{"id": alt, "text": tok.token_text(alt), "logprob": -0.1, "special": False},
         {"id": alt + 1, "text": tok.token_text(alt + 1), "logprob": -0.2, "special": False}],
    ]


async def test_top_n_tokens_stream_events(h):
    ids = ids_of(h, " a b")
    h.engine.push(Script.tokens(ids, LENGTH))
    r = await h.client.post("/generate_stream", json={"inputs": "x", "parameters": {"max_new_tokens": 2, "top_n_tokens": 3}})
    events = sse_events(r.content)
    assert [list(e) for e in events] == [["index", "token", "top_tokens", "generated_text", "details"]] * 2
    assert all(len(e["top_tokens"]) == 3 for e in events)
    assert [[t["id"] for t in e["top_tokens"]] for e in events] == [[i, i + 1, i + 2] for i in ids]


async def test_details_off_and_full_text_on_compat_route(h):
    ids = ids_of(h, " a b")
    h.engine.push(Script.tokens(ids, LENGTH), Script.tokens(ids, LENGTH))
    r = await h.client.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    assert r.json() == {"generated_text": " a b"}
    assert h.engine.requests[-1].sampling.logprobs is None  # nothing asked, nothing computed
    for name in ("x-compute-type", "x-compute-time", "x-total-time", "x-validation-time", "x-queue-time",
                 "x-inference-time", "x-time-per-token", "x-request-id"):
        assert name in r.headers
    assert r.headers["x-prompt-tokens"] == str(len(h.engine.requests[-1].prompt_ids))
    assert r.headers["x-generated-tokens"] == "2" and r.headers["x-compute-characters"] == "2"
    r = await h.client.post("/", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    assert r.json() == [{"generated_text": "Hi a b"}]  # `/`: a list, return_full_text on


async def test_sampling_settings_reach_the_engine(h):
    r = await h.client.post("/generate", json={"inputs": "Hi", "parameters": {
        "max_new_tokens": 4, "do_sample": True, "temperature": 0.5, "top_k": 7, "top_p": 0.9, "seed": 42,
        "repetition_penalty": 1.2, "frequency_penalty": 0.3, "details": True}})
    assert r.status_code == 200, r.text
    s = h.engine.requests[-1].sampling
    assert (s.max_tokens, s.temperature, s.top_k, s.top_p, s.seed, s.repetition_penalty, s.frequency_penalty) == (
        4, 0.5, 7, 0.9, 42, 1.2, 0.3)
    assert r.json()["details"]["seed"] == 42
    r = await h.client.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 4, "details": True}})
    s = h.engine.requests[-1].sampling
    assert s.temperature == 0.0  # greedy
    assert r.json()["details"]["seed"] is None


async def test_absent_parameters_means_sampling_with_a_random_seed(h):
    """TGI's defaults trap: no `parameters` at all means `do_sample: true` (a random seed
    each time), while `"parameters": {}` is greedy; both run to the context's end."""
    for path in ("/generate", "/generate_stream"):
        r = await h.client.post(path, json={"inputs": "Hi"})
        assert r.status_code == 200, r.text
    absent = h.engine.requests[-2:]
    for q in absent:
        assert q.sampling.temperature == 1.0 and q.sampling.seed is not None
        assert q.sampling.max_tokens == h.engine.max_model_len - len(q.prompt_ids)
    assert absent[0].sampling.seed != absent[1].sampling.seed
    r = await h.client.post("/generate", json={"inputs": "Hi", "parameters": {}})
    assert r.status_code == 200 and h.engine.requests[-1].sampling.temperature == 0.0
    assert h.engine.requests[-1].sampling.seed is None


async def test_best_of_holds_one_permit_per_sequence(app_factory):
    h = await app_factory("--max-best-of", "3", "--max-concurrent-requests", "3")
    h.engine.script_for = lambda req: Script(steps=[ids_of(h, " a")], block=True)
    s = h.open_stream("/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 2, "best_of": 3, "do_sample": True}})
    await h.engine.wait_live(3)
    assert await h.metric("tgi_compat_permits_in_use") == 3
    assert await h.metric("tgi_compat_engine_requests") == 3
    h.engine.release_all()  # vLLM ends aborted requests with finish reason "abort"
    body = b"".join(await s.read_all())
    assert s.status == 424
    assert body == b'{"error":"Request failed during generation: the engine ended the request (abort)","error_type":"generation"}'
    assert await h.metric("tgi_compat_permits_in_use") == 0
