"""`sdx4 convert SRC DST`: a single-file checkpoint to a diffusers folder, or a diffusers folder to ONE
.safetensors in the original layout (diffusers' from_single_file, ComfyUI and sdx4 load it).

Only the public API is used (`sdx4.convert`); torch is imported when the conversion runs.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="single-file checkpoint <-> diffusers folder",
        description=(
            "Convert the x4 upscaler: SRC a .safetensors/.ckpt single file -> DST a new diffusers folder; "
            "SRC a diffusers folder (or a Hub id already in the cache) -> DST a new .safetensors in the "
            "original layout (model.diffusion_model.*, first_stage_model.*, cond_stage_model.model.*), which "
            "carries its configs in its metadata. Works offline."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "src",
        metavar="SRC",
        help="single file (.safetensors, .ckpt) or diffusers folder",
    )
    p.add_argument(
        "dst",
        metavar="DST",
        help="diffusers folder to create, or .safetensors file to write",
    )
    p.add_argument(
        "--dtype",
        choices=("fp32", "fp16", "bf16"),
        default=None,
        help="precision to write (default: as stored)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.add_argument(
        "-q", "--quiet", action="store_true", help="no messages, errors only"
    )
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    import time

    from .. import api
    from .args import EXIT_OK

    t0 = time.perf_counter()
    out = api.convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite)
    if not args.quiet:
        print(
            f"sdx4: wrote {out} in {time.perf_counter() - t0:.1f} s; use it with --model {out}",
            file=sys.stderr,
        )
    return EXIT_OK
