"""The server's own settings (its flags), apart from the engine's: address, key, limits."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_PORT = 8000
DEFAULT_MAX_QUEUE = 256
DEFAULT_REQUEST_TIMEOUT_S = 600.0
DEFAULT_MAX_UPLOAD_MB = 20.0
DEFAULT_MAX_PIXELS = 1024 * 1024
MAX_N = 10
"""Most choices / images one HTTP request may ask for (OpenAI's bound)."""
MAX_PROMPT_CHARS = 65536
MAX_IMAGES = 8
"""Images one chat request may carry (each one becomes a ViT block of the context; a bound on the work one
request can ask for)."""
MAX_REMOTE_REDIRECTS = 3
REMOTE_FETCH_TIMEOUT_S = 10.0
IMAGE_URL_TTL_S = 600.0
"""How long an image answered with `response_format=url` stays at GET /v1/images/{id}."""
IMAGE_URL_MAX_KEPT = 256


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_key: str | None = None
    served_model_name: str = "bagel"
    max_queue: int = DEFAULT_MAX_QUEUE
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S
    """Seconds a request may take in all; then it is cancelled and answered 504."""
    allowed_media_domains: list[str] = field(default_factory=list)
    """Hosts image_url may fetch from over http(s) (none: data: URIs only)."""
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Most pixels of a decoded input image and of a requested output size."""
    cors_origins: list[str] = field(default_factory=list)
    """Origins allowed by CORS (none: CORS off)."""

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
