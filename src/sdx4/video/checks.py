"""What a clip holds (`probe`), and the checks of a clip and its output made before any heavy work."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from ..imageio.formats import MAX_INPUT_PIXELS
from ..options import scaled_size
from .errors import VideoInputError, require_av
from .options import (
    CONTAINER_CODECS,
    DEFAULT_CODEC,
    DEFAULT_CRF,
    DEFAULT_PIX_FMT,
    ENCODERS,
    VideoOptions,
    output_container,
)

#: AVColorSpace values swscale understands as conversion matrices (bt709, fcc, bt470bg, smpte170m, smpte240m,
#: bt2020nc); any other (unspecified) takes swscale's default, BT.601 - what players assume too.
_SWS_COLORSPACES = (1, 4, 5, 6, 7, 9)


@dataclass(frozen=True)
class VideoInfo:
    """A clip's video stream and what goes with it. `frames` counts the video packets (stream header or demux)."""

    path: str
    container: str
    codec: str
    width: int
    height: int
    frames: int
    fps: Fraction | None
    time_base: Fraction
    duration_s: float | None
    pix_fmt: str | None
    rotation: int  # degrees counter-clockwise, from the display matrix (0 when none)
    color: dict[str, int] = field(
        default_factory=dict
    )  # color_range, colorspace, color_primaries, color_trc
    audio: tuple[str, ...] = ()  # codec names of the audio streams
    subtitles: tuple[str, ...] = ()
    chapters: int = 0

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


@dataclass(frozen=True)
class Encoding:
    """The resolved encoding of an output: container format, codec, encoder, crf, pixel format, encoded size."""

    container: str
    codec: str
    encoder: str
    crf: int | None
    pix_fmt: str
    size: tuple[
        int, int
    ]  # the encoded size (the upscaled size, padded to even where the pixel format needs it)
    padded: bool

    @property
    def codec_options(self) -> dict[str, str]:
        if self.crf is None:
            return {}
        opts = {"crf": str(self.crf)}
        if self.encoder == "libvpx-vp9":
            opts["b:v"] = "0"  # constant quality, not a bit-rate cap
        if self.encoder == "libx265":
            opts["x265-params"] = "log-level=error"
        return opts

    def to_dict(self) -> dict[str, Any]:
        return {"codec": self.codec, "encoder": self.encoder, "crf": self.crf, "pix_fmt": self.pix_fmt,
                "encoded_size": list(self.size), "padded": self.padded}  # fmt: skip


def _open(path: Path) -> Any:
    av = require_av()
    if not path.is_file():
        raise VideoInputError(
            f"{path}: no such file" if not path.exists() else f"{path}: not a file"
        )
    try:
        return av.open(str(path), metadata_errors="replace")
    except av.FFmpegError as e:
        raise VideoInputError(
            f"{path}: not a video this PyAV build can read ({e.strerror or e})"
        ) from None


def probe(path: str | Path) -> VideoInfo:
    """Open `path`, check it is a clip sdx4 can upscale and say what it holds; VideoInputError if not (not a
    video, no video stream, a codec this PyAV build cannot decode, no frames, over the pixel limit of images).
    Decodes the first frame only (and counts packets when the header has no frame count)."""
    av = require_av()
    path = Path(path)
    container = _open(path)
    try:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["nothing"]
            raise VideoInputError(
                f"{path}: has no video stream (it holds {', '.join(kinds)})"
            )
        stream = container.streams.video[0]
        ctx = stream.codec_context
        if ctx is None:
            raise VideoInputError(
                f"{path}: its video codec cannot be decoded by this PyAV build"
            )
        w, h = ctx.width, ctx.height
        if w * h > MAX_INPUT_PIXELS:
            raise VideoInputError(
                f"{path}: {w}x{h} = {w * h / 1e6:.0f} MP is over the {MAX_INPUT_PIXELS / 1e6:.0f} MP input limit"
            )
        try:
            first = next(iter(container.decode(stream)), None)
        except av.FFmpegError as e:
            raise VideoInputError(
                f"{path}: its {ctx.name} video cannot be decoded ({e.strerror or e})"
            ) from None
        if first is None:
            raise VideoInputError(f"{path}: its video stream has no frames")
        w, h = first.width, first.height
        if w * h > MAX_INPUT_PIXELS:
            raise VideoInputError(
                f"{path}: {w}x{h} = {w * h / 1e6:.0f} MP is over the {MAX_INPUT_PIXELS / 1e6:.0f} MP input limit"
            )
        rotation = int(
            first.rotation or 0
        )  # the display matrix (FFmpeg turns an old "rotate" tag into one)
        color = {
            k: int(getattr(first, k) or getattr(ctx, k) or 0)
            for k in ("color_range", "colorspace", "color_primaries", "color_trc")
        }
        frames = int(stream.frames or 0)
        if frames <= 0:
            container.seek(0)
            frames = sum(1 for p in container.demux(stream) if p.size)
        duration = float(stream.duration * stream.time_base) if stream.duration else (
            container.duration / 1e6 if container.duration else None)  # fmt: skip
        return VideoInfo(
            path=str(path),
            container=container.format.name,
            codec=ctx.name,
            width=w,
            height=h,
            frames=frames,
            fps=stream.average_rate or stream.guessed_rate,
            time_base=stream.time_base or Fraction(1, 90000),
            duration_s=duration,
            pix_fmt=first.format.name,
            rotation=rotation,
            color=color,
            audio=tuple(
                s.codec_context.name if s.codec_context else "?"
                for s in container.streams.audio
            ),
            subtitles=tuple(
                s.codec_context.name if s.codec_context else "?"
                for s in container.streams.subtitles
            ),
            chapters=len(container.chapters()),
        )
    finally:
        container.close()


