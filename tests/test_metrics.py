"""PSNR-Y / SSIM-Y: agreement with scikit-image, closed-form cases, conventions and errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sdx4.quality.metrics import psnr_y, rgb_to_y, ssim_y

skimage_metrics = pytest.importorskip("skimage.metrics")
PHOTOS = Path(__file__).resolve().parents[1] / "examples" / "photos"


def _photo(name: str) -> np.ndarray:
    return np.asarray(Image.open(PHOTOS / f"{name}.png").convert("RGB"))


def _degraded_pairs() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(label, reference, test) pairs that cover mild to strong, smooth and noisy differences."""
    rng = np.random.default_rng(0)
    pairs = []
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        hr = _photo(name)
        im = Image.fromarray(hr)
        lr = im.resize((64, 64), Image.Resampling.BICUBIC)
        pairs.append((f"{name}-bicubic", hr, np.asarray(lr.resize((256, 256), Image.Resampling.BICUBIC))))
        pairs.append((f"{name}-blur", hr, np.asarray(im.filter(ImageFilter.GaussianBlur(2)))))
        noisy = np.clip(hr.astype(np.int16) + rng.integers(-20, 21, hr.shape), 0, 255).astype(np.uint8)
        pairs.append((f"{name}-noise", hr, noisy))
    return pairs


def _skimage_y(rgb: np.ndarray) -> np.ndarray:
    # Independent Y: scikit-image's own rgb2ycbcr (BT.601, Y in 16..235), no rounding.
    from skimage.color import rgb2ycbcr

    return rgb2ycbcr(rgb)[..., 0]


@pytest.mark.parametrize("label,ref,test", _degraded_pairs(), ids=lambda v: v if isinstance(v, str) else "")
def test_agrees_with_scikit_image(label: str, ref: np.ndarray, test: np.ndarray) -> None:
    c = 4
    ry, ty = _skimage_y(ref)[c:-c, c:-c], _skimage_y(test)[c:-c, c:-c]
    want_psnr = skimage_metrics.peak_signal_noise_ratio(ry, ty, data_range=255)
    want_ssim = skimage_metrics.structural_similarity(
        ry, ty, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
    )
    assert psnr_y(ref, test, crop=c) == pytest.approx(want_psnr, abs=0.01)
    assert ssim_y(ref, test, crop=c) == pytest.approx(want_ssim, abs=0.001)
    assert 10 < want_psnr < 45 and 0.1 < want_ssim < 0.999  # the cases are neither trivial nor broken


def test_y_matches_bt601_and_scikit_image() -> None:
    ref = _photo("coffee")
    np.testing.assert_allclose(rgb_to_y(ref), _skimage_y(ref), atol=1e-9)
    corners = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0]]], dtype=np.uint8)
    np.testing.assert_allclose(rgb_to_y(corners)[0], [16.0, 235.0, 16 + 65.481, 16 + 128.553], atol=1e-9)


def test_identical_images() -> None:
    ref = _photo("rocket")
    assert psnr_y(ref, ref.copy()) == math.inf
    assert ssim_y(ref, ref.copy()) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_constant_offset_closed_form(k: int) -> None:
    # +k on R, G and B moves Y by k * (65.481 + 128.553 + 24.966) / 255 = k * 219/255 levels,
    # so PSNR-Y = 20 log10(255 / (k * 219/255)), not the RGB value 20 log10(255 / k).
    rng = np.random.default_rng(k)
    ref = rng.integers(20, 200, (40, 48, 3)).astype(np.uint8)  # no clipping after +k
    test = ref + np.uint8(k)
    want = 20 * math.log10(255 / (k * 219 / 255))
    assert psnr_y(ref, test, crop=4) == pytest.approx(want, abs=1e-9)
    assert psnr_y(ref, test, crop=0) == pytest.approx(want, abs=1e-9)


def test_border_crop_ignores_the_border() -> None:
    ref = _photo("chelsea")
    test = ref.copy()
    test[:4] = 0
    test[:, -4:] = 255
    assert psnr_y(ref, test, crop=4) == math.inf
    assert ssim_y(ref, test, crop=4) == pytest.approx(1.0)
    assert psnr_y(ref, test, crop=3) < 30
    assert ssim_y(ref, test, crop=3) < 0.9995  # one bad row touches only the outermost windows


def test_pil_images_accepted() -> None:
    ref, test = _photo("coffee"), np.asarray(Image.open(PHOTOS / "coffee.png").convert("L").convert("RGB"))
    assert psnr_y(Image.fromarray(ref), Image.fromarray(test)) == pytest.approx(psnr_y(ref, test))


def test_errors_name_the_problem() -> None:
    a = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="differ in size: 32x32 vs 31x32"):
        psnr_y(a, a[:, :31])
    with pytest.raises(ValueError, match="uint8 H x W x 3"):
        psnr_y(a.astype(np.float32), a)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim_y(a[:18, :18], a[:18, :18], crop=4)
    with pytest.raises(ValueError, match="nothing left"):
        psnr_y(a[:8, :8], a[:8, :8], crop=4)
