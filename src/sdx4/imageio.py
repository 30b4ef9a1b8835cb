"""Images in and out: reading any format Pillow reads into RGB/RGBA, and atomic PNG writes with metadata.
The one owner of file names and formats: which suffixes are read as images, which are written, and what an
upscaled image is called (`output_name`).

No torch here: the classical path and the CLI's validation use this module without loading torch.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

#: PNG text chunk key under which the parameters are stored (JSON).
METADATA_KEY = "sdx4"
#: Refuse images whose pixel count suggests a decompression bomb (Pillow's own guard warns at 89 MP).
MAX_INPUT_PIXELS = 64_000_000
OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
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


@dataclass(frozen=True)
class LoadedImage:
    """An input normalised for the model: RGB pixels, optional alpha plane, and the ICC profile."""

    rgb: Image.Image  # mode "RGB"
    alpha: Image.Image | None  # mode "L", same size, or None
    icc_profile: bytes | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.size


def open_image(path: str | os.PathLike[str]) -> LoadedImage:
    """Read an image file (PNG, JPEG, WebP, TIFF, ... whatever Pillow reads) and normalise it."""
    path = Path(path)
    if not path.exists():
        raise ImageInputError(f"{path}: no such file")
    if path.is_dir():
        raise ImageInputError(f"{path}: is a directory, not an image")
    try:
        with Image.open(path) as im:
            _check_pixels(im.size, str(path))
            im.load()
            return normalise(im)
    except ImageInputError:
        raise
    except UnidentifiedImageError:
        raise ImageInputError(f"{path}: not an image Pillow can read (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageInputError(f"{path}: cannot decode image ({e})") from None


def normalise(im: Image.Image, name: str = "image") -> LoadedImage:
    """EXIF orientation applied; any Pillow mode converted to RGB (+ alpha kept separately)."""
    _check_pixels(im.size, name)
    if im.width < 1 or im.height < 1:
        raise ImageInputError(f"{name}: empty image ({im.width}x{im.height})")
    icc = im.info.get("icc_profile")
    im = ImageOps.exif_transpose(im)
    mode = im.mode
    alpha: Image.Image | None = None
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
    return LoadedImage(rgb=rgb, alpha=alpha, icc_profile=icc if rgb.mode == "RGB" else None)


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


def check_output_path(path: str | os.PathLike[str], overwrite: bool) -> Path:
    """Refuse a bad output path before any work: unknown suffix, existing file without overwrite."""
    path = Path(path)
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ImageInputError(f"{path}: output must end in one of {', '.join(OUTPUT_SUFFIXES)}")
    if path.exists() and not overwrite:
        raise ImageInputError(f"{path}: already exists (pass --overwrite to replace it)")
    if path.exists() and path.is_dir():
        raise ImageInputError(f"{path}: is a directory")
    if not path.parent.exists():
        raise ImageInputError(f"{path.parent}: output folder does not exist")
    return path


def save_image(
    image: Image.Image,
    path: str | os.PathLike[str],
    metadata: dict[str, Any] | None = None,
    *,
    overwrite: bool = False,
    icc_profile: bytes | None = None,
) -> Path:
    """Write atomically (temp file in the same folder, fsync, rename): never a partial file.

    PNG outputs carry `metadata` as JSON in a text chunk named "sdx4".
    """
    path = check_output_path(path, overwrite)
    suffix = path.suffix.lower()
    kwargs: dict[str, Any] = {}
    if icc_profile:
        kwargs["icc_profile"] = icc_profile
    if suffix == ".png":
        fmt = "PNG"
        if metadata is not None:
            info = PngImagePlugin.PngInfo()
            info.add_itxt(METADATA_KEY, json.dumps(metadata, sort_keys=True))
            kwargs["pnginfo"] = info
    elif suffix in (".jpg", ".jpeg"):
        fmt = "JPEG"
        kwargs["quality"] = 95
        if image.mode == "RGBA":
            raise ImageInputError(f"{path}: JPEG cannot hold the alpha channel; write .png or .webp instead")
    else:
        fmt = "WEBP"
        kwargs["lossless"] = True
    def write(f: BinaryIO) -> None:
        image.save(f, format=fmt, **kwargs)

    return write_atomic(path, write, overwrite=overwrite)


def write_atomic(path: Path, write: Callable[[BinaryIO], None], *, overwrite: bool = True) -> Path:
    """Write a file atomically: `write(f)` into a temp file in the same folder, fsync, rename.

    A failed or interrupted write leaves nothing behind; the file gets the usual mode (0666 & ~umask).
    With overwrite=False an output that appeared meanwhile is not replaced.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _default_file_mode())  # mkstemp makes 0600 files; outputs get the usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if not overwrite and path.exists():
            raise ImageInputError(f"{path}: already exists (pass --overwrite to replace it)")
        os.replace(tmp, path)
    except BaseException:
        # Interrupted or failed: remove the temp file so nothing partial is left behind.
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
