"""Tile planning, blend weights, tiled merging and the out-of-memory retry (pure functions, no model)."""

from __future__ import annotations

import pytest
import torch

from sdx4.engine import tiling
from sdx4.engine.tiling import (
    Tile,
    blend_weights,
    merge_tiled,
    normalised_weights,
    plan_tiles,
    retry_on_oom,
    tile_starts,
)


def _coverage(tiles: list[Tile], h: int, w: int) -> torch.Tensor:
    cover = torch.zeros(h, w, dtype=torch.int64)
    for t in tiles:
        cover[t.y0 : t.y1, t.x0 : t.x1] += 1
    return cover


@pytest.mark.parametrize(
    "h,w,tile,overlap,multiple",
    [
        (37, 53, 16, 5, 1),  # odd sizes
        (1, 50, 8, 3, 1),  # 1 pixel high
        (50, 1, 8, 3, 1),  # 1 pixel wide
        (1, 1, 8, 3, 1),
        (64, 200, 32, 8, 8),  # on the UNet's grid
        (24, 24, 64, 16, 8),  # smaller than a tile
        (128, 136, 64, 56, 8),  # big overlap
        (100, 100, 99, 98, 1),
    ],
)
def test_tiles_cover_everything_on_grid_with_overlap(h, w, tile, overlap, multiple):
    tiles = plan_tiles(h, w, tile, overlap, multiple)
    assert (_coverage(tiles, h, w) >= 1).all()
    shapes = {(t.h, t.w) for t in tiles}
    assert shapes == {(min(tile, h), min(tile, w))}
    for t in tiles:
        assert 0 <= t.y0 < t.y1 <= h and 0 <= t.x0 < t.x1 <= w
        assert t.y0 % multiple == 0 and t.x0 % multiple == 0
    for starts, n in ((sorted({t.y0 for t in tiles}), h), (sorted({t.x0 for t in tiles}), w)):
        size = min(tile, n)
        assert starts[0] == 0 and starts[-1] + size == n
        for a, b in zip(starts, starts[1:]):
            assert a + size - b >= overlap, "neighbouring tiles overlap by less than asked"


def test_image_smaller_than_tile_is_one_tile():
    assert plan_tiles(24, 40, 64, 16, 8) == [Tile(0, 0, 24, 40)]
    assert tile_starts(8, 8, 0, 8) == [0]


def test_tile_counts_are_minimal():
    # 100 px, tile 30, overlap 10: stride <= 20 -> ceil(70 / 20) + 1 = 5 windows.
    assert tile_starts(100, 30, 10, 1) == [0, 17, 35, 52, 70]
    assert tile_starts(64, 32, 0, 8) == [0, 32]
    assert len(plan_tiles(64, 200, 32, 8, 8)) == 3 * 8


@pytest.mark.parametrize(
    "args,match",
    [
        ((30, 8, 0, 8), "multiples of 8"),
        ((32, 16, 16, 8), "overlap must be in 0..15"),
        ((32, 16, 12, 8), "no room"),
        ((0, 8, 0, 1), ">= 1"),
    ],
)
def test_tile_starts_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        tile_starts(*args)


@pytest.mark.parametrize("blend", tiling.BLENDS)
def test_blend_weights_positive_and_normalise_to_one(blend):
    h, w, tile, overlap = 40, 72, 24, 8
    tiles = plan_tiles(h, w, tile, overlap, 8)
    total = normalised_weights(tiles, h, w, blend, overlap)
    share = torch.zeros(h, w, dtype=torch.float64)
    for t in tiles:
        wt = blend_weights(t.h, t.w, blend, overlap)
        assert (wt > 0).all() and wt.dtype == torch.float64
        share[t.y0 : t.y1, t.x0 : t.x1] += wt / total[t.y0 : t.y1, t.x0 : t.x1]
    torch.testing.assert_close(share, torch.ones(h, w, dtype=torch.float64), rtol=0, atol=1e-12)


