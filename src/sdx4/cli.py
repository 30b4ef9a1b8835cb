"""The `sdx4` command line: a thin layer that builds options and calls the same core as the API.

Exit codes: 0 success, 2 bad usage or bad input (the message names the file and the problem),
1 any other failure. torch is imported only when the diffusion model is needed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from ._version import __version__
from .imageio import OUTPUT_SUFFIXES, ImageInputError, check_output_path, open_image, save_image
from .options import (
    DEFAULT_MODEL,
    COLOR_FIXES,
    MAX_SCALE,
    METHODS,
    MIN_SCALE,
    SCHEDULERS,
    TILE_BLENDS,
    OptionsError,
    UpscaleOptions,
    option_defaults,
    parse_size,
)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad usage or bad input: reported as `sdx4: error: ...` with exit code 2."""


def add_sd_option_args(p: argparse.ArgumentParser | Any) -> None:
    """The diffusion options (prompt ... scheduler), defaults read from UpscaleOptions."""
    d = option_defaults()
    p.add_argument("--prompt", default=d["prompt"], help="text describing the image")
    p.add_argument("--negative-prompt", default=d["negative_prompt"], help="text describing what to avoid")
    p.add_argument("--steps", type=int, default=d["steps"], help="denoising steps")
    p.add_argument("--guidance", type=float, default=d["guidance"], help="guidance scale (<= 1: no guidance, 2x faster)")
    p.add_argument("--noise-level", type=int, default=d["noise_level"], help="noise added to the input, 0..350")
    p.add_argument("--seed", type=int, default=d["seed"], help="random seed; None = draw one and report it")
    p.add_argument("--eta", type=float, default=d["eta"], help="DDIM eta, 0..1")
    p.add_argument("--scheduler", choices=SCHEDULERS, default=d["scheduler"], help="sampler (fewer steps: dpmpp-2m 20, unipc 15)")


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


