"""Command-line options shared by `sdx4 compare` and `sdx4 evaluate`: the method list and the sd settings.

argparse lives here and in the CLI modules only; no torch at import time.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .cli import add_model_args, add_sd_option_args, load_from_args, options_from_args
from .options import UpscaleOptions


def add_method_args(p: argparse.ArgumentParser, default_methods: str) -> None:
    p.add_argument(
        "--methods",
        default=default_methods,
        help="comma-separated: sd (the diffusion model) and/or nearest, bilinear, bicubic, lanczos",
    )
    g = p.add_argument_group("sd method (ignored when 'sd' is not in --methods)")
    add_model_args(g)
    add_sd_option_args(g)


def methods_from_args(args: argparse.Namespace) -> tuple[str, ...]:
    from .cli import UsageError
    from .methods import parse_methods

    try:
        return parse_methods(args.methods)
    except ValueError as e:
        raise UsageError(f"--methods: {e}") from None


def sd_options_from_args(args: argparse.Namespace) -> UpscaleOptions:
    """The sd settings with a concrete seed (drawn once when --seed is not given)."""
    return options_from_args(args, method="sd", num_images=1).with_seed()


def load_upscaler(args: argparse.Namespace, options: UpscaleOptions, quiet: bool = False) -> Any:
    """Load the model once, with the same error handling and messages as `sdx4 upscale`; the prompts of
    `options` are encoded first (see sdx4.load)."""
    return load_from_args(args, None if quiet else (lambda m: print(m, file=sys.stderr)), options.text_prompts)
