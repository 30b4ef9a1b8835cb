"""`sdx4 evaluate HR_DIR -o REPORT_DIR`: PSNR-Y / SSIM-Y / time per method over a folder of HR images.

Exit codes: 0 all images evaluated; 2 bad usage, or some files could not be evaluated (corrupt, too
small: they are listed in the report and on stderr, every other image is still evaluated and the
report is written); 1 other failures. torch is imported only when 'sd' is among the methods.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .args import (
    add_method_args,
    load_upscaler,
    methods_from_args,
    sd_options_from_args,
)

DEFAULT_METHODS = "bicubic,lanczos,sd"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="PSNR-Y/SSIM-Y and time per method over a folder of high-resolution images",
        description=(
            "For each HR image in HR_DIR: crop to a multiple of --scale, make the LR input with antialiased "
            "bicubic (Pillow), upscale it with each method, and compute PSNR and SSIM on the Y channel with a "
            "--scale pixel border crop, plus seconds per image. Writes results.csv, report.md and "
            "quality_vs_time.png to REPORT_DIR. Exit code 2 if any file could not be evaluated (it is listed)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("hr_dir", metavar="HR_DIR", nargs="?", help="folder of high-resolution images (png, jpg, webp, bmp, tif)")
    p.add_argument("-o", "--output", required=True, metavar="REPORT_DIR", help="folder for the report (created if missing)")
    p.add_argument("--scale", type=_whole_scale, default=4, help="upscaling factor, 2..8 (sd: 4 only); also the border crop")
    add_method_args(p, DEFAULT_METHODS)
    p.add_argument(
        "--pairs",
        nargs=2,
        metavar=("LR_DIR", "HR_DIR"),
        help="real-world pairs instead of HR_DIR: files matched by name stem, each HR exactly --scale x its LR; "
        "also writes report.json and a crop gallery per pair (gallery/NAME.png)",
    )
    p.add_argument("--no-plot", action="store_true", help="skip the plot (no matplotlib needed)")
    p.add_argument("--no-perceptual", action="store_true", help="do not look for LPIPS")
    p.add_argument("--overwrite", action="store_true", help="replace existing report files")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages, errors only")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..imageio import ImageInputError
    from ..quality.evaluate import (
        MATPLOTLIB_MISSING,
        REPORT_FILES,
        evaluate_folder,
        list_images,
        matplotlib_available,
        write_report,
    )
    from ..quality.methods import SD_SCALE, MethodRunner, is_sd_method
    from .args import lora_variants_from_args
    from .args import EXIT_OK, EXIT_USAGE, UsageError

    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))

    # Check everything before any heavy work.
    methods = methods_from_args(args, DEFAULT_METHODS, lora_rows="each")
    variants = lora_variants_from_args(args)
    sd_methods = [m for m in methods if is_sd_method(m)]
    if not 2 <= args.scale <= 8:
        raise UsageError(f"--scale must be in 2..8; got {args.scale}")
    if sd_methods and args.scale != SD_SCALE:
        raise UsageError(f"--scale {args.scale}: method sd upscales by exactly {SD_SCALE}")
    sd_options = sd_options_from_args(args) if sd_methods else None
    if args.pairs is not None:
        if args.hr_dir is not None:
            raise UsageError(f"give either HR_DIR ({args.hr_dir}) or --pairs LR_DIR HR_DIR, not both")
        return cmd_evaluate_pairs(args, methods, sd_options, say, variants, sd_methods)
    if args.hr_dir is None:
        raise UsageError("give HR_DIR, or --pairs LR_DIR HR_DIR")
    hr_dir, out_dir = Path(args.hr_dir), Path(args.output)
    if not hr_dir.is_dir():
        raise UsageError(f"{hr_dir}: not a folder")
    if not list_images(hr_dir):
        raise UsageError(f"{hr_dir}: no images in this folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir}: exists and is not a folder")
    existing = [out_dir / n for n in REPORT_FILES if (out_dir / n).exists()]
    if existing and not args.overwrite:
        raise UsageError(f"{existing[0]}: already exists (pass --overwrite to replace the report)")
    if not args.no_plot and not matplotlib_available():
        raise UsageError(MATPLOTLIB_MISSING)

    # One model in memory at a time: each image runs every method, so with LoRAs the UNet is loaded again
    # (Upscaler.set_loras: fresh weights, exact) when the method changes; the reload is not in the timings.
    first = variants[sd_methods[0]] if variants and sd_methods else None
    upscaler = load_upscaler(args, sd_options, quiet=args.quiet, loras=first) if sd_options is not None else None
    runner = MethodRunner(sd_options=sd_options, upscaler=upscaler, lora_variants=variants)

    def on_failure(f: object) -> None:
        print(f"sdx4: error: {f.problem} (skipped; listed in the report)", file=sys.stderr)  # type: ignore[attr-defined]

    try:
        report = evaluate_folder(
            hr_dir, methods, runner, args.scale, use_lpips=not args.no_perceptual, on_event=say, on_failure=on_failure
        )
    except ImageInputError as e:
        raise UsageError(str(e)) from None
    if sd_options is not None:
        report.settings["sd_options"] = sd_options.to_dict()
        report.settings["model"] = upscaler.info["model"]
        report.settings["random_weights"] = upscaler.info["random_weights"]
        if variants:  # method -> the LoRAs it merged (name, sha256 prefix, scale)
            report.settings["loras"] = {
                m: [{"name": s.name, "sha256": s.sha256(), "scale": s.scale} for s in variants[m]] for m in sd_methods
            }
    written = write_report(report, out_dir, plot=not args.no_plot)
    for m, v in report.means().items():
        say(f"mean {m}: PSNR-Y {v['psnr_y']:.2f} dB, SSIM-Y {v['ssim_y']:.4f}, {v['seconds']:.4g} s/image")
    say("wrote " + ", ".join(str(p) for p in written))
    if report.failures:
        print(f"sdx4: {len(report.failures)} file(s) could not be evaluated; see {out_dir / 'report.md'}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def cmd_evaluate_pairs(
    args: argparse.Namespace,
    methods: tuple[str, ...],
    sd_options: Any,
    say: Callable[..., None],
    variants: dict[str, tuple[Any, ...]],
    sd_methods: list[str],
) -> int:
    """`--pairs LR_DIR HR_DIR`: every pair checked (names, sizes, scale) before the model loads. With --lora,
    the sd methods switch LoRAs as in the synthetic mode (one UNet in memory; `sd` stays the base model)."""
    from ..imageio import ImageInputError
    from ..quality.evaluate import MATPLOTLIB_MISSING, matplotlib_available
    from ..quality.methods import MethodRunner
    from ..quality.pairs import (
        PAIRS_FILES,
        check_pairs,
        evaluate_pairs,
        match_pairs,
        write_pairs_report,
    )
    from .args import EXIT_OK, UsageError

    lr_dir, hr_dir = (Path(d) for d in args.pairs)
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir}: exists and is not a folder")
    existing = [out_dir / n for n in PAIRS_FILES if (out_dir / n).exists()]
    if existing and not args.overwrite:
        raise UsageError(f"{existing[0]}: already exists (pass --overwrite to replace the report)")
    if not args.no_plot and not matplotlib_available():
        raise UsageError(MATPLOTLIB_MISSING)
    try:
        match = match_pairs(lr_dir, hr_dir)
        check_pairs(match, args.scale)
    except ImageInputError as e:
        raise UsageError(str(e)) from None
    for role, names in (("LR", match.unmatched_lr), ("HR", match.unmatched_hr)):
        if names:
            print(f"sdx4: {len(names)} {role} file(s) without a partner, not evaluated: {', '.join(names)}", file=sys.stderr)
    first = variants[sd_methods[0]] if variants and sd_methods else None
    upscaler = load_upscaler(args, sd_options, quiet=args.quiet, loras=first) if sd_options is not None else None
    runner = MethodRunner(sd_options=sd_options, upscaler=upscaler, lora_variants=variants)
    result = evaluate_pairs(match, methods, runner, args.scale, on_event=say)
    if sd_options is not None:
        result.report.settings["sd_options"] = sd_options.to_dict()
        result.report.settings["model"] = upscaler.info["model"]
        result.report.settings["random_weights"] = upscaler.info["random_weights"]
        if variants:  # method -> the LoRAs it merged (name, sha256 prefix, scale)
            result.report.settings["loras"] = {
                m: [{"name": s.name, "sha256": s.sha256(), "scale": s.scale} for s in variants[m]] for m in sd_methods
            }
    written = write_pairs_report(result, out_dir, lr_dir, hr_dir, plot=not args.no_plot)
    for m, v in result.report.means().items():
        say(f"mean {m}: PSNR-Y {v['psnr_y']:.2f} dB, SSIM-Y {v['ssim_y']:.4f}, {v['seconds']:.4g} s/image")
    say("wrote " + ", ".join(str(p) for p in written))
    return EXIT_OK


def _whole_scale(text: str) -> int:
    """--scale for evaluate: a whole number (HR images are cropped to a multiple of it and the LR input is
    exactly 1/scale of them; `sdx4 upscale` takes float scales, evaluate does not)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number in 2..8; got {text!r}") from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(
            f"evaluate takes whole scales only (2..8: HR images are cropped to a multiple of the scale); got {text}"
        )
    return int(value)
