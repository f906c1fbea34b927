"""A vision-language model served the TGI way (real engine, the embedded tiny VLM):
`![](...)` images in `inputs` on every TGI route, `image_url` parts in chat, fetched
from data URIs and from a local HTTP server on loopback, and every failure as TGI's
validation error. The tiny VLM's text is gibberish: the tests assert structure,
token counts and determinism, and that the image changes the answer."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import threading
import time
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import psutil
import pytest
from huggingface_hub import InferenceClient
from PIL import Image

from tests.conftest import EAGER, ServerProcess
from tests.helpers import PausedEngines, StreamReader, api_processes, connection_owner, wait_for
from tgi_compat import tiny_vlm

pytestmark = pytest.mark.topology

# The tiny VLM's processor turns one image into 19 tokens (16 image tokens between
# <fake_token_around_image><global-img> and <fake_token_around_image>), which replace
# the one `<image>` placeholder token.
TOKENS_PER_IMAGE = tiny_vlm.IMAGE_TOKENS_PER_IMAGE + 3
MAX_FETCH = 40_000
TIMEOUT = 2.0
MAX_IMAGES = 3
API_KEY = "sk-vlm"  # the server runs with --api-key (checked in both API processes)
AUTH = {"authorization": f"Bearer {API_KEY}"}


def noise_png(seed: int, size=(64, 64)) -> bytes:
    rng = random.Random(seed)
    img = Image.frombytes("RGB", size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3)))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def uri(data: bytes) -> str:
    return f"data:image/png;base64,{base64.b64encode(data).decode()}"


A, B = noise_png(1), noise_png(2)
assert len(A) < MAX_FETCH


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/a.png":
            self._send(A)
        elif self.path == "/big.png":
            self._send(noise_png(3, (160, 160)))  # over MAX_FETCH
        elif self.path == "/slow.png":
            self.send_response(200)
            self.send_header("Content-Length", str(len(A)))
            self.end_headers()
            self.wfile.write(A[:100])
            self.wfile.flush()
            time.sleep(TIMEOUT + 2)
            try:
                self.wfile.write(A[100:])
            except OSError:
                pass
        elif self.path == "/page.html":
            self._send(b"<html>hello</html>")
        elif self.path == "/to-loopback":
            port = self.server.server_address[1]
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{port}/a.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(b"", 404)

    def _send(self, body: bytes, status: int = 200):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def images_host():
    """A local image server, reached as `localhost` (which the VLM server allows by name);
    its 127.0.0.1 address stays refused."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://localhost:{srv.server_address[1]}"
    srv.shutdown()


