"""Images in and out: reading any format Pillow reads into RGB/RGBA, and atomic PNG writes with metadata.
The one owner of file names and formats: which suffixes are read as images, which are written, and what an
upscaled image is called (`output_name`).

No torch here: the classical path and the CLI's validation use this module without loading torch.
"""

from __future__ import annotations

import io
import json
import os
import select
import shutil
import stat
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

#: PNG text chunk key under which the parameters are stored (JSON).
METADATA_KEY = "sdx4"
#: Refuse images whose pixel count suggests a decompression bomb (Pillow's own guard warns at 89 MP).
MAX_INPUT_PIXELS = 64_000_000
#: The formats sdx4 writes: Pillow format name -> the suffixes that choose it (`-o NAME.ext`), any case.
#: GIF is not one of them: 256 colours would throw the upscale away.
OUTPUT_FORMATS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "PNG": (".png",),  # lossless, carries the parameters (METADATA_KEY)
    "JPEG": (".jpg", ".jpeg"),  # quality 95, no alpha
    "WEBP": (".webp",),  # lossless
    "TIFF": (".tif", ".tiff"),  # lossless (deflate)
    "BMP": (".bmp",),  # uncompressed, no alpha
})  # fmt: skip
#: Every suffix of OUTPUT_FORMATS, in its order.
OUTPUT_SUFFIXES = tuple(suffix for suffixes in OUTPUT_FORMATS.values() for suffix in suffixes)
#: The output formats that hold an alpha channel; an input with alpha cannot go to the others.
ALPHA_FORMATS = ("PNG", "WEBP", "TIFF")
#: A pipe, FIFO, socket or stdin is read once into memory, up to this many bytes; a longer stream is refused.
MAX_STREAM_BYTES = 256 * 2**20
#: How long reading a FIFO waits for a writer to open it before giving up, in seconds.
STREAM_WAIT_S = 30.0
#: The output suffixes that hold 16-bit (grayscale) pixels.
SUFFIXES_16_BIT = (".png", ".tif", ".tiff")
#: The formats sdx4 reads as inputs: Pillow format name -> the file suffixes that name it. Folder inputs
#: (batch runs, `sdx4 evaluate`) pick files by these suffixes, case-insensitively; the server picks uploads
#: by format name (UPLOAD_FORMATS), since a client's file name proves nothing.
INPUT_FORMATS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "PNG": (".png",),
    "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"),
    "WEBP": (".webp",),
    "TIFF": (".tif", ".tiff"),
    "BMP": (".bmp", ".dib"),
    "GIF": (".gif",),
    "PPM": (".ppm", ".pgm", ".pbm", ".pnm"),
    "TGA": (".tga",),
    "QOI": (".qoi",),
    "AVIF": (".avif",),
    "JPEG2000": (".jp2", ".j2k"),
})  # fmt: skip
#: Every suffix of INPUT_FORMATS, in its order: what a folder input reads as an image.
INPUT_SUFFIXES = tuple(suffix for suffixes in INPUT_FORMATS.values() for suffix in suffixes)
#: The server's default formats, a subset of INPUT_FORMATS: the common ones only, so that fewer
#: decoders face uploads from strangers (ServerSettings.formats widens or narrows it).
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")


class ImageInputError(ValueError):
    """An input image cannot be used; the message names the file (or the input) and the problem."""


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
            raise ImageInputError(f"{name}: more than {_size(limit)} on the stream (the limit for pipes and stdin); "
                                  "save the image to a file and pass its path")
    if not data:
        raise ImageInputError(f"{name}: empty (nothing was written to it)")
    return bytes(data)


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n} bytes"


