"""The VAE decode's share of the memory budget, fitted after the denoising loop with the decoder's own plan.

`budget.plan_memory` sizes the UNet's tiles before the run with a per-pixel model; here, once the latents
exist, the VAE tile and the decoder's byte budget are chosen from what `vae.plan_decode` says a decode of
that tile holds (times the measured factor below), and with the low-memory policy the UNet's memory is
given to a decode that would otherwise spill whole-image tensors to temporary files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import budget
from .vae import DecodePlan, plan_decode

if TYPE_CHECKING:
    from ..model.loading import Components

#: What a tiled VAE decode really holds, from its own plan (`vae.plan_decode(...).memory.total`):
#: measured on whole full-size fp32 runs, resident ~= 0.5 GiB + 3 x one tile op's planned work (planned
#: 0.24 / 0.35 / 0.80 GiB -> measured 1.09 / ~1.2 / ~2.7 GiB: oneDNN's blocked-layout copies of each
#: conv's input and output, allocator caching, mapped plane pages between releases); whole-image tensors
#: held in RAM count once (the decoder's plan takes the factor as `work_factor`). Raised from 0.5 to
#: 1.25 GiB after 512 px runs peaked at 5.07 and 5.35 GiB in a 5 GiB budget during their decode
#: (2026-12-01, Intel Xeon: the process' own baseline, ~0.4 GiB of libraries, is not in the plan).
TILED_DECODE_FIXED = 5 * 2**28
TILED_DECODE_FACTOR = 3
#: fit_vae_tile tries VAE tiles down to this size (latent pixels) when a smaller tile spills less.
MIN_SPILL_TILE = 64


def tiled_decode_bytes(planned_bytes: int) -> int:
    """Resident bytes of a tiled VAE decode whose own plan (with work_factor=TILED_DECODE_FACTOR) says
    `planned_bytes` (measured model)."""
    return TILED_DECODE_FIXED + planned_bytes


def fit_vae_tile(
    plan_bytes: Callable[[int, int], tuple[int, int]], tile_size: int, free_bytes: int, multiple: int = 8
) -> tuple[int, int]:
    """The VAE tile (<= tile_size) and the decoder's byte budget: the tile whose decode fits `free_bytes`
    and spills the fewest bytes to temporary files, the largest such.

    plan_bytes(tile, max_bytes) -> (the decoder's own planned RAM, bytes it writes to temporary files)
    (`plan_decode(..., work_factor=TILED_DECODE_FACTOR).memory`'s total and spill_traffic). The decoder gets
    max_bytes = free - fixed: it holds whole-image tensors in RAM while they fit next to one tile op's work
    (counted with the measured factor) and spills the rest, so a smaller tile (less work) can hold more of
    them in RAM; tiles below MIN_SPILL_TILE are not tried for that (each op of each tile is a call).
    Stops at `multiple` (the decode then may exceed the budget: it is the smallest tile there is).
    """
    max_bytes = max(1, free_bytes - TILED_DECODE_FIXED)
    t = tile_size
    total, least = plan_bytes(t, max_bytes)
    while t > multiple and tiled_decode_bytes(total) > free_bytes:
        t -= multiple
        total, least = plan_bytes(t, max_bytes)
    best = t
    for smaller in range(t - multiple, min(t, MIN_SPILL_TILE) - 1, -multiple):
        if least == 0:
            break
        total, traffic = plan_bytes(smaller, max_bytes)
        if traffic < least and tiled_decode_bytes(total) <= free_bytes:
            best, least = smaller, traffic
    return best, max_bytes


@dataclass(frozen=True)
class DecodeFit:
    """How the VAE decode runs within what the loop left of the budget."""

    tile_size: int | None  # None: the whole latent at once (the plan has no VAE tile)
    max_bytes: int | None  # the decoder's byte budget for whole-image tensors held in RAM (None: no limit)
    unet_released: bool  # the UNet was dropped to give its memory to the decode


def fit_decode(
    plan: budget.MemoryPlan,
    components: Components,
    latent_hw: tuple[int, int],
    images: int,
    attention_tokens: int,
    release_unet: Callable[[], None] | None = None,
) -> DecodeFit:
    """The VAE tile (<= the plan's) and byte budget whose measured decode cost fits what is left of the
    budget once the weights and the whole-image tensors of `images` latents of `latent_hw` are counted,
    spilling least (`fit_vae_tile`). The whole latent at once when the plan has no VAE tile.

    `release_unet` (the low-memory policy), when given, is called when that decode would still spill to
    temporary files: the caller drops its UNet (`components.unet = None`, the last reference: the caller
    must hold none), its bytes go to the decode, and the tile is fitted again.
    `attention_tokens`: the decoder's global-attention limit (vae_attention_window**2).
    """
    if plan.vae_tile_size is None:
        return DecodeFit(tile_size=None, max_bytes=None, unet_released=False)
    vae = components.vae
    free = plan.budget_bytes - plan.weights_bytes - budget.global_bytes(*latent_hw, images)

    def decode_plan(tile: int, max_bytes: int) -> DecodePlan:
        return plan_decode(vae, latent_hw, tile, batch_size=images, max_attention_tokens=attention_tokens,
                           max_bytes=max_bytes, work_factor=TILED_DECODE_FACTOR)

    def cost(tile: int, max_bytes: int) -> tuple[int, int]:  # planned RAM, bytes written to temporary files
        m = decode_plan(tile, max_bytes).memory
        return m.total, m.spill_traffic

    tile, max_bytes = fit_vae_tile(cost, plan.vae_tile_size, free)
    if release_unet is None or not decode_plan(tile, max_bytes).spill:
        return DecodeFit(tile_size=tile, max_bytes=max_bytes, unet_released=False)
    # Spilling costs 1.2-1.3x the decode's time; the UNet's weights are not needed until the next image:
    # give their memory to the decode instead (the caller reloads the UNet, a few seconds).
    free += budget.weights_bytes(components.unet)
    release_unet()
    budget.release_memory()
    tile, max_bytes = fit_vae_tile(cost, plan.vae_tile_size, free)
    return DecodeFit(tile_size=tile, max_bytes=max_bytes, unet_released=True)