@pytest.fixture(scope="module")
def vlm_server():
    """Two API processes (--api-server-count 2) behind --api-key: images are fetched and
    processed in whichever gets the request; the last test kills one of them."""
    server = ServerProcess(
        [
            "--model-id", "embedded:tiny-vlm",
            "--max-total-tokens", "512",
            "--max-image-fetch-size", str(MAX_FETCH),
            "--image-fetch-timeout", str(TIMEOUT),
            "--max-images-per-request", str(MAX_IMAGES),
            "--image-fetch-allow", "localhost",
            "--api-server-count", "2",
            "--api-key", API_KEY,
            "--engine-failure-grace", "1",  # the last test's server exits this long after its engine is gone
            *EAGER,
        ],
        log_name="vlm",
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def vlm(vlm_server):
    with httpx.Client(base_url=vlm_server.url, timeout=120, headers=AUTH) as client:
        yield client


def greedy(vlm, inputs: str, **params) -> httpx.Response:
    body = {"inputs": inputs, "parameters": {"max_new_tokens": 8, "do_sample": False, "details": True, **params}}
    return vlm.post("/generate", json=body)


def text_tokens(vlm, text: str) -> int:
    return len(vlm.post("/tokenize", json={"inputs": text}).json())


def test_info_and_image_changes_the_answer(vlm):
    assert vlm.get("/info").json()["model_id"] == "embedded:tiny-vlm"
    prompt = "Describe ![](" + uri(A) + ") briefly."
    r1, r2 = greedy(vlm, prompt), greedy(vlm, prompt)
    assert r1.status_code == 200, r1.text
    # The prompt counts the image's tokens as the engine does.
    plain = text_tokens(vlm, "Describe <image> briefly.")
    assert int(r1.headers["x-prompt-tokens"]) == plain - 1 + TOKENS_PER_IMAGE
    other = greedy(vlm, "Describe ![](" + uri(B) + ") briefly.").json()
    no_image = greedy(vlm, "Describe  briefly.").json()
    assert r1.json()["generated_text"] == r2.json()["generated_text"]  # same image, same text
    assert r1.json()["details"]["tokens"] != other["details"]["tokens"]  # another image, another answer
    assert r1.json()["details"]["tokens"] != no_image["details"]["tokens"]
    # Seeded sampling: the same seed and image repeat, another image does not.
    s1 = greedy(vlm, prompt, do_sample=True, seed=7, max_new_tokens=12).json()
    s2 = greedy(vlm, prompt, do_sample=True, seed=7, max_new_tokens=12).json()
    s3 = greedy(vlm, "Describe ![](" + uri(B) + ") briefly.", do_sample=True, seed=7, max_new_tokens=12).json()
    assert s1["details"]["tokens"] == s2["details"]["tokens"] != s3["details"]["tokens"]


def test_several_images_data_and_http(vlm, images_host):
    prompt = f"one ![]({uri(A)}) two ![]({images_host}/a.png) three ![]({uri(B)})"
    r = greedy(vlm, prompt, decoder_input_details=True)
    assert r.status_code == 200, r.text
    n = int(r.headers["x-prompt-tokens"])
    assert n == text_tokens(vlm, "one <image> two <image> three <image>") + 3 * (TOKENS_PER_IMAGE - 1)
    details = r.json()["details"]
    assert len(details["prefill"]) == n
    assert sum(t["text"] == tiny_vlm.IMAGE_TOKEN for t in details["prefill"]) == 3 * tiny_vlm.IMAGE_TOKENS_PER_IMAGE
    # The URL and the data URI of the same bytes are the same image.
    same = greedy(vlm, f"one ![]({uri(A)}) two ![]({uri(A)}) three ![]({uri(B)})").json()
    assert same["generated_text"] == r.json()["generated_text"]
    # return_full_text keeps the markdown, as TGI.
    full = greedy(vlm, prompt, return_full_text=True).json()
    assert full["generated_text"] == prompt + r.json()["generated_text"]
    # /tokenize: the engine's ids; each image's tokens span its markdown.
    tokens = vlm.post("/tokenize", json={"inputs": prompt}).json()
    assert len(tokens) == n
    first = prompt.index("![](")
    image_tokens = [t for t in tokens if t["text"] == tiny_vlm.IMAGE_TOKEN]
    assert len(image_tokens) == 3 * tiny_vlm.IMAGE_TOKENS_PER_IMAGE
    assert (image_tokens[0]["start"], image_tokens[0]["stop"]) == (first, prompt.index(")", first) + 1)
    assert tokens[1]["text"] == "one" or prompt[tokens[1]["start"] : tokens[1]["stop"]].strip() == "one"


def test_stream_and_compat_route(vlm):
    prompt = f"Look ![]({uri(A)}) and ![]({uri(B)})"
    events = []
    with vlm.stream("POST", "/generate_stream", json={"inputs": prompt, "parameters": {
        "max_new_tokens": 6, "do_sample": False, "details": True}}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    assert len(events) == events[-1]["details"]["generated_tokens"] and events[-1]["details"]["finish_reason"]
    assert events[-1]["details"]["input_length"] == text_tokens(vlm, "Look <image> and <image>") + 2 * (TOKENS_PER_IMAGE - 1)
    ref = greedy(vlm, prompt, max_new_tokens=6).json()
    assert events[-1]["generated_text"] == ref["generated_text"]
    compat = vlm.post("/", json={"inputs": prompt, "parameters": {"max_new_tokens": 6, "do_sample": False}})
    assert compat.status_code == 200 and compat.json()[0]["generated_text"] == prompt + ref["generated_text"]
    completion = vlm.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6, "temperature": 0}).json()
    assert completion["choices"][0]["text"] == ref["generated_text"]
    assert completion["usage"]["prompt_tokens"] == events[-1]["details"]["input_length"]


