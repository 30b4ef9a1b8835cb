"""Writing: the output checked before any work (format, alpha, bit depth, folder, free space), then written atomically with its metadata, ICC profile and EXIF; a failed write names the user's path."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image, PngImagePlugin

from .errors import ImageInputError, ImageOutputError
from .formats import (
    ALPHA_FORMATS,
    METADATA_KEY,
    OUTPUT_FORMATS,
    SUFFIXES_16_BIT,
    human_size,
    output_format,
)


def check_output_bit_depth(path: str | os.PathLike[str], bit_depth: int) -> None:
    """Refuse, before any work, a 16-bit output in a format that holds 8 bits (JPEG, WebP)."""
    suffix = Path(path).suffix.lower()
    if bit_depth == 16 and suffix not in SUFFIXES_16_BIT:
        raise ImageInputError(
            f"{path}: {suffix.lstrip('.').upper()} holds 8 bits per channel; a 16-bit output needs "
            + " or ".join(SUFFIXES_16_BIT)
        )



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
                f"{folder}: {human_size(free)} free on its disk, the output(s) may need up to {human_size(need)} "
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
