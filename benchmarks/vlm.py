"""Image cost on a VLM: fetch + preprocessing time and TTFT with and without an image.

    python benchmarks/vlm.py [--rounds 10] [--model-id embedded:tiny-vlm]

Starts a server (the embedded tiny VLM unless ``--model-id``) and a local image server
on loopback (allowed by name as ``localhost``), then, per case, sends ``--rounds``
sequential ``/generate_stream`` requests (1 token) and ``/generate`` requests and prints
the median and p90 of: TTFT (request sent to first token event) and the server's
``x-validation-time`` (for an image prompt: fetch, decode and vLLM's multimodal
preprocessing; for text: tokenization). Cases: text only; a 64x64 PNG as a data URI;
the same over http; a 1024x768 JPEG over http; three 64x64 images. Loopback only.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import statistics
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import ServerProcess  # noqa: E402


def image_bytes(size, fmt: str, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    img = Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


FILES = {"/small.png": image_bytes((64, 64), "PNG"), "/large.jpg": image_bytes((1024, 768), "JPEG")}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        body = FILES.get(self.path, b"")
        self.send_response(200 if body else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--model-id", default="embedded:tiny-vlm")
    args = ap.parse_args()

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    host = f"http://localhost:{srv.server_address[1]}"
    small_uri = "data:image/png;base64," + base64.b64encode(FILES["/small.png"]).decode()
    cases = {
        "text only": "Describe the picture briefly.",
        "64x64 PNG, data URI": f"Describe ![]({small_uri}) briefly.",
        "64x64 PNG, http": f"Describe ![]({host}/small.png) briefly.",
        "1024x768 JPEG, http": f"Describe ![]({host}/large.jpg) briefly.",
        "3 x 64x64 PNG, http": "Compare " + " ".join(f"![]({host}/small.png)" for _ in range(3)),
    }
    server = ServerProcess(["--model-id", args.model_id, "--image-fetch-allow", "localhost"], log_name="bench-vlm")
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=120) as client:
            rows = []
            for name, prompt in cases.items():
                ttft, validation = [], []
                for i in range(args.rounds + 1):
                    # Distinct text each round: vLLM's prefix and multimodal caches would
                    # otherwise skip the work being measured (the image bytes repeat, so
                    # vLLM's processor cache still serves the processed image).
                    body = {"inputs": f"{i}. {prompt}", "parameters": {"max_new_tokens": 1, "do_sample": False}}
                    start = time.perf_counter()
                    with client.stream("POST", "/generate_stream", json=body) as r:
                        for line in r.iter_lines():
                            if line.startswith("data:"):
                                assert "error" not in json.loads(line[5:]), line
                                first = time.perf_counter() - start
                                break
                    r = client.post("/generate", json=body)
                    assert r.status_code == 200, r.text
                    if i:  # the first round warms up
                        ttft.append(first * 1000)
                        validation.append(int(r.headers["x-validation-time"]))
                rows.append((name, int(r.headers["x-prompt-tokens"]), ttft, validation))
    finally:
        server.stop()
        srv.shutdown()
    print(f"model {args.model_id}, {args.rounds} rounds per case (ms)")
    print("| case | prompt tokens | TTFT p50 | TTFT p90 | validation p50 | validation p90 |")
    print("|---|---|---|---|---|---|")
    for name, n, ttft, val in rows:
        print(f"| {name} | {n} | {statistics.median(ttft):.1f} | {pct(ttft, 0.9):.1f} | "
              f"{statistics.median(val):.0f} | {pct(val, 0.9):.0f} |")


if __name__ == "__main__":
    main()
