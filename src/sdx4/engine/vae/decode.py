"""decode_latents: the tiled decode that matches the untiled one, and its report."""


from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .. import budget
from .ops import (
    DEFAULT_MAX_ATTENTION_TOKENS,
    SPILL_SUPPORTED,
    group_norm_affine,
    program,
)
from .plan import (
    attention_bounds,
    build_plan,
    check_args,
    default_attention_overlap,
    op_shapes,
    scale_at,
)
from .run import Plane, Runner, WindowedAttention, mid_attention_processor


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
        convolution's input and output; the pipeline passes its measured factor, see engine/budget.py): the
        budget counts the work this many times, whole-image tensors once.
    """
    check_args(tile_size, overlap, max_attention_tokens, max_bytes, work_factor)
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
        with torch.no_grad(), mid_attention_processor(vae, processor):
            out = vae.decode(latents, return_dict=False)[0]
        norms = sum(isinstance(m, torch.nn.GroupNorm) for m in vae.decoder.modules())
        rows, cols = attention_bounds(h, w, max_attention_tokens, ov)
        windows = (len(rows) - 1) * (len(cols) - 1) if windowed else 1
        return out, DecodeReport(False, None, ov if windowed else 0, "tile-local" if windowed else "global", 1,
                                 "exact", norms, norms, 0, 0, 0, windows)

    ops = program(vae)
    plan = build_plan(op_shapes(ops), (h, w), b, tile_size, overlap, max_attention_tokens, max_bytes,
                 param.element_size(), spill and SPILL_SUPPORTED, work_factor)
    if plan.spill:
        spill_dir = os.fspath(spill_dir) if spill_dir is not None else tempfile.gettempdir()
        if not os.path.isdir(spill_dir):
            raise ValueError(f"spill_dir {spill_dir!r} is not a directory")
    cw = vae.decoder.conv_in.weight
    cl = cw.is_contiguous(memory_format=torch.channels_last) and not cw.is_contiguous()
    fmt = torch.channels_last if cl else torch.contiguous_format
    runner = Runner(ops, plan, param.device, param.dtype, spill_dir if plan.spill else None, fmt)
    with torch.no_grad():
        cur, res = Plane(latents.to(runner.store), fmt=fmt), None
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
            budget.release_memory(collect=False)
        if plan.split == len(ops):
            out = cur.data.contiguous()  # B,3,4h,4w (a channels-last plane on the CPU)
        else:
            total = scale_at(runner.shapes, len(ops))  # 4 for the x4 upscaler's VAE
            out = torch.empty(b, ops[-1].out_channels, total * h, total * w, dtype=param.dtype, device=runner.store)
            table: dict[int, tuple] = {}
            if ops[plan.split].norm is not None:  # its input is a whole-image plane: exact statistics
                table[plan.split] = group_norm_affine(ops[plan.split].norm, cur.moments, runner.device, runner.dtype)
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
