"""Planning a tiled decode (pure; shared by decode_latents and estimate_decode_bytes): tiles, attention
windows, which whole-image planes stay in RAM and which spill, and the memory all that takes."""


from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .ops import (
    ATTENTION_OVERLAP_SHARE,
    DEFAULT_MAX_ATTENTION_TOKENS,
    QUERY_CHUNK,
    SPILL_SUPPORTED,
    Op,
    program,
)

# ----------------------------------------------------------------------------------------------------------
# Planning (pure; shared by decode_latents and estimate_decode_bytes)


@dataclass(frozen=True)
class OpShape:
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


def even_bounds(n: int, tile: int) -> tuple[int, ...]:
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
    return even_bounds(h, core), even_bounds(w, core)


def receptive_radius(shapes: list[OpShape], start: int = 0) -> int:
    """Context (pixels at ops[start]'s input resolution) that makes the output of ops[start:] exact in a core.

    Attention ops count as 0 (tile mode uses tile-local attention, which is not exact anyway).
    """
    r = 0
    for s in reversed(shapes[start:]):
        r = math.ceil(r / s.up) + s.halo
    return r


def scale_at(shapes: list[OpShape], i: int) -> int:
    return math.prod(s.up for s in shapes[:i])


def plane_lives(shapes: list[OpShape]) -> list[tuple[int, int]]:
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


def build_plan(
    shapes: list[OpShape],
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
    rows, cols = even_bounds(h, tile_size), even_bounds(w, tile_size)
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
        return h * w * scale_at(shapes, i) ** 2

    # Plane mode: bytes held while op i runs (input, output, live residual, global-attention keys/values).
    plane_held, work_plane, kv_ram, res_ch = [], [], [], 0
    for i, s in enumerate(shapes):
        held = px(i) * s.in_channels + px(i) * s.up**2 * s.out_channels + px(i) * res_ch
        side = attn_side if s.kind == "attention" and attention == "tile-local" else core_max
        win = (side * scale_at(shapes, i) + 2 * s.halo) ** 2
        work = win * (2 * s.in_channels + 2 * s.up**2 * s.out_channels + res_ch)
        kv = 0
        if s.kind == "attention" and attention == "global":
            kv = 2 * px(i) * s.in_channels  # keys, values (always in RAM)
            work = QUERY_CHUNK * 4 * s.in_channels
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
        sc = scale_at(shapes, k)
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


def op_shapes(ops: list[Op]) -> list[OpShape]:
    return [OpShape(o.kind, o.in_channels, o.out_channels, o.halo, o.up, o.norm is not None, o.save, o.skip) for o in ops]


def check_args(tile_size: Any, overlap: Any, max_attention_tokens: Any, max_bytes: Any, work_factor: Any = 1) -> None:
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
    check_args(tile_size, overlap, max_attention_tokens, max_bytes, work_factor)
    itemsize = next(vae.parameters()).element_size()
    return build_plan(op_shapes(program(vae)), tuple(latent_hw), batch_size, tile_size, overlap,
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

    from ...model.random_model import VAE_CONFIGS

    h, w = latent_hw
    check_args(tile_size, overlap, max_attention_tokens, max_bytes, work_factor)
    with torch.device("meta"):
        vae = AutoencoderKL(**(vae_config or VAE_CONFIGS["full"]))
    shapes = op_shapes(program(vae))
    if tile_size is None or tile_size >= max(h, w):
        p = build_plan(shapes, (h, w), batch_size, max(h, w), 0, max_attention_tokens, None, itemsize, work_factor=work_factor)
        return p.memory
    return build_plan(
        shapes, (h, w), batch_size, tile_size, overlap, max_attention_tokens, max_bytes, itemsize, spill and SPILL_SUPPORTED,
        work_factor,
    ).memory


