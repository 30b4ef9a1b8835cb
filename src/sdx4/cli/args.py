"""Argument helpers shared by the subcommands: the diffusion options, how the model is loaded, the
method list of compare/evaluate, exit codes and UsageError. argparse lives only in this package."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from ..options import (
    BIT_DEPTHS,
    COLOR_MODES,
    DEFAULT_MODEL,
    DTYPES,
    METHODS,
    PRESETS,
    SCHEDULERS,
    VAE_DTYPES,
    WEIGHTS_METHOD_PREFIX,
    LoadOptions,
    OptionsError,
    UpscaleOptions,
    option_defaults,
    parse_size,
    split_method,
)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad usage or bad input: reported as `sdx4: error: ...` with exit code 2."""


class Explicit(argparse.Action):
    """Store the value and remember that the user gave this flag (`args._explicit`): a --preset sets only
    the options the user did not give, also when a given value equals the default."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
        setattr(namespace, self.dest, values)
        explicit = set(getattr(namespace, "_explicit", set()))
        explicit.add(self.dest)
        namespace._explicit = explicit


def add_sd_option_args(p: argparse.ArgumentParser | Any) -> None:
    """The diffusion options (prompt ... scheduler), defaults read from UpscaleOptions."""
    d = option_defaults()
    p.add_argument("--prompt", default=d["prompt"], help="text describing the image")
    p.add_argument("--negative-prompt", default=d["negative_prompt"], help="text describing what to avoid")
    p.add_argument("--steps", type=int, default=d["steps"], action=Explicit, help="denoising steps")
    p.add_argument("--guidance", type=float, default=d["guidance"], help="guidance scale (<= 1: no guidance, 2x faster)")
    p.add_argument("--noise-level", type=int, default=d["noise_level"], help="noise added to the input, 0..350")
    p.add_argument("--seed", type=int, default=d["seed"], help="random seed; None = draw one and report it")
    p.add_argument("--eta", type=float, default=d["eta"], help="DDIM eta, 0..1")
    p.add_argument("--scheduler", choices=SCHEDULERS, default=d["scheduler"], action=Explicit,
                   help="sampler (fewer steps: dpmpp-2m 20, unipc 15)")


def add_output_args(p: argparse.ArgumentParser | Any) -> None:
    """What the written images keep of the input (`sdx4 upscale`, files and folders)."""
    d = option_defaults()
    p.add_argument(
        "--color-mode",
        choices=COLOR_MODES,
        default=d["color_mode"],
        help="auto = grayscale inputs give grayscale outputs, colour inputs RGB; rgb = always RGB",
    )
    p.add_argument(
        "--bit-depth",
        type=int,
        choices=BIT_DEPTHS,
        default=d["bit_depth"],
        help="bits per channel of the output; 16: grayscale inputs only, PNG or TIFF outputs",
    )


LORA_HELP = (
    "a LoRA .safetensors file (diffusers or Kohya keys) merged into the UNet at SCALE (default 1); "
    "repeat for several; merged before the speed tricks, so inference is as fast as without"
)


def add_model_args(p: argparse.ArgumentParser | Any, lora_help: str = LORA_HELP) -> None:
    """--model/--device/--dtype/--vae-dtype/--low-memory/--compile/--no-weight-cache/--lora: how the model is
    loaded, defaults read from LoadOptions (`load_options_from_args` builds one)."""
    d = option_defaults(LoadOptions)
    p.add_argument("--model", default=d["model"], help="Hub id, local folder in diffusers layout, or single-file checkpoint (.safetensors, .ckpt)")
    p.add_argument("--device", default=d["device"], help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=d["dtype"],
        help="UNet/text-encoder precision; auto = fp16 on CUDA, bf16 on CPUs with native bf16, else fp32",
    )
    p.add_argument("--vae-dtype", choices=VAE_DTYPES, default=d["vae_dtype"], help="VAE precision (fp16 gives NaN)")
    p.add_argument(
        "--low-memory",
        action=argparse.BooleanOptionalAction,
        default="auto",  # LoadOptions' None: argparse shows "auto" in --help
        help="encode the prompts, then drop the text encoder before the UNet is loaded (fp32: -1.3 GB resident; "
        "a new prompt reloads it); auto = on for the CPU, off for GPUs",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (slow first call; see README)")
    p.add_argument("--no-weight-cache", dest="weight_cache", action="store_false", default=argparse.SUPPRESS,
                   help="read and convert the weights at every start instead of mapping the converted copy kept in "
                   "the cache folder (also SDX4_WEIGHT_CACHE=0; `sdx4 cache info` shows it)")
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help=lora_help,
    )


def low_memory_arg(args: argparse.Namespace) -> bool | None:
    """--low-memory / --no-low-memory / neither (auto: None, sdx4.load decides by device)."""
    return None if args.low_memory == "auto" else bool(args.low_memory)


def load_options_from_args(args: argparse.Namespace) -> LoadOptions:
    """LoadOptions from the arguments of `add_model_args`; a bad value (--device tpu) is a UsageError with
    LoadOptions' own message. An empty --model is the default model, as sdx4.load has always read it."""
    try:
        return LoadOptions(
            model=args.model or DEFAULT_MODEL,
            device=args.device,
            dtype=args.dtype,
            vae_dtype=args.vae_dtype,
            low_memory=low_memory_arg(args),
            compile=args.compile,
            weight_cache=getattr(args, "weight_cache", True),
            loras=tuple(getattr(args, "lora", None) or ()),
        )
    except OptionsError as e:
        raise UsageError(str(e)) from None


