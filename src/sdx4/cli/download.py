"""`sdx4 download [--variant fp16|fp32] [--to DIR]`: fetch the x4 upscaler's files for one precision into a
local folder, with progress and resume, and print the --model to use. Only the public API is used."""

from __future__ import annotations

import argparse
import sys

from ..options import DEFAULT_MODEL


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "download",
        help="download the model (one precision variant) into a local folder",
        description=(
            "Download only the files one precision variant needs (configs, tokenizer, one weight file per "
            "network: no single-file checkpoints, no .bin copies) from the Hugging Face Hub into a local "
            "folder, with progress bars; an interrupted download resumes. Prints the --model to use."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--variant",
        choices=("fp32", "fp16"),
        default="fp32",
        help="fp16: half the download (3.5 -> 1.7 GB); fp32: the full-precision weights",
    )
    p.add_argument(
        "--to",
        default=None,
        metavar="DIR",
        help="folder to download into (default: ~/.cache/sdx4/models/stable-diffusion-x4-upscaler-VARIANT)",
    )
    p.add_argument("--repo", default=DEFAULT_MODEL, help="Hub repo in diffusers layout")
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress bars, only the folder on stdout",
    )
    p.set_defaults(func=cmd_download)


def cmd_download(args: argparse.Namespace) -> int:
    from .. import api
    from .args import EXIT_OK

    folder = api.download(
        args.repo, variant=args.variant, to=args.to, progress=not args.quiet
    )
    if not args.quiet:
        print(
            f"sdx4: the model is in {folder}; use it with --model {folder}",
            file=sys.stderr,
        )
    print(folder)
    return EXIT_OK
