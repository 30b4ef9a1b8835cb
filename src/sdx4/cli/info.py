"""`sdx4 info`: load the model and print what was loaded (device, dtypes, random weights) as JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .args import EXIT_OK, add_model_args, load_from_args


def register(sub: Any) -> None:
    p = sub.add_parser("info", help="load the model and print what was loaded", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    print(json.dumps(load_from_args(args).info, indent=1))
    return EXIT_OK
