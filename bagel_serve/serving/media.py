"""Images in and out of the HTTP API, within the server's limits.

In: `data:` URIs always; http(s) URLs only from `--allowed-media-domains` (every redirect hop checked too, at
most `MAX_REMOTE_REDIRECTS`, the body read up to the upload limit); uploaded files. Every image is checked
for its pixel count from its header *before* it is decoded (a decompression bomb never expands).
Out: PNG / JPEG / WebP bytes, as base64 or kept for a while at GET /v1/images/{id}.
"""

from __future__ import annotations

import base64
import binascii
import io
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import OrderedDict

from PIL import Image

from bagel_serve.serving.errors import APIError
from bagel_serve.serving.settings import (IMAGE_URL_MAX_KEPT, IMAGE_URL_TTL_S, MAX_REMOTE_REDIRECTS,
                                          REMOTE_FETCH_TIMEOUT_S, ServerSettings)

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def decode_image(data: bytes, param: str, settings: ServerSettings) -> Image.Image:
    """Decoded RGB-ready image from bytes; 413 when it has more pixels than `--max-pixels`, 400 when it is
    not an image."""
    if len(data) > settings.max_upload_bytes:
        raise APIError(413, f"{param}: the image has {len(data)} bytes, more than --max-upload-mb "
                            f"{settings.max_upload_mb:g} MB", param=param, code="too_large")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size  # from the header: nothing is decoded yet
    except Exception:
        raise APIError(400, f"{param}: not an image PIL can read (PNG, JPEG, WebP, ...)", param=param,
                       code="invalid_image") from None
    if w * h > settings.max_pixels:
        raise APIError(413, f"{param}: the image has {w}x{h} = {w * h} pixels, more than --max-pixels "
                            f"{settings.max_pixels}", param=param, code="too_large")
    try:
        img.load()
    except Exception as e:
        raise APIError(400, f"{param}: the image could not be decoded ({type(e).__name__})", param=param,
                       code="invalid_image") from None
    return img


def image_from_url(url: str, param: str, settings: ServerSettings) -> Image.Image:
    """An image_url's image: a data: URI, or an http(s) URL of an allowed domain."""
    if url.startswith("data:"):
        head, sep, payload = url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise APIError(400, f"{param}: a data: URI must be base64 (data:image/png;base64,...)", param=param,
                           code="invalid_image")
        if len(payload) * 3 // 4 > settings.max_upload_bytes:
            raise APIError(413, f"{param}: the image is larger than --max-upload-mb {settings.max_upload_mb:g} MB",
                           param=param, code="too_large")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{param}: the data: URI is not valid base64", param=param,
                           code="invalid_image") from None
        return decode_image(data, param, settings)
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise APIError(400, f"{param}: only data: URIs and http(s) URLs are taken, got a {scheme or 'relative'} URL",
                       param=param, code="invalid_image")
    return decode_image(fetch(url, param, settings), param, settings)


def _allowed(url: str, settings: ServerSettings) -> bool:
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    return any(host == d.lower() or host.endswith("." + d.lower()) for d in settings.allowed_media_domains)


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows at most MAX_REMOTE_REDIRECTS redirects, each to an allowed domain."""

    max_redirections = MAX_REMOTE_REDIRECTS

    def __init__(self, settings: ServerSettings, param: str) -> None:
        self.settings = settings
        self.param = param

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 (urllib's signature)
        if not _allowed(newurl, self.settings):
            raise APIError(400, f"{self.param}: the URL redirects to a domain not in --allowed-media-domains",
                           param=self.param, code="domain_not_allowed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch(url: str, param: str, settings: ServerSettings) -> bytes:
    """The bytes at an http(s) URL of an allowed domain, at most the upload limit (blocking: run it in a
    thread)."""
    if not _allowed(url, settings):
        raise APIError(400, f"{param}: fetching images from this domain is not allowed (the server allows "
                            f"{', '.join(settings.allowed_media_domains) or 'no remote domains'}; send a data: URI)",
                       param=param, code="domain_not_allowed")
    opener = urllib.request.build_opener(_CheckedRedirects(settings, param))
    limit = settings.max_upload_bytes
    try:
        with opener.open(url, timeout=REMOTE_FETCH_TIMEOUT_S) as resp:
            data = resp.read(limit + 1)
    except APIError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise APIError(400, f"{param}: the image could not be fetched ({type(e).__name__}: {e})", param=param,
                       code="fetch_failed") from None
    if len(data) > limit:
        raise APIError(413, f"{param}: the image is larger than --max-upload-mb {settings.max_upload_mb:g} MB",
                       param=param, code="too_large")
    return data


def encode_image(img: Image.Image, fmt: str, compression: int | None = None) -> bytes:
    """The image as PNG, JPEG or WebP bytes (`compression` 0-100: higher is smaller, as OpenAI's
    output_compression)."""
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=round((compression or 0) * 9 / 100))
    else:
        quality = 100 - compression if compression is not None else 90
        img.convert("RGB").save(buf, format=fmt.upper(), quality=max(1, quality))
    return buf.getvalue()


def data_uri(data: bytes, fmt: str) -> str:
    return f"data:{MEDIA_TYPES[fmt]};base64,{base64.b64encode(data).decode('ascii')}"


class ImageStore:
    """Images answered by URL: kept for `IMAGE_URL_TTL_S` seconds, at most `IMAGE_URL_MAX_KEPT` of them."""

    def __init__(self, ttl: float = IMAGE_URL_TTL_S, max_kept: int = IMAGE_URL_MAX_KEPT) -> None:
        self.ttl = ttl
        self.max_kept = max_kept
        self._items: OrderedDict[str, tuple[float, bytes, str]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, data: bytes, fmt: str) -> str:
        key = uuid.uuid4().hex
        with self._lock:
            self._expire()
            self._items[key] = (time.monotonic() + self.ttl, data, MEDIA_TYPES[fmt])
            while len(self._items) > self.max_kept:
                self._items.popitem(last=False)
        return key

    def get(self, key: str) -> tuple[bytes, str] | None:
        with self._lock:
            self._expire()
            item = self._items.get(key)
        return (item[1], item[2]) if item is not None else None

    def _expire(self) -> None:
        now = time.monotonic()
        while self._items and next(iter(self._items.values()))[0] <= now:
            self._items.popitem(last=False)
