"""Animated GIF, WebP and APNG: every frame upscaled, written back as an animation (or an MP4/WebM video).

    input animation ─► probe (limits, timing) ─► composited frames, one at a time ─► upscale (same seed for
    every frame) ─► [temporal colour fix over the clip] ─► flicker measure ─► animation (or video) + record

Frame consistency: every frame is upscaled with the SAME options and seed, so the initial latents and the
low-res noise are the same for every frame: a static animation gives identical output frames, and what
changes between output frames is driven by what changes between input frames.

`temporal`: a treatment of the whole clip after every frame is upscaled (video/temporal.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..imageio import (
    VIDEO_OUTPUT_SUFFIXES,
    AnimationInfo,
    ImageInputError,
    check_animation_path,
    iter_frames,
    output_animation_format,
    probe_animation,
    write_animation,
    write_atomic,
)
from ..options import OptionsError, UpscaleOptions
from .flicker import FlickerMeter
from .temporal import TEMPORAL_FIXES, TEMPORAL_MODES

#: Output suffixes that make a video of an animation (through PyAV).
VIDEO_SUFFIXES = VIDEO_OUTPUT_SUFFIXES


@dataclass(frozen=True)
class AnimationResult:
    """What `upscale_animation` wrote: the path, the record stored in it, and the flicker measure."""

    path: Path
    frames: int
    size: tuple[int, int]  # output (w, h)
    flicker: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)


def check_animation_options(options: UpscaleOptions, temporal: str = "none") -> None:
    """Refuse, before any work, options an animation cannot take."""
    if options.num_images != 1:
        raise OptionsError(
            f"num_images must be 1 for an animation (each frame gives one output frame); got {options.num_images}",
            option="num_images",
        )
    if options.bit_depth != 8:
        raise OptionsError(
            f"bit_depth must be 8 for an animation; got {options.bit_depth}",
            option="bit_depth",
        )
    if temporal not in TEMPORAL_MODES:
        raise OptionsError(
            f"temporal must be one of {', '.join(TEMPORAL_MODES)}; got {temporal!r}",
            option="temporal",
        )


def check_animation_output(dst: str | Path, overwrite: bool = False) -> str:
    """The kind of output `dst` names ("animation" or "video"), checked before any work."""
    path = check_animation_path(dst, overwrite)
    return "video" if path.suffix.lower() in VIDEO_SUFFIXES else "animation"


def upscale_animation(
    upscaler: Any,
    src: str | Path,
    dst: str | Path,
    options: UpscaleOptions | None = None,
    *,
    temporal: str = "none",
    overwrite: bool = False,
    progress: Any = None,
    cancel: Any = None,
    name: str | None = None,
) -> AnimationResult:
    """Upscale every frame of an animated GIF, WebP or APNG `src` and write `dst`.

    upscaler: an `sdx4.Upscaler` (method "sd", or any method), or None for the methods without a model
        (classical filters and whatever `sdx4.upscale` runs).
    dst: .gif/.webp/.png/.apng writes that animated format with the input's timing and loop count;
        .mp4/.webm writes a video (H.264 / VP9, through PyAV: `pip install -e ".[video]"`).
    temporal: "none", or one of video/temporal.py's TEMPORAL_FIXES ("colorfix", "flow").
    progress(done, total): after each frame. cancel(): before each frame; may raise to stop.
    The seed is drawn once (when options.seed is None) and used for every frame.
    """
    from ..api import upscale as upscale_without_model

    opts = (options or UpscaleOptions()).with_seed()
    check_animation_options(opts, temporal)
    src = Path(src)
    name = name or str(src)
    if opts.method == "sd" and upscaler is None:
        raise OptionsError(
            "method 'sd' needs the model: pass the upscaler sdx4.load() returns",
            option="method",
        )
    kind = check_animation_output(dst, overwrite)
    info = probe_animation(src, name, output_size=opts.output_size)  # float scales, width/height
    if upscaler is not None and opts.method == "sd":
        upscaler.check(opts, info.size)  # the memory budget, before any heavy work
    run = upscaler if upscaler is not None else upscale_without_model

    t0 = time.perf_counter()
    frames: list[Image.Image] = []
    first_meta: dict[str, Any] = {}
    for i, loaded in enumerate(iter_frames(src, name)):
        if cancel is not None:
            cancel()
        result = run(loaded, opts)
        frames.append(result.image)
        if i == 0:
            first_meta = dict(result.metadata)
        if progress is not None:
            progress(i + 1, info.frames)
    if len(frames) != info.frames:
        raise ImageInputError(
            f"{name}: {len(frames)} frames decoded, {info.frames} announced"
        )

    if temporal != "none":
        frames = TEMPORAL_FIXES[temporal](frames, _inputs(src, name))
    meter = FlickerMeter()
    for out, inp in zip(frames, _inputs(src, name)):
        meter.add(np.asarray(out.convert("RGB")), inp)
    flicker = meter.result()

    record = {
        **first_meta,
        "seconds": round(time.perf_counter() - t0, 3),
        "animation": {
            "format": info.format,  # the input's
            "output_format": Path(dst).suffix.lstrip(".").upper()
            if kind == "video"
            else output_animation_format(dst),
            "frames": info.frames,
            "durations_ms": list(info.durations),
            "loop": info.loop,
            "seed_per_frame": "same",
        },
        "temporal": temporal,
        "flicker": flicker,
        "input": Path(name).name,
    }
    record.pop("timings", None)  # the first frame's; "seconds" is the whole clip's
    if kind == "video":
        path = write_video(frames, dst, info, overwrite=overwrite)
    else:
        path = write_animation(frames, dst, info, record, overwrite=overwrite)
    w, h = frames[0].size
    return AnimationResult(
        path=Path(path),
        frames=len(frames),
        size=(w, h),
        flicker=flicker,
        metadata=record,
    )


def _inputs(src: Path, name: str):
    """The input frames again, as HxWx3 uint8 arrays (decoded one at a time)."""
    for loaded in iter_frames(src, name):
        yield np.asarray(loaded.rgb.convert("RGB"))


def write_video(
    frames: list[Image.Image],
    dst: str | Path,
    info: AnimationInfo,
    *,
    overwrite: bool = False,
) -> Path:
    """Upscaled frames -> an MP4 (H.264, yuv420p, crf 18) or WebM (VP9) with the animation's timing (a time
    base of 1 ms: each frame shows for its own duration), written atomically (`imageio.write_atomic`)."""
    try:
        import av
    except ImportError:
        raise ImageInputError(
            f'{dst}: writing a video needs PyAV: pip install -e ".[video]"'
        ) from None
    from fractions import Fraction

    path = check_animation_path(dst, overwrite)
    webm = path.suffix.lower() == ".webm"
    w, h = frames[0].size
    ew, eh = (
        w + (w % 2),
        h + (h % 2),
    )  # yuv420p needs even sides: an odd side gets its edge repeated once
    ms = Fraction(1, 1000)

    def write(f) -> None:
        with av.open(f, "w", format="webm" if webm else "mp4") as container:
            stream = container.add_stream(
                "libvpx-vp9" if webm else "libx264", rate=1000
            )
            stream.width, stream.height, stream.pix_fmt, stream.time_base = (
                ew,
                eh,
                "yuv420p",
                ms,
            )
            stream.options = {"crf": "18"} if not webm else {"crf": "24", "b": "0"}
            pts = 0
            for image, duration in zip(frames, info.durations, strict=True):
                rgb = np.asarray(image.convert("RGB"))
                if (ew, eh) != (w, h):
                    rgb = np.pad(rgb, ((0, eh - h), (0, ew - w), (0, 0)), mode="edge")
                frame = av.VideoFrame.from_ndarray(
                    np.ascontiguousarray(rgb), format="rgb24"
                )
                frame.pts, frame.time_base = pts, ms
                pts += max(int(duration), 1)
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)

    return write_atomic(path, write, overwrite=overwrite)