def test_blend_shapes():
    g = blend_weights(9, 9, "gaussian")
    assert g[4, 4] == g.max() and g[0, 0] == g.min() and g[0, 0] > 0.01
    f = blend_weights(16, 16, "feather", overlap=4)
    assert f[8, 8] == 1.0 and f[0, 8] == pytest.approx(1 / 5) and f[0, 0] == pytest.approx(1 / 25)
    assert torch.equal(blend_weights(5, 7, "uniform"), torch.ones(5, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="blend must be one of uniform, gaussian, feather"):
        blend_weights(4, 4, "cosine")


def _pointwise(x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """k*B,4,h,w and k*B,3,h,w -> k*B,2,h,w; each output pixel depends on the same input pixel only."""
    return torch.stack([torch.sin(3 * x[:, 0]) * cond[:, 1] + x[:, 2] ** 2, x[:, 3] * 0.37 - cond[:, 0]], dim=1)


@pytest.mark.parametrize("blend", tiling.BLENDS)
@pytest.mark.parametrize("tile,overlap,multiple,batch", [(16, 4, 8, 1), (24, 16, 8, 3), (7, 3, 1, 2), (13, 12, 1, 50)])
def test_pointwise_model_is_exactly_untiled(blend, tile, overlap, multiple, batch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 40, 56, generator=g)
    cond = torch.randn(2, 3, 40, 56, generator=g)
    tiles = plan_tiles(40, 56, tile, overlap, multiple)
    assert len(tiles) > 4
    out = merge_tiled(_pointwise, [x, cond], tiles, tile_batch=batch, blend=blend, overlap=overlap)
    assert out.dtype == torch.float32 and out.shape == (2, 2, 40, 56)
    assert torch.equal(out, _pointwise(x, cond))


def test_pointwise_result_does_not_depend_on_layout():
    x = torch.randn(1, 4, 48, 48, generator=torch.Generator().manual_seed(1))
    cond = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    results = [
        merge_tiled(_pointwise, [x, cond], plan_tiles(48, 48, t, o, 8), tile_batch=b, blend=bl, overlap=o)
        for t, o, b, bl in [(16, 8, 1, "gaussian"), (24, 8, 2, "uniform"), (32, 16, 4, "feather"), (48, 0, 1, "gaussian")]
    ]
    for r in results[1:]:
        assert torch.equal(r, results[0])


def test_non_pointwise_model_differs_when_tiled():
    """The exactness above is a property of pointwise models: a 3x3 blur does see the tile edges."""
    conv = lambda x: torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1)  # noqa: E731
    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    tiled = merge_tiled(conv, [x], plan_tiles(32, 32, 16, 8, 8), blend="uniform", overlap=8)
    assert not torch.allclose(tiled, conv(x), atol=1e-3)


def test_merge_rejects_mismatched_inputs_and_outputs():
    tiles = plan_tiles(16, 16, 8, 0, 8)
    with pytest.raises(ValueError, match="share batch and size"):
        merge_tiled(_pointwise, [torch.zeros(1, 4, 16, 16), torch.zeros(1, 3, 16, 8)], tiles)
    with pytest.raises(ValueError, match="model_fn returned shape"):
        merge_tiled(lambda x: x[:1], [torch.zeros(1, 4, 16, 16)], tiles, tile_batch=2)
    with pytest.raises(ValueError, match="do not cover"):
        merge_tiled(lambda x: x, [torch.zeros(1, 4, 16, 16)], tiles[:1])


class _FailOnce:
    def __init__(self, error: BaseException, times: int = 1) -> None:
        self.error, self.times, self.sizes = error, times, []

    def __call__(self, tile: int) -> torch.Tensor:
        self.sizes.append(tile)
        if len(self.sizes) <= self.times:
            raise self.error
        return torch.full((1,), float(tile))


def test_oom_halves_tile_and_retries():
    fn = _FailOnce(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    out, tile = retry_on_oom(fn, 96, min_tile=8, multiple=8)
    assert fn.sizes == [96, 48] and tile == 48 and out.item() == 48.0


def test_oom_halving_stays_on_grid_and_gives_up_at_min_tile():
    fn = _FailOnce(torch.OutOfMemoryError("out of memory"), times=99)
    with pytest.raises(torch.OutOfMemoryError):
        retry_on_oom(fn, 100, min_tile=8, multiple=8)
    assert fn.sizes == [100, 48, 24, 8]


def test_other_errors_propagate_untouched():
    err = RuntimeError("shape mismatch in conv")
    fn = _FailOnce(err)
    with pytest.raises(RuntimeError) as info:
        retry_on_oom(fn, 64, min_tile=8, multiple=8)
    assert info.value is err and fn.sizes == [64]


def test_seam_score():
    g = torch.Generator().manual_seed(0)
    smooth = torch.randn(3, 64, 64, generator=g)
    assert tiling.seam_score(smooth, [32], [16, 48]) == pytest.approx(1.0, abs=0.15)
    seamed = smooth.clone()
    seamed[:, :, 32:] += 2.0  # a visible step at column 32
    assert tiling.seam_score(seamed, [], [32]) > 1.5
    rows, cols = tiling.tile_boundaries(plan_tiles(64, 64, 32, 16, 8), 64, 64)
    assert rows == [16, 32, 48] and cols == [16, 32, 48]
    # Period: a grid of stronger steps every 4th column (like the VAE's upsampling) is not a seam.
    grid = smooth.clone()
    grid[:, :, ::4] += 2.0
    assert tiling.seam_score(grid, [], [32], period=1) > 1.25
    assert tiling.seam_score(grid, [], [32], period=4) == pytest.approx(1.0, abs=0.2)
    with pytest.raises(ValueError, match="no tile boundary"):
        tiling.seam_score(smooth, [], [0, 64])
