"""Errors as OpenAI returns them: `{"error": {"message", "type", "param", "code"}}` with an HTTP status,
and the mapping from the engine's exceptions to them. A response never carries a traceback."""

from __future__ import annotations

from typing import Any

from bagel_serve.engine.request import RequestError
from bagel_serve.imaging import ImageInputError
from bagel_serve.pipeline.orchestrator import EngineShutDownError, WorkerDiedError
from bagel_serve.pipeline.submission import QueueFullError, RequestCancelledError, RequestTimeoutError

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "request_too_large", 422: "invalid_request_error",
          429: "rate_limit_error", 499: "cancelled", 500: "server_error", 503: "service_unavailable",
          504: "timeout_error"}


class APIError(Exception):
    """An error answered to the client: HTTP `status`, a message and, for a bad field, its `param`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_field(param: str, reason: str) -> APIError:
    return APIError(400, f"{param}: {reason}" if not reason.startswith(param) else reason, param=param,
                    code="invalid_value")


def from_exception(e: BaseException, fields: dict[str, str] | None = None) -> APIError:
    """The API error for an exception of the engine; `fields` maps engine field names to request params."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, RequestError):
        if e.field:
            param = (fields or {}).get(e.field, e.field)
            return bad_field(param, f"{param} {e.reason}")
        return APIError(400, str(e), code="invalid_value")
    if isinstance(e, ImageInputError):
        return APIError(400, str(e), param="image", code="invalid_image")
    if isinstance(e, QueueFullError):
        return APIError(429, str(e), code="queue_full")
    if isinstance(e, RequestTimeoutError):
        return APIError(504, str(e), code="timeout")
    if isinstance(e, RequestCancelledError):
        return APIError(499, str(e), code="cancelled")
    if isinstance(e, (EngineShutDownError, WorkerDiedError)):
        return APIError(503, f"the engine is unavailable: {str(e).splitlines()[0]}", code="engine_unavailable")
    return APIError(500, f"the request failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                    code="generation_failed")
