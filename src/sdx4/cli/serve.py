"""`sdx4 serve`: the HTTP service and web page (see docs/server.md). No torch or FastAPI at import time."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from typing import Any

API_KEY_ENV = "SDX4_API_KEY"  # == server.API_KEY_ENV (no FastAPI import here)
MIB = 1024 * 1024


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the HTTP service and web page",
        description="Serve an HTTP API (OpenAPI at /docs) and a web page at / that upscale images 4x. "
        "One worker owns the model; requests are queued. Stop with Ctrl-C or SIGTERM: queued jobs are "
        "cancelled, the running one stops before its next UNet call; a temporary results folder is removed "
        "(with --results-dir, jobs and results are kept: a restart serves and runs them).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes it to the network")
    p.add_argument("--port", type=int, default=7860, help="TCP port")
    from .args import (
        add_model_args,  # cli is fully imported by the time it registers subcommands
    )

    add_model_args(p)
    p.add_argument("--api-key", default=None, help=f"require this key (header 'Authorization: Bearer KEY' or 'X-API-Key'); default: ${API_KEY_ENV} if set, else none")
    p.add_argument("--max-queue", type=int, default=16, help="jobs waiting at most; more get 429 with Retry-After")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload in MiB (413 above)")
    p.add_argument("--max-input-pixels", type=int, default=1024 * 1024, help="largest input W*H (413 above, checked before decoding)")
    p.add_argument("--max-output-pixels", type=int, default=2048 * 2048, help="largest output 4W*4H*num_images (413 above)")
    p.add_argument("--results-dir", default=None, help="folder for result PNGs and the job store (jobs survive a restart or a crash on the same folder); "
                   "default: a temporary folder removed at exit")
    p.add_argument("--result-ttl", type=float, default=3600.0, help="seconds a finished job and its files are kept")
    p.add_argument("--max-results", type=int, default=100, help="finished jobs kept at most (oldest forgotten first)")
    p.add_argument("--max-result-mb", type=float, default=2048.0, help="MiB of result files kept at most (oldest removed first)")
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info", help="server log level")
    p.set_defaults(func=cmd_serve)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    from ..options import OptionsError
    from .args import EXIT_FAILURE, EXIT_OK, UsageError

    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be in 1..65535; got {args.port}")
    api_key = args.api_key if args.api_key is not None else (os.environ.get(API_KEY_ENV) or None)
    if args.api_key is not None and not args.api_key:
        raise UsageError("--api-key must not be empty")

    try:
        from ..service.app import serve
        from ..service.jobs import QueueSettings
        from ..service.requests import ServerSettings
    except ImportError as e:
        print(f"sdx4: error: sdx4 serve needs FastAPI and uvicorn ({e}); install them with: pip install 'sdx4[server]'", file=sys.stderr)
        return EXIT_FAILURE

    try:
        settings = ServerSettings(
            api_key=api_key,
            max_upload_bytes=int(args.max_upload_mb * MIB),
            max_input_pixels=args.max_input_pixels,
            max_output_pixels=args.max_output_pixels,
            queue=QueueSettings(
                max_queue=args.max_queue,
                result_ttl_s=args.result_ttl,
                max_results=args.max_results,
                max_result_bytes=int(args.max_result_mb * MIB),
                results_dir=args.results_dir,
            ),
        )
    except OptionsError as e:
        flag = f"--{e.option.replace('_', '-')}: " if e.option else ""
        raise UsageError(f"{flag}{e}") from None

    say = lambda *a: print(*a, file=sys.stderr)  # noqa: E731
    if not _is_loopback(args.host) and api_key is None:
        say(f"warning: serving on {args.host} without an API key: anyone who can reach it can use it (see --api-key)")

    from .args import load_from_args

    if args.results_dir is not None:
        from ..service.store import folder_in_use

        busy = folder_in_use(args.results_dir)  # before minutes of loading
        if busy is not None:
            say(f"sdx4: error: --results-dir: {busy}")
            return EXIT_FAILURE

    say(f"loading {args.model} ...")
    upscaler = load_from_args(args, say)  # a bad --model/--device is a usage error (exit 2)
    say(f"open http://{args.host}:{args.port}/ (API docs at /docs)")
    try:
        serve(upscaler, settings, host=args.host, port=args.port, log_level=args.log_level)
    except OptionsError as e:  # the results folder was taken while the model loaded
        say(f"sdx4: error: --results-dir: {e}")
        return EXIT_FAILURE
    except OSError as e:  # e.g. the port is taken
        say(f"sdx4: error: cannot serve on {args.host}:{args.port}: {e}")
        return EXIT_FAILURE
    return EXIT_OK
