"""Images in prompts, as TGI takes them (router/src/validation.rs ``prepare_input``,
``fetch_image``): markdown ``![](url)`` chunks, fetched over http(s) or decoded from
``data:`` URIs, bounded and safe.

- ``split_markdown`` cuts ``inputs`` into text and image-URL chunks with TGI's regex.
- ``ImageFetcher.load_all`` turns a request's image URLs into RGB ``PIL.Image``s,
  concurrently, off the event loop: http/https and ``data:`` only; TGI's
  ``--max-image-fetch-size`` on the body (Content-Length first, then while reading);
  one deadline per image for DNS, connection, redirects and body; a cap on images per
  request; content sniffed by Pillow among common raster formats only; a pixel limit
  checked before decoding (decompression bombs).
- Unlike TGI (which fetches any URL), no connection goes to a loopback, private,
  link-local, CGNAT, multicast or otherwise non-global address, the cloud metadata
  address included: every connection (redirects too) resolves its host, checks every
  address and connects to the checked address itself, so DNS rebinding cannot swap it.
  ``allow`` opens named hosts or networks (tests open 127.0.0.0/8).

Every failure is a ``ValidationError`` with TGI's message where TGI has one.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field

import anyio
import httpcore
import httpx

from tgi_compat.errors import ValidationError

# TGI's regex: an image is `![](...)` with no `)` inside.
MARKDOWN_IMAGE = re.compile(r"!\[\]\([^\)]*\)")

# TGI's router default for --max-image-fetch-size (backends/v3/src/main.rs): 1 GiB.
DEFAULT_MAX_IMAGE_FETCH_SIZE = 1 << 30
# Formats Pillow may open: the raster formats TGI's `image` crate reads. Anything else
# (EPS runs Ghostscript, some decode through plugins) is not an image here.
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP")
# TGI's data-URI MIME types (format_from_mimetype), mapped to Pillow's format names.
MIME_FORMATS = {
    "image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/gif": "GIF",
    "image/webp": "WEBP", "image/tiff": "TIFF",
}
MAX_REDIRECTS = 5


@dataclass(frozen=True)
class ImageChunk:
    """One ``![](url)`` in ``inputs``: the URL and the markdown's character span."""

    url: str
    start: int
    end: int


def split_markdown(inputs: str) -> list[str | ImageChunk]:
    """``inputs`` as TGI's chunks, in order: text (``str``) and images (``ImageChunk``)."""
    chunks: list[str | ImageChunk] = []
    pos = 0
    for m in MARKDOWN_IMAGE.finditer(inputs):
        if m.start() != pos:
            chunks.append(inputs[pos : m.start()])
        chunks.append(ImageChunk(m.group()[4:-1], m.start(), m.end()))
        pos = m.end()
    if pos != len(inputs):
        chunks.append(inputs[pos:])
    return chunks


@dataclass(frozen=True)
class FetchPolicy:
    max_fetch_size: int = DEFAULT_MAX_IMAGE_FETCH_SIZE
    timeout: float = 10.0  # seconds per image: DNS, connect, redirects and body
    max_images: int = 8  # per request
    max_pixels: int = 50_000_000  # width * height, checked before decoding
    allow_hosts: frozenset[str] = frozenset()
    allow_networks: tuple = ()

    @classmethod
    def with_allow(cls, allow: Iterable[str], **kw) -> FetchPolicy:
        """``allow``: host names and CIDR networks (``example.internal``, ``10.0.0.0/8``)."""
        hosts, nets = set(), []
        for item in allow:
            item = item.strip()
            if not item:
                continue
            try:
                nets.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                hosts.add(item.lower().rstrip("."))
        return cls(allow_hosts=frozenset(hosts), allow_networks=tuple(nets), **kw)


class _Refused(Exception):
    """A connection the policy refuses (raised inside httpcore, caught by the fetcher)."""


