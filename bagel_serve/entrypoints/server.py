"""`bagel-serve serve MODEL` and `python -m bagel_serve.entrypoints.server MODEL`: the HTTP server's flags
(the engine's flags are `generate`'s, from the same definitions) and its start.

The server itself lives in `bagel_serve.serving` and needs the `serve` extra; it is imported only here,
when serving starts, so the rest of the package never needs FastAPI.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from bagel_serve.entrypoints.cli_args import (DEFAULT_MODEL, MODEL_HELP, CLIError, add_engine_arguments,
                                              add_reporting_arguments, load_omni)

API_KEY_ENV = "BAGEL_SERVE_API_KEY"


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    from bagel_serve.serving.settings import (DEFAULT_MAX_PIXELS, DEFAULT_MAX_QUEUE, DEFAULT_MAX_UPLOAD_MB,
                                              DEFAULT_PORT, DEFAULT_REQUEST_TIMEOUT_S)

    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"{MODEL_HELP} (default: {DEFAULT_MODEL})")
    g = add_engine_arguments(p, model_option=False)
    for action in g._group_actions:
        if action.dest == "request_timeout":
            action.help = (f"seconds a request may take in all before it is cancelled and answered 504; also how "
                           f"long a stage worker may show no sign of life (default: {DEFAULT_REQUEST_TIMEOUT_S:g} "
                           f"for requests, 60 for workers)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface "
                                                        "(default: 127.0.0.1)")
    g.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port; 0 picks a free one (default: {DEFAULT_PORT})")
    g.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every /v1 route (default: ${API_KEY_ENV}, else none)")
    g.add_argument("--served-model-name", default=None,
                   help="the model's name in the API (/v1/models, the 'model' field) (default: MODEL)")
    g.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help=f"most unfinished requests; more are answered 429 at once (default: {DEFAULT_MAX_QUEUE})")
    g.add_argument("--allowed-media-domains", nargs="*", default=[], metavar="DOMAIN",
                   help="hosts (and their subdomains) image_url may fetch from over http(s) (default: none; data: "
                        "URIs only)")
    g.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                   help=f"largest request body and input image, in MB (default: {DEFAULT_MAX_UPLOAD_MB:g})")
    g.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"most pixels of an input image (checked before decoding) and of an output size "
                        f"(default: {DEFAULT_MAX_PIXELS})")
    g.add_argument("--allowed-origins", nargs="*", default=[], metavar="ORIGIN",
                   help="origins CORS allows (browser pages on other sites) (default: none; CORS off)")
    g.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn's log level (default: info)")
    add_reporting_arguments(g)
    p.set_defaults(no_progress=True)


def run_serve(args: argparse.Namespace) -> int:
    from bagel_serve.serving import require_server_dependencies

    try:
        require_server_dependencies()
    except ImportError as e:
        raise CLIError(str(e)) from None
    from bagel_serve.serving.run import serve
    from bagel_serve.serving.settings import DEFAULT_REQUEST_TIMEOUT_S, ServerSettings
    from bagel_serve.testing.demo import DEMO_MODEL, DEMO_NOTICE

    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port must be in [0, 65535], got {args.port}")
    for flag, value, low in (("--max-queue", args.max_queue, 1), ("--max-pixels", args.max_pixels, 256)):
        if value < low:
            raise CLIError(f"{flag} must be >= {low}, got {value}")
    if not args.max_upload_mb > 0:
        raise CLIError(f"--max-upload-mb must be > 0, got {args.max_upload_mb:g}")
    if args.request_timeout is not None and not args.request_timeout > 0:
        raise CLIError(f"--request-timeout must be > 0, got {args.request_timeout:g}")
    settings = ServerSettings(
        host=args.host, port=args.port, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        served_model_name=args.served_model_name or args.model, max_queue=args.max_queue,
        request_timeout=args.request_timeout or DEFAULT_REQUEST_TIMEOUT_S,
        allowed_media_domains=list(args.allowed_media_domains), max_upload_mb=args.max_upload_mb,
        max_pixels=args.max_pixels, cors_origins=list(args.allowed_origins))
    if args.model == DEMO_MODEL:
        print(f"WARNING: {DEMO_NOTICE}", file=sys.stderr)
    omni = load_omni(args, args.deploy_config)
    return serve(omni, settings, args.model, log_level=args.uvicorn_log_level)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m bagel_serve.entrypoints.server`."""
    p = argparse.ArgumentParser(prog="python -m bagel_serve.entrypoints.server", allow_abbrev=False,
                                description="Serve BAGEL over HTTP: an OpenAI-compatible API.")
    add_serve_arguments(p)
    args = p.parse_args(argv)
    try:
        return run_serve(args)
    except CLIError as e:
        p.exit(e.status, f"error: {e}\n")
    except KeyboardInterrupt:
        p.exit(130, "interrupted\n")


if __name__ == "__main__":
    sys.exit(main())
