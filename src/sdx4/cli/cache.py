"""`sdx4 cache info` and `sdx4 cache clear`: what sdx4 keeps in its cache folder ($SDX4_CACHE, else
~/.cache/sdx4): the converted weights of the fast start and the embeddings of the prompts given at load, the
time calibration and the bf16 measurement."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..cache import cache_info, clear_cache
from .args import EXIT_OK


def register(sub: Any) -> None:
    p = sub.add_parser(
        "cache",
        help="show or clear what sdx4 keeps in its cache folder",
        description="What sdx4 keeps in its cache folder ($SDX4_CACHE, else ~/.cache/sdx4): the weights converted "
        "to their dtype and layout (mapped at later starts) and the embeddings of the prompts given at load "
        "(--no-weight-cache or SDX4_WEIGHT_CACHE=0 turns both off), the time calibration of the estimates and the bf16 measurement. Other files there are left alone.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    what = p.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    info = what.add_parser("info", help="list the entries and their disk use")
    info.add_argument(
        "--json", action="store_true", help="print one JSON object instead of lines"
    )
    clear = what.add_parser("clear", help="remove them (rebuilt at the next start)")
    clear.add_argument(
        "--weights", action="store_true", help="remove only the converted weights and prompt embeddings"
    )
    p.set_defaults(func=cmd_cache)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def cmd_cache(args: argparse.Namespace) -> int:
    if args.cache_command == "clear":
        freed = clear_cache(weights_only=args.weights)
        print(
            f"cleared {'the converted weights and prompt embeddings' if args.weights else 'the sdx4 cache'} in {cache_info()['folder']}: "
            f"{_gib(freed)} freed"
        )
        return EXIT_OK
    info = cache_info()
    if args.json:
        print(json.dumps(info, indent=1))
        return EXIT_OK
    print(f"cache folder: {info['folder']}")
    entries = info["weights"]
    print(
        f"converted weights: {len(entries)} entries, {_gib(int(info['weights_bytes']))}"
    )  # type: ignore[call-overload]
    for e in entries:  # type: ignore[attr-defined]
        print(
            f"  {e['file']}  {_gib(int(e['bytes']))}  {e['dtype']}  {e['source']}  (written {e['written']})"
        )
    print(f"prompt embeddings: {info['prompts']} entries, {_gib(int(info['prompts_bytes']))}")  # type: ignore[call-overload]
    for name in info["files"]:  # type: ignore[attr-defined]
        print(f"measurement: {name}")
    print(f"total: {_gib(int(info['total_bytes']))}")  # type: ignore[call-overload]
    return EXIT_OK
