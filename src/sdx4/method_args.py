"""Command-line options shared by `sdx4 compare` and `sdx4 evaluate`: the method list and the sd settings.

argparse lives here and in the CLI modules only; no torch at import time.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from .options import OptionsError, UpscaleOptions, option_defaults


def add_method_args(p: argparse.ArgumentParser, default_methods: str) -> None:
    d = option_defaults()
    p.add_argument(
        "--methods",
        default=default_methods,
        help="comma-separated: sd (the diffusion model) and/or nearest, bilinear, bicubic, lanczos",
    )
    g = p.add_argument_group("sd method (ignored when 'sd' is not in --methods)")
    g.add_argument("--model", default=None, help="Hub id or local diffusers folder (default: the published model)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    g.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto", help="UNet/text-encoder precision")
    g.add_argument("--prompt", default=d["prompt"], help="text describing the image")
    g.add_argument("--negative-prompt", default=d["negative_prompt"], help="text describing what to avoid")
    g.add_argument("--steps", type=int, default=d["steps"], help="denoising steps")
    g.add_argument("--guidance", type=float, default=d["guidance"], help="guidance scale")
    g.add_argument("--noise-level", type=int, default=d["noise_level"], help="noise added to the input, 0..350")
    g.add_argument("--eta", type=float, default=d["eta"], help="DDIM eta, 0..1")
    g.add_argument("--seed", type=int, default=d["seed"], help="random seed (default: drawn once and recorded)")


def methods_from_args(args: argparse.Namespace) -> tuple[str, ...]:
    from .cli import UsageError
    from .methods import parse_methods

    try:
        return parse_methods(args.methods)
    except ValueError as e:
        raise UsageError(f"--methods: {e}") from None


def sd_options_from_args(args: argparse.Namespace) -> UpscaleOptions:
    """The sd settings with a concrete seed (drawn once when --seed is not given)."""
    from .cli import UsageError

    try:
        opts = UpscaleOptions(
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            steps=args.steps,
            guidance=args.guidance,
            noise_level=args.noise_level,
            eta=args.eta,
            seed=args.seed,
            method="sd",
        )
    except OptionsError as e:
        raise UsageError(f"--{str(e).split(' ', 1)[0].replace('_', '-')}: {e}") from None
    return opts.with_seed()


def load_upscaler(args: argparse.Namespace, quiet: bool = False) -> Any:
    """Load the model once, with the same error handling as `sdx4 upscale`."""
    from .api import load
    from .cli import UsageError, _quiet_libraries
    from .models import ModelPathError

    _quiet_libraries()
    t0 = time.perf_counter()
    try:
        upscaler = load(args.model, device=args.device, dtype=args.dtype)
    except ModelPathError as e:
        raise UsageError(str(e)) from None
    except ValueError as e:  # bad --device / --dtype for this machine
        raise UsageError(str(e)) from None
    if not quiet:
        info = upscaler.info
        print(f"loaded {info['model']} on {info['device']} ({info['unet_dtype']}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        if info["random_weights"]:
            print("warning: this model has RANDOM WEIGHTS (made for tests/benchmarks); its output is noise", file=sys.stderr)
    return upscaler
