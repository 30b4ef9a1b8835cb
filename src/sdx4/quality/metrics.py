"""Full-reference image quality the way super-resolution papers report it: PSNR-Y and SSIM-Y.

numpy only (no scipy, no torch), so the classical evaluation needs nothing beyond the hard deps.

Conventions (the ones of the SR literature since SRCNN, Dong et al. 2014, https://arxiv.org/abs/1501.00092,
as in MATLAB's evaluation scripts and BasicSR's `calculate_psnr/ssim(test_y_channel=True)`):

* Y channel: ITU-R BT.601 luma as MATLAB's `rgb2ycbcr` computes it on [0, 1] inputs, rescaled to 0..255:
  ``Y = 16 + (65.481 R + 128.553 G + 24.966 B)`` with R, G, B in [0, 1], so Y is in [16, 235].
  Y is kept as float64, NOT rounded to integers, as BasicSR does. (MATLAB's `rgb2ycbcr` on a uint8
  image rounds Y to uint8; scripts that do so differ slightly: for bicubic x4 on the bundled photos,
  by 0.002-0.015 dB PSNR and 0.0008-0.0015 SSIM.)
* Border crop: `crop` pixels (the scale factor, by convention: 4 for x4) are removed from every side
  of both images before either metric, because methods treat the image border differently.
* PSNR = 10 log10(255^2 / MSE) over the cropped Y planes; infinite for identical images. The peak is
  255 even though Y only spans 16..235, as everyone computes it.
* SSIM: Wang, Bovik, Sheikh, Simoncelli 2004, https://doi.org/10.1109/TIP.2003.819861, with their
  published settings: 11x11 Gaussian window of sigma 1.5 (normalised to sum 1), K1 = 0.01,
  K2 = 0.03, L = 255, population (not sample) (co)variances; the SSIM map is computed only where the
  whole window lies inside the (cropped) image ("valid" filtering, as MATLAB's `filter2(..., 'valid')`)
  and averaged. No automatic downsampling (the later `ssim.m` does it for large images; SR papers'
  scripts do not). This equals scikit-image's `structural_similarity(gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=255)` on the same Y planes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: MATLAB rgb2ycbcr, Y row: offset and weights for R, G, B in [0, 1].
Y_OFFSET = 16.0
Y_WEIGHTS = (65.481, 128.553, 24.966)
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
PEAK = 255.0


def to_rgb_array(image: Any, name: str = "image") -> np.ndarray:
    """PIL image (any mode) or uint8 array H,W,3 -> uint8 H,W,3. Other input is an error."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image; imported lazily nowhere
        image = np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"{name}: expected a uint8 H x W x 3 RGB array or a PIL image; got {a.dtype} {a.shape}")
    return a


def rgb_to_y(rgb: np.ndarray) -> np.ndarray:
    """uint8 H,W,3 RGB -> float64 H,W BT.601 luma in [16, 235] (MATLAB rgb2ycbcr, not rounded)."""
    x = to_rgb_array(rgb).astype(np.float64) / 255.0  # H,W,3 in [0,1]
    r, g, b = Y_WEIGHTS
    return Y_OFFSET + r * x[..., 0] + g * x[..., 1] + b * x[..., 2]


def _y_pair(reference: Any, test: Any, crop: int) -> tuple[np.ndarray, np.ndarray]:
    ref = to_rgb_array(reference, "reference")
    out = to_rgb_array(test, "test")
    if ref.shape != out.shape:
        raise ValueError(f"reference and test differ in size: {ref.shape[1]}x{ref.shape[0]} vs {out.shape[1]}x{out.shape[0]}")
    if isinstance(crop, bool) or not isinstance(crop, int) or crop < 0:
        raise ValueError(f"crop must be an integer >= 0; got {crop!r}")
    h, w = ref.shape[:2]
    if h - 2 * crop < 1 or w - 2 * crop < 1:
        raise ValueError(f"a {w}x{h} image has nothing left after cropping {crop} pixels from each border")
    ys = slice(crop, h - crop)
    xs = slice(crop, w - crop)
    return rgb_to_y(ref)[ys, xs], rgb_to_y(out)[ys, xs]


def psnr_y_planes(ref_y: np.ndarray, test_y: np.ndarray) -> float:
    """PSNR in dB of two float Y planes (0..255 scale); inf when they are identical."""
    mse = float(np.mean((ref_y.astype(np.float64) - test_y.astype(np.float64)) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(PEAK**2 / mse)


def gaussian_window_1d(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Normalised 1-D Gaussian taps; the 2-D window is its outer product (separable)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x**2) / (2.0 * sigma**2))
    return g / g.sum()


def _filter_valid(plane: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable correlation with `taps` along both axes, 'valid' region only: H,W -> H-k+1, W-k+1."""
    k = len(taps)
    h, w = plane.shape
    rows = sum(taps[i] * plane[i : h - k + 1 + i, :] for i in range(k))  # H-k+1, W
    return sum(taps[i] * rows[:, i : w - k + 1 + i] for i in range(k))  # H-k+1, W-k+1


def ssim_map(ref_y: np.ndarray, test_y: np.ndarray) -> np.ndarray:
    """SSIM map of two float Y planes (0..255 scale) over the 'valid' window positions."""
    x = ref_y.astype(np.float64)
    y = test_y.astype(np.float64)
    if min(x.shape) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels after the border crop; got {x.shape[1]}x{x.shape[0]}")
    taps = gaussian_window_1d()
    c1 = (SSIM_K1 * PEAK) ** 2
    c2 = (SSIM_K2 * PEAK) ** 2
    mu_x = _filter_valid(x, taps)
    mu_y = _filter_valid(y, taps)
    var_x = _filter_valid(x * x, taps) - mu_x**2  # population variance under the window
    var_y = _filter_valid(y * y, taps) - mu_y**2
    cov = _filter_valid(x * y, taps) - mu_x * mu_y
    num = (2.0 * mu_x * mu_y + c1) * (2.0 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return num / den


def psnr_y(reference: Any, test: Any, crop: int = 4) -> float:
    """PSNR (dB) on BT.601 Y with `crop` border pixels removed; see the module docstring."""
    return psnr_y_planes(*_y_pair(reference, test, crop))


def ssim_y(reference: Any, test: Any, crop: int = 4) -> float:
    """Mean SSIM on BT.601 Y with `crop` border pixels removed; see the module docstring."""
    return float(np.mean(ssim_map(*_y_pair(reference, test, crop))))


def min_size_for_metrics(crop: int) -> int:
    """The smallest image side both metrics accept with this border crop."""
    return 2 * crop + SSIM_WINDOW