def load_from_args(args: argparse.Namespace, say: Any = None, prompts: list[str] | None = None, loras: Any = None) -> Any:
    """sdx4.load() with the arguments of `add_model_args`; a bad --model/--device is a UsageError.
    `prompts`: encoded before the UNet is loaded (sdx4.load's `prompts`; default: the default ones).
    `say` gets the lines of `Upscaler.describe` (what was loaded, in how long)."""
    from .. import api

    options = load_options_from_args(args)
    if loras is not None:
        options = options.replace(loras=tuple(loras))
    api.quiet_libraries()
    t0 = time.perf_counter()
    try:
        upscaler = api.load(options, prompts=prompts)
    except api.ModelPathError as e:
        raise UsageError(str(e)) from None
    except ValueError as e:  # a --device this machine does not have
        raise UsageError(str(e)) from None
    if say is not None:
        for line in upscaler.describe(time.perf_counter() - t0):
            say(line)
    return upscaler


def load_or_report(args: argparse.Namespace, say: Any, options: UpscaleOptions) -> Any | None:
    """`load_from_args` for a run of the diffusion model, its prompts encoded first; None when the model is not
    found (the reason printed: the caller exits EXIT_FAILURE)."""
    from ..api import ModelNotFoundError

    try:
        return load_from_args(args, say, options.text_prompts)
    except ModelNotFoundError as e:
        print(f"sdx4: error: {e}", file=sys.stderr)
        return None


def check_fits(upscaler: Any, options: UpscaleOptions, src: Any, size: tuple[int, int], frames: int | None = None,
               max_cost: float | None = None) -> None:
    """Before any heavy work: a UsageError naming `src` when an input of `size` cannot fit the memory budget
    (--max-memory), or when its job (every frame of an animation of `frames`) costs more than `max_cost`
    megapixel-steps (--max-job-cost)."""
    from ..api import MemoryBudgetError

    try:
        upscaler.check(options, size)
    except MemoryBudgetError as e:
        raise UsageError(f"{src}: --max-memory: {e}") from None
    if max_cost is None:
        return
    cost = upscaler.cost(options, size).megapixel_steps * (frames or 1)
    if cost > max_cost:
        if frames is None:
            what, hint = f"this job ({size[0]}x{size[1]})", (
                " (fewer steps, guidance <= 1, fewer images or a smaller image cost less)")
        else:
            what, hint = f"this animation ({frames} frames of {size[0]}x{size[1]})", ""
        raise UsageError(f"{src}: --max-job-cost: {what} costs {cost:.3g} megapixel-steps, over the limit of "
                         f"{max_cost:g}{hint}")


def method_arg(text: str) -> str:
    """--method: a name of METHODS, or realesrgan:PATH (a user's Real-ESRGAN-family weights, split by
    options_from_args; the file is checked there, before any work)."""
    if text in METHODS or text.startswith(WEIGHTS_METHOD_PREFIX):
        return text
    raise argparse.ArgumentTypeError(
        f"invalid choice: {text!r} (choose from {', '.join(METHODS)}, or {WEIGHTS_METHOD_PREFIX}PATH for your own "
        ".pth/.safetensors weights)"
    )


def option_flag(option: str | None) -> str:
    """The flag of an UpscaleOptions field in `sdx4 upscale` ("--tile-size: "); gan_weights is --method's
    realesrgan:PATH; "" when the error is about no field."""
    if not option:
        return ""
    return "--method: " if option == "gan_weights" else f"--{option.replace('_', '-')}: "


