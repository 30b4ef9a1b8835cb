"""Tiled VAE decoding that matches the untiled decode, in bounded memory.

`decode_latents(vae, latents, tile_size=..)` runs diffusers' own AutoencoderKL decoder modules (post_quant_conv,
conv_in, mid_block, up_blocks, conv_norm_out, conv_act, conv_out) on tiles, with every GroupNorm normalised by
statistics of the WHOLE image. The decoder is written out as a flat list of ops (`_program`); each op is
"GroupNorm (whole-image statistics) then a tile function" (a conv chain, an upsample+conv, or attention).

Two ways to run an op (see docs/tiled-vae.md):
  * plane mode (exact): the op's input is held as a whole-image tensor ("plane", CPU: in RAM, or spilled to
    an unlinked temporary file under a memory budget); the op is computed tile by tile (each tile reads its
    op's own halo, 0-1 px, so every output pixel is exact) into a whole-image output; the per-tile
    mean/variance of the output cores are merged (Chan et al.) into exact pooled statistics for the next
    GroupNorm. The mid-block attention is global (SDPA over all latent pixels, keys/values for the whole
    image, queries in chunks) while the token count <= max_attention_tokens, tile-local beyond.
  * tile mode (spill=False under a budget): the remaining ops run on one tile window at a time (core + a
    halo >= the remaining receptive radius, so cores are exact given the statistics). Statistics of the norms
    in this part come from a first group of tiles run in lockstep (pooled over their cores): exact if that
    group is every tile, otherwise an estimate from an evenly spread sample, and the report says so.

`plan_decode` / `estimate_decode_bytes` give the plan and its memory without running anything.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import math
import mmap
import os
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from . import memory

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
_QUERY_CHUNK = 4096
#: Spilling whole-image tensors to temporary files needs shared file mappings and madvise (Linux, macOS).
SPILL_SUPPORTED = os.name == "posix" and hasattr(mmap, "MADV_DONTNEED")


@dataclass(frozen=True)
class DecodeReport:
    """What `decode_latents` did (goes into the output metadata)."""

    tiled: bool
    tile_size: int | None  # latent pixels per tile core (None: untiled)
    overlap: int  # latent pixels of context around each tile core (tile-local attention, tile-mode windows)
    attention: Literal["global", "tile-local"]
    tiles: int
    #: GroupNorm statistics: "exact" (whole image) or "estimated" (pooled over `sample_tiles` tiles only).
    norm_stats: Literal["exact", "estimated"] = "exact"
    exact_norms: int = 0  # how many of the decoder's GroupNorms used exact whole-image statistics
    norms: int = 0  # how many GroupNorms the decoder has
    sample_tiles: int = 0  # tiles whose pooled statistics set the estimated norms (0 when all exact)
    planned_bytes: int = 0  # the plan's RAM estimate for activations (see `estimate_decode_bytes`)
    spilled_bytes: int = 0  # planned bytes of whole-image tensors kept in temporary files instead of RAM (peak)
    attention_windows: int = 1  # windows the mid-block attention ran over (1: global)
    spill_traffic_bytes: int = 0  # bytes written to temporary files over the decode (0: all in RAM)


# ----------------------------------------------------------------------------------------------------------
# The decoder as a list of ops


@dataclass(frozen=True, eq=False)
class _Op:
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


def _conv_halo(conv: torch.nn.Module, what: str) -> int:
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


def _act(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation module, in place when it is SiLU (our tiles are private copies)."""
    if isinstance(module, torch.nn.SiLU):
        return lambda t: F.silu(t, inplace=True)
    return module


def _resnet_ops(r: Any) -> list[_Op]:
    """ResnetBlock2D (diffusers resnet.py): out = (shortcut(x) + conv2(act(norm2(conv1(act(norm1(x))))))) / osf."""
    if r.upsample is not None or r.downsample is not None or r.time_emb_proj is not None:
        raise NotImplementedError("tiled VAE decode: resnet blocks with up/down-sampling or time embedding")
    if getattr(r, "time_embedding_norm", "default") not in ("default", "group"):
        raise NotImplementedError(f"tiled VAE decode: time_embedding_norm {r.time_embedding_norm!r}")
    act = _act(r.nonlinearity)
    if r.conv_shortcut is not None and _conv_halo(r.conv_shortcut, "resnet conv_shortcut") != 0:
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
        _Op("map", r.conv1.in_channels, r.conv1.out_channels, _conv_halo(r.conv1, "resnet conv1"), 1, r.norm1, first, save=True),
        _Op("map", r.conv2.in_channels, r.conv2.out_channels, _conv_halo(r.conv2, "resnet conv2"), 1, r.norm2, second, skip=True),
    ]


def _upsample_op(u: Any) -> _Op:
    """Upsample2D: nearest x2 then conv (diffusers upsampling.py)."""
    if u.norm is not None or u.use_conv_transpose or not u.interpolate or not u.use_conv:
        raise NotImplementedError("tiled VAE decode: only nearest-x2 + conv Upsample2D is supported")
    conv = u.conv if u.name == "conv" else u.Conv2d_0
    halo = math.ceil(_conv_halo(conv, "upsampler conv") / 2)  # in input pixels

    def fn(t: torch.Tensor) -> torch.Tensor:
        return conv(F.interpolate(t, scale_factor=2.0, mode="nearest"))

    return _Op("map", conv.in_channels, conv.out_channels, halo, 2, None, fn)


def _attention_op(attn: Any) -> _Op:
    if attn.spatial_norm is not None or attn.group_norm is None or attn.norm_q is not None or attn.norm_k is not None:
        raise NotImplementedError("tiled VAE decode: mid-block attention must use a plain GroupNorm")
    if attn.is_cross_attention or not attn.residual_connection:
        raise NotImplementedError("tiled VAE decode: mid-block attention must be self-attention with a residual")
    c = attn.group_norm.num_channels
    return _Op("attention", c, c, 0, 1, attn.group_norm, None, attn=attn)


