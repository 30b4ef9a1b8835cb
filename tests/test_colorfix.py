"""Colour fix on synthetic images where the right correction is known."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdx4.engine.colorfix import adain, color_fix, reference_for, wavelet, wavelet_low


def _smooth(seed: int, size: int = 64) -> torch.Tensor:
    """A low-frequency image 1,3,size,size in [-0.5, 0.5] (bilinear upsampling of 4x4 noise)."""
    small = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(seed)) - 0.5
    return F.interpolate(small, size=(size, size), mode="bilinear", align_corners=True)


def test_adain_undoes_a_per_channel_affine_shift():
    ref = torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1
    scale = torch.tensor([0.5, 1.7, 0.9]).view(1, 3, 1, 1)
    shift = torch.tensor([0.2, -0.3, 0.05]).view(1, 3, 1, 1)
    content = ref * scale + shift
    torch.testing.assert_close(adain(content, ref), ref, atol=1e-4, rtol=0)


def test_adain_matches_statistics_only():
    content = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ref = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 0.2 + 0.5
    out = adain(content, ref)
    torch.testing.assert_close(out.mean(dim=(-2, -1)), ref.mean(dim=(-2, -1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=(-2, -1)), ref.std(dim=(-2, -1)), atol=1e-4, rtol=0)
    # The structure is the content's: per channel, out is an increasing affine map of it.
    corr = torch.corrcoef(torch.stack([out[0, 0].flatten(), content[0, 0].flatten()]))[0, 1]
    assert corr > 0.9999


def test_wavelet_removes_a_constant_colour_cast_exactly():
    ref = _smooth(3) + 0.05 * torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    cast = torch.tensor([0.3, -0.2, 0.1]).view(1, 3, 1, 1)
    torch.testing.assert_close(wavelet(ref + cast, ref), ref, atol=1e-6, rtol=0)


def test_wavelet_removes_a_linear_colour_drift_away_from_borders():
    # A linear drift is kept by every symmetric blur, so the fix removes it exactly where the blurs
    # do not reach the border (support radius 1+2+4+8+16 = 31 px).
    size, margin = 128, 32
    ref = _smooth(5, size) + 0.05 * torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(6))
    xx = torch.arange(size, dtype=torch.float32).view(1, 1, 1, size)
    drift = torch.tensor([0.2, -0.1, 0.0]).view(1, 3, 1, 1) + torch.tensor([0.002, 0.001, -0.003]).view(1, 3, 1, 1) * xx
    out = wavelet(ref + drift, ref)
    inner = (..., slice(margin, -margin), slice(margin, -margin))
    torch.testing.assert_close(out[inner], ref[inner], atol=1e-5, rtol=0)
    assert (out - ref).abs().mean() < 0.1 * drift.abs().mean()


def test_wavelet_keeps_the_finest_details_exactly():
    # [1,2,1]/4 blurs a +-1 checkerboard to 0, so away from the borders (where replicate padding
    # breaks the pattern) the fix must hand the details back untouched.
    size, margin = 128, 32
    ref, low_out = _smooth(7, size), _smooth(8, size)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    detail = (0.2 * (-1.0) ** (yy + xx)).expand(1, 3, size, size)
    out = wavelet(low_out + detail, ref)
    expected = low_out - wavelet_low(low_out) + wavelet_low(ref) + detail  # linearity, with low(detail) = 0
    inner = (..., slice(margin, -margin), slice(margin, -margin))
    torch.testing.assert_close(out[inner], expected[inner], atol=1e-5, rtol=0)
    assert (out - expected).abs().max() < 0.02  # near the borders: close, not exact


def test_wavelet_low_keeps_constants_even_on_tiny_images():
    x = torch.full((1, 3, 2, 3), 0.25)
    torch.testing.assert_close(wavelet_low(x), x)


def test_reference_is_bicubic_upscale_clamped():
    small = torch.tensor([[[[-1.0, 1.0], [1.0, -1.0]]]]).expand(1, 3, 2, 2)
    ref = reference_for(small, (8, 8))
    assert ref.shape == (1, 3, 8, 8) and ref.min() >= -1 and ref.max() <= 1
    const = torch.full((1, 3, 5, 7), 0.3)
    torch.testing.assert_close(reference_for(const, (20, 28)), torch.full((1, 3, 20, 28), 0.3))


def test_color_fix_dispatch_and_errors():
    content = torch.rand(1, 3, 16, 16) * 2 - 1
    ref = content * 0.5 + 0.2
    assert color_fix(content, ref, "none") is content
    fixed = color_fix(content + 3.0, ref, "adain")
    assert fixed.min() >= -1 and fixed.max() <= 1
    torch.testing.assert_close(fixed, adain(content + 3.0, ref).clamp(-1, 1))
    with pytest.raises(ValueError, match="color_fix must be one of none, adain, wavelet"):
        color_fix(content, ref, "histogram")
    with pytest.raises(ValueError, match="one size"):
        adain(content, ref[..., :8])
