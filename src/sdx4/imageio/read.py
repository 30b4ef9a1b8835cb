"""Reading: any image Pillow reads (a file, a pipe or stdin read once, an array or a tensor) into RGB/RGBA plus what must survive (ICC profile, EXIF, grayscale, 16 bits); refusals name the input."""

from __future__ import annotations

import io
import json
import os
import select
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageInputError
from .formats import (
    MAX_INPUT_PIXELS,
    MAX_STREAM_BYTES,
    METADATA_KEY,
    STREAM_WAIT_S,
    human_size,
)

#: Pillow modes of grayscale inputs: their outputs are grayscale too, unless color_mode="rgb".
GRAY_MODES = ("1", "L", "LA", "La", "I;16", "I;16B", "I;16L", "I;16N", "I", "F")
#: The EXIF tag of the orientation: reset to 1 (upright) on outputs, since reading applies it.
EXIF_ORIENTATION = 0x0112



@dataclass(frozen=True)
class LoadedImage:
    """An input normalised for the model: RGB pixels, optional alpha plane, and what outputs keep of the
    input: its ICC profile and EXIF (the pixels are never converted between profiles), and its Pillow mode
    (a grayscale input gives a grayscale output, see `is_gray`)."""

    rgb: Image.Image  # mode "RGB"
    alpha: Image.Image | None  # mode "L", same size, or None
    icc_profile: bytes | None = None
    exif: bytes | None = None  # the input's EXIF with the orientation set to 1 (already applied)
    mode: str = "RGB"  # the input's Pillow mode before normalising ("L", "I;16", "P", "RGBA", ...)
    grey16: np.ndarray | None = field(default=None, compare=False)  # H,W uint16: a 16-bit grey input's own values (rgb holds them in 8 bits)

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.size

    @property
    def is_gray(self) -> bool:
        """Whether the input was grayscale (L, LA, 1, I;16, I, F): its RGB planes are equal."""
        return self.mode in GRAY_MODES


def open_image(path: str | os.PathLike[str]) -> LoadedImage:
    """Read an image file (PNG, JPEG, WebP, TIFF, ... whatever Pillow reads) and normalise it.

    A pipe or FIFO (`/dev/stdin`, `<(cat a.png)`) is read once into memory (`read_stream`), never reopened.
    """
    path = Path(path)
    if not path.exists():
        raise ImageInputError(f"{path}: no such file")
    if path.is_dir():
        raise ImageInputError(f"{path}: is a directory, not an image")
    if is_stream(path):
        return decode_image(read_stream(path), str(path))
    return _decode(path, str(path))


def decode_image(data: bytes, name: str = "image") -> LoadedImage:
    """An encoded image held in memory (read from stdin or a pipe) -> LoadedImage; errors name `name`."""
    return _decode(io.BytesIO(data), name)


