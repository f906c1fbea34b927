"""Image fetching and decoding (tgi_compat/images.py), against a local HTTP server on
loopback: the guard, the limits and TGI's messages. No engine."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from tgi_compat.errors import ValidationError
from tgi_compat.images import FetchPolicy, ImageChunk, ImageFetcher, split_markdown


def png(color=(255, 0, 0), size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


PNG = png()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        port = self.server.server_address[1]
        path = self.path
        if path == "/img.png":
            self._send(200, PNG, "image/png")
        elif path == "/big":  # announces a size over the limit
            self._send(200, b"x" * 5000, "image/png")
        elif path == "/chunked-big":  # no Content-Length: the limit applies while reading
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(10):
                self.wfile.write(b"400\r\n" + b"y" * 1024 + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG[:10])
            self.wfile.flush()
            time.sleep(3)
            self.wfile.write(PNG[10:])
        elif path == "/text":
            self._send(200, b"<html>not an image</html>", "image/png")
        elif path == "/redirect-local":
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{port}/img.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(404, b"no", "text/plain")

    def _send(self, status, body, ctype):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def load(urls, **policy):
    async def go():
        fetcher = ImageFetcher(FetchPolicy.with_allow(policy.pop("allow", ()), **policy))
        try:
            return await fetcher.load_all(urls)
        finally:
            await fetcher.aclose()

    return asyncio.run(go())


def error(urls, **policy) -> str:
    with pytest.raises(ValidationError) as e:
        load(urls, **policy)
    return e.value.message


LOOPBACK = {"allow": ["127.0.0.0/8"]}


def test_split_markdown_as_tgi():
    s = "a ![](http://x/1.png) b ![](data:image/png;base64,AA==)![](u) c ![alt](y)"
    chunks = split_markdown(s)
    assert chunks == [
        "a ",
        ImageChunk("http://x/1.png", 2, 21),
        " b ",
        ImageChunk("data:image/png;base64,AA==", 24, 55),
        ImageChunk("u", 55, 61),
        " c ![alt](y)",  # only `![](...)` is an image, as TGI's regex
    ]
    assert split_markdown("plain") == ["plain"]


def test_fetch_and_data_uri_in_order(server):
    red, blue = png((255, 0, 0)), png((0, 0, 255), (5, 5))
    imgs = load([f"http://{server}/img.png", data_uri(blue), data_uri(red, "image/jpeg-ish")], **LOOPBACK)
    assert [i.mode for i in imgs] == ["RGB"] * 3
    assert imgs[0].size == (8, 6) and imgs[1].size == (5, 5)
    assert imgs[1].getpixel((0, 0)) == (0, 0, 255) and imgs[2].getpixel((0, 0)) == (255, 0, 0)


def test_loopback_refused_by_default_and_on_redirect(server):
    msg = error([f"http://{server}/img.png"])
    assert msg.startswith("Input validation error: Could not fetch image: http://127.0.0.1:")
    assert "resolves to 127.0.0.1, which is not a public address" in msg
    # `localhost` opened by name; its redirect to 127.0.0.1 is checked again and refused.
    port = server.split(":")[1]
    assert load([f"http://localhost:{port}/img.png"], allow=["localhost"])[0].size == (8, 6)
    msg = error([f"http://localhost:{port}/redirect-local"], allow=["localhost"])
    assert "127.0.0.1, which is not a public address" in msg
    # Private, link-local (cloud metadata) and CGNAT addresses too.
    for host in ("10.1.2.3", "169.254.169.254", "100.64.0.1", "[::1]", "0.0.0.0"):
        assert "not a public address" in error([f"http://{host}:9/x.png"], timeout=2)


def test_size_limit(server):
    assert error([f"http://{server}/big"], max_fetch_size=1000, **LOOPBACK) == (
        "Input validation error: Image size 5000 bytes exceeds maximum allowed size of 1000 bytes"
    )
    msg = error([f"http://{server}/chunked-big"], max_fetch_size=3000, **LOOPBACK)
    assert msg.startswith("Input validation error: Image size ") and msg.endswith(
        "bytes exceeds maximum allowed size of 3000 bytes"
    )
    assert "exceeds maximum allowed size of 10 bytes" in error([data_uri(PNG)], max_fetch_size=10)


def test_slow_server_times_out(server):
    start = time.monotonic()
    msg = error([f"http://{server}/slow"], timeout=1, **LOOPBACK)
    assert time.monotonic() - start < 2.5
    assert msg == f"Input validation error: Could not fetch image: http://{server}/slow: timed out after 1 s"


def test_not_an_image_and_http_errors(server):
    assert error([f"http://{server}/text"], **LOOPBACK) == (
        "Input validation error: invalid image: The image format could not be determined"
    )
    assert error([f"http://{server}/nope"], **LOOPBACK).endswith("/nope: HTTP status 404")
    assert "more than 5 redirects" in error([f"http://{server}/loop"], **LOOPBACK)
    assert error(["http://127.0.0.1:1/x.png"], **LOOPBACK).startswith(
        "Input validation error: Could not fetch image: http://127.0.0.1:1/x.png: "
    )


def test_bad_urls_and_data_uris():
    assert error(["ftp://x/y.png"]) == "Input validation error: invalid image content: ![](ftp://x/y.png)"
    assert error(["file:///etc/passwd"]) == "Input validation error: invalid image content: ![](file:///etc/passwd)"
    assert error(["data:image/png,AAAA"]) == "Input validation error: invalid image content: image/png,AAAA"
    assert error(["data:image/png;charset=x;base64,AA"]) == (
        "Input validation error: invalid image content: image/png;charset=x;base64,AA"
    )
    assert error(["data:image/png;hex,00"]) == "Input validation error: invalid image content: hex,00"
    assert error(["data:image/png;base64,@@@"]).startswith("Input validation error: base64 encoding is invalid: ")
    assert error([data_uri(b"GIF89a garbage")]).startswith("Input validation error: invalid image: ")
    # The declared format is the one decoded (TGI's format_from_mimetype).
    assert error([data_uri(PNG, "image/jpeg")]).startswith("Input validation error: invalid image: ")


def test_image_cap_and_pixel_limit():
    assert error([data_uri(PNG)] * 3, max_images=2) == "Input validation error: `inputs` must have at most 2 images. Given: 3"
    assert error([data_uri(PNG)], max_pixels=47) == (
        "Input validation error: invalid image: 8x6 pixels exceed the limit of 47 pixels"
    )
    # A decompression bomb: a few kB of PNG that would decode to 144 M pixels.
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, "PNG")
    assert len(buf.getvalue()) < 100_000
    start = time.monotonic()
    assert "12000x12000 pixels exceed the limit" in error([data_uri(buf.getvalue())])
    assert time.monotonic() - start < 1.0  # refused from the header, before decoding


def test_fetches_run_concurrently_off_the_loop(server):
    async def go():
        fetcher = ImageFetcher(FetchPolicy.with_allow(["127.0.0.0/8"], timeout=10))
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        t = asyncio.ensure_future(ticker())
        start = time.monotonic()
        try:
            imgs = await fetcher.load_all([f"http://{server}/slow"] * 3)
        finally:
            t.cancel()
            await fetcher.aclose()
        return imgs, time.monotonic() - start, ticks

    imgs, elapsed, ticks = asyncio.run(go())
    assert len(imgs) == 3
    assert elapsed < 6  # three 3-second bodies together, not one after another
    assert ticks > 20  # the event loop kept running meanwhile
