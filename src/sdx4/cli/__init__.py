"""The `sdx4` command line: a thin layer that builds options and calls the same core as the API.

Exit codes: 0 success, 2 bad usage or bad input (the message names the file and the problem), a
bad --model included (missing, not diffusers layout, damaged or inconsistent files: ModelPathError,
ModelConfigError), 1 run-time failures (the Hub unreachable, out of memory, a non-finite output
image). torch is imported only when the diffusion model is needed.
"""

from __future__ import annotations

import argparse
import sys

from .._version import __version__
from .args import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, UsageError

#: Modules that add a subcommand, in the order `--help` lists them: each has `register(subparsers)` which adds
#: a parser whose `func(args)` returns an exit code. They must not import torch at import time (`sdx4 --help`
#: stays fast).
COMMAND_MODULES: tuple[str, ...] = ("sdx4.cli.upscale", "sdx4.cli.compare", "sdx4.cli.evaluate", "sdx4.cli.serve",
                                    "sdx4.cli.convert", "sdx4.cli.download", "sdx4.cli.train",
                                    "sdx4.cli.cache")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="sdx4",
        description="Upscale images, animations and videos with the Stable Diffusion x4 Upscaler (or Real-ESRGAN, or a classical filter).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sdx4 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def runs_model(args: argparse.Namespace) -> bool:
    """Whether this command runs the diffusion model (then the C allocator matters: sdx4.allocator)."""
    if args.command == "upscale":
        return args.method == "sd"
    if args.command == "cache":
        return False
    if hasattr(args, "methods"):  # compare, evaluate
        return any(m.strip() == "sd" or m.strip().startswith("sd+") for m in str(args.methods).split(","))
    if args.command in ("convert", "download"):
        return False  # no diffusion run: the allocator does not matter
    return True  # serve


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 with a usage message on bad usage
    try:
        if argv is None and runs_model(args):  # the real command line (not a call from Python): once, early
            from ..speed.allocator import AllocatorError, reexec_with_tcmalloc

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
    except Exception as e:  # the model's errors and run-time failures: a clear one-line message
        from ..api import (
            ModelConfigError,
            ModelNotFoundError,
            ModelPathError,
            NonFiniteOutputError,
        )

        if isinstance(e, (ModelConfigError, ModelPathError)):  # the user's --model is wrong: exit 2
            print(f"sdx4: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(e, (ModelNotFoundError, NonFiniteOutputError, OSError, MemoryError)) or _out_of_memory(e):
            print(f"sdx4: error: {e}", file=sys.stderr)
            return EXIT_FAILURE
        raise
    return EXIT_OK


def _out_of_memory(e: BaseException) -> bool:
    """torch's OutOfMemoryError, recognised without importing torch."""
    return any(c.__name__ == "OutOfMemoryError" for c in type(e).__mro__)


if __name__ == "__main__":
    raise SystemExit(main())
