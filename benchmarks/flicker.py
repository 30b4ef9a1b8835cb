"""Flicker of an upscaled animation, with each `--temporal` mode (none, colorfix, flow) (sdx4.video.FlickerMeter).

Makes a moving-texture animation (an APNG: a smoothed-noise texture panning by `--shift` input pixels per
frame), upscales it with each temporal mode and each method asked for, and prints/writes the flicker
measure (mean motion-compensated frame-to-frame difference, grey levels) and its ratio to bicubic's.

    python benchmarks/flicker.py --tiny                      # a tiny random model built here (smoke)
    python benchmarks/flicker.py --model stabilityai/stable-diffusion-x4-upscaler --size 96 --frames 8
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def moving_texture(
    frames: int, size: int, shift: int, seed: int = 0
) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    pad = shift * frames + 8
    big = rng.random((size + 2 * pad, size + 2 * pad, 3)) * 255
    k = np.ones(5) / 5
    for axis in (0, 1):
        big = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), axis, big)
    big = (big - big.min()) / (big.max() - big.min()) * 220 + 15
    return [Image.fromarray(big[pad : pad + size, pad - i * shift : pad - i * shift + size].astype(np.uint8))
            for i in range(frames)]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model id or folder (sd method)")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="build and use a tiny random model (smoke run)",
    )
    p.add_argument("--frames", type=int, default=6)
    p.add_argument("--size", type=int, default=32, help="input side in pixels")
    p.add_argument(
        "--shift", type=int, default=1, help="input pixels the texture moves per frame"
    )
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="sd,bicubic")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)

    import sdx4
    from sdx4.video import ANIMATION_TEMPORAL_MODES, upscale_animation

    work = Path(tempfile.mkdtemp(prefix="sdx4-flicker-"))
    frames = moving_texture(args.frames, args.size, args.shift, args.seed)
    src = work / "moving.png"
    frames[0].save(src, save_all=True, append_images=frames[1:], duration=100, loop=0)
    upscaler = None
    methods = [m.strip() for m in args.methods.split(",")]
    if "sd" in methods:
        model = args.model
        if args.tiny:
            from sdx4.model.random_model import build_random_model

            model = str(build_random_model(work / "tiny", size="tiny", seed=0))
        if model is None:
            p.error("the sd method needs --model or --tiny")
        upscaler = sdx4.load(model)
    rows = []
    for method in methods:
        for temporal in ANIMATION_TEMPORAL_MODES:
            opts = sdx4.UpscaleOptions(method=method, steps=args.steps, seed=args.seed)
            t0 = time.perf_counter()
            result = upscale_animation(upscaler if method == "sd" else None, src, work / f"{method}-{temporal}.png",
                                       opts, temporal=temporal)  # fmt: skip
            rows.append({"method": method, "temporal": temporal, **result.flicker,
                         "seconds": round(time.perf_counter() - t0, 2)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    report = {"frames": args.frames, "size": args.size, "shift": args.shift, "steps": args.steps,
              "model": "tiny random" if args.tiny else args.model, "rows": rows}  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
