"""Classical interpolation baselines (Pillow): the reference every diffusion result is compared with.

No torch, no model: `sdx4 upscale --method bicubic` starts and finishes fast.
"""

from __future__ import annotations

from PIL import Image

from ..imageio import LoadedImage, attach_alpha
from ..options import CLASSICAL_METHODS

FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
assert tuple(FILTERS) == CLASSICAL_METHODS, "FILTERS must cover every classical method in options.Method"

#: The filter used for the alpha plane of "sd" outputs (the model only sees RGB).
ALPHA_FILTER = "bicubic"


def resize(image: Image.Image, size: tuple[int, int], method: str) -> Image.Image:
    """Resize one image to `size` (w, h) with a named classical filter."""
    if method not in FILTERS:
        raise ValueError(f"method must be one of {', '.join(FILTERS)}; got {method!r}")
    if image.size == size:
        return image.copy()
    return image.resize(size, FILTERS[method])


def upscale_classical(image: LoadedImage, method: str, scale: int = 4, size: tuple[int, int] | None = None) -> Image.Image:
    """Upscale RGB and alpha with the same classical filter: exactly (scale*W, scale*H), or `size` when given
    (UpscaleOptions.output_size: a float scale or a width/height target)."""
    w, h = image.size
    size = size or (w * scale, h * scale)
    rgb = resize(image.rgb, size, method)
    alpha = resize(image.alpha, size, method) if image.alpha is not None else None
    return attach_alpha(rgb, alpha)