def _decode(source: Path | BinaryIO, name: str) -> LoadedImage:
    try:
        with Image.open(source) as im:
            _check_pixels(im.size, name)
            im.load()
            return normalise(im, name)
    except ImageInputError:
        raise
    except UnidentifiedImageError:
        raise ImageInputError(f"{name}: not an image Pillow can read (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageInputError(f"{name}: cannot decode image ({e})") from None


def is_stream(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a pipe, FIFO, socket or device rather than a file: it can be read only once."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def read_stream(path: str | os.PathLike[str], *, limit: int | None = None, wait_s: float | None = None) -> bytes:
    """Read a pipe or FIFO to its end, once, into memory (at most `limit`, default MAX_STREAM_BYTES).

    A FIFO that no process has opened for writing is waited for `wait_s` seconds (default STREAM_WAIT_S),
    then refused: a plain open() would block for ever.
    """
    wait = STREAM_WAIT_S if wait_s is None else wait_s
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # non-blocking: open() does not wait for a writer
    except OSError as e:
        raise ImageInputError(f"{path}: cannot open ({e.strerror or e})") from None
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        # Linux reports a FIFO that never had a writer as neither readable nor hung up: poll waits.
        if not poller.poll(int(wait * 1000)):
            raise ImageInputError(f"{path}: nothing was written to it in {wait:g} s (a FIFO needs a writer)")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            return read_limited(f, str(path), limit)
    finally:
        os.close(fd)


def read_limited(f: BinaryIO, name: str, limit: int | None = None) -> bytes:
    """Read `f` to its end (stdin, a pipe), refusing more than `limit` bytes (default MAX_STREAM_BYTES) and nothing."""
    limit = MAX_STREAM_BYTES if limit is None else limit
    data = bytearray()
    while chunk := f.read(min(2**20, limit + 1 - len(data))):
        data += chunk
        if len(data) > limit:
            raise ImageInputError(f"{name}: more than {human_size(limit)} on the stream (the limit for pipes and stdin); "
                                  "save the image to a file and pass its path")
    if not data:
        raise ImageInputError(f"{name}: empty (nothing was written to it)")
    return bytes(data)



def normalise(im: Image.Image, name: str = "image") -> LoadedImage:
    """EXIF orientation applied; any Pillow mode converted to RGB (+ alpha kept separately).

    Animated images (GIF, WebP, APNG with more than one frame) are refused here: one image in, one out would
    drop every frame but the first without a word. `sdx4.video.upscale_animation` upscales every frame (the
    `sdx4 upscale` command, folder runs and the server route animations there)."""
    _check_pixels(im.size, name)
    if im.width < 1 or im.height < 1:
        raise ImageInputError(f"{name}: empty image ({im.width}x{im.height})")
    frames = getattr(im, "n_frames", 1)
    if frames > 1:
        raise ImageInputError(
            f"{name}: an animated image with {frames} frames; this call upscales one image: use "
            "sdx4.video.upscale_animation(upscaler, src, dst, options) for every frame"
        )
    icc = im.info.get("icc_profile") or None
    exif = _exif_upright(im)
    source_mode = im.mode
    im = ImageOps.exif_transpose(im)
    mode = im.mode
    alpha: Image.Image | None = None
    grey16: np.ndarray | None = None
    if mode == "P" or mode == "PA":
        im = im.convert("RGBA" if ("transparency" in im.info or mode == "PA") else "RGB")
        mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit / 32-bit grey: Pillow's convert("L") clips instead of scaling, so scale ourselves.
        a = np.asarray(im, dtype=np.float64)
        peak = 1.0 if (mode == "F" and a.max(initial=0.0) <= 1.0) else (255.0 if mode == "F" else 65535.0)
        if mode == "I" and a.max(initial=0) <= 255:
            peak = 255.0  # an 8-bit image that was stored as 32-bit integers
        grey = np.clip(np.rint(a / peak * 255.0), 0, 255).astype(np.uint8)
        if peak == 65535.0:
            grey16 = np.clip(a, 0, 65535).astype(np.uint16)
        im = Image.fromarray(grey, "L")
        mode = "L"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        alpha = rgba.getchannel("A")
        rgb = rgba.convert("RGB")
        if alpha.getextrema() == (255, 255):
            alpha = None  # fully opaque: nothing to keep
    elif mode == "CMYK" and icc is None:
        rgb = im.convert("RGB")
    elif mode == "CMYK":
        rgb = _cmyk_with_profile(im, icc)
        icc = None  # converted to sRGB
    else:
        rgb = im.convert("RGB")  # L, 1, YCbCr, LAB, HSV, RGBX ...
    return LoadedImage(
        rgb=rgb, alpha=alpha, icc_profile=icc if rgb.mode == "RGB" else None, exif=exif, mode=source_mode,
        grey16=grey16,
    )


def _exif_upright(im: Image.Image) -> bytes | None:
    """The image's EXIF as bytes with the orientation set to 1 (normalise applies it), or None."""
    try:
        found = im.getexif()
        if not len(found):
            return None
        exif = Image.Exif()  # a copy: the caller's image (and exif_transpose) still see the orientation
        exif.load(found.tobytes())
    except Exception:  # a broken EXIF block: nothing to keep
        return None
    if EXIF_ORIENTATION in exif:
        exif[EXIF_ORIENTATION] = 1
    return exif.tobytes()


def _cmyk_with_profile(im: Image.Image, icc: bytes) -> Image.Image:
    try:
        import io

        from PIL import ImageCms

        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        dst = ImageCms.createProfile("sRGB")
        return ImageCms.profileToProfile(im, src, dst, outputMode="RGB")
    except Exception:  # a broken embedded profile: fall back to Pillow's plain conversion
        return im.convert("RGB")


def _check_pixels(size: tuple[int, int], name: str) -> None:
    w, h = size
    if w * h > MAX_INPUT_PIXELS:
        raise ImageInputError(
            f"{name}: {w}x{h} = {w * h / 1e6:.0f} MP is over the {MAX_INPUT_PIXELS / 1e6:.0f} MP input limit"
        )


def from_array(array: np.ndarray, name: str = "image") -> LoadedImage:
    """numpy HWC (or HW) uint8 in 0..255, or float in [0, 1] -> LoadedImage (3 or 4 channels)."""
    a = np.asarray(array)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ImageInputError(f"{name}: expected an HxWxC array with C in 1, 3, 4; got shape {a.shape}")
    if a.dtype == np.uint8:
        u8 = a
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ImageInputError(f"{name}: float image contains NaN or inf")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0.0 or hi > 1.0:
            raise ImageInputError(f"{name}: float image must be in [0, 1]; got values in [{lo:g}, {hi:g}]")
        u8 = np.rint(a.astype(np.float64) * 255.0).astype(np.uint8)
    else:
        raise ImageInputError(f"{name}: dtype {a.dtype} not supported; use uint8 (0..255) or float (0..1)")
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[u8.shape[2]]
    im = Image.fromarray(np.ascontiguousarray(u8[:, :, 0] if mode == "L" else u8), mode)
    return normalise(im, name)


def as_loaded(image: Any, name: str = "image") -> LoadedImage:
    """Accept a path, PIL image, numpy array, torch tensor (CHW / 1CHW / HWC-less) or LoadedImage."""
    if isinstance(image, LoadedImage):
        return image
    if isinstance(image, (str, os.PathLike)):
        return open_image(image)
    if isinstance(image, Image.Image):
        return normalise(image, name)
    if isinstance(image, np.ndarray):
        return from_array(image, name)
    if type(image).__module__.startswith("torch"):
        t = image.detach().cpu()
        if t.ndim == 4:
            if t.shape[0] != 1:
                raise ImageInputError(f"{name}: a 4-D tensor must have batch size 1; got shape {tuple(t.shape)}")
            t = t[0]
        if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
            raise ImageInputError(f"{name}: expected a CxHxW tensor with C in 1, 3, 4; got shape {tuple(t.shape)}")
        arr = t.permute(1, 2, 0).numpy()
        if arr.dtype not in (np.uint8,) and not np.issubdtype(arr.dtype, np.floating):
            raise ImageInputError(f"{name}: tensor dtype {t.dtype} not supported; use uint8 or float in [0, 1]")
        return from_array(arr.astype(np.float32) if arr.dtype == np.float16 else arr, name)
    raise ImageInputError(
        f"{name}: unsupported input type {type(image).__name__}; pass a file path, PIL image, numpy array or tensor"
    )


def attach_alpha(rgb: Image.Image, alpha: Image.Image | None) -> Image.Image:
    """Re-attach an alpha plane (already resized to rgb's size) -> RGBA, or rgb unchanged."""
    if alpha is None:
        return rgb
    if alpha.size != rgb.size:
        raise ValueError(f"alpha size {alpha.size} != image size {rgb.size}")
    out = rgb.convert("RGBA")
    out.putalpha(alpha)
    return out


def output_mode(image: LoadedImage, color_mode: str = "auto") -> str:
    """The Pillow mode of the upscaled `image`: "L"/"LA" for a grayscale input with color_mode "auto",
    else "RGB"/"RGBA" (the model and the filters work in RGB)."""
    gray = image.is_gray and color_mode == "auto"
    return ("L" if gray else "RGB") + ("A" if image.alpha is not None else "")


def check_bit_depth(image: LoadedImage, bit_depth: int, color_mode: str, name: str = "image") -> None:
    """Refuse, before any work, a 16-bit output Pillow cannot hold: only grey images without alpha."""
    if bit_depth == 16 and output_mode(image, color_mode) != "L":
        raise ImageInputError(
            f"{name}: a 16-bit output must be grayscale without alpha (Pillow holds 16 bits only in grey images); "
            f"this image gives {output_mode(image, color_mode)}"
        )



def profile_fits(icc_profile: bytes | None, mode: str) -> bool:
    """Whether an ICC profile describes images of this mode: a GRAY profile for L/LA/I;16 outputs, an RGB
    one for RGB/RGBA (its colour space is bytes 16..20 of the header). A grey input written as RGB
    (color_mode "rgb") cannot carry its grey profile."""
    if not icc_profile or len(icc_profile) < 20:
        return False
    return icc_profile[16:20] == (b"RGB " if mode.startswith("RGB") else b"GRAY")


def to_output_mode(upscaled: Image.Image, mode: str) -> Image.Image:
    """An upscaled RGB/RGBA image in `mode` (from output_mode): grey through Pillow's ITU-R 601 luma
    (L = 0.299 R + 0.587 G + 0.114 B), which gives back the grey value exactly where R = G = B."""
    return upscaled if upscaled.mode == mode else upscaled.convert(mode)



def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parameters sdx4 stored in a PNG it wrote ({} when there are none)."""
    with Image.open(path) as im:
        text = im.info.get(METADATA_KEY)
    return json.loads(text) if text else {}
