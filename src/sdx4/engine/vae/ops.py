"""The VAE decoder written out as a flat list of ops, and the exact pooled statistics of its GroupNorms."""


from __future__ import annotations

import math
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

#: Global mid-block attention up to this many latent pixels per image (128x128 latent = 512x512 output);
#: beyond it, attention runs over overlapping windows of at most this many pixels, blended. Global attention
#: costs 4*N^2*512 FLOP: 0.55 TFLOP at 128x128 (18% of that decode), 8.8 at 256x256 (86% on top of the
#: convolutions), 141 at 512x512; with windows the decoder's cost stays linear in the pixel count (the
#: time budget of issue 3): windows of up to 109x109 (`attention_core`: cores of at most 93 plus the overlap)
#: cost no more per pixel than the global attention at 128x128. They are larger than diffusers' own tiled
#: decode's (`enable_tiling`: independent 64x64-latent tiles, attention per tile).
DEFAULT_MAX_ATTENTION_TOKENS = 128 * 128
#: Attention windows reach this share of the limit's side past their core (8 latent pixels for the 128x128
#: limit; the blend band is twice that), see `default_attention_overlap`.
ATTENTION_OVERLAP_SHARE = 1 / 16
#: Queries per SDPA call in global attention (keys/values cover the whole image).
QUERY_CHUNK = 4096
#: Spilling whole-image tensors to temporary files needs shared file mappings and madvise (Linux, macOS).
SPILL_SUPPORTED = os.name == "posix" and hasattr(mmap, "MADV_DONTNEED")



# ----------------------------------------------------------------------------------------------------------
# The decoder as a list of ops


@dataclass(frozen=True, eq=False)
class Op:
    """GroupNorm `norm` (whole-image statistics) on the input, then `fn` on a tile.

    halo: input pixels of context `fn` needs on each side for an exact output; up: output/input resolution.
    save: keep this op's (un-normalised) input as the residual; skip: `fn(x, residual)` consumes it.
    """

    kind: Literal["map", "attention"]
    in_channels: int
    out_channels: int
    halo: int = 0
    up: int = 1
    norm: Any = None  # torch.nn.GroupNorm | None
    fn: Callable[..., torch.Tensor] | None = None
    save: bool = False
    skip: bool = False
    attn: Any = None  # diffusers Attention for kind == "attention"


