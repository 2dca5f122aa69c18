"""The OpenAI-compatible HTTP server (`bagel-serve serve MODEL`): FastAPI routes over `Omni`'s async API.

It needs the `serve` extra (`pip install 'bagel-serve[serve]'`); the rest of the package never imports it.
Modules: `settings` (the server's limits), `protocol` (request bodies, checked by the one validator),
`errors` (OpenAI-style error bodies), `media` (image inputs and outputs), `generation` (running requests
through the engine, cancelling on disconnect, the server-sent events of a stream), `defaults` (GET
/v1/defaults), `metrics`, the routes (`routes_chat`, `routes_images`, `routes_meta`), `app` (the application
and the playground page, whose files are in `static/`) and `run` (uvicorn, the ready line, graceful shutdown).
"""

from __future__ import annotations

import importlib.util

SERVE_EXTRA = "pip install 'bagel-serve[serve]'"
_NEEDED = ("fastapi", "uvicorn", "multipart", "prometheus_client")


def require_server_dependencies() -> None:
    """Raise ImportError naming the extra when a server dependency is missing."""
    missing = [m for m in _NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        names = ["python-multipart" if m == "multipart" else m.replace("_", "-") for m in missing]
        raise ImportError(f"the server needs {', '.join(names)}, which {'is' if len(names) == 1 else 'are'} not "
                          f"installed: {SERVE_EXTRA}")
