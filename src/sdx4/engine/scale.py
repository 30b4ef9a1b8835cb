"""Scale factors other than 4: the model only knows x4, so other integer scales are built from x4 passes.

scale 2..4: one x4 pass, then a Lanczos downsample to exactly scale x input.
scale 5..16: first bring the image to ceil(target / 4) (recursively, so one pass plus a downsample),
  then a last x4 pass, then a Lanczos downsample if rounding left it larger. x8 = (x4, down to x2), x4.
  Every pass only ever upsamples by 4 and every correction is a downsample, never a classical upsample.
The output size is always exactly scale x input. No torch here: passes are functions on PIL images.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from PIL import Image

from ..options import MAX_SCALE, MIN_SCALE, OptionsError

#: The model's native factor.
NATIVE = 4
DOWNSAMPLE_FILTER = Image.Resampling.LANCZOS

#: one x4 pass: image -> image exactly 4x larger.
PassFn = Callable[[Image.Image], Image.Image]


def target_size(size: tuple[int, int], scale: int) -> tuple[int, int]:
    """(w, h) -> (scale*w, scale*h), checking the scale."""
    if isinstance(scale, bool) or not isinstance(scale, int) or not MIN_SCALE <= scale <= MAX_SCALE:
        raise OptionsError(f"scale must be an integer in {MIN_SCALE}..{MAX_SCALE}; got {scale!r}")
    return size[0] * scale, size[1] * scale


def pass_plan(size: tuple[int, int], target: tuple[int, int]) -> list[tuple[int, int]]:
    """The sizes (w, h) after each x4 pass's downsample, ending at `target`. Pure; len() = number of passes."""
    w, h = size
    tw, th = target
    if tw <= NATIVE * w and th <= NATIVE * h:
        return [(tw, th)]
    mid = (max(w, math.ceil(tw / NATIVE)), max(h, math.ceil(th / NATIVE)))
    return pass_plan(size, mid) + [(tw, th)]


def upscale_by(image: Image.Image, scale: int, one_pass: PassFn) -> tuple[Image.Image, int]:
    """Upscale `image` by exactly `scale` with x4 passes of `one_pass`; returns (image, number of passes)."""
    target = target_size(image.size, scale)
    plan = pass_plan(image.size, target)
    out = image
    for size in plan:
        expected = (NATIVE * out.width, NATIVE * out.height)
        out = one_pass(out)
        if out.size != expected:
            raise RuntimeError(f"an x4 pass returned {out.size}, expected {expected}")
        if out.size != size:
            out = out.resize(size, DOWNSAMPLE_FILTER)
    return out, len(plan)
