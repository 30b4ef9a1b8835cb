"""`sdx4 upscale anim.gif`: animated GIF, WebP and APNG inputs, every frame upscaled (sdx4.video).

cli/upscale.py hands over when its inputs are animations; the output keeps the animated format (or is a
video with `-o NAME.mp4` / `.webm`), and one line reports the flicker measure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..imageio import (
    ImageInputError,
    check_animation_path,
    is_animated,
    is_stream,
    output_name,
    probe_animation,
)
from ..options import OptionsError
from .args import EXIT_FAILURE, UsageError, check_fits, load_or_report, options_from_args

#: The --temporal choices (sdx4.video.TEMPORAL_MODES; kept here so building the parser imports no numpy).
TEMPORAL_CHOICES = ("none", "colorfix", "flow")


def add_animation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--temporal",
        choices=TEMPORAL_CHOICES,
        default="none",
        help="animations and videos: colorfix = each frame's colour statistics (relative to its bicubic "
        "upscale) set to the clip's average; every frame always gets the same seed",
    )


def refuse_temporal(args: argparse.Namespace, what: str) -> None:
    """--temporal is for animations: refused (not ignored) for `what` (a video INPUT, a folder)."""
    if getattr(args, "temporal", "none") != "none":
        raise UsageError(
            f"--temporal only applies to animated GIF/WebP/APNG INPUTs, not {what}"
        )


def animated_inputs(args: argparse.Namespace) -> bool:
    """Whether this run's inputs are animations (then `cmd_animation` runs it). A mix of animations and
    still images is refused: run them separately, or as a folder."""
    paths = [Path(p) for p in args.inputs if p != "-"]
    flags = [p.is_file() and not is_stream(p) and is_animated(p) for p in paths]
    if not any(flags):
        return False
    if not all(flags) or len(paths) != len(args.inputs):
        mixed = next(p for p, f in zip(paths, flags) if f)
        raise UsageError(
            f"{mixed}: an animation cannot be upscaled in one command with still images (or stdin); "
            "run them separately, or put them in a folder (a folder run handles both)"
        )
    return True


def cmd_animation(args: argparse.Namespace) -> int:
    from .. import video

    options = options_from_args(args)
    if args.max_job_cost is not None and not args.max_job_cost > 0:
        raise UsageError(
            f"--max-job-cost must be a positive number of megapixel-steps; got {args.max_job_cost:g}"
        )
    temporal = getattr(args, "temporal", "none")
    try:
        video.check_animation_options(options, temporal)
    except OptionsError as e:
        raise UsageError(f"--{(e.option or 'option').replace('_', '-')}: {e}") from None
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    inputs = [Path(p) for p in args.inputs]
    if args.output == "-":
        raise UsageError(
            "-o -: an animation cannot go to stdout; name an output file or folder"
        )
    out = Path(args.output) if args.output else None
    to_file = (
        out is not None
        and out.suffix != ""
        and not args.output.endswith("/")
        and not out.is_dir()
    )
    if to_file and len(inputs) > 1:
        raise UsageError(f"-o {out}: several inputs need an output folder, not a file")
    if out is not None and not to_file and not out.is_dir():
        raise UsageError(f"-o {out}: the output folder does not exist")

    plans = []  # (src, dst): every input probed and every output checked before any heavy work
    for src in inputs:
        try:
            info = probe_animation(src, str(src), output_size=options.output_size)
            if to_file:
                dst = out
            else:
                dst = (out or src.parent) / output_name(
                    src.stem, options.size_tag, options.method_tag, suffix=info.suffix
                )
            check_animation_path(dst, args.overwrite)
        except ImageInputError as e:
            raise UsageError(str(e)) from None
        except OptionsError as e:  # --width/--height out of range for this animation's frames
            raise UsageError(f"{src}: --{(e.option or 'option').replace('_', '-')}: {e}") from None
        plans.append((src, dst, info))

    upscaler = None
    if options.method == "sd":
        upscaler = load_or_report(args, say, options)
        if upscaler is None:
            return EXIT_FAILURE
        for src, _, info in plans:  # every frame counts in the job's cost
            check_fits(upscaler, options, src, info.size, frames=info.frames, max_cost=args.max_job_cost)

    for src, dst, info in plans:
        bar = _bar(args, src.name, info.frames)
        try:
            result = video.upscale_animation(
                upscaler, src, dst, options.with_seed(), temporal=temporal, overwrite=args.overwrite,
                progress=None if bar is None else (lambda i, n, bar=bar: bar.update(i - bar.n)),
            )  # fmt: skip
        finally:
            if bar is not None:
                bar.close()
        f = result.flicker
        seed = result.metadata.get("seed")
        say(
            f"{src} -> {result.path} ({result.frames} frames, {result.size[0]}x{result.size[1]}"
            + (f", seed {seed}" if seed is not None else "")
            + ")"
        )
        say(
            f"flicker {f['flicker']:.2f} (bicubic {f['bicubic_flicker']:.2f}, ratio {f['ratio']:.2f}"
            + ("" if f["warped"] else ", unwarped: OpenCV missing")
            + f"; temporal {temporal})"
        )
    return 0


def _bar(args: argparse.Namespace, name: str, frames: int) -> Any:
    if args.quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=frames, desc=name, unit="frame", leave=False)
