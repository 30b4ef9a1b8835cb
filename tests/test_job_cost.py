"""The job cost the service admits by: pure arithmetic over sizes and options (engine/budget.job_cost)."""

from __future__ import annotations

import pytest

from sdx4.engine.budget import _tile_count, job_cost
from sdx4.engine.tiling import tile_starts
from sdx4.options import UpscaleOptions


def test_cost_is_padded_latent_pixels_times_steps_times_samples():
    c = job_cost(100, 60, UpscaleOptions(steps=10, guidance=9.0), multiple=8)
    assert (c.latent_pixels, c.samples, c.passes) == (104 * 64, 2, 1)  # padded to the grid, x2 for guidance
    assert c.megapixel_steps == pytest.approx(104 * 64 * 10 * 2 / 1e6)
    one = job_cost(100, 60, UpscaleOptions(steps=10, guidance=1.0, num_images=3), multiple=8)
    assert one.samples == 3 and one.megapixel_steps == pytest.approx(104 * 64 * 10 * 3 / 1e6)


def test_a_thin_strip_costs_its_padding():
    # 100000 x 1 is 0.1 MP of input, but the UNet sees 100000 x 8 latent pixels per sample and step.
    c = job_cost(100_000, 1, UpscaleOptions(steps=75), multiple=8)
    assert c.latent_pixels == 800_000 and c.megapixel_steps == pytest.approx(0.8 * 75 * 2)


def test_scales_above_four_add_a_pass_and_below_cost_as_four():
    four = job_cost(64, 64, UpscaleOptions(steps=2, scale=4))
    assert job_cost(64, 64, UpscaleOptions(steps=2, scale=2)) == four
    eight = job_cost(64, 64, UpscaleOptions(steps=2, scale=8))  # 64 -> 256 -> down to 128 -> 512
    assert eight.passes == 2 and eight.latent_pixels == 64 * 64 + 128 * 128


def test_explicit_tiles_count_their_overlap_and_classical_costs_nothing():
    opts = UpscaleOptions(steps=1, guidance=1.0, tile_size=64, tile_overlap=16)
    c = job_cost(200, 64, opts)
    assert c.latent_pixels == len(tile_starts(200, 64, 16, 8)) * 64 * 64 > 200 * 64
    assert job_cost(4000, 4000, UpscaleOptions(method="bicubic")).megapixel_steps == 0.0


@pytest.mark.parametrize("length, tile, overlap, m", [(200, 64, 16, 8), (1000, 96, 24, 8), (64, 64, 0, 8), (520, 128, 0, 8), (96, 32, 8, 8)])
def test_tile_count_agrees_with_the_tiler(length, tile, overlap, m):
    assert _tile_count(length, tile, overlap, m) == len(tile_starts(length, tile, overlap, m))


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="at least 1x1; got 0x5"):
        job_cost(0, 5, UpscaleOptions())