def normalise(im: Image.Image, name: str = "image") -> LoadedImage:
    """EXIF orientation applied; any Pillow mode converted to RGB (+ alpha kept separately).

    Animated images (GIF, WebP, APNG with more than one frame) are refused: upscaling only the first
    frame would drop the others without a word."""
    _check_pixels(im.size, name)
    if im.width < 1 or im.height < 1:
        raise ImageInputError(f"{name}: empty image ({im.width}x{im.height})")
    frames = getattr(im, "n_frames", 1)
    if frames > 1:
        raise ImageInputError(
            f"{name}: an animated image with {frames} frames; animations are not supported yet "
            "(only still images are upscaled: export the frame you want, e.g. as PNG)"
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


def check_output_bit_depth(path: str | os.PathLike[str], bit_depth: int) -> None:
    """Refuse, before any work, a 16-bit output in a format that holds 8 bits (JPEG, WebP)."""
    suffix = Path(path).suffix.lower()
    if bit_depth == 16 and suffix not in SUFFIXES_16_BIT:
        raise ImageInputError(
            f"{path}: {suffix.lstrip('.').upper()} holds 8 bits per channel; a 16-bit output needs "
            + " or ".join(SUFFIXES_16_BIT)
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


def is_input_image(path: str | os.PathLike[str]) -> bool:
    """Whether a folder input reads this file as an image: by its suffix (INPUT_SUFFIXES), any case."""
    return Path(path).suffix.lower() in INPUT_SUFFIXES


def output_name(
    stem: str, scale: int, method: str | None = None, index: int = 0, count: int = 1, suffix: str = ".png"
) -> str:
    """The name of an upscaled image: `photo` -> `photo_x4.png`; a classical method adds itself
    (`photo_x4_bicubic.png`); one of several images is numbered from 1 (`photo_x4_2.png`).

    method: "sd" and None add no method tag (the server's download names never carry one).
    index: which of the `count` images (0-based).
    """
    tag = f"_x{scale}" if method in (None, "sd") else f"_x{scale}_{method}"
    return numbered_name(stem + tag, index, count, suffix)


def numbered_name(base: str, index: int, count: int, suffix: str = ".png") -> str:
    """`base.png` when it is the only image; `base_1.png`, `base_2.png`, ... when there are `count` of them."""
    if count < 1:
        raise ValueError(f"count must be at least 1; got {count}")
    if not 0 <= index < count:
        raise ValueError(f"index must be in 0..{count - 1} for {count} image(s); got index {index}")
    return f"{base}{suffix}" if count == 1 else f"{base}_{index + 1}{suffix}"


class ImageOutputError(OSError):
    """An output cannot be written (no space, no permission, read-only disk); the message names the output
    the user asked for, never the temp file sdx4 writes first."""


def output_format(path: str | os.PathLike[str]) -> str:
    """The Pillow format an output path asks for by its suffix (OUTPUT_FORMATS), any case; others are refused."""
    suffix = Path(path).suffix.lower()
    for fmt, suffixes in OUTPUT_FORMATS.items():
        if suffix in suffixes:
            return fmt
    raise ImageInputError(f"{path}: output must end in one of {', '.join(OUTPUT_SUFFIXES)}")


def check_output_alpha(path: str | os.PathLike[str], input_name: str) -> None:
    """Refuse to send an input with an alpha channel to a format without one (JPEG, BMP), naming both files."""
    fmt = output_format(path)
    if fmt not in ALPHA_FORMATS:
        raise ImageInputError(
            f"{input_name} has an alpha channel (transparency) that {fmt} cannot hold, so it cannot be written "
            f"to {path}; name the output .png, .webp or .tif instead"
        )


def check_output_path(path: str | os.PathLike[str], overwrite: bool) -> Path:
    """Refuse a bad output path before any work: unknown suffix, existing file without overwrite."""
    path = Path(path)
    output_format(path)
    if path.exists() and not overwrite:
        raise ImageInputError(f"{path}: already exists (pass --overwrite to replace it)")
    if path.exists() and path.is_dir():
        raise ImageInputError(f"{path}: is a directory")
    if not path.parent.exists():
        raise ImageInputError(f"{path.parent}: output folder does not exist")
    if not path.parent.is_dir():
        raise ImageInputError(f"{path.parent}: is not a folder, so {path} cannot be written in it")
    return path


def max_output_bytes(size: tuple[int, int], scale: int, count: int = 1, channels: int = 4) -> int:
    """An upper bound on the bytes `count` outputs of an input of `size` take on disk: the uncompressed 8-bit
    pixels (`channels` bytes per output pixel: 3 RGB, 4 RGBA), 1% more for what a compressor adds to
    incompressible data (zlib's stored blocks, PNG's per-row filter byte, BMP's row padding), and 1 MiB
    per file for headers and metadata."""
    w, h = size
    return count * ((w * h * scale * scale * channels * 101 + 99) // 100 + 2**20)


def check_output_folders(needs: Mapping[Path, int]) -> None:
    """Before any work: each folder takes a new file (a probe file is created and removed), and each disk has
    room for what its folders need (bytes, e.g. from max_output_bytes). Errors name the folder."""
    by_disk: dict[int, tuple[Path, int]] = {}
    for folder, need in needs.items():
        if not folder.is_dir():
            raise ImageInputError(f"{folder}: output folder does not exist")
        try:
            fd, probe = tempfile.mkstemp(prefix=".sdx4-probe-", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise ImageInputError(f"{folder}: cannot write in the output folder ({e.strerror or e})") from None
        dev = folder.stat().st_dev
        first, total = by_disk.get(dev, (folder, 0))
        by_disk[dev] = (first, total + need)
    for folder, need in by_disk.values():
        free = shutil.disk_usage(folder).free
        if need > free:
            raise ImageInputError(
                f"{folder}: {_size(free)} free on its disk, the output(s) may need up to {_size(need)} "
                "(uncompressed pixels); free some space or choose another folder with -o"
            )


def save_image(
    image: Image.Image,
    path: str | os.PathLike[str],
    metadata: dict[str, Any] | None = None,
    *,
    overwrite: bool = False,
    icc_profile: bytes | None = None,
    exif: bytes | None = None,
) -> Path:
    """Write atomically (temp file in the same folder, fsync, rename): never a partial file.

    The suffix chooses the format (OUTPUT_FORMATS). PNG outputs carry `metadata` as JSON in a text chunk
    named "sdx4". `icc_profile` and `exif` (the input's, from `UpscaleResult.icc_profile` / `.exif`) are
    embedded as they are in every format; the pixels are not converted. Without them nothing is embedded,
    even when `image.info` holds a profile. A write that fails (no space, no permission) raises
    ImageOutputError naming `path`.
    """
    path = check_output_path(path, overwrite)
    fmt = output_format(path)
    if "A" in image.getbands() and fmt not in ALPHA_FORMATS:
        raise ImageInputError(f"{path}: {fmt} cannot hold the alpha channel; write .png, .webp or .tif instead")
    if image.mode.startswith("I;16"):
        check_output_bit_depth(path, 16)

    def write(f: BinaryIO) -> None:
        write_image(image, f, fmt, metadata, icc_profile=icc_profile, exif=exif)

    return write_atomic(path, write, overwrite=overwrite)


def write_image(
    image: Image.Image,
    f: BinaryIO,
    fmt: str = "PNG",
    metadata: dict[str, Any] | None = None,
    *,
    icc_profile: bytes | None = None,
    exif: bytes | None = None,
) -> None:
    """Encode `image` into the open file `f` (a temp file, stdout) as `fmt`, one of OUTPUT_FORMATS.
    `icc_profile` / `exif`: embedded as given; None embeds none (not even one `image.info` holds)."""
    kwargs: dict[str, Any] = {"icc_profile": icc_profile or None, "exif": exif or b""}
    if fmt == "PNG":
        if metadata is not None:
            info = PngImagePlugin.PngInfo()
            info.add_itxt(METADATA_KEY, json.dumps(metadata, sort_keys=True))
            kwargs["pnginfo"] = info
    elif fmt == "JPEG":
        kwargs["quality"] = 95
    elif fmt == "WEBP":
        kwargs["lossless"] = True
    elif fmt == "TIFF":
        kwargs["compression"] = "tiff_adobe_deflate"
    elif fmt != "BMP":
        raise ValueError(f"output format must be one of {', '.join(OUTPUT_FORMATS)}; got {fmt!r}")
    image.save(f, format=fmt, **kwargs)


def write_atomic(path: Path, write: Callable[[BinaryIO], None], *, overwrite: bool = True) -> Path:
    """Write a file atomically: `write(f)` into a temp file in the same folder, fsync, rename.

    A failed or interrupted write leaves nothing behind; the file gets the usual mode (0666 & ~umask).
    With overwrite=False an output that appeared meanwhile is not replaced. An OSError (no space, no
    permission, read-only disk) is raised again as ImageOutputError naming `path`, not the temp file.
    """
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _output_error(path, e) from None
    try:
        os.fchmod(fd, _default_file_mode())  # mkstemp makes 0600 files; outputs get the usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if not overwrite and path.exists():
            raise ImageInputError(f"{path}: already exists (pass --overwrite to replace it)")
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise _output_error(path, e) from None
    except BaseException:
        # Interrupted or failed: remove the temp file so nothing partial is left behind.
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _output_error(path: Path, e: OSError) -> ImageOutputError:
    err = ImageOutputError(f"{path}: cannot write the output ({e.strerror or e})")
    err.errno = e.errno
    return err


def _default_file_mode() -> int:
    """0666 minus the process umask, as a plain open() would give.

    Linux shows the umask in /proc without changing it (setting it, even briefly, would race with
    other threads creating files, e.g. in the server); elsewhere read it by setting and restoring.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parameters sdx4 stored in a PNG it wrote ({} when there are none)."""
    with Image.open(path) as im:
        text = im.info.get(METADATA_KEY)
    return json.loads(text) if text else {}


def open_image_bytes(data: bytes, name: str) -> LoadedImage:
    """`open_image` for a file's bytes already in memory (a folder run hashes what it reads): the same
    checks and messages, named by `name`."""
    import io  # here, not at the top: this function was added at the end to keep merges simple

    try:
        with Image.open(io.BytesIO(data)) as im:
            _check_pixels(im.size, name)
            im.load()
            return normalise(im)
    except ImageInputError:
        raise
    except UnidentifiedImageError:
        raise ImageInputError(f"{name}: not an image Pillow can read (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageInputError(f"{name}: cannot decode image ({e})") from None
