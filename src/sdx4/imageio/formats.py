"""Which files are images: the formats sdx4 reads (by suffix) and writes, and what an upscaled image is called."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from .errors import ImageInputError

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

def human_size(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n} bytes"



def is_input_image(path: str | os.PathLike[str]) -> bool:
    """Whether a folder input reads this file as an image: by its suffix (INPUT_SUFFIXES), any case."""
    return Path(path).suffix.lower() in INPUT_SUFFIXES


def output_name(
    stem: str, scale: int | float | str, method: str | None = None, index: int = 0, count: int = 1, suffix: str = ".png"
) -> str:
    """The name of an upscaled image: `photo` -> `photo_x4.png`; a classical method adds itself
    (`photo_x4_bicubic.png`); one of several images is numbered from 1 (`photo_x4_2.png`).

    scale: a number (4 -> `_x4`, 1.5 -> `_x1.5`, 4.0 -> `_x4`) or a size tag as `UpscaleOptions.size_tag`
      spells it (`x4`, `x1.5`, `3840w`, `2160h`, `3840x2160`), used as it is.
    method: "sd" and None add no method tag (the server's download names never carry one).
    index: which of the `count` images (0-based).
    """
    if isinstance(scale, str):
        size = scale
    else:
        size = f"x{int(scale)}" if float(scale).is_integer() else f"x{scale:g}"
    tag = f"_{size}" if method in (None, "sd") else f"_{size}_{method}"
    return numbered_name(stem + tag, index, count, suffix)


def numbered_name(base: str, index: int, count: int, suffix: str = ".png") -> str:
    """`base.png` when it is the only image; `base_1.png`, `base_2.png`, ... when there are `count` of them."""
    if count < 1:
        raise ValueError(f"count must be at least 1; got {count}")
    if not 0 <= index < count:
        raise ValueError(f"index must be in 0..{count - 1} for {count} image(s); got index {index}")
    return f"{base}{suffix}" if count == 1 else f"{base}_{index + 1}{suffix}"



def output_format(path: str | os.PathLike[str]) -> str:
    """The Pillow format an output path asks for by its suffix (OUTPUT_FORMATS), any case; others are refused."""
    suffix = Path(path).suffix.lower()
    for fmt, suffixes in OUTPUT_FORMATS.items():
        if suffix in suffixes:
            return fmt
    raise ImageInputError(f"{path}: output must end in one of {', '.join(OUTPUT_SUFFIXES)}")