def _address_allowed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, policy: FetchPolicy) -> bool:
    if any(ip in net for net in policy.allow_networks):
        return True
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    return ip.is_global and not ip.is_multicast


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend with the address check on every TCP connection."""

    def __init__(self, policy: FetchPolicy):
        self.policy = policy
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        name = host.lower().rstrip(".")
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        if not addresses:
            raise _Refused(f"{host} has no address")
        if name not in self.policy.allow_hosts:
            for a in addresses:
                if not _address_allowed(ipaddress.ip_address(a.split("%")[0]), self.policy):
                    raise _Refused(f"{host} resolves to {a}, which is not a public address")
        error: Exception | None = None
        for a in addresses:  # connect to the address that was checked, not a new lookup
            try:
                return await self.inner.connect_tcp(a, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as e:
                error = e
        raise error  # type: ignore[misc]

    async def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise _Refused("unix sockets are not fetched")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class _GuardedTransport(httpx.AsyncHTTPTransport):
    def __init__(self, policy: FetchPolicy):
        super().__init__(retries=0)
        # httpx builds its pool without a way to pass a network backend; this is the
        # same pool (TLS verified, HTTP/1.1) with the guarded backend.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(), network_backend=_GuardedBackend(policy)
        )


@dataclass
class ImageFetcher:
    """Fetches and decodes a request's images under one ``FetchPolicy``."""

    policy: FetchPolicy = field(default_factory=FetchPolicy)
    _client: httpx.AsyncClient | None = None

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                transport=_GuardedTransport(self.policy),
                follow_redirects=True,
                max_redirects=MAX_REDIRECTS,
                timeout=self.policy.timeout,
                trust_env=False,  # a proxy would connect to what the guard refused
                # identity: the size limit then bounds what is decoded, not a compressed body
                headers={"user-agent": "tgi-compat", "accept": "image/*", "accept-encoding": "identity"},
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def check_count(self, n: int) -> None:
        if n > self.policy.max_images:
            raise ValidationError(f"`inputs` must have at most {self.policy.max_images} images. Given: {n}")

    async def load_all(self, urls: list[str]):
        """RGB ``PIL.Image``s in order, fetched concurrently; the first failure (in
        order) is raised."""
        self.check_count(len(urls))
        results = await asyncio.gather(*(self.load(u) for u in urls), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results

    async def load(self, url: str):
        if url.startswith(("http://", "https://")):
            data = await self.fetch(url)
            return await anyio.to_thread.run_sync(self.decode, data, None)
        if url.startswith("data:"):
            data, fmt = self.parse_data_uri(url)
            return await anyio.to_thread.run_sync(self.decode, data, fmt)
        raise ValidationError(f"invalid image content: ![]({url})")

    async def fetch(self, url: str) -> bytes:
        limit = self.policy.max_fetch_size
        try:
            with anyio.fail_after(self.policy.timeout):
                async with self.client().stream("GET", url) as resp:
                    if resp.status_code != 200:
                        raise ValidationError(f"Could not fetch image: {url}: HTTP status {resp.status_code}")
                    length = resp.headers.get("content-length")
                    if length is not None and length.isdigit() and int(length) > limit:
                        raise ValidationError(
                            f"Image size {int(length)} bytes exceeds maximum allowed size of {limit} bytes"
                        )
                    body = bytearray()
                    async for part in resp.aiter_bytes():
                        body += part
                        if len(body) > limit:
                            raise ValidationError(
                                f"Image size {len(body)} bytes exceeds maximum allowed size of {limit} bytes"
                            )
                    return bytes(body)
        except TimeoutError:
            raise ValidationError(f"Could not fetch image: {url}: timed out after {self.policy.timeout:g} s") from None
        except _Refused as e:
            raise ValidationError(f"Could not fetch image: {url}: {e}") from None
        except httpx.TooManyRedirects:
            raise ValidationError(f"Could not fetch image: {url}: more than {MAX_REDIRECTS} redirects") from None
        except (httpx.HTTPError, OSError) as e:
            raise ValidationError(f"Could not fetch image: {url}: {e or type(e).__name__}") from None

    def parse_data_uri(self, url: str) -> tuple[bytes, str | None]:
        """TGI's data-URI rules: ``data:<mime>;base64,<data>``, exactly one ``;``."""
        content = url[len("data:") :]
        parts = content.split(";")
        if len(parts) != 2:
            raise ValidationError(f"invalid image content: {content}")
        mimetype, payload = parts
        if not payload.startswith("base64,"):
            raise ValidationError(f"invalid image content: {payload}")
        try:
            data = base64.b64decode(payload[len("base64,") :], validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValidationError(f"base64 encoding is invalid: {e}") from None
        if len(data) > self.policy.max_fetch_size:
            raise ValidationError(
                f"Image size {len(data)} bytes exceeds maximum allowed size of {self.policy.max_fetch_size} bytes"
            )
        return data, MIME_FORMATS.get(mimetype)

    def decode(self, data: bytes, fmt: str | None):
        """Sniff and decode one image (in a worker thread): the first frame, as RGB."""
        from PIL import Image, UnidentifiedImageError

        formats = (fmt,) if fmt else FORMATS
        try:
            img = Image.open(io.BytesIO(data), formats=formats)
        except UnidentifiedImageError:
            raise ValidationError("invalid image: The image format could not be determined") from None
        except Exception as e:  # a malformed header
            raise ValidationError(f"invalid image: {e}") from None
        width, height = img.size
        if width * height > self.policy.max_pixels:
            raise ValidationError(
                f"invalid image: {width}x{height} pixels exceed the limit of {self.policy.max_pixels} pixels"
            )
        try:
            img.load()
            return img.convert("RGB")
        except Exception as e:  # truncated or corrupt data
            raise ValidationError(f"invalid image: {e}") from None


def image_token_offsets(inputs, chunks, placeholder, tok, ids, mm_input, add_special_tokens) -> list[dict]:
    """Tokens of an image prompt with byte offsets into the original ``inputs``.

    The placeholder prompt's tokens map back to ``inputs`` through its chunks; each
    image's span of engine tokens (vLLM's placeholder ranges) replaced one placeholder
    token and takes the bytes of its markdown."""
    text_parts, spans = [], []  # spans: (start in placeholder text, end, start in inputs, end, is image)
    pos = orig = 0
    for c in chunks:
        piece = c if isinstance(c, str) else placeholder
        length_in_inputs = len(c) if isinstance(c, str) else c.end - c.start
        spans.append((pos, pos + len(piece), orig, orig + length_in_inputs, not isinstance(c, str)))
        text_parts.append(piece)
        pos += len(piece)
        orig += length_in_inputs
    text = "".join(text_parts)
    enc = tok.hf(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    byte_pos = [0]
    for ch in inputs:
        byte_pos.append(byte_pos[-1] + len(ch.encode("utf-8")))

    def to_inputs(start: int, stop: int) -> tuple[int, int]:
        for s0, s1, o0, o1, is_image in spans:
            if s0 <= start < s1 or (start == stop == s1):
                if is_image:
                    return byte_pos[o0], byte_pos[o1]
                return byte_pos[o0 + start - s0], byte_pos[min(o0 + stop - s0, o1)]
        return byte_pos[-1], byte_pos[-1]

    pre = [to_inputs(a, b) for a, b in enc.offset_mapping]
    ranges = sorted((p.offset, p.length) for rs in mm_input["mm_placeholders"].values() for p in rs)
    image_spans = [c for c in chunks if isinstance(c, ImageChunk)]
    out, i, j = [], 0, 0  # i: engine token, j: placeholder-prompt token
    for k, (offset, length) in enumerate(ranges):
        while i < offset and j < len(pre):
            out.append((ids[i], *pre[j]))
            i += 1
            j += 1
        c = image_spans[k] if k < len(image_spans) else None
        span = (byte_pos[c.start], byte_pos[c.end]) if c is not None else pre[min(j, len(pre) - 1)]
        out.extend((ids[i + n], *span) for n in range(length))
        i += length
        j += 1  # the placeholder token this image replaced
    while i < len(ids):
        out.append((ids[i], *(pre[j] if j < len(pre) else (byte_pos[-1], byte_pos[-1]))))
        i += 1
        j += 1
    return [{"id": tid, "text": tok.token_text(tid), "start": a, "stop": b} for tid, a, b in out]