def test_truncate_and_length_limits_count_image_tokens(vlm):
    prompt = f"words before ![]({uri(A)}) after"
    n = int(greedy(vlm, prompt).headers["x-prompt-tokens"])
    kept = greedy(vlm, prompt, truncate=n - 2)  # drops leading text only
    assert kept.status_code == 200 and int(kept.headers["x-prompt-tokens"]) == n - 2
    cut = greedy(vlm, prompt, truncate=5)
    assert cut.status_code == 422
    assert "would cut into an image" in cut.json()["error"]
    many = " ".join(f"![]({uri(A)})" for _ in range(3)) + " x" * 470
    r = greedy(vlm, many)
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    assert r.json()["error"].startswith("Input validation error: `inputs` tokens + `max_new_tokens` must be <= 512. Given: ")


def expect_error(vlm, inputs: str) -> str:
    r = greedy(vlm, inputs)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error_type"] == "validation"
    # Streams get the same error in-band.
    with vlm.stream("POST", "/generate_stream", json={"inputs": inputs, "parameters": {"max_new_tokens": 2}}) as s:
        assert s.status_code == 200
        lines = [line for line in s.iter_lines() if line.startswith("data:")]
    assert [json.loads(line[5:]) for line in lines] == [body]
    return body["error"]


def test_errors(vlm, images_host):
    host = images_host
    assert expect_error(vlm, f"x ![]({host}/big.png)").startswith(
        "Input validation error: Image size "
    ) and f"exceeds maximum allowed size of {MAX_FETCH} bytes" in expect_error(vlm, f"x ![]({host}/big.png)")
    start = time.monotonic()
    assert expect_error(vlm, f"x ![]({host}/slow.png)") == (
        f"Input validation error: Could not fetch image: {host}/slow.png: timed out after {TIMEOUT:g} s"
    )
    assert time.monotonic() - start < 4 * TIMEOUT + 4  # two requests, each bounded
    assert "127.0.0.1, which is not a public address" in expect_error(vlm, f"x ![]({host}/to-loopback)")
    port = host.rsplit(":", 1)[1]
    assert "not a public address" in expect_error(vlm, f"x ![](http://127.0.0.1:{port}/a.png)")
    assert "not a public address" in expect_error(vlm, "x ![](http://169.254.169.254/latest/meta-data)")
    assert expect_error(vlm, f"x ![]({host}/page.html)") == (
        "Input validation error: invalid image: The image format could not be determined"
    )
    assert expect_error(vlm, "x ![](data:image/png,AAAA)") == "Input validation error: invalid image content: image/png,AAAA"
    assert expect_error(vlm, "x ![](ftp://h/a.png)") == "Input validation error: invalid image content: ![](ftp://h/a.png)"
    assert expect_error(vlm, "x " + f"![]({uri(A)})" * (MAX_IMAGES + 1)) == (
        f"Input validation error: `inputs` must have at most {MAX_IMAGES} images. Given: {MAX_IMAGES + 1}"
    )
    # Parameter errors come first, as TGI checks them before fetching.
    r = greedy(vlm, f"x ![]({host}/slow.png)", temperature=-1)
    assert r.json()["error"] == "Input validation error: `temperature` must be strictly positive"
    # The server is fine afterwards.
    assert greedy(vlm, f"ok ![]({uri(A)})").status_code == 200


def chat_messages(image_url: str) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "text", "text": "What is in "},
        {"type": "image_url", "image_url": {"url": image_url}},
        {"type": "text", "text": "?"},
    ]}]


