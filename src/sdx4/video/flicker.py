"""Temporal flicker of an upscaled clip, measured against the bicubic upscale of the same clip.

For each consecutive pair of frames, the previous OUTPUT frame is warped onto the current one along dense
optical flow (OpenCV's Farneback) computed on the bicubic upscale of the INPUT frames, and the mean absolute
difference (0..255 grey levels, over the pixels the flow keeps inside the frame) is taken. Motion that the
input really has is thereby compensated; what is left is change the method invented from one frame to the
next. The same measure on the bicubic upscale of the inputs is the reference: bicubic adds no detail of its
own, so `ratio` = flicker / bicubic_flicker near 1 means the method adds no flicker.

Memory: only the previous frames are kept (one output frame, one bicubic frame, one grey flow frame).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

#: Added to both sides of `ratio` (in grey levels) so a static clip gives a finite ratio (1.0 when the
#: output is static too) instead of 0/0.
RATIO_FLOOR = 0.5

#: The optical flow is computed at most at this long side (the flow is scaled back up): Farneback's cost
#: grows with pixels, and motion at 1024 px is well resolved for a frame-difference measure.
FLOW_MAX_SIDE = 1024

CV2_MISSING = (
    "OpenCV is not installed: flicker is the UNWARPED frame difference. Install the video extra for the "
    'motion-compensated measure: pip install -e ".[video]"'
)


def _import_cv2():
    """OpenCV, or None (the meter then falls back to unwarped differences and says so)."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2


def _check_frame(frame: np.ndarray, name: str) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(
            f"{name} must be an HxWx3 uint8 array; got shape {frame.shape} dtype {frame.dtype}"
        )
    return frame


def bicubic_upscale(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The reference: Pillow's bicubic (sdx4's `bicubic` method) of an hxwx3 uint8 frame to `size` (w, h)."""
    image = Image.fromarray(frame)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    return np.asarray(image)


class FlickerMeter:
    """Mean motion-compensated frame-to-frame difference of an output clip and of its bicubic reference.

    `add(output_frame, input_frame)` once per frame, in order; `result()` at any time.
    """

    def __init__(self) -> None:
        self._cv2 = _import_cv2()
        self._frames = 0
        self._sum_out = 0.0
        self._sum_ref = 0.0
        self._prev_out: np.ndarray | None = None  # H,W,3 float32
        self._prev_ref: np.ndarray | None = None  # H,W,3 float32
        self._prev_grey: np.ndarray | None = None  # h',w' uint8 (flow resolution)

    def add(self, output_frame: np.ndarray, input_frame: np.ndarray) -> None:
        """Account one frame: `output_frame` HxWx3 uint8 (the upscaled frame), `input_frame` hxwx3 uint8."""
        out = _check_frame(output_frame, "output_frame")
        inp = _check_frame(input_frame, "input_frame")
        if self._prev_out is not None and out.shape != self._prev_out.shape:
            raise ValueError(
                f"output_frame size changed within the clip: {out.shape[1]}x{out.shape[0]} after "
                f"{self._prev_out.shape[1]}x{self._prev_out.shape[0]}"
            )
        h, w = out.shape[:2]
        ref = bicubic_upscale(inp, (w, h))
        grey = self._flow_grey(ref)
        out_f = out.astype(np.float32)
        ref_f = ref.astype(np.float32)
        if self._prev_out is not None:
            warp = self._warper(self._prev_grey, grey, (h, w))
            self._sum_out += warp(self._prev_out, out_f)
            self._sum_ref += warp(self._prev_ref, ref_f)
        self._prev_out, self._prev_ref, self._prev_grey = out_f, ref_f, grey
        self._frames += 1

    def result(self) -> dict:
        """`flicker`, `bicubic_flicker` (grey levels), `ratio`, `frames`, `warped` (False without OpenCV)."""
        pairs = max(self._frames - 1, 0)
        flicker = self._sum_out / pairs if pairs else 0.0
        reference = self._sum_ref / pairs if pairs else 0.0
        result = {
            "flicker": round(flicker, 4),
            "bicubic_flicker": round(reference, 4),
            "ratio": round((flicker + RATIO_FLOOR) / (reference + RATIO_FLOOR), 4),
            "frames": self._frames,
            "warped": self._cv2 is not None,
        }
        if self._cv2 is None:
            result["note"] = CV2_MISSING
        return result

    # -- internals -------------------------------------------------------------------------------------

    def _flow_grey(self, ref: np.ndarray) -> np.ndarray | None:
        """The bicubic frame in grey at the flow resolution (None without OpenCV)."""
        return None if self._cv2 is None else flow_grey(self._cv2, ref)

    def _warper(self, prev_grey, grey, size: tuple[int, int]):
        """A function (previous frame, current frame) -> mean |current - warped previous| over valid pixels."""
        if self._cv2 is None or np.array_equal(prev_grey, grey):
            # No OpenCV, or no motion in the reference: Farneback on identical frames returns tiny non-zero
            # vectors whose interpolation would count as flicker.
            return lambda prev, cur: float(np.abs(cur - prev).mean())
        cv2 = self._cv2
        map_x, map_y, valid = flow_maps(cv2, prev_grey, grey, size)

        def warp(prev: np.ndarray, cur: np.ndarray) -> float:
            warped = cv2.remap(
                prev, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
            )
            return float(np.abs(cur - warped)[valid].mean())

        return warp


def flow_grey(cv2, ref: np.ndarray) -> np.ndarray:
    """An HxWx3 uint8 frame in grey at the flow resolution (long side at most FLOW_MAX_SIDE)."""
    h, w = ref.shape[:2]
    grey = cv2.cvtColor(np.ascontiguousarray(ref), cv2.COLOR_RGB2GRAY)
    side = max(h, w)
    if side > FLOW_MAX_SIDE:
        f = FLOW_MAX_SIDE / side
        grey = cv2.resize(
            grey,
            (max(1, round(w * f)), max(1, round(h * f))),
            interpolation=cv2.INTER_AREA,
        )
    return grey


def flow_maps(cv2, prev_grey: np.ndarray, grey: np.ndarray, size: tuple[int, int]):
    """Farneback flow from the current frame to the previous one, as cv2.remap maps at `size` (h, w):
    (map_x, map_y, valid), where `valid` marks the pixels whose previous position is inside the frame."""
    h, w = size
    flow = cv2.calcOpticalFlowFarneback(
        grey, prev_grey, None, 0.5, 4, 15, 3, 5, 1.2, 0
    )  # h',w',2
    fh, fw = flow.shape[:2]
    if (fh, fw) != (h, w):
        flow = cv2.resize(flow, (w, h), interpolation=cv2.INTER_LINEAR)
        flow[..., 0] *= w / fw
        flow[..., 1] *= h / fh
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    map_x = (
        xs + flow[..., 0]
    )  # for each current pixel, where it was in the previous frame
    map_y = ys + flow[..., 1]
    valid = (map_x >= 0) & (map_x <= w - 1) & (map_y >= 0) & (map_y <= h - 1)
    if not valid.any():
        valid[:] = True
    return map_x, map_y, valid
