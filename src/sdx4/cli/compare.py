"""`sdx4 compare IMAGE`: one PNG with the input and each method's 4x output side by side, plus zoomed crops.

torch is imported only when 'sd' is among the methods.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..imageio import ImageInputError, check_output_path, open_image, save_image
from ..metadata import compare_metadata
from .args import (
    add_method_args,
    load_upscaler,
    methods_from_args,
    sd_options_from_args,
)

DEFAULT_METHODS = "sd,bicubic,lanczos"
SCALE = 4


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare",
        help="comparison grid: input vs each method, with zoomed crops",
        description=(
            "Write one PNG with the input (nearest-enlarged), each method's 4x output and a zoomed crop of "
            "the most detailed region for each. Every setting is stored in the PNG's 'sdx4' metadata. "
            "Classical methods need no model. Alpha is ignored (RGB only)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("image", metavar="IMAGE", help="input image (the low-resolution one)")
    p.add_argument("-o", "--output", default=None, help="grid PNG to write (default: IMAGE_compare.png next to the input)")
    p.add_argument(
        "--crop",
        default="auto",
        help="region to zoom, in INPUT pixels: x,y,w,h, or auto (the square of 1/4 the shorter side with most detail)",
    )
    add_method_args(p, DEFAULT_METHODS)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("-q", "--quiet", action="store_true", help="no messages, errors only")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from ..quality.compare import auto_crop, build_grid, parse_crop
    from ..quality.methods import MethodRunner, is_sd_method
    from .args import lora_variants_from_args
    from .args import EXIT_OK, UsageError

    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    src = Path(args.image)
    out = Path(args.output) if args.output else src.with_name(f"{src.stem}_compare.png")

    # Check everything before any heavy work.
    methods = methods_from_args(args, DEFAULT_METHODS, lora_rows="all")
    variants = lora_variants_from_args(args)
    sd_methods = [m for m in methods if is_sd_method(m)]
    sd_options = sd_options_from_args(args) if sd_methods else None
    try:
        loaded = open_image(src)
        if out.suffix.lower() != ".png":
            raise ImageInputError(f"{out}: the grid is written as PNG (it carries the settings); use a .png name")
        check_output_path(out, args.overwrite)
    except ImageInputError as e:
        raise UsageError(str(e)) from None
    rgb = loaded.rgb
    try:
        crop = parse_crop(args.crop, rgb.size)
    except ValueError as e:
        raise UsageError(f"--crop: {e}") from None
    crop_source = "user" if crop is not None else "auto"
    if crop is None:
        crop = auto_crop(rgb)

    # One model in memory at a time: loaded with the first sd method's LoRAs, switched for the next ones.
    first = variants[sd_methods[0]] if variants and sd_methods else None
    upscaler = load_upscaler(args, sd_options, quiet=args.quiet, loras=first) if sd_options is not None else None
    runner = MethodRunner(sd_options=sd_options, upscaler=upscaler, lora_variants=variants)
    panels = []
    per_method: dict[str, object] = {}
    for method in methods:
        result = runner.run(method, rgb, SCALE)
        label = method if not is_sd_method(method) else f"{method} (seed {sd_options.seed})"  # type: ignore[union-attr]
        panels.append((label, result.image))
        per_method[method] = {**result.metadata, "seconds": round(result.seconds, 4)}
        say(f"{method}: {result.seconds:.2f} s")

    grid, layout = build_grid(rgb, panels, SCALE, crop)
    metadata = compare_metadata(
        input_name=src.name,
        input_size=rgb.size,
        alpha_ignored=loaded.alpha is not None,
        scale=SCALE,
        methods=methods,
        labels=["input (nearest x%d)" % SCALE] + [label for label, _ in panels],
        crop=crop,
        crop_source=crop_source,
        zoom=layout.zoom,
        sd_options=sd_options,
        per_method=per_method,
        layout=layout.to_dict(),
    )
    save_image(grid, out, metadata, overwrite=args.overwrite)
    say(f"{src} -> {out} ({grid.width}x{grid.height}, crop {crop_source} {crop})")
    return EXIT_OK
