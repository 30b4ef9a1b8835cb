"""Animated images in and out: animated GIF, WebP and APNG, read as composited frames and written back
with their timing, loop count and disposal.

Reading (`probe_animation`, `iter_frames`): Pillow composites GIF and APNG frames itself (each frame after
the first is the canvas after the previous frame's disposal and this frame's blend) and WebP's decoder
gives whole frames, so every frame handed on is the full picture a viewer shows, as RGB or RGBA.

Writing (`write_animation`): whole frames, so the way they are laid over each other must not change what
is shown. Opaque animations keep the input's GIF disposal and APNG dispose/blend values (any value shows
a whole opaque frame the same). With transparency a frame must replace the canvas, not be drawn over the
previous one: GIF frames are then written with disposal 2 (restore to background) and APNG frames with
blend "source". Pillow's GIF and APNG writers and libwebp merge identical consecutive frames into one
whose duration is the sum: the animation plays the same (a wholly static one becomes a single frame).

GIF holds 256 colours: ONE palette is built over all output frames (a mosaic of them, median cut), and
every frame is mapped onto it WITHOUT dithering. Measured on a panning texture (8 frames, 192 px, bicubic;
FlickerMeter, lossless frames 1.04): per-frame palettes (Pillow's default) flicker 2.14 with a mean error of
3.75 grey levels, one palette dithered 3.46 / 4.93, one palette undithered 1.20 / 4.04: dither patterns
and per-frame palettes both change from frame to frame. Transparency takes index 255 where alpha < 128.

Memory: inputs are decoded one frame at a time, but the upscaled frames are held until the file is written
(Pillow's writers compare each frame with the previous ones): MAX_ANIMATION_FRAMES frames and
MAX_ANIMATION_OUTPUT_PIXELS output pixels in all are the documented limits, checked before any work.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from ..options import OptionsError, scaled_size
from .errors import ImageInputError
from .formats import MAX_INPUT_PIXELS, METADATA_KEY
from .read import LoadedImage, normalise
from .write import write_atomic

#: (input width, height) -> (output width, height): `UpscaleOptions.output_size`.
SizeRule = Callable[[tuple[int, int]], tuple[int, int]]

#: The animated formats: Pillow format name -> the output suffix that keeps it.
ANIMATION_FORMATS = {"GIF": ".gif", "WEBP": ".webp", "PNG": ".png"}
#: The suffixes `-o` may name for an animated input (its own format, or another animated one).
ANIMATION_SUFFIXES = (".gif", ".webp", ".png", ".apng")
#: At most this many frames in one animation.
MAX_ANIMATION_FRAMES = 1000
#: At most this many OUTPUT pixels in all frames together (held in memory until written: 4 bytes each).
MAX_ANIMATION_OUTPUT_PIXELS = 256_000_000
#: The key of the record in a GIF's comment (PNG keeps it in the "sdx4" text chunk, like still images).
GIF_COMMENT_PREFIX = METADATA_KEY + ":"


@dataclass(frozen=True)
class AnimationInfo:
    """What an animated input is, and what its output keeps."""

    format: str  # "GIF", "WEBP" or "PNG" (APNG)
    size: tuple[int, int]  # (w, h) of the canvas
    frames: int
    durations: tuple[int, ...]  # per frame, milliseconds
    loop: (
        int | None
    )  # 0 = for ever, N = N times (GIF: N + 1 plays); None = the file has no loop count
    disposal: tuple[int, ...] | None = (
        None  # GIF disposal method / APNG dispose op, per frame
    )
    blend: tuple[int, ...] | None = None  # APNG blend op, per frame
    background: Any = None  # GIF palette index / WebP RGBA colour

    @property
    def suffix(self) -> str:
        return ANIMATION_FORMATS[self.format]

    @property
    def duration_s(self) -> float:
        return sum(self.durations) / 1000

    def output_pixels(self, scale: float = 4, output_size: SizeRule | None = None) -> int:
        """Pixels of all upscaled frames: each frame `output_size(size)` (UpscaleOptions.output_size), else
        size x scale rounded half up."""
        w, h = output_size(self.size) if output_size is not None else scaled_size(self.size, scale)
        return w * h * self.frames


def _open(source: str | os.PathLike[str] | bytes) -> tuple[Image.Image, Any]:
    """Image.open on a path or bytes; returns the image and the file object to close."""
    # The caller closes it (after iterating frames lazily): a `with` here would close it too early.
    f: BinaryIO
    if isinstance(source, bytes):
        f = io.BytesIO(source)
    else:
        f = open(source, "rb")  # noqa: SIM115
    try:
        return Image.open(f), f
    except BaseException:
        f.close()
        raise


def is_animated(source: str | os.PathLike[str] | bytes) -> bool:
    """Whether a file (or encoded bytes) is an animated GIF, WebP or APNG with more than one frame.
    Anything Pillow cannot open is not (the still-image path then reports why)."""
    try:
        im, f = _open(source)
    except (
        OSError,
        UnidentifiedImageError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
    ):
        return False
    try:
        with im:
            return im.format in ANIMATION_FORMATS and getattr(im, "n_frames", 1) > 1
    except (OSError, ValueError, SyntaxError):
        return False
    finally:
        f.close()


def probe_animation(
    source: str | os.PathLike[str] | bytes, name: str | None = None, *, scale: float = 4,
    output_size: SizeRule | None = None,
) -> AnimationInfo:
    """Read an animation's frame count, timing, loop and disposal (no pixels yet) and check the limits
    for an upscale by `scale`, or to `output_size(frame size)` when given (pass `options.output_size`: float
    scales and width/height; its OptionsError comes out as it is); errors (ImageInputError) name the input."""
    name = name or str(source if not isinstance(source, bytes) else "animation")
    try:
        im, f = _open(source)
    except FileNotFoundError:
        raise ImageInputError(f"{name}: no such file") from None
    except UnidentifiedImageError:
        raise ImageInputError(
            f"{name}: not an image Pillow can read (unknown or corrupt format)"
        ) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageInputError(f"{name}: cannot decode image ({e})") from None
    try:
        with im:
            if im.format not in ANIMATION_FORMATS or getattr(im, "n_frames", 1) < 2:
                raise ImageInputError(
                    f"{name}: not an animated GIF, WebP or PNG (APNG)"
                )
            frames = im.n_frames
            w, h = im.size
            if w * h > MAX_INPUT_PIXELS:
                raise ImageInputError(
                    f"{name}: {w}x{h} is over the {MAX_INPUT_PIXELS / 1e6:.0f} MP input limit"
                )
            if frames > MAX_ANIMATION_FRAMES:
                raise ImageInputError(
                    f"{name}: {frames} frames is over the limit of {MAX_ANIMATION_FRAMES} frames for an animation"
                )
            ow, oh = output_size((w, h)) if output_size is not None else scaled_size((w, h), scale)
            out_pixels = ow * oh * frames
            if out_pixels > MAX_ANIMATION_OUTPUT_PIXELS:
                raise ImageInputError(
                    f"{name}: {frames} frames of {ow}x{oh} = {out_pixels / 1e6:.3g} MP of output is over "
                    f"the {MAX_ANIMATION_OUTPUT_PIXELS / 1e6:.3g} MP limit for an animation (the frames are held "
                    "in memory until written): cut it, or make it smaller"
                )
            durations, disposal, blend = [], [], []
            loop = im.info.get("loop")
            background = im.info.get("background")
            for i in range(frames):
                im.seek(i)
                if im.format == "WEBP":
                    im.load()  # WebP reports a frame's duration once it is decoded
                durations.append(round(im.info.get("duration", 0) or 0))
                if im.format == "GIF":
                    disposal.append(int(getattr(im, "disposal_method", 0) or 0))
                elif im.format == "PNG":
                    disposal.append(int(im.info.get("disposal", 0)))
                    blend.append(int(im.info.get("blend", 0)))
            return AnimationInfo(
                format=im.format,
                size=(w, h),
                frames=frames,
                durations=tuple(durations),
                loop=None if loop is None else int(loop),
                disposal=tuple(disposal) if disposal else None,
                blend=tuple(blend) if blend else None,
                background=background,
            )
    except (ImageInputError, OptionsError):  # OptionsError: output_size's width/height out of range
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageInputError(f"{name}: cannot decode image ({e})") from None
    finally:
        f.close()


def iter_frames(
    source: str | os.PathLike[str] | bytes, name: str | None = None
) -> Iterator[LoadedImage]:
    """The composited frames of an animation, one at a time, as LoadedImage (RGB, alpha where a frame is
    not fully opaque). Only the current frame is decoded and held."""
    name = name or str(source if not isinstance(source, bytes) else "animation")
    im, f = _open(source)
    try:
        with im:
            for i in range(im.n_frames):
                try:
                    im.seek(i)
                    im.load()
                    frame = im.convert("RGBA")
                except (OSError, ValueError, SyntaxError, EOFError) as e:
                    raise ImageInputError(
                        f"{name}: cannot decode frame {i + 1} ({e})"
                    ) from None
                yield normalise(frame, f"{name} frame {i + 1}")
    finally:
        f.close()


def frame_array(loaded: LoadedImage):
    """An HxWx3 uint8 array of a frame's RGB (for the flicker measure)."""
    import numpy as np

    return np.asarray(loaded.rgb.convert("RGB"))


