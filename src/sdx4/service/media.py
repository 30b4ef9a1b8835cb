"""Animations and videos as service jobs: checked before queueing, run frame by frame by the worker.

An upload that is an animated GIF/WebP/APNG is always an animation job (its result keeps its format). A video
upload (a `video/*` part or a video file suffix) is a job only with `ServerSettings.allow_video`
(`sdx4 serve --allow-video`), within `max_video_seconds`, `max_video_frames` and the usual pixel limits per
frame; otherwise 415/413/422 with the field "image", before anything is queued.

The job's progress counts frames (`frames_done` / `frames_total` in its snapshot and events). Media jobs
are not kept across a restart of the server: their input is held in memory only (a restarted server
reports them failed, "input lost").
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..imageio import ImageInputError, is_animated, probe_animation
from ..options import OptionsError, UpscaleOptions
from .requests import OPTION_NAMES, ApiError, ServerSettings, check_header

#: Content types of results by suffix (what GET /v1/jobs/{id}/result answers).
MEDIA_TYPES = {
    ".png": "image/png", ".gif": "image/gif", ".webp": "image/webp", ".mp4": "video/mp4", ".webm": "video/webm",
    ".mkv": "video/x-matroska", ".mov": "video/quicktime", ".m4v": "video/mp4",
}  # fmt: skip


@dataclass(frozen=True)
class MediaInput:
    """An accepted animation or video upload, held until the worker runs it."""

    kind: str  # "animation" or "video"
    data: bytes = field(repr=False)
    suffix: str  # the input's (and, for animations, the output's) suffix
    size: tuple[int, int]  # one frame (w, h)
    frames: int
    seconds: float | None

    # Read by JobManager like a LoadedImage's fields.
    alpha = None
    icc_profile = None


@dataclass(frozen=True)
class MediaResult:
    """What the worker writes for a media job: one file (its `path`), and the record."""

    path: Path
    metadata: dict[str, Any]
    images: tuple = ()
    icc_profile: bytes | None = None
    exif: bytes | None = None


def _video_suffix(name: str, part_type: str) -> str | None:
    from ..video import VIDEO_SUFFIXES

    suffix = Path(name).suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return suffix
    if part_type.startswith("video/"):
        return {
            "video/webm": ".webm",
            "video/quicktime": ".mov",
            "video/x-matroska": ".mkv",
        }.get(part_type, ".mp4")
    return None


def _check_options(options: UpscaleOptions, name: str) -> None:
    from ..video import check_animation_options

    try:
        check_animation_options(options)
    except OptionsError as e:
        raise ApiError(422, f"{name}: {e}", e.option) from None


def media_upload(
    data: bytes,
    part_type: str,
    name: str,
    options: UpscaleOptions,
    settings: ServerSettings,
) -> MediaInput | None:
    """The upload as a MediaInput when it is an animation or a video (checked against the limits), or None
    for a still image (the usual path takes it)."""
    if is_animated(data):
        _check_options(options, name)
        check_header(
            data, settings, 1, name, options.scale, options.output_size
        )  # format, pixels, side, aspect, output per frame (its exact size: float scales, width/height)
        try:
            info = probe_animation(data, name, output_size=options.output_size)
        except ImageInputError as e:
            raise ApiError(
                422 if "limit" not in str(e) else 413, str(e), "image"
            ) from None
        _check_length(name, info.frames, info.duration_s, settings)
        return MediaInput(
            "animation", data, info.suffix, info.size, info.frames, info.duration_s
        )
    suffix = _video_suffix(name, part_type)
    if suffix is None:
        return None
    if not settings.allow_video:
        raise ApiError(
            415,
            f"{name}: a video; this server does not take videos (start it with sdx4 serve --allow-video)",
            "image",
        )
    _check_options(options, name)
    from ..video import VideoInputError, probe

    with tempfile.TemporaryDirectory(prefix="sdx4-upload-") as folder:
        path = Path(folder) / f"upload{suffix}"
        path.write_bytes(data)
        try:
            info = probe(path)
        except (VideoInputError, ImageInputError, OSError, ValueError) as e:
            raise ApiError(
                422,
                f"{name}: not a video this server can read ({str(e).replace(str(path), name)})",
                "image",
            ) from None
    w, h = info.size
    if w * h > settings.max_input_pixels:
        raise ApiError(
            413,
            f"{name}: {w}x{h} frames are over the input limit of {settings.max_input_pixels} pixels",
            "image",
        )
    try:
        ow, oh = options.output_size((w, h))  # exactly what each frame becomes (float scales, width/height)
    except OptionsError as e:
        raise ApiError(422, f"{name}: {e}", e.option if e.option in OPTION_NAMES else "image") from None
    if ow * oh > settings.max_output_pixels:
        raise ApiError(
            413, f"{name}: output frames of {ow}x{oh} are over the output limit of "
            f"{settings.max_output_pixels} pixels", "image",
        )  # fmt: skip
    _check_length(name, info.frames, info.duration_s, settings)
    return MediaInput("video", data, suffix, (w, h), info.frames, info.duration_s)


def _check_length(
    name: str, frames: int, seconds: float | None, settings: ServerSettings
) -> None:
    if frames > settings.max_video_frames:
        raise ApiError(
            413,
            f"{name}: {frames} frames is over the limit of {settings.max_video_frames} frames",
            "image",
        )
    if seconds is not None and seconds > settings.max_video_seconds:
        raise ApiError(
            413,
            f"{name}: {seconds:.3g} s is over the limit of {settings.max_video_seconds:g} s",
            "image",
        )


def run_media(
    upscaler: Any,
    media: MediaInput,
    options: UpscaleOptions,
    out: Path,
    progress: Any,
    cancel_check: Any,
) -> MediaResult:
    """Run an animation or video job into the file `out` (its suffix chosen by `media_output_suffix`)."""
    from .. import video

    model = upscaler if options.method == "sd" else None
    work = Path(tempfile.mkdtemp(prefix="sdx4-media-"))
    try:
        src = work / f"input{media.suffix}"
        src.write_bytes(media.data)
        if media.kind == "animation":
            result = video.upscale_animation(
                model,
                src,
                out,
                options,
                overwrite=True,
                progress=progress,
                cancel=cancel_check,
                name="input",
            )
            return MediaResult(out, dict(result.metadata))

        def cancel() -> bool:
            if cancel_check is not None:
                cancel_check()  # raises the job's JobCancelled
            return False

        report = video.upscale_video(
            model,
            src,
            out,
            options,
            video.VideoOptions(),
            progress=progress,
            cancel=cancel,
            work_dir=work / "parts",
        )
        return MediaResult(out, dict(report.metadata or {}, flicker=report.flicker))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def media_output_suffix(media: MediaInput) -> str:
    """An animation keeps its format; a video keeps its container (.avi becomes .mkv, as in the CLI)."""
    if media.kind == "animation":
        return media.suffix
    from ..video import video_output_suffix

    return video_output_suffix(f"x{media.suffix}")


class MediaAware:
    """The worker's upscaler: a MediaInput runs through `run_media`, anything else through the upscaler."""

    def __init__(self, upscaler: Any, results_dir: Any) -> None:
        import inspect

        self._upscaler = upscaler
        self._results_dir = results_dir  # a callable giving the results folder (known once the manager exists)
        try:
            self._takes_check = "cancel_check" in inspect.signature(upscaler).parameters
        except (TypeError, ValueError):
            self._takes_check = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._upscaler, name)

    def __call__(
        self,
        image: Any,
        options: UpscaleOptions,
        *,
        progress: Any = None,
        cancel_check: Any = None,
    ) -> Any:
        if isinstance(image, MediaInput):
            out = (
                Path(self._results_dir())
                / f".media-{id(image):x}{media_output_suffix(image)}"
            )
            return run_media(
                self._upscaler, image, options, out, progress, cancel_check
            )
        extra = (
            {"cancel_check": cancel_check}
            if self._takes_check and cancel_check is not None
            else {}
        )
        return self._upscaler(image, options, progress=progress, **extra)
