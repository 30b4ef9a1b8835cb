"""Scale factors other than 4: the model only knows x4, so other scales and sizes are built from x4 passes.

scale 2..4: one x4 pass, then a Lanczos downsample to exactly scale x input.
scale 5..16: first bring the image to ceil(target / 4) (recursively, so one pass plus a downsample),
  then a last x4 pass, then a Lanczos downsample if rounding left it larger. x8 = (x4, down to x2), x4.
  Every pass only ever upsamples by 4 and every correction is a downsample, never a classical upsample.
The same holds for any target size (a float scale such as 1.5 or 3.5, or --width/--height): a target
within 4x the input on both sides is one pass and a downsample; beyond, the first passes bring the image to
ceil(target / 4). Used by sd and by Real-ESRGAN (engine/gan.py), whose networks are x4 too.
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

#: one x4 pass: image -> image exactly 4x larger.
PassFn = Callable[[Image.Image], Image.Image]


def target_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(w, h) -> (scale*w, scale*h), each side rounded half up (exact for integer scales), checking the scale
    (OptionsError: 1 < scale <= 16)."""
    return scaled_size(size, scale)


def pass_plan(size: tuple[int, int], target: tuple[int, int]) -> list[tuple[int, int]]:
    """The sizes (w, h) after each x4 pass's downsample, ending at `target`. Pure; len() = number of passes."""
    w, h = size
    tw, th = target
    if tw <= NATIVE * w and th <= NATIVE * h:
        return [(tw, th)]
    mid = (max(w, math.ceil(tw / NATIVE)), max(h, math.ceil(th / NATIVE)))
    return pass_plan(size, mid) + [(tw, th)]


def upscale_by(image: Image.Image, scale: float, one_pass: PassFn) -> tuple[Image.Image, int]:
    """Upscale `image` by exactly `scale` with x4 passes of `one_pass`; returns (image, number of passes)."""
    return upscale_to(image, target_size(image.size, scale), one_pass)


def upscale_to(image: Image.Image, target: tuple[int, int], one_pass: PassFn) -> tuple[Image.Image, int]:
    """Upscale `image` to exactly `target` = (w, h) (each side at least the input's) with x4 passes of
    `one_pass`, each followed by a Lanczos downsample where the plan asks; returns (image, number of passes)."""
    if target[0] < image.width or target[1] < image.height:
        raise ValueError(f"target {target} is smaller than the image {image.size}: x4 passes only enlarge")
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
