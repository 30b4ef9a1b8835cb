"""STAND-IN for `sdx4.vae_decode` (issue 3 item 2, written on another branch): same interface, no tiling.

The pipeline imports `sdx4.vae_decode.decode_latents` when it exists and this module otherwise; the lead
removes this file once `vae_decode.py` is merged. It decodes the whole latent at once with
`vae.decode`, exactly what the untiled pipeline did before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch


@dataclass(frozen=True)
class DecodeReport:
    tiled: bool
    tile_size: int | None
    overlap: int
    attention: Literal["global", "tile-local"]
    tiles: int


def decode_latents(
    vae: Any,
    latents: torch.Tensor,
    *,
    tile_size: int | None = None,
    overlap: int | None = None,
    max_attention_tokens: int | None = None,
) -> tuple[torch.Tensor, DecodeReport]:
    """B,4,h,w (already divided by scaling_factor) -> B,3,4h,4w in [-1,1]; tiling arguments are ignored."""
    decoded = vae.decode(latents, return_dict=False)[0]
    return decoded, DecodeReport(tiled=False, tile_size=None, overlap=0, attention="global", tiles=1)