def _program(vae: Any) -> list[_Op]:
    """AutoencoderKL.decode as ops, in the order of diffusers' `Decoder.forward` (models/autoencoders/vae.py)."""
    dec = vae.decoder
    if not isinstance(dec.conv_norm_out, torch.nn.GroupNorm):
        raise NotImplementedError("tiled VAE decode: decoder norm_type must be 'group' (not 'spatial')")
    pq = getattr(vae, "post_quant_conv", None)
    if pq is not None and _conv_halo(pq, "post_quant_conv") != 0:
        raise NotImplementedError("tiled VAE decode: post_quant_conv must be 1x1")
    conv_in = dec.conv_in

    def first(t: torch.Tensor) -> torch.Tensor:
        return conv_in(pq(t) if pq is not None else t)

    ops = [_Op("map", conv_in.in_channels, conv_in.out_channels, _conv_halo(conv_in, "conv_in"), 1, None, first)]
    mid = dec.mid_block
    ops += _resnet_ops(mid.resnets[0])
    for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
        if attn is not None:
            ops.append(_attention_op(attn))
        ops += _resnet_ops(resnet)
    for block in dec.up_blocks:
        for r in block.resnets:
            ops += _resnet_ops(r)
        for u in block.upsamplers or []:
            ops.append(_upsample_op(u))
    conv_out, act = dec.conv_out, _act(dec.conv_act)
    ops.append(
        _Op("map", conv_out.in_channels, conv_out.out_channels, _conv_halo(conv_out, "conv_out"), 1, dec.conv_norm_out,
            lambda t: conv_out(act(t)))
    )
    return ops


# ----------------------------------------------------------------------------------------------------------
# Exact pooled statistics


class _Moments:
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