def conv_halo(conv: torch.nn.Module, what: str) -> int:
    if not isinstance(conv, torch.nn.Conv2d):
        raise NotImplementedError(f"tiled VAE decode: {what} is {type(conv).__name__}, expected Conv2d")
    k = conv.kernel_size
    if (
        k[0] != k[1]
        or k[0] % 2 != 1
        or conv.stride != (1, 1)
        or conv.dilation != (1, 1)
        or conv.padding != (k[0] // 2, k[1] // 2)
        or conv.padding_mode != "zeros"
    ):
        raise NotImplementedError(f"tiled VAE decode: {what} must be an odd 'same' stride-1 conv; got {conv}")
    return k[0] // 2


def activation(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation module, in place when it is SiLU (our tiles are private copies)."""
    if isinstance(module, torch.nn.SiLU):
        return lambda t: F.silu(t, inplace=True)
    return module


def resnet_ops(r: Any) -> list[Op]:
    """ResnetBlock2D (diffusers resnet.py): out = (shortcut(x) + conv2(act(norm2(conv1(act(norm1(x))))))) / osf."""
    if r.upsample is not None or r.downsample is not None or r.time_emb_proj is not None:
        raise NotImplementedError("tiled VAE decode: resnet blocks with up/down-sampling or time embedding")
    if getattr(r, "time_embedding_norm", "default") not in ("default", "group"):
        raise NotImplementedError(f"tiled VAE decode: time_embedding_norm {r.time_embedding_norm!r}")
    act = activation(r.nonlinearity)
    if r.conv_shortcut is not None and conv_halo(r.conv_shortcut, "resnet conv_shortcut") != 0:
        raise NotImplementedError("tiled VAE decode: resnet conv_shortcut must be 1x1")
    osf = r.output_scale_factor

    def first(t: torch.Tensor) -> torch.Tensor:
        return r.conv1(act(t))

    def second(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = r.conv2(r.dropout(act(t)))
        if r.conv_shortcut is not None:
            x = r.conv_shortcut(x)
        out = x + h
        return out / osf if osf != 1 else out

    return [
        Op("map", r.conv1.in_channels, r.conv1.out_channels, conv_halo(r.conv1, "resnet conv1"), 1, r.norm1, first, save=True),
        Op("map", r.conv2.in_channels, r.conv2.out_channels, conv_halo(r.conv2, "resnet conv2"), 1, r.norm2, second, skip=True),
    ]


def upsample_op(u: Any) -> Op:
    """Upsample2D: nearest x2 then conv (diffusers upsampling.py)."""
    if u.norm is not None or u.use_conv_transpose or not u.interpolate or not u.use_conv:
        raise NotImplementedError("tiled VAE decode: only nearest-x2 + conv Upsample2D is supported")
    conv = u.conv if u.name == "conv" else u.Conv2d_0
    halo = math.ceil(conv_halo(conv, "upsampler conv") / 2)  # in input pixels

    def fn(t: torch.Tensor) -> torch.Tensor:
        return conv(F.interpolate(t, scale_factor=2.0, mode="nearest"))

    return Op("map", conv.in_channels, conv.out_channels, halo, 2, None, fn)


def attention_op(attn: Any) -> Op:
    if attn.spatial_norm is not None or attn.group_norm is None or attn.norm_q is not None or attn.norm_k is not None:
        raise NotImplementedError("tiled VAE decode: mid-block attention must use a plain GroupNorm")
    if attn.is_cross_attention or not attn.residual_connection:
        raise NotImplementedError("tiled VAE decode: mid-block attention must be self-attention with a residual")
    c = attn.group_norm.num_channels
    return Op("attention", c, c, 0, 1, attn.group_norm, None, attn=attn)


def program(vae: Any) -> list[Op]:
    """AutoencoderKL.decode as ops, in the order of diffusers' `Decoder.forward` (models/autoencoders/vae.py)."""
    dec = vae.decoder
    if not isinstance(dec.conv_norm_out, torch.nn.GroupNorm):
        raise NotImplementedError("tiled VAE decode: decoder norm_type must be 'group' (not 'spatial')")
    pq = getattr(vae, "post_quant_conv", None)
    if pq is not None and conv_halo(pq, "post_quant_conv") != 0:
        raise NotImplementedError("tiled VAE decode: post_quant_conv must be 1x1")
    conv_in = dec.conv_in

    def first(t: torch.Tensor) -> torch.Tensor:
        return conv_in(pq(t) if pq is not None else t)

    ops = [Op("map", conv_in.in_channels, conv_in.out_channels, conv_halo(conv_in, "conv_in"), 1, None, first)]
    mid = dec.mid_block
    ops += resnet_ops(mid.resnets[0])
    for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
        if attn is not None:
            ops.append(attention_op(attn))
        ops += resnet_ops(resnet)
    for block in dec.up_blocks:
        for r in block.resnets:
            ops += resnet_ops(r)
        for u in block.upsamplers or []:
            ops.append(upsample_op(u))
    conv_out, act = dec.conv_out, activation(dec.conv_act)
    ops.append(
        Op("map", conv_out.in_channels, conv_out.out_channels, conv_halo(conv_out, "conv_out"), 1, dec.conv_norm_out,
            lambda t: conv_out(act(t)))
    )
    return ops


# ----------------------------------------------------------------------------------------------------------
# Exact pooled statistics


class Moments:
    """Per (batch, channel) count, mean and sum of squared deviations, merged exactly over tiles (float64).

    Chan, Golub & LeVeque's pairwise update: pooling (n_i, mean_i, M2_i) gives the exact whole-image mean and
    variance (not an average of per-tile variances) without the cancellation of sum(x^2) - n*mean^2.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None  # B,C float64 (cpu)
        self.m2: torch.Tensor | None = None  # B,C float64 (cpu)

    def add(self, t: torch.Tensor) -> None:
        """t: B,C,h,w (a tile core)."""
        nt = t.shape[2] * t.shape[3]
        if nt == 0:
            return
        t = t.float()
        if t.is_contiguous():
            var, mean = torch.var_mean(t, dim=(2, 3), correction=0)
        else:  # channels-last: reduce over the pixel axis of B,n,C (3x faster here than var_mean over dims 2,3)
            tok = t.permute(0, 2, 3, 1).reshape(t.shape[0], nt, t.shape[1])  # B,n,C
            mean = tok.mean(dim=1)
            var = (tok - mean[:, None]).square_().mean(dim=1)  # two passes: no cancellation
        mean, m2 = mean.double().cpu(), var.double().cpu() * nt
        if self.mean is None:
            self.n, self.mean, self.m2 = nt, mean, m2
            return
        n = self.n + nt
        delta = mean - self.mean
        self.mean = self.mean + delta * (nt / n)
        self.m2 = self.m2 + m2 + delta.square() * (self.n * nt / n)
        self.n = n


def group_norm_affine(norm: Any, m: Moments, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm with pooled statistics as a per-channel affine map: y = x * scale + shift (each B,C,1,1)."""
    if m.mean is None:
        raise RuntimeError("tiled VAE decode: no statistics for a GroupNorm (empty tiles)")
    b, c = m.mean.shape
    g = norm.num_groups
    mean = m.mean.view(b, g, c // g)  # B,G,Cg
    gmean = mean.mean(-1, keepdim=True)
    gm2 = (m.m2.view(b, g, c // g) + m.n * (mean - gmean).square()).sum(-1, keepdim=True)
    var = gm2 / (m.n * (c // g))  # biased, as torch's GroupNorm
    rstd = (var + norm.eps).rsqrt()
    scale = rstd.expand(b, g, c // g).reshape(b, c)
    shift = -gmean.expand(b, g, c // g).reshape(b, c) * scale
    if norm.affine:
        w, bias = norm.weight.detach().double().cpu(), norm.bias.detach().double().cpu()
        scale, shift = scale * w, shift * w + bias
    return (scale.to(device, dtype)[:, :, None, None], shift.to(device, dtype)[:, :, None, None])


def apply_affine_(t: torch.Tensor, affine: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    if affine is None:
        return t
    return t.mul_(affine[0]).add_(affine[1])


def attend(attn: Any, q_in: torch.Tensor, kv_in: torch.Tensor | None = None, kv: tuple | None = None) -> torch.Tensor:
    """diffusers' AttnProcessor2_0 on normalised tokens: q_in B,Nq,C; keys/values from kv_in or given kv."""
    b = q_in.shape[0]
    heads = attn.heads
    q = attn.to_q(q_in)
    if kv is None:
        kv = (attn.to_k(kv_in), attn.to_v(kv_in))
    k, v = kv
    hd = k.shape[-1] // heads
    q = q.view(b, -1, heads, hd).transpose(1, 2)
    k = k.view(b, -1, heads, hd).transpose(1, 2)
    v = v.view(b, -1, heads, hd).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False, scale=attn.scale)
    out = out.transpose(1, 2).reshape(b, -1, heads * hd).to(q.dtype)
    return attn.to_out[1](attn.to_out[0](out))  # B,Nq,C


def to_tokens(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(2).transpose(1, 2)  # B,C,h,w -> B,h*w,C


def from_tokens(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return t.transpose(1, 2).reshape(t.shape[0], -1, h, w)


