"""Scale factors other than 4: the model only knows x4, so other scales and sizes are built from x4 passes.

scale 2..4: one x4 pass, then a Lanczos downsample to exactly scale x input.
scale 5..16: first bring the image to ceil(target / 4) (recursively, so one pass plus a downsample),
  then a last x4 pass, then a Lanczos downsample if rounding left it larger. x8 = (x4, down to x2), x4.
  Every pass only ever upsamples by 4 and every correction is a downsample, never a classical upsample.
The same holds for any target size (a float scale such as 1.5 or 3.5, or --width/--height): a target
within 4x the input on both sides is one pass and a downsample; beyond, the first passes bring the image to
ceil(target / 4). Used by sd and by Real-ESRGAN (engine/gan.py), whose networks are x4 too.
A user's own Real-ESRGAN-family net may be native x2 or x3 (or x1): the same rules with that factor in
place of 4 (`native`); an x1 net never enlarges, so it runs one pass and the Lanczos resize enlarges.
The output size is always exactly the target. No torch here: passes are functions on PIL images.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from PIL import Image

from ..options import scaled_size

#: The model's native factor.
NATIVE = 4
DOWNSAMPLE_FILTER = Image.Resampling.LANCZOS

#: one pass: image -> image exactly `native` (default 4) x larger.
PassFn = Callable[[Image.Image], Image.Image]


def target_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(w, h) -> (scale*w, scale*h), each side rounded half up (exact for integer scales), checking the scale
    (OptionsError: 1 < scale <= 16)."""
    return scaled_size(size, scale)


def pass_plan(size: tuple[int, int], target: tuple[int, int], native: int = NATIVE) -> list[tuple[int, int]]:
    """The sizes (w, h) after each pass's resize, ending at `target`; `native`: the net's factor per pass.
    Pure; len() = number of passes. native 1: one pass (the resize then enlarges)."""
    if native < 1:
        raise ValueError(f"native must be a positive integer; got {native}")
    w, h = size
    tw, th = target
    if native == 1 or (tw <= native * w and th <= native * h):
        return [(tw, th)]
    mid = (max(w, math.ceil(tw / native)), max(h, math.ceil(th / native)))
    return pass_plan(size, mid, native) + [(tw, th)]


def upscale_by(image: Image.Image, scale: float, one_pass: PassFn) -> tuple[Image.Image, int]:
    """Upscale `image` by exactly `scale` with x4 passes of `one_pass`; returns (image, number of passes)."""
    return upscale_to(image, target_size(image.size, scale), one_pass)


def upscale_to(
    image: Image.Image, target: tuple[int, int], one_pass: PassFn, native: int = NATIVE
) -> tuple[Image.Image, int]:
    """Upscale `image` to exactly `target` = (w, h) (each side at least the input's) with passes of
    `one_pass` (x`native` each), each followed by a Lanczos resize where the plan asks (a downsample, but
    for native 1); returns (image, number of passes)."""
    if target[0] < image.width or target[1] < image.height:
        raise ValueError(f"target {target} is smaller than the image {image.size}: x{native} passes only enlarge")
    plan = pass_plan(image.size, target, native)
    out = image
    for size in plan:
        expected = (native * out.width, native * out.height)
        out = one_pass(out)
        if out.size != expected:
            raise RuntimeError(f"an x{native} pass returned {out.size}, expected {expected}")
        if out.size != size:
            out = out.resize(size, DOWNSAMPLE_FILTER)
    return out, len(plan)