def output_animation_format(path: str | os.PathLike[str]) -> str:
    """The animated format an output path asks for: .gif -> GIF, .webp -> WEBP, .png/.apng -> PNG (APNG)."""
    suffix = Path(path).suffix.lower()
    for fmt, s in (
        ("GIF", ".gif"),
        ("WEBP", ".webp"),
        ("PNG", ".png"),
        ("PNG", ".apng"),
    ):
        if suffix == s:
            return fmt
    raise ImageInputError(
        f"{path}: an animation's output must end in one of {', '.join(ANIMATION_SUFFIXES + VIDEO_OUTPUT_SUFFIXES)}"
    )


#: The suffixes that make a video of an animation (written through PyAV, sdx4.video).
VIDEO_OUTPUT_SUFFIXES = (".mp4", ".webm")


def check_animation_path(path: str | os.PathLike[str], overwrite: bool) -> Path:
    """Refuse a bad output path for an animation before any work: a suffix that is neither an animated
    format (ANIMATION_SUFFIXES) nor a video (VIDEO_OUTPUT_SUFFIXES), an existing file without overwrite,
    a missing folder."""
    path = Path(path)
    if path.suffix.lower() not in VIDEO_OUTPUT_SUFFIXES:
        output_animation_format(path)
    if path.exists() and not overwrite:
        raise ImageInputError(
            f"{path}: already exists (pass --overwrite to replace it)"
        )
    if path.exists() and path.is_dir():
        raise ImageInputError(f"{path}: is a directory")
    if not path.parent.exists():
        raise ImageInputError(f"{path.parent}: output folder does not exist")
    if not path.parent.is_dir():
        raise ImageInputError(
            f"{path.parent}: is not a folder, so {path} cannot be written in it"
        )
    return path


