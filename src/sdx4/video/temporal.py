"""Temporal treatments of an upscaled clip, applied after every frame is upscaled (same seed for all).

Each is a function (output frames, input frames as HxWx3 uint8 arrays) -> output frames, measured with
video/flicker.py's FlickerMeter (benchmarks/flicker.py; README "Frame consistency and flicker").

- "colorfix": each output frame's per-channel mean and standard deviation, relative to those of its own
  bicubic reference (the input frame upscaled), are set to the clip's average relation. A method that
  shifts colours the same way in every frame is left as it is; frame-to-frame colour pumping goes; the
  input's own colour changes (fades, cuts) are followed, since each frame keeps its reference's.
- "flow": each output frame is blended with the previous (already blended) output frame warped onto it
  along the optical flow of the bicubic references (OpenCV Farneback), weighted by how well the warped
  reference matches the current one (occlusions and cuts get ~no blending): detail invented differently
  from frame to frame is averaged along the motion (a recursive filter, `FLOW_BLEND` of the previous).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from PIL import Image

from ..imageio import attach_alpha
from .flicker import bicubic_upscale, flow_grey, flow_maps

#: The weight of the warped previous frame where the references match exactly.
FLOW_BLEND = 0.5
#: Grey levels of reference mismatch at which the blend weight falls to 1/e of FLOW_BLEND.
FLOW_MATCH = 6.0


def temporal_colorfix(frames: list[Image.Image], inputs) -> list[Image.Image]:
    """Per channel: each frame's (mean, std) relative to its bicubic reference's is set to the clip's average
    relation (see the module's docstring). Alpha is kept as it is."""
    stats = []  # per frame: out mean, out std, ref mean, ref std  (each 3 values)
    for out, inp in zip(frames, inputs):
        o = np.asarray(out.convert("RGB"), np.float64).reshape(-1, 3)
        r = bicubic_upscale(inp, out.size).astype(np.float64).reshape(-1, 3)
        stats.append((o.mean(0), o.std(0), r.mean(0), r.std(0)))
    eps = 1e-6
    offset = np.mean(
        [om - rm for om, _, rm, _ in stats], axis=0
    )  # clip-level mean offset, per channel
    gain = np.mean(
        [(os + eps) / (rs + eps) for _, os, _, rs in stats], axis=0
    )  # clip-level std ratio
    fixed = []
    for out, (om, os, rm, rs) in zip(frames, stats):
        o = np.asarray(out.convert("RGB"), np.float64)
        target_mean, target_std = rm + offset, rs * gain
        y = (o - om) / (os + eps) * target_std + target_mean
        rgb = Image.fromarray(np.clip(np.rint(y), 0, 255).astype(np.uint8), "RGB")
        fixed.append(
            attach_alpha(rgb, out.getchannel("A")) if out.mode == "RGBA" else rgb
        )
    return fixed


def temporal_flow(
    frames: list[Image.Image], inputs: Iterable[np.ndarray]
) -> list[Image.Image]:
    """Blend each frame with the warped previous output where the motion is reliable (module docstring)."""
    try:
        import cv2
    except ImportError:
        raise ImportError(
            '--temporal flow needs OpenCV: pip install -e ".[video]"'
        ) from None
    fixed: list[Image.Image] = []
    prev = prev_ref = prev_grey = None
    for out, inp in zip(frames, inputs):
        w, h = out.size
        ref = bicubic_upscale(inp, (w, h))
        grey = flow_grey(cv2, ref)
        o = np.asarray(out.convert("RGB"), np.float32)
        r = ref.astype(np.float32)
        if prev is not None:
            if np.array_equal(prev_grey, grey):
                ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
                map_x, map_y = xs, ys
            else:
                map_x, map_y, _ = flow_maps(cv2, prev_grey, grey, (h, w))
            warped = cv2.remap(
                prev, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
            )
            warped_ref = cv2.remap(
                prev_ref,
                map_x,
                map_y,
                cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_REPLICATE,
            )
            mismatch = np.abs(warped_ref - r).mean(axis=-1, keepdims=True)  # H,W,1
            weight = FLOW_BLEND * np.exp(-mismatch / FLOW_MATCH)
            o = (1 - weight) * o + weight * warped
        prev, prev_ref, prev_grey = o, r, grey
        rgb = Image.fromarray(np.clip(np.rint(o), 0, 255).astype(np.uint8), "RGB")
        fixed.append(
            attach_alpha(rgb, out.getchannel("A")) if out.mode == "RGBA" else rgb
        )
    return fixed


#: name -> the function; "none" is no treatment. The CLI's --temporal and the service read these names.
TEMPORAL_FIXES: dict[
    str, Callable[[list[Image.Image], Iterable[np.ndarray]], list[Image.Image]]
] = {
    "colorfix": temporal_colorfix,
    "flow": temporal_flow,
}
TEMPORAL_MODES = ("none", *TEMPORAL_FIXES)