def _needs_even(pix_fmt: str) -> tuple[bool, bool]:
    """Whether a pixel format subsamples chroma horizontally / vertically (its width / height must be even)."""
    if "420" in pix_fmt or pix_fmt in ("nv12", "nv21", "p010le", "p016le"):
        return True, True
    return ("422" in pix_fmt or "411" in pix_fmt), False


def plan_encoding(
    dst: str | Path, info: VideoInfo, video: VideoOptions, scale: float = 4,
    output_size: Callable[[tuple[int, int]], tuple[int, int]] | None = None,
) -> Encoding:
    """The encoding of `dst` for an upscale of `info` by `scale` (sides rounded half up), or to
    `output_size(frame size)` when given (pass `options.output_size`: float scales and width/height, exactly
    what the upscaler returns; its OptionsError comes out as it is), checked before any work: the suffix is a
    video container, the codec fits it, this PyAV build has an encoder and the pixel format, and the copied
    audio and subtitle streams fit the container. VideoInputError names the problem."""
    av = require_av()
    fmt = output_container(dst)
    codec = video.codec or DEFAULT_CODEC[fmt]
    if codec not in CONTAINER_CODECS[fmt]:
        raise VideoInputError(
            f"{dst}: {fmt} cannot hold {codec} video; use one of {', '.join(CONTAINER_CODECS[fmt])}"
            + (" or write .mkv" if fmt != "matroska" else "")
        )
    encoder = next(
        (e for e in ENCODERS[codec] if e in av.codecs_available and _can_encode(av, e)),
        None,
    )
    if encoder is None:
        raise VideoInputError(
            f"{dst}: this PyAV build has no {codec} encoder ({' or '.join(ENCODERS[codec])}); "
            f"choose another --video-codec"
        )
    pix_fmt = video.pix_fmt or DEFAULT_PIX_FMT[codec]
    formats = {f.name for f in (av.Codec(encoder, "w").video_formats or ())}
    if formats and pix_fmt not in formats:
        raise VideoInputError(
            f"{dst}: {codec} ({encoder}) cannot encode pixel format {pix_fmt}; it takes "
            f"{', '.join(sorted(formats))}"
        )
    crf = (
        None
        if codec == "ffv1"
        else (video.crf if video.crf is not None else DEFAULT_CRF[codec])
    )
    size_in = (info.width, info.height)
    w, h = output_size(size_in) if output_size is not None else scaled_size(size_in, scale)
    even_w, even_h = _needs_even(pix_fmt)
    size = (w + (w % 2 if even_w else 0), h + (h % 2 if even_h else 0))
    if video.keep_audio:
        _check_copies(av, info, fmt, dst)
    return Encoding(fmt, codec, encoder, crf, pix_fmt, size, size != (w, h))


def _can_encode(av: Any, name: str) -> bool:
    try:
        av.Codec(name, "w")
    except Exception:  # noqa: BLE001 - PyAV raises UnknownCodecError or ValueError
        return False
    return True


def _check_copies(av: Any, info: VideoInfo, fmt: str, dst: str | Path) -> None:
    """Add every audio and subtitle stream of the clip to an in-memory `fmt` container: a stream the format
    cannot hold (AAC in WebM, mov_text in Matroska) is an error now, not after hours of upscaling."""
    src = av.open(info.path, metadata_errors="replace")
    try:
        out = av.open(io.BytesIO(), "w", format=fmt)
        try:
            for s in list(src.streams.audio) + list(src.streams.subtitles):
                try:
                    out.add_stream_from_template(s)
                except (ValueError, av.FFmpegError) as e:
                    kind = s.type
                    raise VideoInputError(
                        f"{dst}: the clip's {kind} stream #{s.index} ({s.codec_context.name if s.codec_context else '?'}) "
                        f"cannot be copied into {fmt} ({e}); write a container that holds it (mov_text: .mp4/.mov; AAC: not .webm) or drop audio and subtitles (--no-audio)"
                    ) from None
        finally:
            out.close()
    finally:
        src.close()


def sws_colorspace(value: int) -> int | None:
    """A stream's AVColorSpace as swscale's matrix, None (swscale's default) when unspecified or unknown."""
    return value if value in _SWS_COLORSPACES else None


def sws_range(value: int) -> int | None:
    return value if value in (1, 2) else None