def test_chat_with_image_parts(vlm, images_host):
    base = str(vlm.base_url).rstrip("/")
    hf = InferenceClient(base_url=base, timeout=120, api_key=API_KEY)
    a = hf.chat_completion(chat_messages(uri(A)), max_tokens=8, temperature=0)
    a_http = hf.chat_completion(chat_messages(f"{images_host}/a.png"), max_tokens=8, temperature=0)
    b = hf.chat_completion(chat_messages(uri(B)), max_tokens=8, temperature=0)
    assert a.choices[0].message.content == a_http.choices[0].message.content
    assert a.choices[0].message.content != b.choices[0].message.content
    # The templated prompt holds the image's tokens: prompt_tokens counts them.
    assert a.usage.prompt_tokens == a_http.usage.prompt_tokens
    templated = vlm.post("/chat_tokenize", json={"messages": chat_messages(uri(A))}).json()
    assert len(templated["tokenize_response"]) == a.usage.prompt_tokens
    assert templated["templated_text"].count("![](data:image/png;base64,") == 1
    text_only = templated["templated_text"].replace(f"![]({uri(A)})", "<image>")
    assert a.usage.prompt_tokens == len(
        vlm.post("/tokenize", json={"inputs": text_only}).json()
    ) - 1 + TOKENS_PER_IMAGE - 1  # /tokenize adds a BOS; a templated prompt has the template's own

    oa = openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, timeout=120)
    got = oa.chat.completions.create(model="tgi", messages=chat_messages(uri(A)), max_tokens=8, temperature=0)
    assert got.choices[0].message.content == a.choices[0].message.content
    stream = oa.chat.completions.create(model="tgi", messages=chat_messages(uri(B)), max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == b.choices[0].message.content
    # A failed image is TGI's validation error on the chat route too.
    with pytest.raises(openai.UnprocessableEntityError) as e:
        oa.chat.completions.create(model="tgi", messages=chat_messages("data:x"), max_tokens=4)
    assert e.value.response.json() == {"error": "Input validation error: invalid image content: x", "error_type": "validation"}


def test_api_key_is_checked_in_both_api_processes(vlm_server):
    workers, refused_by = api_processes(vlm_server.proc.pid, vlm_server.port), set()
    for _ in range(24):  # a connection each: the kernel spreads them over the processes
        conn = HTTPConnection("127.0.0.1", vlm_server.port, timeout=60)
        try:
            conn.request("POST", "/generate", '{"inputs": "x"}', {"Content-Type": "application/json"})
            response = conn.getresponse()
            assert (response.status, response.read()) == (401, b"")  # TGI's: no body
            refused_by.add(connection_owner(workers, conn.sock.getsockname()[1]))
        finally:
            conn.close()
        if len(refused_by) == 2:
            break
    assert refused_by == {p.pid for p in workers}


def test_killed_api_process_takes_the_server_down(vlm_server):
    """Run last (it ends the module's server): one of the two API processes is killed; the
    engine is stopped, so the other's in-flight requests end with TGI's in-band
    `generation` error, and the server exits 1 with nothing of it left."""
    server = vlm_server
    workers = api_processes(server.proc.pid, server.port)
    assert len(workers) == 2
    body = {"inputs": "Describe ![](" + uri(A) + ") briefly.", "parameters": {"max_new_tokens": 400}}
    with PausedEngines(server.proc.pid, exclude=tuple(p.pid for p in workers)) as engines:
        streams = []
        for _ in range(4):  # until both processes hold a stream (the kernel picks per connection)
            streams += [StreamReader(server.url, body, headers=AUTH) for _ in range(2)]
            assert engines.run_until(lambda: all(s.started.is_set() for s in streams))
            if {connection_owner(workers, s.local_port) for s in streams} == {p.pid for p in workers}:
                break
        victim, other = workers
        survivors = [s for s in streams if connection_owner(workers, s.local_port) == other.pid]
        assert survivors and all(s.is_alive() for s in survivors)
        victim.kill()
    # The supervisor stops the engine at once (it resumes here, to take the SIGTERM): far
    # sooner than the survivors' 400 tokens.
    for s in survivors:
        s.join(60)
    for s in survivors:
        last = s.events()[-1]
        assert last.get("error_type") == "generation", s.raw[-300:]
    assert server.proc.wait(60) == 1
    assert wait_for(lambda: not [p for p in psutil.process_iter(["pid"]) if _pgid(p.info["pid"]) == server.proc.pid], 30)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