def add_model_args(p: argparse.ArgumentParser | Any) -> None:
    """--model/--device/--dtype/--vae-dtype/--low-memory/--compile: how the model is loaded."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="Hub id or local folder in diffusers layout")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument(
        "--dtype",
        choices=("auto", "fp32", "fp16", "bf16"),
        default="auto",
        help="UNet/text-encoder precision; auto = fp16 on CUDA, bf16 on CPUs with native bf16, else fp32",
    )
    p.add_argument("--vae-dtype", choices=("fp32", "bf16"), default="fp32", help="VAE precision (fp16 gives NaN)")
    p.add_argument(
        "--low-memory",
        action=argparse.BooleanOptionalAction,
        default="auto",
        help="encode the prompts, then drop the text encoder before the UNet is loaded (fp32: -1.3 GB resident; "
        "a new prompt reloads it); auto = on for the CPU, off for GPUs",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (slow first call; see README)")


def low_memory_arg(args: argparse.Namespace) -> bool | None:
    """--low-memory / --no-low-memory / neither (auto: None, sdx4.load decides by device)."""
    return None if args.low_memory == "auto" else bool(args.low_memory)


def load_from_args(args: argparse.Namespace, say: Any = None, prompts: list[str] | None = None) -> Any:
    """sdx4.load() with the arguments of `add_model_args`; a bad --model/--device is a UsageError.
    `prompts`: encoded before the UNet is loaded (sdx4.load's `prompts`; default: the default ones)."""
    from . import api
    from .models import ModelPathError

    _quiet_libraries()
    t0 = time.perf_counter()
    try:
        upscaler = api.load(
            args.model,
            device=args.device,
            dtype=args.dtype,
            vae_dtype=args.vae_dtype,
            low_memory=low_memory_arg(args),
            compile=args.compile,
            prompts=prompts,
        )
    except ModelPathError as e:
        raise UsageError(str(e)) from None
    except ValueError as e:  # bad --device / --dtype for this machine
        raise UsageError(str(e)) from None
    if say is not None:
        info = upscaler.info
        say(f"loaded {info['model']} on {info['device']} ({info['unet_dtype']}) in {time.perf_counter() - t0:.1f} s")
        if info["random_weights"]:
            say("warning: this model has RANDOM WEIGHTS (made for tests/benchmarks); its output is noise")
    return upscaler


#: Modules that add a subcommand: each has `register(subparsers)` which adds a parser whose `func(args)`
#: returns an exit code. They must not import torch at import time (`sdx4 --help` stays fast).
COMMAND_MODULES: tuple[str, ...] = ("sdx4.compare_cli", "sdx4.evaluate_cli", "sdx4.serve_cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdx4",
        description="Upscale images 4x with the Stable Diffusion x4 Upscaler (or a classical filter).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sdx4 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    up = sub.add_parser(
        "upscale",
        help="upscale images 4x",
        description="Upscale images 4x (or --scale N). Outputs are exactly NW x NH; PNG outputs carry every parameter.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_upscale_args(up)
    from .batch_cli import add_batch_args  # folder INPUTs: the batch runner (batch.py, batch_cli.py)

    add_batch_args(up)
    up.set_defaults(func=cmd_upscale)
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def options_from_args(args: argparse.Namespace, **fixed: Any) -> UpscaleOptions:
    """UpscaleOptions from the arguments of `add_sd_option_args` (+ num_images/method when present)."""
    values = dict(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        guidance=args.guidance,
        noise_level=args.noise_level,
        eta=args.eta,
        seed=args.seed,
        scheduler=args.scheduler,
    )
    for name in ("num_images", "method", "scale", "color_fix", "tile_size", "tile_overlap", "tile_batch", "tile_blend",
                 "vae_attention_window"):
        if hasattr(args, name):
            values[name] = getattr(args, name)
    try:
        if getattr(args, "max_memory", None) is not None:
            values["max_memory"] = parse_size(args.max_memory)
        return UpscaleOptions(**{**values, **fixed})
    except OptionsError as e:
        raise UsageError(f"--{str(e).split(' ', 1)[0].replace('_', '-')}: {e}") from None


def _is_output_file(out: Path) -> bool:
    """-o names a file when it has an image suffix and is not an existing folder; else a folder."""
    return out.suffix.lower() in OUTPUT_SUFFIXES and not out.is_dir()


def output_paths(inputs: list[Path], output: str | None, options: UpscaleOptions) -> list[list[Path]]:
    """For each input, the output path(s): one per generated image."""
    n = options.num_images
    tag = f"_x{options.scale}" if options.method == "sd" else f"_x{options.scale}_{options.method}"
    out = Path(output) if output else None
    as_file = out is not None and _is_output_file(out)
    if as_file and len(inputs) > 1:
        raise UsageError(f"-o {out}: several inputs need an output folder, not a file")
    result = []
    for src in inputs:
        if as_file:
            assert out is not None
            base, suffix, folder = out.stem, out.suffix, out.parent
        else:
            base, suffix, folder = src.stem + tag, ".png", (out if out is not None else src.parent)
        names = [f"{base}{suffix}"] if n == 1 else [f"{base}_{i + 1}{suffix}" for i in range(n)]
        result.append([folder / name for name in names])
    flat = [p for ps in result for p in ps]
    dupes = {p for p in flat if flat.count(p) > 1}
    if dupes:
        raise UsageError(f"several inputs would write the same output {sorted(map(str, dupes))[0]}; use distinct names")
    return result


def _quiet_libraries() -> None:
    """Library progress bars ("Loading weights") and info logs are noise in a CLI."""
    for name in ("transformers", "diffusers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import diffusers.utils.logging as dl
        import transformers.utils.logging as tl

        tl.disable_progress_bar()
        dl.disable_progress_bar()
    except Exception:  # pragma: no cover - only cosmetics
        pass


def cmd_upscale(args: argparse.Namespace) -> int:
    from .batch_cli import cmd_batch, is_batch

    if is_batch(args):  # a folder INPUT: the batch runner takes over (manifest, resume, Ray)
        return cmd_batch(args)
    options = options_from_args(args)
    inputs = [Path(p) for p in args.inputs]
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))

    # Check everything before any heavy work: inputs decode, outputs are writable and new.
    for src in inputs:
        try:
            open_image(src)
        except ImageInputError as e:
            raise UsageError(str(e)) from None
    outputs = output_paths(inputs, args.output, options)
    if args.output and not _is_output_file(Path(args.output)):
        Path(args.output).mkdir(parents=True, exist_ok=True)
    for paths in outputs:
        for p in paths:
            try:
                check_output_path(p, args.overwrite)
            except ImageInputError as e:
                raise UsageError(str(e)) from None

    upscaler = None
    if options.method == "sd":
        from .models import ModelNotFoundError

        try:
            upscaler = load_from_args(args, say, options.text_prompts)
        except ModelNotFoundError as e:
            print(f"sdx4: error: {e}", file=sys.stderr)
            return EXIT_FAILURE

    if upscaler is not None:  # the memory budget must hold every input, checked before any heavy work
        from .memory import MemoryBudgetError
        from .pipeline import check_memory

        for src in inputs:
            try:
                check_memory(upscaler.components, options, *open_image(src).size)
            except MemoryBudgetError as e:
                raise UsageError(f"{src}: --max-memory: {e}") from None

    for src, paths in zip(inputs, outputs):
        opts = options.with_seed()
        result = _run_one(upscaler, src, opts, quiet=args.quiet)
        for image, path in zip(result.images, paths):
            save_image(image, path, {**result.metadata, "input": src.name}, overwrite=args.overwrite)
            say(f"{src} -> {path} ({image.width}x{image.height}" + (f", seed {opts.seed})" if opts.method == "sd" else ")"))
    return EXIT_OK


def _run_one(upscaler: Any, src: Path, opts: UpscaleOptions, quiet: bool) -> Any:
    from .api import upscale_classical_result

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


def runs_model(args: argparse.Namespace) -> bool:
    """Whether this command runs the diffusion model (then the C allocator matters: sdx4.allocator)."""
    if args.command == "upscale":
        return args.method == "sd"
    if hasattr(args, "methods"):  # compare, evaluate
        return "sd" in {m.strip() for m in str(args.methods).split(",")}
    return True  # serve


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 with a usage message on bad usage
    try:
        if argv is None and runs_model(args):  # the real command line (not a call from Python): once, early
            from .allocator import AllocatorError, reexec_with_tcmalloc

            try:
                reexec_with_tcmalloc()  # returns only when staying on the current allocator
            except AllocatorError as e:
                raise UsageError(str(e)) from None
        return int(args.func(args))
    except UsageError as e:
        print(f"sdx4: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("sdx4: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # anything else: a clear one-line message, exit 1
        from .models import ModelConfigError, ModelNotFoundError

        if isinstance(e, (ModelConfigError, ModelNotFoundError, OSError)):
            print(f"sdx4: error: {e}", file=sys.stderr)
            return EXIT_FAILURE
        raise
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
