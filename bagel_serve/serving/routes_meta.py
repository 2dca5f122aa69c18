"""GET /v1/models (and /v1/models/{id}), /v1/defaults (`serving.defaults`), /health, /version, /metrics."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from bagel_serve import __version__
from bagel_serve.serving.errors import APIError

router = APIRouter()


def _model_card(state: Any) -> dict[str, Any]:
    return {"id": state.settings.served_model_name, "object": "model", "created": state.started,
            "owned_by": "bagel-serve", "root": state.model, "max_model_len": state.max_model_len}


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(request.app.state.bagel)]}


@router.get("/v1/models/{model_id:path}")
async def model(request: Request, model_id: str) -> dict[str, Any]:
    state = request.app.state.bagel
    state.check_model(model_id)
    return _model_card(state)


@router.get("/v1/defaults")
async def defaults(request: Request) -> dict[str, Any]:
    return request.app.state.bagel.defaults


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 while the engine serves; 503 with the reason when it does not (a stage worker died, shut down)."""
    state = request.app.state.bagel
    problem = state.omni.orchestrator.health()
    if problem is not None:
        return JSONResponse(APIError(503, f"unhealthy: {problem}", code="engine_unavailable").body(), status_code=503)
    return JSONResponse({"status": "ok", "topology": state.omni.topology, "in_flight": state.omni.orchestrator.in_flight})


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    text = await asyncio.to_thread(request.app.state.bagel.metrics.render)
    return Response(content=text, media_type=CONTENT_TYPE_LATEST)
