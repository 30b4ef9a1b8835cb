"""The VAE decode's fit after the loop (engine/decode_fit.py) alone, with the tiny model's VAE and its own plan."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from sdx4.engine import budget
from sdx4.engine.budget import MemoryPlan
from sdx4.engine.decode_fit import TILED_DECODE_FIXED, DecodeFit, fit_decode

HW = (160, 160)
WEIGHTS = 3 * 2**30


def _plan(vae_tile: int | None, spare: int) -> MemoryPlan:
    """A plan whose budget leaves `spare` bytes past the weights, the whole-image tensors and the decode's fixed part."""
    total = WEIGHTS + budget.global_bytes(*HW, 1) + TILED_DECODE_FIXED + spare
    return MemoryPlan(tile_size=160, tile_limit=160, tile_overlap=0, tile_batch=1, tiles=1, vae_tile_size=vae_tile,
                      estimate_bytes=0, budget_bytes=total, weights_bytes=WEIGHTS)


def _model(vae):
    components = SimpleNamespace(vae=vae, unet=torch.nn.Linear(64, 64))  # the UNet stand-in: 16640 bytes
    released = []

    def release_unet():
        released.append(components.unet)
        components.unet = None

    return components, released, release_unet


def test_no_vae_tile_in_the_plan_decodes_the_whole_latent_and_keeps_the_unet(tiny_upscaler):
    components, released, release = _model(tiny_upscaler.components.vae)
    fit = fit_decode(_plan(None, 2**20), components, HW, 1, 128 * 128, release)
    assert fit == DecodeFit(tile_size=None, max_bytes=None, unet_released=False)
    assert released == [] and components.unet is not None


def test_a_decode_that_would_spill_gets_the_unets_memory_only_when_it_may_release_it(tiny_upscaler):
    vae = tiny_upscaler.components.vae
    components, released, release = _model(vae)
    kept = fit_decode(_plan(160, 2**20), components, HW, 1, 128 * 128)  # no release_unet: the keep policy
    assert kept.max_bytes == 2**20 and not kept.unet_released and kept.tile_size <= 160
    unet_bytes = budget.weights_bytes(components.unet)
    assert unet_bytes == (64 * 64 + 64) * 4
    fit = fit_decode(_plan(160, 2**20), components, HW, 1, 128 * 128, release)
    assert fit.unet_released and len(released) == 1 and components.unet is None
    assert fit.max_bytes == 2**20 + unet_bytes  # its memory went to the decode


def test_a_decode_that_fits_keeps_the_unet(tiny_upscaler):
    components, released, release = _model(tiny_upscaler.components.vae)
    fit = fit_decode(_plan(160, 64 * 2**30), components, HW, 1, 128 * 128, release)
    assert fit == DecodeFit(tile_size=160, max_bytes=64 * 2**30, unet_released=False)
    assert released == []
