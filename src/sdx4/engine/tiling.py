"""Tiles over a latent: planning, blend weights, running a model function tile by tile, merging.

Pure functions, no state and no torch modules: the pipeline's tiled denoising (MultiDiffusion, Bar-Tal et
al. 2023, https://arxiv.org/abs/2302.08113) is `merge_tiled(model_fn, ...)` once per step on ONE global
latent, so the result does not depend on where tiles fall except through the model itself.

A pointwise model (each output pixel depends only on the same input pixel) gives exactly the untiled
result: predictions are merged as sum(w_i * p_i) / sum(w_i) accumulated in float64, and since every p_i
equals p, the float64 quotient is within 1e-16 of p and rounds back to p exactly in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch

Blend = Literal["uniform", "gaussian", "feather"]
BLENDS: tuple[str, ...] = get_args(Blend)


@dataclass(frozen=True)
class Tile:
    """A half-open latent window [y0, y1) x [x0, x1)."""

    y0: int
    x0: int
    y1: int
    x1: int

    @property
    def h(self) -> int:
        return self.y1 - self.y0

    @property
    def w(self) -> int:
        return self.x1 - self.x0

    def crop(self, t: torch.Tensor) -> torch.Tensor:
        """..., H, W -> ..., h, w (a view)."""
        return t[..., self.y0 : self.y1, self.x0 : self.x1]


def tile_starts(length: int, tile: int, overlap: int, multiple: int = 1) -> list[int]:
    """Start offsets of windows of size min(tile, length) covering [0, length) with >= `overlap` overlap.

    `length` and `tile` must be multiples of `multiple`; every start is one too (the UNet halves the
    latent several times, so windows must stay on that grid). Windows are spread evenly: neighbouring
    starts differ by at most tile - overlap (rounded down to the grid), never more.
    """
    if length < 1 or tile < 1 or multiple < 1:
        raise ValueError(f"length, tile and multiple must be >= 1; got {length}, {tile}, {multiple}")
    if length % multiple or tile % multiple:
        raise ValueError(f"length ({length}) and tile ({tile}) must be multiples of {multiple}")
    if length <= tile:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in 0..{tile - 1} for tile size {tile}; got {overlap}")
    stride = (tile - overlap) // multiple * multiple  # largest allowed gap on the grid
    if stride < multiple:
        raise ValueError(
            f"tile overlap {overlap} leaves no room for a step of {multiple} with tile size {tile}; use overlap <= {tile - multiple}"
        )
    units = (length - tile) // multiple  # the last start, in grid units
    gaps = math.ceil(units * multiple / stride)  # number of steps between first and last window
    # Spread `units` over `gaps` steps as evenly as possible: each step gets floor or ceil of units/gaps.
    return [(i * units // gaps) * multiple for i in range(gaps + 1)]


def plan_tiles(h: int, w: int, tile_size: int, overlap: int, multiple: int = 1) -> list[Tile]:
    """Windows covering an h x w latent, row-major, all of the same shape (min(tile,h) x min(tile,w)).

    `tile_size` is rounded down to `multiple` (at least one `multiple`); h and w must be multiples of
    `multiple` (the pipeline pads the image to it). One tile when the latent fits.
    """
    if h < 1 or w < 1:
        raise ValueError(f"latent size must be at least 1x1; got {h}x{w}")
    if tile_size < 1:
        raise ValueError(f"tile size must be >= 1; got {tile_size}")
    tile = max(multiple, tile_size // multiple * multiple)
    th, tw = min(tile, h), min(tile, w)
    ys = tile_starts(h, tile, overlap, multiple)
    xs = tile_starts(w, tile, overlap, multiple)
    return [Tile(y, x, y + th, x + tw) for y in ys for x in xs]


def blend_weights(h: int, w: int, blend: Blend = "feather", overlap: int = 0) -> torch.Tensor:
    """Per-pixel weights of one h x w tile, float64, all > 0 (merging divides by their sum).

    uniform: all ones (MultiDiffusion's plain average).
    gaussian: exp(-d^2 / 2 s^2) around the tile centre with s = 0.3 x the tile side (Mixture of
      Diffusers, Jimenez 2023, https://arxiv.org/abs/2302.02412, with a wider bell so edges keep ~4%).
    feather: 1 in the middle, a linear ramp down to 1/(overlap+1) over the last `overlap` pixels of
      each side (what ComfyUI's tiled_scale does).
    """
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {', '.join(BLENDS)}; got {blend!r}")
    if h < 1 or w < 1:
        raise ValueError(f"tile must be at least 1x1; got {h}x{w}")

    def axis(n: int) -> torch.Tensor:
        i = torch.arange(n, dtype=torch.float64)
        if blend == "uniform" or n == 1:
            return torch.ones(n, dtype=torch.float64)
        if blend == "gaussian":
            sigma = 0.3 * n
            return torch.exp(-((i - (n - 1) / 2) ** 2) / (2 * sigma**2))
        ramp = max(1, min(overlap, n // 2))
        dist = torch.minimum(i, n - 1 - i) + 1  # 1 at the edges
        return torch.clamp(dist / (ramp + 1), max=1.0)

    return axis(h)[:, None] * axis(w)[None, :]  # h,w


def normalised_weights(tiles: Sequence[Tile], h: int, w: int, blend: Blend, overlap: int) -> torch.Tensor:
    """The weight sum over all tiles at every latent pixel (h x w, float64); > 0 iff tiles cover all."""
    total = torch.zeros(h, w, dtype=torch.float64)
    for t in tiles:
        total[t.y0 : t.y1, t.x0 : t.x1] += blend_weights(t.h, t.w, blend, overlap)
    return total


#: model_fn(*crops) -> prediction. Each crop is k*B,C,th,tw (k tiles concatenated, tile-major);
#: it must return k*B,C_out,th,tw.
ModelFn = Callable[..., torch.Tensor]


def merge_tiled(
    model_fn: ModelFn,
    inputs: Sequence[torch.Tensor],
    tiles: Sequence[Tile],
    *,
    tile_batch: int = 1,
    blend: Blend = "feather",
    overlap: int = 0,
) -> torch.Tensor:
    """Run `model_fn` over `tiles` of `inputs` (each B,C_i,H,W, cropped alike), `tile_batch` tiles per call,
    and merge the predictions: sum_i(w_i * p_i) / sum_i(w_i) per pixel. Returns B,C_out,H,W in the
    prediction's dtype.
    """
    if not inputs:
        raise ValueError("merge_tiled needs at least one input tensor")
    if tile_batch < 1:
        raise ValueError(f"tile_batch must be >= 1; got {tile_batch}")
    b, (h, w) = inputs[0].shape[0], inputs[0].shape[-2:]
    for x in inputs:
        if x.shape[0] != b or x.shape[-2:] != (h, w):
            raise ValueError(f"inputs must share batch and size {b},..,{h},{w}; got {tuple(x.shape)}")
    if not tiles:
        raise ValueError("no tiles to run")
    shapes = {(t.h, t.w) for t in tiles}
    if len(shapes) != 1:
        raise ValueError(f"all tiles must have one shape to be batched; got {sorted(shapes)}")
    total = normalised_weights(tiles, h, w, blend, overlap)
    if not bool((total > 0).all()):
        raise ValueError("tiles do not cover the whole latent")
    # MPS has no float64; there the merge is float32 (close, not bit-exact).
    device = inputs[0].device
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64
    weight = blend_weights(tiles[0].h, tiles[0].w, blend, overlap).to(device, acc_dtype)  # th,tw
    acc: torch.Tensor | None = None
    out_dtype = None
    for start in range(0, len(tiles), tile_batch):
        group = tiles[start : start + tile_batch]
        crops = [torch.cat([t.crop(x) for t in group]) for x in inputs]  # k*B,C_i,th,tw
        pred = model_fn(*crops)  # k*B,C_out,th,tw
        if pred.shape[0] != len(group) * b or pred.shape[-2:] != crops[0].shape[-2:]:
            raise ValueError(f"model_fn returned shape {tuple(pred.shape)} for input {tuple(crops[0].shape)}")
        if acc is None:
            acc = torch.zeros(b, pred.shape[1], h, w, dtype=acc_dtype, device=device)
            out_dtype = pred.dtype
        for k, t in enumerate(group):
            acc[..., t.y0 : t.y1, t.x0 : t.x1] += pred[k * b : (k + 1) * b].to(acc_dtype) * weight
    assert acc is not None and out_dtype is not None
    return (acc / total.to(device, acc_dtype)).to(out_dtype)


def tile_boundaries(tiles: Sequence[Tile], h: int, w: int) -> tuple[list[int], list[int]]:
    """Interior tile edges (rows, columns) in latent coordinates: where a seam could show."""
    rows = sorted({e for t in tiles for e in (t.y0, t.y1) if 0 < e < h})
    cols = sorted({e for t in tiles for e in (t.x0, t.x1) if 0 < e < w})
    return rows, cols


def seam_score(image: torch.Tensor, rows: Sequence[int], cols: Sequence[int], period: int = 1) -> float:
    """Mean gradient magnitude across boundary lines / across the other lines of the same phase (1.0 = no seam).

    image: C,H,W (or H,W). A row boundary r is the step between rows r-1 and r; likewise columns.
    period: compare only with lines at the same position modulo `period` as the boundaries (the x4
    VAE upsamples by nearest-neighbour steps, so every 4th line differs from the others even without
    tiles; latent tile edges always fall on such lines). Raises ValueError when there is nothing to score.
    """
    x = image.double()
    if x.ndim == 2:
        x = x[None]
    dy = (x[:, 1:, :] - x[:, :-1, :]).abs().mean(dim=(0, 2))  # H-1: step into row r at index r-1
    dx = (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=(0, 1))  # W-1
    rows = sorted({r for r in rows if 0 < r < x.shape[1]})
    cols = sorted({c for c in cols if 0 < c < x.shape[2]})
    if not rows and not cols:
        raise ValueError("no tile boundary inside the image: nothing to score")
    row_phases, col_phases = {r % period for r in rows}, {c % period for c in cols}
    on = [dy[r - 1] for r in rows] + [dx[c - 1] for c in cols]
    off = [dy[r - 1] for r in range(1, x.shape[1]) if r % period in row_phases and r not in rows]
    off += [dx[c - 1] for c in range(1, x.shape[2]) if c % period in col_phases and c not in cols]
    if not off:
        raise ValueError("every line of that phase is a boundary: nothing to compare with")
    return float(torch.stack(on).mean() / torch.stack(off).mean())


def retry_on_oom(
    fn: Callable[[int], torch.Tensor], tile_size: int, *, min_tile: int, multiple: int = 1
) -> tuple[torch.Tensor, int]:
    """fn(tile_size); on torch.OutOfMemoryError halve the tile (on the `multiple` grid) and call again.

    Returns (result, the tile size that worked). Any other error propagates untouched, and so does the
    out-of-memory error once the tile cannot shrink below `min_tile` (ComfyUI's tiled_scale does the same).
    """
    while True:
        try:
            return fn(tile_size), tile_size
        except torch.OutOfMemoryError:
            smaller = max(min_tile, tile_size // 2 // multiple * multiple)
            if smaller >= tile_size:
                raise
            import logging

            logging.getLogger("sdx4").warning("out of memory with %d px tiles; retrying with %d px", tile_size, smaller)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            tile_size = smaller
