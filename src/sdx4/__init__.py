"""sdx4: upscale images 4x with the Stable Diffusion x4 Upscaler.

    import sdx4
    up = sdx4.load()                       # or sdx4.load(model="path/to/folder", device="cpu", dtype="fp32")
    up = sdx4.load(sdx4.LoadOptions(device="cpu", dtype="fp32"))  # the same options as one object
    result = up("photo.png", prompt="a photo of a cat", seed=42)
    result.image.save("photo_x4.png")
    sdx4.upscale("photo.png", method="bicubic").image    # classical baseline, no model

Importing sdx4 does not import torch; loading the model does.
"""

from ._version import __version__
from .api import (
    Upscaler,
    UpscaleResult,
    convert,
    download,
    estimate_classical,
    load,
    preset_options,
    upscale,
)
from .engine.estimate import Estimate  # no torch there
from .imageio import ImageInputError, read_metadata
from .options import METHODS, PRESETS, LoadOptions, LoraSpec, OptionsError, UpscaleOptions

__all__ = [
    "__version__",
    "load",
    "upscale",
    "Upscaler",
    "UpscaleResult",
    "UpscaleOptions",
    "LoadOptions",
    "OptionsError",
    "LoraSpec",
    "ImageInputError",
    "METHODS",
    "read_metadata",
    "convert",
    "download",
    "Estimate",
    "PRESETS",
    "preset_options",
    "estimate_classical",
]
