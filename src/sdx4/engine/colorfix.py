"""Colour fix: pull the output's colours / low frequencies back to those of the (bicubic-upscaled) input.

Diffusion upscalers drift in colour (more so with tiles and many steps). Newer diffusion super-resolution
systems correct this after decoding (StableSR, Wang et al. 2023, https://arxiv.org/abs/2305.07015,
`colorfix.py`): AdaIN matches each channel's mean and standard deviation to the reference (Huang &
Belongie 2017, https://arxiv.org/abs/1703.06868); the wavelet fix keeps the output's high-frequency
bands and takes the low-frequency band from the reference (a-trous wavelet: 3x3 binomial blurs with
dilations 1, 2, 4, 8, 16).

All functions are pure and work on B,3,H,W float tensors in [-1,1]; the reference has the output's size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..options import COLOR_FIXES, ColorFix

WAVELET_LEVELS = 5


def reference_for(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The colour reference: the low-res input B,3,h,w bicubic-upscaled to `size` (H, W), clamped to [-1,1]."""
    ref = F.interpolate(image.float(), size=size, mode="bicubic", align_corners=False)
    return ref.clamp(-1.0, 1.0)


def adain(content: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per image and channel: (x - mean_x) / std_x * std_ref + mean_ref.  B,C,H,W -> B,C,H,W."""
    _check(content, reference)
    # Statistics in float64 (sums over millions of pixels), the per-pixel map in the content's dtype.
    c, r = content.double(), reference.double()
    c_mean, c_std = c.mean(dim=(-2, -1), keepdim=True), c.std(dim=(-2, -1), keepdim=True)
    r_mean, r_std = r.mean(dim=(-2, -1), keepdim=True), r.std(dim=(-2, -1), keepdim=True)
    gain = (r_std / (c_std + eps)).to(content.dtype)  # B,C,1,1
    bias = (r_mean - c_mean * r_std / (c_std + eps)).to(content.dtype)  # B,C,1,1
    return content * gain + bias


def wavelet_blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """3x3 binomial blur with a dilation, replicate padding (a constant image stays constant)."""
    k = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device)
    kernel = (k[:, None] * k[None, :] / 16.0).expand(x.shape[1], 1, 3, 3)  # C,1,3,3 (depthwise)
    # Replicate padding needs pad < size only for reflect; replicate works for any size.
    x = F.pad(x, (dilation, dilation, dilation, dilation), mode="replicate")
    return F.conv2d(x, kernel, groups=x.shape[1], dilation=dilation)


def wavelet_low(x: torch.Tensor, levels: int = WAVELET_LEVELS) -> torch.Tensor:
    """The low-frequency band after `levels` a-trous levels (what remains after removing all details)."""
    low = x
    for i in range(levels):
        low = wavelet_blur(low, 2**i)
    return low


def wavelet(content: torch.Tensor, reference: torch.Tensor, levels: int = WAVELET_LEVELS) -> torch.Tensor:
    """content - low(content) + low(reference): the output's details on the reference's low frequencies."""
    _check(content, reference)
    return content - wavelet_low(content, levels) + wavelet_low(reference.to(content.dtype), levels)


def color_fix(content: torch.Tensor, reference: torch.Tensor, method: ColorFix) -> torch.Tensor:
    """Apply the named colour fix ("none" returns `content` unchanged). Result clamped to [-1,1]."""
    if method not in COLOR_FIXES:
        raise ValueError(f"color_fix must be one of {', '.join(COLOR_FIXES)}; got {method!r}")
    if method == "none":
        return content
    fixed = adain(content, reference) if method == "adain" else wavelet(content, reference)
    return fixed.clamp(-1.0, 1.0)


def _check(content: torch.Tensor, reference: torch.Tensor) -> None:
    if content.ndim != 4 or content.shape[-3:] != reference.shape[-3:] or reference.shape[0] not in (1, content.shape[0]):
        raise ValueError(
            f"content and reference must be B,C,H,W of one size; got {tuple(content.shape)} and {tuple(reference.shape)}"
        )