def gif_frames(frames: list[Image.Image]) -> tuple[list[Image.Image], int | None]:
    """RGB/RGBA frames -> P frames on ONE palette computed over all of them (undithered: module docstring);
    returns (frames, transparency index or None)."""
    alpha = any(
        f.mode == "RGBA" and f.getchannel("A").getextrema()[0] < 128 for f in frames
    )
    colours = 255 if alpha else 256  # index 255 is kept for transparency
    # A mosaic of every frame (each shrunk so the mosaic holds about 1 MP) is what the palette is fitted to.
    w, h = frames[0].size
    per = max(1, int((1_000_000 / len(frames)) ** 0.5))
    f = min(1.0, per / max(w, h))
    tw, th = max(1, round(w * f)), max(1, round(h * f))
    cols = max(1, int(len(frames) ** 0.5 + 0.999))
    rows = (len(frames) + cols - 1) // cols
    mosaic = Image.new("RGB", (tw * cols, th * rows))
    for i, frame in enumerate(frames):
        mosaic.paste(
            frame.convert("RGB").resize((tw, th), Image.Resampling.BOX),
            ((i % cols) * tw, (i // cols) * th),
        )
    palette = mosaic.quantize(colours, method=Image.Quantize.MEDIANCUT)
    out = []
    for frame in frames:
        p = frame.convert("RGB").quantize(palette=palette, dither=Image.Dither.NONE)
        if alpha and frame.mode == "RGBA":
            clear = frame.getchannel("A").point(lambda a: 255 if a < 128 else 0)
            p.paste(255, mask=clear)
        out.append(p)
    return out, (255 if alpha else None)


def write_animation(
    frames: list[Image.Image],
    path: str | os.PathLike[str],
    info: AnimationInfo,
    metadata: dict[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write upscaled whole frames as the animated format `path`'s suffix names, atomically, with the
    input's durations and loop count (and disposal/blend where they show the frames the same, see the
    module's docstring). PNG keeps `metadata` in its "sdx4" text chunk, GIF in its comment."""
    path = check_animation_path(path, overwrite)
    fmt = output_animation_format(path)
    if len(frames) != len(info.durations):
        raise ValueError(f"{len(frames)} frames for {len(info.durations)} durations")
    alpha = any(f.mode == "RGBA" for f in frames)
    frames = [f.convert("RGBA") if alpha else f.convert("RGB") for f in frames]
    kwargs: dict[str, Any] = {"save_all": True, "duration": list(info.durations)}
    record = json.dumps(metadata, sort_keys=True) if metadata is not None else None
    same_kind = info.format == fmt
    if fmt == "GIF":
        frames, transparency = gif_frames(frames)
        if transparency is not None:
            kwargs["transparency"] = transparency
            kwargs["disposal"] = 2
        elif same_kind and info.disposal:
            kwargs["disposal"] = list(info.disposal)
        if info.loop is not None:
            kwargs["loop"] = info.loop
        # Pillow merges identical frames (adding their durations); left with one it writes a still GIF and
        # reads a per-frame disposal list as a scalar (TypeError).
        static = all(f.tobytes() == frames[0].tobytes() for f in frames[1:])
        if static and isinstance(kwargs.get("disposal"), list):
            kwargs["disposal"] = kwargs["disposal"][0]
        if record is not None:
            kwargs["comment"] = GIF_COMMENT_PREFIX + record
    elif fmt == "PNG":
        kwargs["loop"] = info.loop or 0
        if same_kind and info.disposal:
            kwargs["disposal"] = list(info.disposal)
        if alpha:
            kwargs["blend"] = PngImagePlugin.Blend.OP_SOURCE
        elif same_kind and info.blend:
            kwargs["blend"] = list(info.blend)
        if record is not None:
            png = PngImagePlugin.PngInfo()
            png.add_itxt(METADATA_KEY, record)
            kwargs["pnginfo"] = png
    else:  # WEBP
        kwargs.update(lossless=True, loop=info.loop or 0)
        if same_kind and isinstance(info.background, tuple):
            kwargs["background"] = info.background

    def write(f: BinaryIO) -> None:
        frames[0].save(f, format=fmt, append_images=frames[1:], **kwargs)

    return write_atomic(path, write, overwrite=overwrite)


def read_animation_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The record sdx4 wrote into an animated PNG (text chunk) or GIF (comment); {} when there is none."""
    with Image.open(path) as im:
        text = im.info.get(METADATA_KEY)
        comment = im.info.get("comment")
    if text:
        return json.loads(text)
    if isinstance(comment, bytes) and comment.startswith(GIF_COMMENT_PREFIX.encode()):
        return json.loads(comment[len(GIF_COMMENT_PREFIX) :].decode())
    return {}