def options_from_args(args: argparse.Namespace, **fixed: Any) -> UpscaleOptions:
    """UpscaleOptions from the arguments of `add_sd_option_args` (+ num_images/method when present). A
    --method realesrgan:PATH gives method realesrgan with gan_weights PATH, and the file is read and checked
    here (a UsageError naming it), before any image is read."""
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
                 "vae_attention_window", "color_mode", "bit_depth", "width", "height"):
        if hasattr(args, name):
            values[name] = getattr(args, name)
    if values.get("scale", 0) is None:  # --scale not given (its default is None so that it can clash with --width)
        if values.get("width") is None and values.get("height") is None:
            values.pop("scale")
        else:
            values["scale"] = 4  # the default, replaced by the width/height target
    elif values.get("width") is not None or values.get("height") is not None:
        raise UsageError(f"--scale: give either --scale ({values['scale']:g}) or --width/--height, not both")
    try:
        if isinstance(values.get("method"), str):
            values["method"], weights = split_method(values["method"])
            if weights is not None:
                values["gan_weights"] = weights
        if getattr(args, "max_memory", None) is not None:
            values["max_memory"] = parse_size(args.max_memory)
        if getattr(args, "preset", None) is not None:  # the preset's values for the flags not given
            given = getattr(args, "_explicit", set())
            for name in PRESETS[args.preset]:
                if name not in given:
                    values.pop(name, None)
            options = UpscaleOptions.from_preset(args.preset, **{**values, **fixed})
        else:
            options = UpscaleOptions(**{**values, **fixed})
        if options.gan_weights is not None:
            from ..api import check_method

            check_method(options.method, options.gan_weights)  # a missing or foreign file: said now
        return options
    except OptionsError as e:
        raise UsageError(f"{option_flag(e.option)}{e}") from None


def add_method_args(p: argparse.ArgumentParser, default_methods: str) -> None:
    p.add_argument(
        "--methods",
        default=default_methods,
        help="comma-separated: sd (the diffusion model), realesrgan, realesrgan-anime (Real-ESRGAN, pip install -e \".[gan]\"), "
        "realesrgan:PATH (your own RRDBNet/SRVGGNetCompact .pth/.safetensors, run by torch) "
        "and/or nearest, bilinear, bicubic, lanczos",
    )
    g = p.add_argument_group("sd method (ignored when 'sd' is not in --methods)")
    add_model_args(g)
    add_sd_option_args(g)


def methods_from_args(args: argparse.Namespace, default: str | None = None, lora_rows: str = "all") -> tuple[str, ...]:
    """--methods, checked. With --lora and the command's `default` methods, the LoRA methods are added:
    `lora_rows` "all" adds sd+lora (every LoRA merged), "each" one sd+NAME per LoRA."""
    from ..quality.methods import LORA_METHOD, parse_methods
    from .args import UsageError

    from ..api import check_method

    variants = lora_variants_from_args(args)
    text = args.methods
    if variants and default is not None and text == default:
        text += "," + (LORA_METHOD if lora_rows == "all" or len(variants) == 2 else ",".join(list(variants)[2:]))
    try:
        methods = parse_methods(text, extra=tuple(variants))
        for method in methods:
            check_method(method)  # Real-ESRGAN without its extra: said before any work
    except ValueError as e:  # OptionsError included
        raise UsageError(f"--methods: {e}") from None
    return methods


def lora_variants_from_args(args: argparse.Namespace) -> dict[str, tuple[Any, ...]]:
    """The sd methods --lora makes (quality.methods.lora_methods): {} without --lora."""
    from ..options import LoraSpec
    from ..quality.methods import lora_methods

    try:
        return lora_methods([LoraSpec.parse(text) for text in getattr(args, "lora", None) or ()])
    except OptionsError as e:
        raise UsageError(str(e)) from None
    except ValueError as e:
        raise UsageError(f"--lora: {e}") from None


def sd_options_from_args(args: argparse.Namespace) -> UpscaleOptions:
    """The sd settings with a concrete seed (drawn once when --seed is not given)."""
    return options_from_args(args, method="sd", num_images=1).with_seed()


def load_upscaler(args: argparse.Namespace, options: UpscaleOptions, quiet: bool = False, loras: Any = None) -> Any:
    """Load the model once, with the same error handling and messages as `sdx4 upscale`; the prompts of
    `options` are encoded first (see sdx4.load). `loras`: merged instead of --lora's (compare/evaluate
    load the first method's)."""
    return load_from_args(args, None if quiet else (lambda m: print(m, file=sys.stderr)), options.text_prompts,
                          loras=loras)
