"""Running the application under uvicorn: the ready line, graceful shutdown, and a server in a thread.

On SIGINT / SIGTERM uvicorn stops accepting connections and lets the requests in flight finish (streams
included, up to the request timeout); then the engine and its stage workers are shut down. A second signal
exits at once.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import Any

import uvicorn

from bagel_serve.serving.app import build_app
from bagel_serve.serving.settings import ServerSettings


class _Server(uvicorn.Server):
    """uvicorn's server, saying once where it listens when it is ready."""

    def __init__(self, config: uvicorn.Config, ready_line: str | None) -> None:
        super().__init__(config)
        self.ready_line = ready_line
        self.port: int | None = None
        self.ready = threading.Event()

    def handle_exit(self, sig: int, frame: Any) -> None:
        """Drain, then return normally (uvicorn would raise the signal again after its shutdown, killing the
        process before the engine's workers are stopped)."""
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started and self.servers:
            self.port = self.servers[0].sockets[0].getsockname()[1]
            if self.ready_line is not None:
                print(self.ready_line.format(port=self.port), flush=True)
        self.ready.set()


def _config(app: Any, settings: ServerSettings, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level, lifespan="off",
                          timeout_graceful_shutdown=int(settings.request_timeout) + 1, access_log=False)


def serve(omni: Any, settings: ServerSettings, model: str, *, log_level: str = "info") -> int:
    """Serve until a signal, then drain and shut the engine down; returns the exit status."""
    app = build_app(omni, settings, model)
    line = (f"bagel-serve ready: {model} as {settings.served_model_name!r} on http://{settings.host}:{{port}} "
            f"(OpenAI API at /v1, playground at /; Ctrl-C to stop)")
    server = _Server(_config(app, settings, log_level), line)
    try:
        server.run()
    finally:
        omni.shutdown()
    return 0 if server.started else 1


class ServerThread:
    """The application served from a thread of this process (tests, notebooks): `start()` returns once it
    listens (`port` is then the real port, when settings.port is 0); `stop()` drains and joins."""

    def __init__(self, omni: Any, settings: ServerSettings, model: str = "", *, log_level: str = "warning") -> None:
        self.app = build_app(omni, settings, model)
        self.server = _Server(_config(self.app, settings, log_level), None)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), name="bagel-serve-http",
                                       daemon=True)
        self.host = settings.host

    @property
    def port(self) -> int:
        return self.server.port or 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        if not self.server.ready.wait(timeout) or not self.server.started:
            raise RuntimeError("the HTTP server did not start")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            print("warning: the HTTP server thread did not stop", file=sys.stderr)