def _group_norm_affine(norm: Any, m: _Moments, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
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


def _apply_affine_(t: torch.Tensor, affine: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    if affine is None:
        return t
    return t.mul_(affine[0]).add_(affine[1])


def _attend(attn: Any, q_in: torch.Tensor, kv_in: torch.Tensor | None = None, kv: tuple | None = None) -> torch.Tensor:
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


def _tokens(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(2).transpose(1, 2)  # B,C,h,w -> B,h*w,C


def _untokens(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return t.transpose(1, 2).reshape(t.shape[0], -1, h, w)


# ----------------------------------------------------------------------------------------------------------
# Planning (pure; shared by decode_latents and estimate_decode_bytes)


@dataclass(frozen=True)
class _OpShape:
    kind: str
    in_channels: int
    out_channels: int
    halo: int
    up: int
    norm: bool
    save: bool
    skip: bool


@dataclass(frozen=True)
class DecodeMemory:
    """Estimated peak bytes of a tiled decode, by part (activations only; weights not included).

    planes: whole-image tensors held in RAM in plane mode (op input, output, residual), at their peak;
    handoff: the whole-image tensors kept while tile mode runs; sample: the lockstep sample group's held tile
    windows; work: temporaries of one tile op (input copy, output, residual; 2x margin for conv workspaces);
    output: the decoded image. total: the peak over the ops of RAM planes + global-attention keys/values +
    work_factor x work + output (tile mode: max(planes, handoff + sample + output) + work_factor x work).
    spilled: peak bytes of whole-image tensors held in temporary files instead (disk / page cache, not RAM);
    spill_traffic: bytes written to temporary files over the whole decode (what spilling costs in time).
    """

    total: int
    planes: int
    handoff: int
    sample: int
    work: int
    output: int
    spilled: int = 0
    spill_traffic: int = 0


@dataclass(frozen=True)
class DecodePlan:
    latent_hw: tuple[int, int]
    batch_size: int
    tile_size: int
    overlap: int
    attention: Literal["global", "tile-local"]
    rows: tuple[int, ...]  # core boundaries in latent pixels (len = tiles down + 1)
    cols: tuple[int, ...]
    split: int  # ops[:split] in plane mode (exact); ops[split:] per tile
    sample: tuple[int, ...]  # tile indices run first in lockstep (their pooled statistics serve every tile)
    halo: int  # tile-mode window halo, in pixels at the resolution of ops[split]'s input
    exact_norms: int
    norms: int
    memory: DecodeMemory
    spill: bool = False  # whole-image tensors in temporary files instead of RAM (those not in `ram_planes`)
    attn_rows: tuple[int, ...] = ()  # tile-local attention: window core boundaries (latent pixels)
    attn_cols: tuple[int, ...] = ()
    #: With `spill`: the ops whose output plane is held in RAM all the same (the budget has room for it
    #: over its whole life; `place_planes`), the others' are in temporary files.
    ram_planes: frozenset[int] = frozenset()

    @property
    def tiles(self) -> int:
        return (len(self.rows) - 1) * (len(self.cols) - 1)


def _bounds(n: int, tile: int) -> tuple[int, ...]:
    """Split 0..n into ceil(n/tile) nearly equal parts."""
    k = math.ceil(n / tile)
    return tuple(round(i * n / k) for i in range(k + 1))


def default_attention_overlap(max_tokens: int) -> int:
    """Latent pixels an attention window reaches past its core by default: 1/16 of the limit's side."""
    return max(1, int(math.isqrt(max_tokens) * ATTENTION_OVERLAP_SHARE))


def attention_core(max_tokens: int, overlap: int) -> int:
    """The largest core side of a tile-local attention window whose attention costs no more per latent pixel
    than the global attention at the limit.

    A window with cores of c (and `overlap` on each side) computes (c + 2*overlap)^2 queries against as many
    keys for c^2 pixels: (c + 2*overlap)^4 / c^2 per pixel and axis pair; global attention over the largest
    image allowed costs max_tokens = S^2 per pixel. (c + 2*overlap)^2 <= S*c per axis bounds both axes, and
    the largest such c is the larger root of c^2 - (S - 4*overlap)*c + 4*overlap^2. The window is then
    (S + sqrt(S^2 - 8*S*overlap)) / 2 <= S wide: 93 + 2*8 = 109 for S = 128 (default overlap 8), not the
    full 128, whose cores of 112 cost 1.31x per pixel and whose count, rounded up (ceil(n/112) windows
    along n), let the cost per pixel swing by 1.4x from one image size to the next. Overlaps too wide for
    any window to be that cheap (S < 8*overlap): the largest core that keeps the window within S.
    """
    s = math.sqrt(max_tokens)
    disc = s * s - 8 * s * overlap
    if disc < 0:
        return max(1, math.isqrt(max_tokens) - 2 * overlap)
    core = math.floor((s - 4 * overlap + math.sqrt(disc)) / 2)
    while core > 1 and (core + 2 * overlap) ** 2 > s * core:  # floating point at the root
        core -= 1
    return max(1, core)


def attention_bounds(h: int, w: int, max_tokens: int, overlap: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Core boundaries of the tile-local attention windows (`attention_core` pixels or fewer each, spread
    evenly): every window (core + `overlap` on each side) holds at most max_tokens latent pixels, and the
    attention's cost per latent pixel stays at or under the global attention's at the limit, whatever the
    image size."""
    core = attention_core(max_tokens, overlap)
    return _bounds(h, core), _bounds(w, core)


def receptive_radius(shapes: list[_OpShape], start: int = 0) -> int:
    """Context (pixels at ops[start]'s input resolution) that makes the output of ops[start:] exact in a core.

    Attention ops count as 0 (tile mode uses tile-local attention, which is not exact anyway).
    """
    r = 0
    for s in reversed(shapes[start:]):
        r = math.ceil(r / s.up) + s.halo
    return r


def _scale_at(shapes: list[_OpShape], i: int) -> int:
    return math.prod(s.up for s in shapes[:i])


def plane_lives(shapes: list[_OpShape]) -> list[tuple[int, int]]:
    """(first op, last op) during which ops[p]'s output plane is held, for every op p but the last (whose
    output is the decoded image): written by op p, read by op p+1, and by the skip op when op p+1 keeps
    its input as the residual."""
    last = list(range(1, len(shapes)))  # read by the next op
    saved = None
    for i, s in enumerate(shapes):
        if s.skip and saved is not None and saved >= 0:
            last[saved] = i
        saved = i - 1 if s.save else (None if s.skip else saved)
    return [(p, last[p]) for p in range(len(shapes) - 1)]


def place_planes(sizes: list[int], lives: list[tuple[int, int]], other: list[int], budget: int) -> frozenset[int]:
    """Which planes to hold in RAM (the rest go to temporary files): the largest first, each one that fits
    next to the planes already chosen at every op of its life. other[i]: the rest of op i's RAM.

    Every byte kept in RAM is a byte not written to and read back from the page cache (1.2-1.3x the
    decode's time when everything spills); largest-first keeps the most bytes for a greedy choice.
    """
    used = list(other)
    chosen = set()
    for p in sorted(range(len(sizes)), key=lambda p: (-sizes[p], p)):
        first, last = lives[p]
        if all(used[i] + sizes[p] <= budget for i in range(first, last + 1)):
            chosen.add(p)
            for i in range(first, last + 1):
                used[i] += sizes[p]
    return frozenset(chosen)


def _plan(
    shapes: list[_OpShape],
    latent_hw: tuple[int, int],
    batch_size: int,
    tile_size: int,
    overlap: int | None,
    max_attention_tokens: int,
    max_bytes: int | None,
    itemsize: int,
    spill: bool = False,
    work_factor: int = 1,
) -> DecodePlan:
    h, w = latent_hw
    rows, cols = _bounds(h, tile_size), _bounds(w, tile_size)
    n_tiles = (len(rows) - 1) * (len(cols) - 1)
    attn_idx = [i for i, s in enumerate(shapes) if s.kind == "attention"]
    attention: Literal["global", "tile-local"] = "global" if h * w <= max_attention_tokens else "tile-local"
    if overlap is None:  # tile-mode windows get at least the receptive radius whatever this is
        overlap = default_attention_overlap(max_attention_tokens)
    attn_rows, attn_cols = attention_bounds(h, w, max_attention_tokens, overlap) if attention == "tile-local" else ((), ())
    attn_side = max((min(n, b1 - b0 + 2 * overlap) for n, bounds in ((h, attn_rows), (w, attn_cols))
                     for b0, b1 in itertools.pairwise(bounds)), default=0)
    norms = sum(s.norm for s in shapes)
    b, e = batch_size, itemsize
    core_max = max(max(b1 - b0 for b0, b1 in itertools.pairwise(rows)), max(c1 - c0 for c0, c1 in itertools.pairwise(cols)))

    def px(i: int) -> int:  # pixels of ops[i]'s input, whole image
        return h * w * _scale_at(shapes, i) ** 2

    # Plane mode: bytes held while op i runs (input, output, live residual, global-attention keys/values).
    plane_held, work_plane, kv_ram, res_ch = [], [], [], 0
    for i, s in enumerate(shapes):
        held = px(i) * s.in_channels + px(i) * s.up**2 * s.out_channels + px(i) * res_ch
        side = attn_side if s.kind == "attention" and attention == "tile-local" else core_max
        win = (side * _scale_at(shapes, i) + 2 * s.halo) ** 2
        work = win * (2 * s.in_channels + 2 * s.up**2 * s.out_channels + res_ch)
        kv = 0
        if s.kind == "attention" and attention == "global":
            kv = 2 * px(i) * s.in_channels  # keys, values (always in RAM)
            work = _QUERY_CHUNK * 4 * s.in_channels
        kv_ram.append(kv * b * e)
        plane_held.append(held * b * e)
        work_plane.append(work * b * e)
        res_ch = s.in_channels if s.save else (0 if s.skip else res_ch)
    output = b * shapes[-1].out_channels * px(len(shapes)) * e

    def residual_channels_at(k: int) -> int:
        rc = 0
        for s in shapes[:k]:
            rc = s.in_channels if s.save else (0 if s.skip else rc)
        return rc

    def tile_costs(k: int) -> tuple[int, int, int]:
        """(halo, held bytes of one tile window at its peak, one tile op's temporaries) for a split at k."""
        sc = _scale_at(shapes, k)
        halo = max(receptive_radius(shapes, k), overlap * sc)
        side = core_max * sc + 2 * halo  # window side at ops[k]'s input
        rc, held_peak, work_peak = residual_channels_at(k), 0, 0
        for s in shapes[k:]:
            held = side**2 * (s.in_channels + rc)
            work = side**2 * (2 * s.in_channels + 2 * s.up**2 * s.out_channels + rc)
            held_peak, work_peak = max(held_peak, held), max(work_peak, work)
            rc = s.in_channels if s.save else (0 if s.skip else rc)
            side *= s.up
        return halo, held_peak * b * e, work_peak * b * e

    n, f = len(shapes), work_factor
    k_min = attn_idx[0] + 1 if (attn_idx and attention == "global") else 0
    full_planes = max(p + kv for p, kv in zip(plane_held, kv_ram)) + f * max(work_plane)
    spilled, ram_planes = False, frozenset()
    if max_bytes is None or full_planes + output <= max_bytes or k_min == n:
        split, sample, halo = n, (), 0
        memory = DecodeMemory(full_planes + output, max(plane_held), 0, 0, max(work_plane), output)
    elif spill:
        # Whole-image tensors in temporary files, except those the budget can hold in RAM over their
        # whole life next to one tile op's work and the output.
        split, sample, halo, spilled = n, (), 0, True
        lives = plane_lives(shapes)
        sizes = [b * e * px(p + 1) * shapes[p].out_channels for p in range(n - 1)]
        other = [kv + f * wk + output for wk, kv in zip(work_plane, kv_ram)]
        ram_planes = place_planes(sizes, lives, other, max_bytes)
        in_ram, in_files = [0] * n, [0] * n
        for p, (first, last) in enumerate(lives):
            for i in range(first, last + 1):
                (in_ram if p in ram_planes else in_files)[i] += sizes[p]
        total = max(r + o for r, o in zip(in_ram, other))
        traffic = sum(size for p, size in enumerate(sizes) if p not in ram_planes)
        memory = DecodeMemory(total, max(in_ram), 0, 0, max(work_plane), output, max(in_files), traffic)
        spilled = memory.spilled > 0  # else every plane fits after all (the per-op count is tighter)
    else:
        # Tile mode from op k: the whole-image tensors at k stay (handoff), the sample group is held in lockstep.
        options = []
        for k in range(k_min, n):
            halo, tile_held, tile_work = tile_costs(k)
            planes = max((p + kv for p, kv in zip(plane_held[:k], kv_ram[:k])), default=0) + f * max(work_plane[:k], default=0)
            handoff = b * e * px(k) * (shapes[k].in_channels + residual_channels_at(k))
            fixed = handoff + output + f * tile_work
            m = min(n_tiles, (max_bytes - fixed) // tile_held) if planes <= max_bytes and fixed < max_bytes else 0
            total = max(planes, fixed + max(m, 1) * tile_held)
            # most sample tiles first (better estimates), then the latest split (more exact norms),
            # and when nothing fits the budget, the smallest total
            options.append(((m, k) if m > 0 else (0, -total), k, halo, max(m, 1), handoff, tile_held, tile_work, planes, total))
        _, split, halo, m, handoff, tile_held, tile_work, planes, total = max(options, key=lambda o: o[0])
        sample = tuple(sorted({min(n_tiles - 1, int((j + 0.5) * n_tiles / m)) for j in range(m)}))
        memory = DecodeMemory(total, planes, handoff, len(sample) * tile_held, tile_work, output)
    exact = norms if (split == n or len(sample) == n_tiles) else sum(s.norm for s in shapes[: split + 1])
    return DecodePlan(
        (h, w), b, tile_size, overlap, attention, rows, cols, split, sample, halo, exact, norms, memory, spilled,
        attn_rows, attn_cols, ram_planes,
    )


def _shapes(ops: list[_Op]) -> list[_OpShape]:
    return [_OpShape(o.kind, o.in_channels, o.out_channels, o.halo, o.up, o.norm is not None, o.save, o.skip) for o in ops]


def _check_args(tile_size: Any, overlap: Any, max_attention_tokens: Any, max_bytes: Any, work_factor: Any = 1) -> None:
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if tile_size is not None and (not is_int(tile_size) or tile_size < 1):
        raise ValueError(f"tile_size must be None (untiled) or an integer >= 1 latent pixel; got {tile_size!r}")
    if overlap is not None and (not is_int(overlap) or overlap < 0):
        raise ValueError(f"overlap must be None (the decoder's receptive radius) or an integer >= 0; got {overlap!r}")
    if not is_int(max_attention_tokens) or max_attention_tokens < 1:
        raise ValueError(f"max_attention_tokens must be an integer >= 1; got {max_attention_tokens!r}")
    if max_bytes is not None and (not is_int(max_bytes) or max_bytes < 1):
        raise ValueError(f"max_bytes must be None (no limit: every norm exact) or an integer >= 1 byte; got {max_bytes!r}")
    if not is_int(work_factor) or work_factor < 1:
        raise ValueError(f"work_factor must be an integer >= 1; got {work_factor!r}")


def plan_decode(
    vae: Any,
    latent_hw: tuple[int, int],
    tile_size: int,
    overlap: int | None = None,
    *,
    batch_size: int = 1,
    max_attention_tokens: int = DEFAULT_MAX_ATTENTION_TOKENS,
    max_bytes: int | None = None,
    spill: bool = True,
    work_factor: int = 1,
) -> DecodePlan:
    """The plan `decode_latents` follows for these arguments (no computation)."""
    _check_args(tile_size, overlap, max_attention_tokens, max_bytes, work_factor)
    itemsize = next(vae.parameters()).element_size()
    return _plan(_shapes(_program(vae)), tuple(latent_hw), batch_size, tile_size, overlap,
                 max_attention_tokens, max_bytes, itemsize, spill and SPILL_SUPPORTED, work_factor)


def estimate_decode_bytes(
    latent_hw: tuple[int, int],
    tile_size: int | None,
    overlap: int | None = None,
    *,
    batch_size: int = 1,
    vae_config: dict[str, Any] | None = None,
    max_attention_tokens: int = DEFAULT_MAX_ATTENTION_TOKENS,
    max_bytes: int | None = None,
    spill: bool = True,
    itemsize: int = 4,
    work_factor: int = 1,
) -> DecodeMemory:
    """Estimated peak activation bytes of `decode_latents` (weights NOT included; see `DecodeMemory`).

    vae_config: AutoencoderKL config (default: the published x4 upscaler's, `random_model.VAE_CONFIGS["full"]`);
    the model is built on the meta device (no memory). tile_size None: a rough count for the untiled decode
    (the whole image as one tile: 2 inputs + 2 outputs of the widest op, plus global attention keys/values).
    """
    from diffusers import AutoencoderKL

    from .random_model import VAE_CONFIGS

    h, w = latent_hw
    _check_args(tile_size, overlap, max_attention_tokens, max_bytes, work_factor)
    with torch.device("meta"):
        vae = AutoencoderKL(**(vae_config or VAE_CONFIGS["full"]))
    shapes = _shapes(_program(vae))
    if tile_size is None or tile_size >= max(h, w):
        p = _plan(shapes, (h, w), batch_size, max(h, w), 0, max_attention_tokens, None, itemsize, work_factor=work_factor)
        return p.memory
    return _plan(
        shapes, (h, w), batch_size, tile_size, overlap, max_attention_tokens, max_bytes, itemsize, spill and SPILL_SUPPORTED,
        work_factor,
    ).memory


# ----------------------------------------------------------------------------------------------------------
# Execution


class _Plane:
    """A whole-image tensor B,C,H,W on the CPU (in RAM, or in an unlinked temporary file) and its moments.

    A spilled plane is a file laid out B,H,W,C (so a tile window is a few contiguous runs), written with
    pwrite (`write`) and read through a shared mapping (`crop`); `release()` drops the mapping's pages from
    this process's resident set after each tile (MADV_DONTNEED keeps the data: it is in the file / page
    cache, which the kernel writes back and evicts under memory pressure). Writes do not go through the
    mapping: filling a shared file mapping page by page cost 12-20 s of kernel time per 4 GiB here (ext4),
    pwrite 2.4 s; and a full disk is then an OSError naming the directory, not a SIGBUS.
    """

    def __init__(
        self,
        data: torch.Tensor,
        moments: _Moments | None = None,
        mapping: mmap.mmap | None = None,
        fmt: torch.memory_format = torch.contiguous_format,
        fd: int | None = None,
        where: str | None = None,
    ) -> None:
        self.data = data
        self.moments = moments
        self._mapping = mapping
        self.fmt = fmt  # the layout of crops (the decoder's convolutions' layout: no conversion per tile)
        self._fd, self._where = fd, where
        if fd is not None:
            weakref.finalize(self, os.close, fd)

    @classmethod
    def empty(
        cls,
        shape: tuple[int, int, int, int],
        dtype: torch.dtype,
        spill_dir: str | None,
        fmt: torch.memory_format = torch.contiguous_format,
    ) -> _Plane:
        if spill_dir is None:
            return cls(torch.empty(shape, dtype=dtype, memory_format=fmt), fmt=fmt)
        b, c, h, w = shape
        nbytes = b * c * h * w * torch.empty((), dtype=dtype).element_size()
        fd, path = tempfile.mkstemp(prefix="sdx4-vae-", suffix=".plane", dir=spill_dir)
        try:
            os.unlink(path)  # the descriptor and mapping keep the file alive; it disappears with the plane
            os.ftruncate(fd, nbytes)
            # writable only because torch.frombuffer warns on read-only buffers: writes go through `write`
            mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        data = torch.frombuffer(mapping, dtype=dtype).view(b, h, w, c).permute(0, 3, 1, 2)  # B,C,H,W view
        return cls(data, None, mapping, fmt, fd, spill_dir)

    def crop(self, y0: int, y1: int, x0: int, x1: int, device: torch.device) -> torch.Tensor:
        """A private copy of data[:, :, y0:y1, x0:x1] on `device`, laid out as `fmt`."""
        return self.data[:, :, y0:y1, x0:x1].to(device, memory_format=self.fmt, copy=True)

    def write(self, y0: int, x0: int, t: torch.Tensor) -> None:
        """data[:, :, y0:y0+h, x0:x0+w] = t (B,C,h,w)."""
        if self._fd is None:
            self.data[:, :, y0 : y0 + t.shape[2], x0 : x0 + t.shape[3]] = t
            return
        b, c, h, w = self.data.shape
        rows = t.to(self.data.device, self.data.dtype).permute(0, 2, 3, 1)  # B,h,w,C: each row one run
        if rows.stride(3) != 1 or rows.stride(2) != c:
            rows = rows.contiguous()
        raw = rows.view(torch.uint8).numpy()  # (any dtype, bf16 too) B,h,w,C*itemsize
        run, e = raw.shape[2] * raw.shape[3], self.data.element_size()
        whole = x0 == 0 and raw.shape[2] == w and raw.strides[1] == run  # full-width rows: one block each
        try:
            for i in range(b):
                if whole:
                    self._pwrite(raw[i], ((i * h + y0) * w) * c * e)
                    continue
                for r in range(raw.shape[1]):
                    self._pwrite(raw[i, r], ((i * h + y0 + r) * w + x0) * c * e)
        except OSError as err:
            raise OSError(
                err.errno,
                f"tiled VAE decode: writing a whole-image tensor ({self.data.numel() * e / 2**30:.2f} GiB) to a "
                f"temporary file in {self._where!r} failed: {err.strerror}. Free disk space there, point TMPDIR "
                "(or spill_dir) at a disk with room, or give the decode more memory (--max-memory)",
            ) from err

    def add_(self, y0: int, x0: int, t: torch.Tensor) -> None:
        """data[:, :, y0:y0+h, x0:x0+w] += t (B,C,h,w)."""
        y1, x1 = y0 + t.shape[2], x0 + t.shape[3]
        if self._fd is None:
            self.data[:, :, y0:y1, x0:x1] += t.to(self.data.device)
        else:
            self.write(y0, x0, self.crop(y0, y1, x0, x1, t.device) + t)

    def _pwrite(self, block: Any, offset: int) -> None:
        view = memoryview(block).cast("B")
        while view:
            n = os.pwrite(self._fd, view, offset)
            if n <= 0:
                raise OSError(errno.EIO, "pwrite wrote nothing")
            view, offset = view[n:], offset + n

    def release(self) -> None:
        if self._mapping is not None:
            self._mapping.madvise(mmap.MADV_DONTNEED)


def _ramp(start: int, end: int, n: int, overlap: int) -> torch.Tensor:
    """Blend weights along one axis of a window [start, end) of 0..n: linear over the 2*overlap pixels it
    shares with a neighbour (sums to one with the neighbour's opposite ramp), 1 elsewhere and at image edges."""
    p = torch.arange(start, end, dtype=torch.float64) + 0.5
    w = torch.ones(end - start, dtype=torch.float64)
    if overlap > 0 and start > 0:
        w = torch.minimum(w, (p - start) / (2 * overlap))
    if overlap > 0 and end < n:
        w = torch.minimum(w, (end - p) / (2 * overlap))
    return w


def _windows(n: int, bounds: tuple[int, ...], halo: int) -> list[tuple[int, int, int, int]]:
    """(window start, window end, core start, core end) per part of 0..n; windows clipped to the image."""
    return [(max(0, a - halo), min(n, b + halo), a, b) for a, b in itertools.pairwise(bounds)]


class _Runner:
    def __init__(
        self,
        ops: list[_Op],
        plan: DecodePlan,
        device: torch.device,
        dtype: torch.dtype,
        spill_dir: str | None,
        fmt: torch.memory_format = torch.contiguous_format,
    ) -> None:
        self.ops, self.plan, self.device, self.dtype = ops, plan, device, dtype
        self.spill_dir = spill_dir  # None: whole-image tensors in RAM
        self.store = torch.device("cpu")
        self.shapes = _shapes(ops)
        #: Planes and crops in the layout of the decoder's convolution weights (channels-last on the CPU):
        #: contiguous crops would be converted by every convolution and converted back when stored.
        self.fmt = fmt

    # -- plane mode ---------------------------------------------------------------------------------------
    def plane_op(self, i: int, cur: _Plane, res: _Plane | None) -> _Plane:
        """ops[i] over whole-image tensors, tile by tile (each tile with the op's own halo): exact."""
        op, sc = self.ops[i], _scale_at(self.shapes, i)
        rows = tuple(r * sc for r in self.plan.rows)
        cols = tuple(c * sc for c in self.plan.cols)
        affine = _group_norm_affine(op.norm, cur.moments, self.device, self.dtype) if op.norm is not None else None
        # the decoded image itself, and the planes the plan holds in RAM, are not spilled
        where = None if (i == len(self.ops) - 1 or i in self.plan.ram_planes) else self.spill_dir
        if op.kind == "attention":
            if self.plan.attention == "global":
                return self._global_attention(op, cur, affine, where)
            return self._local_attention(op, cur, affine, self.plan.attn_rows, self.plan.attn_cols, where)
        halo = op.halo
        b, _, hh, ww = cur.data.shape
        u = op.up
        out = _Plane.empty((b, op.out_channels, hh * u, ww * u), self.dtype, where, self.fmt)
        moments = _Moments()
        for y0, y1, cy0, cy1 in _windows(hh, rows, halo):
            for x0, x1, cx0, cx1 in _windows(ww, cols, halo):
                t = _apply_affine_(cur.crop(y0, y1, x0, x1, self.device), affine)  # B,C,wh,ww normalised
                if op.skip:
                    o = op.fn(t, res.crop(y0, y1, x0, x1, self.device))
                else:
                    o = op.fn(t)
                core = o[:, :, (cy0 - y0) * u : (cy1 - y0) * u, (cx0 - x0) * u : (cx1 - x0) * u]
                out.write(cy0 * u, cx0 * u, core)
                moments.add(core)
                del t, o, core
                for plane in (cur, res, out):
                    if plane is not None:
                        plane.release()
        out.moments = moments
        return out

    def _local_attention(
        self, op: _Op, cur: _Plane, affine: tuple, rows: tuple[int, ...], cols: tuple[int, ...], where: str | None
    ) -> _Plane:
        """Attention within each window (core + overlap; `attention_bounds`), blended with feathered weights.

        Neighbouring windows overlap by 2*overlap pixels; linear ramps across that band sum to one, so the
        attention output changes smoothly from one tile's to the next (no seam at core boundaries). Windows
        that cover the whole latent give exactly the global result.
        """
        attn, ov = op.attn, self.plan.overlap
        b, c, hh, ww = cur.data.shape
        acc = _Plane.empty((b, c, hh, ww), self.dtype, where, self.fmt)  # weighted sum of attention outputs
        if acc._mapping is None:
            acc.data.zero_()  # (a new file mapping reads as zeros)
        wsum = torch.zeros(hh, ww, dtype=torch.float64)
        for y0, y1, cy0, cy1 in _windows(hh, rows, ov):
            for x0, x1, cx0, cx1 in _windows(ww, cols, ov):
                t = _tokens(_apply_affine_(cur.crop(y0, y1, x0, x1, self.device), affine))
                o = _untokens(_attend(attn, t, t), y1 - y0, x1 - x0)  # B,C,wh,ww
                weight = _ramp(y0, y1, hh, ov)[:, None] * _ramp(x0, x1, ww, ov)[None, :]  # wh,ww
                wsum[y0:y1, x0:x1] += weight
                acc.add_(y0, x0, o.mul_(weight.to(o.device, o.dtype)))
                del t, o
                cur.release()
                acc.release()
        moments = _Moments()
        for y0, y1, _, _ in _windows(hh, rows, 0):
            for x0, x1, _, _ in _windows(ww, cols, 0):
                o = acc.crop(y0, y1, x0, x1, self.device) / wsum[y0:y1, x0:x1].to(self.device, self.dtype)
                o = (o + cur.crop(y0, y1, x0, x1, self.device)) / attn.rescale_output_factor  # residual
                acc.write(y0, x0, o)
                moments.add(o)
                cur.release()
                acc.release()
        acc.moments = moments
        return acc

    def _global_attention(self, op: _Op, cur: _Plane, affine: tuple, where: str | None) -> _Plane:
        """Single-head self-attention over ALL latent pixels; keys/values for the whole image, queries in chunks."""
        attn = op.attn
        b, c, hh, ww = cur.data.shape
        rows_per_chunk = max(1, _QUERY_CHUNK // ww)
        bands = [(y, min(hh, y + rows_per_chunk)) for y in range(0, hh, rows_per_chunk)]
        keys, values = [], []
        for y0, y1 in bands:
            t = _tokens(_apply_affine_(cur.crop(y0, y1, 0, ww, self.device), affine))  # B,n,C
            keys.append(attn.to_k(t))
            values.append(attn.to_v(t))
            cur.release()
        kv = (torch.cat(keys, 1), torch.cat(values, 1))  # B,N,C each, N = every latent pixel
        del keys, values
        out = _Plane.empty((b, c, hh, ww), self.dtype, where, self.fmt)
        moments = _Moments()
        for y0, y1 in bands:
            t = _tokens(_apply_affine_(cur.crop(y0, y1, 0, ww, self.device), affine))
            o = _untokens(_attend(attn, t, kv=kv), y1 - y0, ww)
            o = (o + cur.crop(y0, y1, 0, ww, self.device)) / attn.rescale_output_factor
            out.write(y0, 0, o)
            moments.add(o)
            cur.release()
            out.release()
        out.moments = moments
        return out

    # -- tile mode ----------------------------------------------------------------------------------------
    def tile_group(
        self,
        tiles: list[int],
        cur: _Plane,
        res: _Plane | None,
        table: dict[int, tuple],
        out: torch.Tensor,
    ) -> None:
        """Run ops[split:] on the given tiles in lockstep; norms missing from `table` get the group's pooled stats."""
        plan, ops, k = self.plan, self.ops, self.plan.split
        sc, total = _scale_at(self.shapes, k), _scale_at(self.shapes, len(ops))
        nx = len(plan.cols) - 1
        hh, ww = cur.data.shape[2:]
        state = []  # per tile: [current B,C,h,w, residual or None, core box (y0, y1, x0, x1) in the window]
        for t in tiles:
            r, c = divmod(t, nx)
            cy0, cy1 = plan.rows[r] * sc, plan.rows[r + 1] * sc
            cx0, cx1 = plan.cols[c] * sc, plan.cols[c + 1] * sc
            y0, y1 = max(0, cy0 - plan.halo), min(hh, cy1 + plan.halo)
            x0, x1 = max(0, cx0 - plan.halo), min(ww, cx1 + plan.halo)
            rt = res.crop(y0, y1, x0, x1, self.device) if res is not None else None
            state.append([cur.crop(y0, y1, x0, x1, self.device), rt,
                          (cy0 - y0, cy1 - y0, cx0 - x0, cx1 - x0), (plan.rows[r] * total, plan.cols[c] * total)])
            for plane in (cur, res):
                if plane is not None:
                    plane.release()
        moments: _Moments | None = None
        for i in range(k, len(ops)):
            op = ops[i]
            if op.norm is not None and i not in table:
                table[i] = _group_norm_affine(op.norm, moments, self.device, self.dtype)
            affine = table.get(i) if op.norm is not None else None
            # the next op's norm reads this op's output: pool its cores if that norm has no statistics yet
            nxt = i + 1
            moments = _Moments() if nxt < len(ops) and ops[nxt].norm is not None and nxt not in table else None
            for s in state:
                x, r, (a0, a1, b0, b1) = s[0], s[1], s[2]
                if op.save:
                    s[1] = r = x
                # normalise in place unless the un-normalised input is still needed (residual, attention)
                t = x.clone() if (op.save or op.kind == "attention") else x
                _apply_affine_(t, affine)
                if op.kind == "attention":  # tile-local: attention over the window's tokens
                    o = _untokens(_attend(op.attn, _tokens(t), _tokens(t)), t.shape[2], t.shape[3])
                    o = (o + x) / op.attn.rescale_output_factor
                elif op.skip:
                    o = op.fn(t, r)
                    s[1] = None
                else:
                    o = op.fn(t)
                u = op.up
                s[0], s[2] = o, (a0 * u, a1 * u, b0 * u, b1 * u)
                if moments is not None:
                    moments.add(o[:, :, a0 * u : a1 * u, b0 * u : b1 * u])
                del t, o, x
        for s in state:
            a0, a1, b0, b1 = s[2]
            oy, ox = s[3]
            out[:, :, oy : oy + a1 - a0, ox : ox + b1 - b0] = s[0][:, :, a0:a1, b0:b1].to(self.store)


class WindowedAttention:
    """A diffusers attention processor for the VAE's mid-block: self-attention within overlapping windows of
    at most `max_tokens` latent pixels (`attention_bounds`), blended with linear ramps over 2 x `overlap`
    pixels, the GroupNorm over the whole image. The same windows as the tiled decode's tile-local attention,
    so the untiled and tiled decodes agree beyond the global-attention limit too."""

    def __init__(self, max_tokens: int, overlap: int) -> None:
        self.max_tokens, self.overlap = max_tokens, overlap

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 attention_mask: Any = None, temb: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        if hidden_states.ndim != 4 or encoder_hidden_states is not None or attention_mask is not None:
            raise NotImplementedError("windowed attention: B,C,H,W self-attention without a mask only")
        x = attn.group_norm(hidden_states)  # B,C,h,w, whole-image statistics
        b, c, h, w = x.shape
        rows, cols = attention_bounds(h, w, self.max_tokens, self.overlap)
        acc = torch.zeros_like(x)
        wsum = torch.zeros(h, w, dtype=torch.float64)
        for y0, y1, _, _ in _windows(h, rows, self.overlap):
            for x0, x1, _, _ in _windows(w, cols, self.overlap):
                t = _tokens(x[:, :, y0:y1, x0:x1])  # B,n,C
                o = _untokens(_attend(attn, t, t), y1 - y0, x1 - x0)  # B,C,wh,ww
                weight = _ramp(y0, y1, h, self.overlap)[:, None] * _ramp(x0, x1, w, self.overlap)[None, :]
                wsum[y0:y1, x0:x1] += weight
                acc[:, :, y0:y1, x0:x1] += o * weight.to(o.device, o.dtype)
        out = acc / wsum.to(acc.device, acc.dtype)
        return (out + hidden_states) / attn.rescale_output_factor


@contextlib.contextmanager
def _mid_attention_processor(vae: Any, processor: Any) -> Any:
    """Run the decoder's mid-block attention with `processor` (None: leave it alone), restored afterwards."""
    attentions = [a for a in getattr(vae.decoder.mid_block, "attentions", []) if a is not None]
    if processor is None or not attentions:
        yield
        return
    for a in attentions:
        _attention_op(a)  # a plain GroupNorm self-attention with a residual, or NotImplementedError
    saved = [a.processor for a in attentions]
    for a in attentions:
        a.set_processor(processor)
    try:
        yield
    finally:
        for a, p in zip(attentions, saved):
            a.set_processor(p)


def decode_latents(
    vae: Any,
    latents: torch.Tensor,
    *,
    tile_size: int | None = None,
    overlap: int | None = None,
    max_attention_tokens: int = DEFAULT_MAX_ATTENTION_TOKENS,
    max_bytes: int | None = None,
    spill: bool = True,
    spill_dir: str | os.PathLike[str] | None = None,
    work_factor: int = 1,
) -> tuple[torch.Tensor, DecodeReport]:
    """Decode latents with diffusers' AutoencoderKL decoder, optionally on tiles with whole-image GroupNorms.

    latents: B,4,h,w ALREADY divided by vae.config.scaling_factor, in the VAE's dtype.
    Returns B,3,4h,4w in [-1,1] (same as vae.decode(latents).sample) and what was done.

    tile_size: latent pixels per tile core; None or >= both latent sides: plain `vae.decode` (bit-identical
        while the attention is global; beyond max_attention_tokens its mid-block attention runs windowed).
    overlap: latent pixels each tile-local attention window reaches past its core (default: 1/16 of the
        window side, 8 for 128x128 windows; the blend band is twice this), and the least context of tile-mode windows (which never get less than the exact
        receptive radius, so cores are exact whatever this is).
    max_attention_tokens: global mid-block attention while h*w <= this; beyond, attention within windows of
        at most this many latent pixels (`attention_bounds`), blended: the cost stays linear in pixels.
    max_bytes: RAM budget for activations (weights not included; see `estimate_decode_bytes`). None, or
        when the whole-image tensors fit: they are held in RAM. Otherwise, with `spill` (default), those
        that do not fit (the largest first: `place_planes`) are held in unlinked temporary files under
        `spill_dir` (default: the system temp dir): still exact, at the cost of disk/page-cache traffic
        for the spilled ones. With spill=False the later,
        larger layers run one tile at a time instead, with GroupNorm statistics pooled over an evenly spread
        sample of tiles held in lockstep: an ESTIMATE (report.norm_stats == "estimated"), see
        docs/tiled-vae.md.
    work_factor: what one tile op really holds per planned byte (oneDNN's blocked-layout copies of each
        convolution's input and output; the pipeline passes its measured factor, see memory.py): the
        budget counts the work this many times, whole-image tensors once.
    """
    _check_args(tile_size, overlap, max_attention_tokens, max_bytes, work_factor)
    if latents.ndim != 4 or latents.shape[1] != vae.config.latent_channels:
        raise ValueError(
            f"latents must be B,{vae.config.latent_channels},h,w; got shape {tuple(latents.shape)}"
        )
    param = next(vae.parameters())
    if latents.dtype != param.dtype:
        raise ValueError(f"latents dtype {latents.dtype} differs from the VAE's {param.dtype}; cast them first")
    b, _, h, w = latents.shape
    if tile_size is None or tile_size >= max(h, w):
        windowed = h * w > max_attention_tokens
        ov = default_attention_overlap(max_attention_tokens) if overlap is None else overlap
        processor = WindowedAttention(max_attention_tokens, ov) if windowed else None
        with torch.no_grad(), _mid_attention_processor(vae, processor):
            out = vae.decode(latents, return_dict=False)[0]
        norms = sum(isinstance(m, torch.nn.GroupNorm) for m in vae.decoder.modules())
        rows, cols = attention_bounds(h, w, max_attention_tokens, ov)
        windows = (len(rows) - 1) * (len(cols) - 1) if windowed else 1
        return out, DecodeReport(False, None, ov if windowed else 0, "tile-local" if windowed else "global", 1,
                                 "exact", norms, norms, 0, 0, 0, windows)

    ops = _program(vae)
    plan = _plan(_shapes(ops), (h, w), b, tile_size, overlap, max_attention_tokens, max_bytes,
                 param.element_size(), spill and SPILL_SUPPORTED, work_factor)
    if plan.spill:
        spill_dir = os.fspath(spill_dir) if spill_dir is not None else tempfile.gettempdir()
        if not os.path.isdir(spill_dir):
            raise ValueError(f"spill_dir {spill_dir!r} is not a directory")
    cw = vae.decoder.conv_in.weight
    cl = cw.is_contiguous(memory_format=torch.channels_last) and not cw.is_contiguous()
    fmt = torch.channels_last if cl else torch.contiguous_format
    runner = _Runner(ops, plan, param.device, param.dtype, spill_dir if plan.spill else None, fmt)
    with torch.no_grad():
        cur, res = _Plane(latents.to(runner.store), fmt=fmt), None
        for i in range(plan.split):
            nxt = runner.plane_op(i, cur, res)
            op = ops[i]
            if op.save:
                res = cur
            elif op.skip:
                res = None
            cur = nxt
            # The op's tile temporaries (and a dropped input plane) go back to the OS: an allocator that keeps
            # freed memory for reuse (tcmalloc, sdx4.allocator) would otherwise carry every op's sizes forward
            # (measured at 512 px: peak 5.90 GiB against the 5 GiB budget, glibc 4.56-4.79).
            memory.release_memory(collect=False)
        if plan.split == len(ops):
            out = cur.data.contiguous()  # B,3,4h,4w (a channels-last plane on the CPU)
        else:
            total = _scale_at(runner.shapes, len(ops))  # 4 for the x4 upscaler's VAE
            out = torch.empty(b, ops[-1].out_channels, total * h, total * w, dtype=param.dtype, device=runner.store)
            table: dict[int, tuple] = {}
            if ops[plan.split].norm is not None:  # its input is a whole-image plane: exact statistics
                table[plan.split] = _group_norm_affine(ops[plan.split].norm, cur.moments, runner.device, runner.dtype)
            runner.tile_group(list(plan.sample), cur, res, table, out)
            for t in range(plan.tiles):
                if t not in plan.sample:
                    runner.tile_group([t], cur, res, table, out)
            del cur, res
    windows = (len(plan.attn_rows) - 1) * (len(plan.attn_cols) - 1) if plan.attn_rows else 1
    if plan.attention == "tile-local" and plan.split < len(ops) and any(o.kind == "attention" for o in ops[plan.split:]):
        windows = plan.tiles  # tile mode: each tile attends within its own window
    report = DecodeReport(
        True, tile_size, plan.overlap, plan.attention, plan.tiles,
        "exact" if plan.exact_norms == plan.norms else "estimated",
        plan.exact_norms, plan.norms, 0 if plan.exact_norms == plan.norms else len(plan.sample),
        plan.memory.total, plan.memory.spilled, windows, plan.memory.spill_traffic,
    )
    return out.to(latents.device), report
