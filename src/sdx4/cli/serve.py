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

    add_model_args(
        p,
        lora_help="a LoRA .safetensors file (diffusers or Kohya keys) offered at SCALE (default 1); repeat for "
        "several; a job's lora field picks among them by file name (none: the base model), a job without it "
        "gets all of them merged",
    )
    p.add_argument("--api-key", default=None, help=f"require this key (header 'Authorization: Bearer KEY' or 'X-API-Key'); "
                   f"VISIBLE to every user in `ps`: prefer ${API_KEY_ENV} or --api-key-file; default: ${API_KEY_ENV} if set, else none")
    p.add_argument("--api-key-file", default=None, metavar="PATH", help="read the key from this file (first line; surrounding spaces dropped)")
    p.add_argument("--max-queue", type=int, default=16, help="jobs waiting at most; more get 429 with Retry-After")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload in MiB (413 above)")
    p.add_argument("--max-input-pixels", type=int, default=1024 * 1024, help="largest input W*H (413 above, checked before decoding)")
    p.add_argument("--max-output-pixels", type=int, default=2048 * 2048, help="largest output 4W*4H*num_images (413 above)")
    p.add_argument("--max-side", type=int, default=4096, help="longest input side in pixels (413 above)")
    p.add_argument("--max-aspect", type=float, default=16.0, help="largest input aspect ratio, long side / short side (422 above)")
    p.add_argument("--max-job-cost", type=float, default=400.0,
                   help="largest job in UNet megapixel-steps: padded latent MP x steps x num_images x 2 with guidance, per x4 pass (413 above)")
    p.add_argument("--max-queue-cost", type=float, default=1600.0, help="megapixel-steps waiting in the queue at most (429 with Retry-After above)")
    p.add_argument("--max-connections", type=int, default=100, help="open connections at most; more are answered 503 and closed (keep under `ulimit -n`)")
    p.add_argument("--max-uploads", type=int, default=4, help="request bodies read at once; others wait 2 s, then 503")
    p.add_argument("--body-timeout", type=float, default=120.0, help="seconds a request body may take to arrive (408 after)")
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds a new connection may take to send its request head (closed after)")
    p.add_argument("--keep-alive", type=float, default=5.0, help="seconds an idle keep-alive connection is kept")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a Host name the service answers to besides IP addresses and localhost (DNS-rebinding guard; repeat; '*': any)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="a web origin (scheme://host:port) allowed to call the API besides the server's own page (repeat; '*': any)")
    p.add_argument("--expose-paths", action="store_true", help="show the model's full path in /v1/info, job JSON and result metadata (default: its Hub id or folder name)")
    p.add_argument("--results-dir", default=None, help="folder for result PNGs and the job store (jobs survive a restart or a crash on the same folder); "
                   "default: a temporary folder removed at exit")
    p.add_argument("--result-ttl", type=float, default=3600.0, help="seconds a finished job and its files are kept")
    p.add_argument("--max-results", type=int, default=100, help="finished jobs kept at most (oldest forgotten first)")
    p.add_argument("--max-result-mb", type=float, default=2048.0, help="MiB of result files kept at most (oldest removed first)")
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info", help="server log level")
    p.add_argument("--allow-video", action="store_true", help="take video uploads as jobs (animated GIF/WebP/APNG are always taken)")
    p.add_argument("--max-video-seconds", type=float, default=60.0, help="longest video or animation in seconds (413 above)")
    p.add_argument("--max-video-frames", type=int, default=1800, help="most frames of a video or animation (413 above)")
    p.set_defaults(func=cmd_serve)


#: ServerSettings fields whose flag has another name.
FLAG_OF = {"body_timeout_s": "body_timeout", "header_timeout_s": "header_timeout", "keep_alive_s": "keep_alive",
           "allowed_hosts": "allowed_host", "allowed_origins": "allow_origin", "max_upload_bytes": "max_upload_mb"}


def _api_key(args: argparse.Namespace, UsageError: type) -> str | None:
    """--api-key-file, else --api-key (with a warning: argv is public), else $SDX4_API_KEY, else None."""
    if args.api_key is not None and args.api_key_file is not None:
        raise UsageError("give --api-key or --api-key-file, not both")
    if args.api_key_file is not None:
        try:
            with open(args.api_key_file, encoding="utf-8") as f:
                key = f.readline().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--api-key-file: cannot read {args.api_key_file}: {e}") from None
        if not key:
            raise UsageError(f"--api-key-file: {args.api_key_file} is empty")
        return key
    if args.api_key is not None:
        if not args.api_key:
            raise UsageError("--api-key must not be empty")
        print(f"warning: --api-key is visible to every user of this machine (ps, /proc); use ${API_KEY_ENV} or --api-key-file",
              file=sys.stderr)
        return args.api_key
    return os.environ.get(API_KEY_ENV) or None


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
    api_key = _api_key(args, UsageError)

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
            max_side=args.max_side,
            max_aspect=args.max_aspect,
            max_job_cost=args.max_job_cost,
            max_queue_cost=args.max_queue_cost,
            max_connections=args.max_connections,
            max_uploads=args.max_uploads,
            body_timeout_s=args.body_timeout,
            header_timeout_s=args.header_timeout,
            keep_alive_s=args.keep_alive,
            allowed_hosts=tuple(args.allowed_host),
            allowed_origins=tuple(args.allow_origin),
            expose_paths=args.expose_paths,
            allow_video=args.allow_video,
            max_video_seconds=args.max_video_seconds,
            max_video_frames=args.max_video_frames,
            queue=QueueSettings(
                max_queue=args.max_queue,
                result_ttl_s=args.result_ttl,
                max_results=args.max_results,
                max_result_bytes=int(args.max_result_mb * MIB),
                results_dir=args.results_dir,
            ),
        )
    except OptionsError as e:
        flag = f"--{FLAG_OF.get(e.option, e.option).replace('_', '-')}: " if e.option else ""
        raise UsageError(f"{flag}{e}") from None

    say = lambda *a: print(*a, file=sys.stderr)  # noqa: E731
    if not _is_loopback(args.host) and api_key is None:
        say(f"warning: serving on {args.host} without an API key: anyone who can reach it can use it (set $SDX4_API_KEY or --api-key-file)")

    from ..service.requests import LoraChoices
    from .args import load_from_args, load_options_from_args

    try:  # jobs choose among the --lora files by file name: refused now, before minutes of loading
        LoraChoices(load_options_from_args(args).loras)
    except OptionsError as e:
        raise UsageError(f"--lora: {e}") from None

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
