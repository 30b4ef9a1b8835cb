"""`sdx4 upscale`: images, or a folder (then the batch runner takes over: cli/batch.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..imageio import (
    OUTPUT_SUFFIXES,
    ImageInputError,
    check_bit_depth,
    check_output_bit_depth,
    check_output_path,
    numbered_name,
    open_image,
    output_name,
    save_image,
)
from ..metadata import saved_metadata
from ..options import (
    COLOR_FIXES,
    MAX_SCALE,
    METHODS,
    MIN_SCALE,
    TILE_BLENDS,
    UpscaleOptions,
    option_defaults,
)
from .args import (
    UsageError,
    add_model_args,
    add_output_args,
    add_sd_option_args,
    load_from_args,
    options_from_args,
)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2



def register(sub: Any) -> None:
    up = sub.add_parser(
        "upscale",
        help="upscale images 4x",
        description="Upscale images 4x (or --scale N). Outputs are exactly NW x NH; PNG outputs carry every parameter.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_upscale_args(up)
    from .batch import (
        add_batch_args,  # folder INPUTs: the batch runner (sdx4.batch, cli/batch.py)
    )

    add_batch_args(up)
    up.set_defaults(func=cmd_upscale)


def _add_upscale_args(p: argparse.ArgumentParser) -> None:
    d = option_defaults()
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image file(s) to upscale, or one folder (batch run)")
    p.add_argument(
        "-o",
        "--output",
        metavar="FILE_OR_DIR",
        help="output file (one input) or folder; default: next to each input as NAME_x4.png",
    )
    add_sd_option_args(p)
    p.add_argument("--num-images", type=int, default=d["num_images"], help="images per input")
    p.add_argument("--method", choices=METHODS, default=d["method"], help="sd = diffusion; others are classical filters")
    add_model_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no messages, errors only")
    p.add_argument("--scale", type=int, default=d["scale"], help=f"output = scale x input, an integer {MIN_SCALE}..{MAX_SCALE}")
    add_output_args(p)
    p.add_argument("--color-fix", choices=COLOR_FIXES, default=d["color_fix"], help="match colours to the bicubic-upscaled input")
    p.add_argument("--max-memory", default=None, metavar="SIZE", help="memory budget, weights included (e.g. 6GiB); default: 60%% of free RAM / 80%% of free GPU memory")
    p.add_argument("--tile-size", type=int, default=d["tile_size"], help="latent tile side in input pixels (default: from --max-memory)")
    p.add_argument("--tile-overlap", type=int, default=d["tile_overlap"], help="tile overlap in input pixels (default: a quarter of the tile, at most 32)")
    p.add_argument("--tile-batch", type=int, default=d["tile_batch"], help="tiles per UNet call (default: from --max-memory)")
    p.add_argument("--tile-blend", choices=TILE_BLENDS, default=d["tile_blend"], help="weights that merge overlapping tiles")
    p.add_argument(
        "--vae-attention-window",
        type=int,
        default=d["vae_attention_window"],
        metavar="PX",
        help="VAE attention is global up to PX x PX input pixels, windowed beyond (linear time); 16..1024",
    )


def _is_output_file(out: Path) -> bool:
    """-o names a file when it has an image suffix and is not an existing folder; else a folder."""
    return out.suffix.lower() in OUTPUT_SUFFIXES and not out.is_dir()


def output_paths(inputs: list[Path], output: str | None, options: UpscaleOptions) -> list[list[Path]]:
    """For each input, the output path(s): one per generated image."""
    n = options.num_images
    out = Path(output) if output else None
    as_file = out is not None and _is_output_file(out)
    if as_file and len(inputs) > 1:
        raise UsageError(f"-o {out}: several inputs need an output folder, not a file")
    result = []
    for src in inputs:
        if as_file:  # -o photo.webp: that name, numbered when there are several images
            assert out is not None
            names = [numbered_name(out.stem, i, n, out.suffix) for i in range(n)]
            folder = out.parent
        else:
            names = [output_name(src.stem, options.scale, options.method, i, n) for i in range(n)]
            folder = out if out is not None else src.parent
        result.append([folder / name for name in names])
    flat = [p for ps in result for p in ps]
    dupes = {p for p in flat if flat.count(p) > 1}
    if dupes:
        raise UsageError(f"several inputs would write the same output {sorted(map(str, dupes))[0]}; use distinct names")
    return result


def cmd_upscale(args: argparse.Namespace) -> int:
    from .batch import cmd_batch, is_batch

    if is_batch(args):  # a folder INPUT: the batch runner takes over (manifest, resume, Ray)
        return cmd_batch(args)
    options = options_from_args(args)
    inputs = [Path(p) for p in args.inputs]
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))

    # Check everything before any heavy work: inputs decode, outputs are writable and new.
    for src in inputs:
        try:
            check_bit_depth(open_image(src), options.bit_depth, options.color_mode, str(src))
        except ImageInputError as e:
            raise UsageError(str(e)) from None
    outputs = output_paths(inputs, args.output, options)
    if args.output and not _is_output_file(Path(args.output)):
        Path(args.output).mkdir(parents=True, exist_ok=True)
    for paths in outputs:
        for p in paths:
            try:
                check_output_path(p, args.overwrite)
                check_output_bit_depth(p, options.bit_depth)
            except ImageInputError as e:
                raise UsageError(str(e)) from None

    upscaler = None
    if options.method == "sd":
        from ..api import MemoryBudgetError, ModelNotFoundError

        try:
            upscaler = load_from_args(args, say, options.text_prompts)
        except ModelNotFoundError as e:
            print(f"sdx4: error: {e}", file=sys.stderr)
            return EXIT_FAILURE

        for src in inputs:  # the memory budget must hold every input, checked before any heavy work
            try:
                upscaler.check(options, open_image(src).size)
            except MemoryBudgetError as e:
                raise UsageError(f"{src}: --max-memory: {e}") from None

    for src, paths in zip(inputs, outputs):
        opts = options.with_seed()
        result = _run_one(upscaler, src, opts, quiet=args.quiet)
        for image, path in zip(result.images, paths):
            save_image(image, path, saved_metadata(result.metadata, src.name), overwrite=args.overwrite,
                       icc_profile=result.icc_profile, exif=result.exif)
            say(f"{src} -> {path} ({image.width}x{image.height}" + (f", seed {opts.seed})" if opts.method == "sd" else ")"))
    return EXIT_OK


def _run_one(upscaler: Any, src: Path, opts: UpscaleOptions, quiet: bool) -> Any:
    from ..api import upscale_classical_result

    if upscaler is None:
        return upscale_classical_result(src, opts)
    bar = None
    if not quiet and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=opts.steps, desc=src.name, unit="step", leave=False)

    def progress(i: int, n: int) -> None:
        if bar is not None:
            bar.total = n
            bar.update(i - bar.n)

    try:
        return upscaler(src, opts, progress=progress)
    finally:
        if bar is not None:
            bar.close()


