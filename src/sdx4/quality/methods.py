"""Run a list of upscaling methods on the same image: shared by `compare` and `evaluate`.

No torch at import time; the model is only touched when the method is "sd".
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ..api import upscale
from ..imageio import LoadedImage
from ..options import METHODS, UpscaleOptions

#: The diffusion model only upscales by exactly 4.
SD_SCALE = 4


def parse_methods(text: str) -> tuple[str, ...]:
    """'sd,bicubic, lanczos' -> ('sd', 'bicubic', 'lanczos'); unknown or repeated names are errors."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ValueError(f"no methods given; choose from {', '.join(METHODS)}")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"method {dupes[0]!r} is listed twice")
    return tuple(names)


@dataclass(frozen=True)
class MethodOutput:
    image: Image.Image  # RGB, exactly scale x the input size
    seconds: float  # wall time of the upscaling call alone
    metadata: dict[str, Any]


@dataclass(frozen=True)
class MethodRunner:
    """Upscales RGB images with any method; `upscaler` (an sdx4.Upscaler) is needed only for "sd".

    `sd_options` must carry a concrete seed, so that every image of a run uses the same, reported seed.
    """

    sd_options: UpscaleOptions | None = None
    upscaler: Any = None

    def __post_init__(self) -> None:
        if self.sd_options is not None and self.sd_options.seed is None:
            raise ValueError("sd_options needs a concrete seed (use options.with_seed())")

    def run(self, method: str, rgb: Image.Image, scale: int = SD_SCALE) -> MethodOutput:
        """One image (mode RGB) -> its upscaled version by `method`; alpha is not part of comparisons."""
        if rgb.mode != "RGB":
            raise ValueError(f"expected an RGB image; got mode {rgb.mode}")
        if method == "sd":
            if self.upscaler is None or self.sd_options is None:
                raise ValueError("method 'sd' needs the model: load it with sdx4.load() and pass upscaler and sd_options")
            if scale != SD_SCALE:
                raise ValueError(f"method 'sd' upscales by exactly {SD_SCALE}; got scale {scale}")
            opts = self.sd_options.replace(method="sd", num_images=1)
            t0 = time.perf_counter()
            result = self.upscaler(rgb, opts)
            seconds = time.perf_counter() - t0
            return MethodOutput(result.image.convert("RGB"), seconds, result.metadata)
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        t0 = time.perf_counter()
        out = upscale(LoadedImage(rgb=rgb, alpha=None), method=method, scale=scale).image  # the public API's path
        seconds = time.perf_counter() - t0
        return MethodOutput(out, seconds, {"method": method, "scale": scale})
