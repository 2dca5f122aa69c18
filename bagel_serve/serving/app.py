"""The FastAPI application over one `Omni`: routes, the API key, body limits, CORS, error bodies, and the
playground page at `/` (served from `serving/static/`, shipped in the package).

`build_app(omni, settings)` does not own the engine: whoever made the `Omni` shuts it down (`run.serve`
does, after uvicorn has drained the requests in flight).
"""

from __future__ import annotations

import hmac
import logging
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from bagel_serve import __version__
from bagel_serve.serving import routes_chat, routes_images, routes_meta
from bagel_serve.serving.defaults import server_defaults
from bagel_serve.serving.errors import APIError
from bagel_serve.serving.media import ImageStore
from bagel_serve.serving.metrics import Metrics
from bagel_serve.serving.settings import ServerSettings

STATIC_DIR = Path(__file__).resolve().parent / "static"
log = logging.getLogger("bagel_serve.serving")
_ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/images/generations": "images_generations",
              "/v1/images/edits": "images_edits"}


class AppState:
    """What the routes share: the engine, the settings, metrics, images kept for URL answers, the request
    defaults."""

    def __init__(self, omni: Any, settings: ServerSettings, model: str) -> None:
        self.omni = omni
        self.settings = settings
        self.model = model
        self.metrics = Metrics(omni)
        self.images = ImageStore()
        self.started = int(time.time())
        self.max_model_len = omni.deploy_config.stage(0).max_model_len or omni.config.llm.max_position_embeddings
        self.defaults = server_defaults(self)
        """GET /v1/defaults' body (fixed for the server's life)."""

    def check_model(self, name: str | None) -> None:
        """404 for a model this server does not serve (None or the served name are fine)."""
        if name is not None and name != self.settings.served_model_name:
            raise APIError(404, f"the model {name!r} does not exist here; this server serves "
                                f"{self.settings.served_model_name!r}", param="model", code="model_not_found")

    def record(self, endpoint: str, modality: str, status: int, t0: float) -> None:
        self.metrics.requests.labels(endpoint, modality, str(status)).inc()
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)


def build_app(omni: Any, settings: ServerSettings, model: str = "") -> FastAPI:
    app = FastAPI(title="bagel-serve", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.bagel = AppState(omni, settings, model)
    app.state.bagel.omni.orchestrator.max_queue = settings.max_queue
    for r in (routes_meta.router, routes_chat.router, routes_images.router):
        app.include_router(r)
    _static(app)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        endpoint = _ENDPOINTS.get(request.url.path)
        if endpoint is not None:
            app.state.bagel.metrics.requests.labels(endpoint, "unknown", str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = "no such route" if e.status_code == 404 else str(e.detail)
        return JSONResponse(APIError(e.status_code, f"{message}: {request.method} {request.url.path}",
                                     code="not_found" if e.status_code == 404 else None).body(),
                            status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError(422, "the request could not be processed", code="invalid_body").body(),
                            status_code=422)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(APIError(500, f"internal error ({type(e).__name__})", code="internal_error").body(),
                            status_code=500)

    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(_BodyLimit, limit=settings.max_upload_bytes)
    app.add_middleware(_ApiKey, key=settings.api_key)
    return app


PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
            "form-action 'none'; frame-ancestors 'none'")
"""The playground's Content-Security-Policy: its own scripts, styles and API only (nothing from elsewhere,
no inline code); images also from data: and blob: URLs (results, previews)."""


def _static(app: FastAPI) -> None:
    """The playground (`serving/static/`): its page at `/`, its files at `/static/...`. Neither needs the
    API key; every /v1 call the page makes does."""
    index = STATIC_DIR / "index.html"
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(index, headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"})


async def _send_error(send: Send, e: APIError, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    import json

    body = json.dumps(e.body()).encode()
    await send({"type": "http.response.start", "status": e.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class _ApiKey:
    """With a key: every /v1 route needs `Authorization: Bearer <key>` (compared in constant time)."""

    def __init__(self, app: ASGIApp, key: str | None) -> None:
        self.app = app
        self.key = key.encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key is None or scope["type"] != "http" or not scope["path"].startswith("/v1"):
            return await self.app(scope, receive, send)
        auth = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            return await _send_error(send, APIError(401, "a valid API key is needed: Authorization: Bearer <key>",
                                                    code="invalid_api_key"),
                                     [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)


class _BodyLimit:
    """413 for a body over the limit: at once from its Content-Length, or as soon as it has sent too much."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        error = APIError(413, f"the request body is larger than --max-upload-mb ({self.limit} bytes)",
                         code="too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _send_error(send, error)
        seen = 0
        started = False

        async def counted() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise error  # answered by the APIError handler
            return msg

        async def tracked(msg: dict) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counted, tracked)
        except APIError as e:  # raised outside the routes' handlers
            if not started:
                await _send_error(send, e)
