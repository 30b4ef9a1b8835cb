"""Max |tiled - untiled| of `sdx4.vae_decode.decode_latents` on random VAEs (tiny and full-size config), batch 2.

    python benchmarks/vae_decode_exactness.py
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from sdx4.model.random_model import VAE_CONFIGS
from sdx4.engine.vae import decode_latents

CASES = {
    "tiny": [((37, 23), 5), ((37, 23), 8), ((37, 23), 16), ((64, 48), 16)],
    "full": [((37, 23), 8), ((37, 23), 16), ((32, 32), 16), ((48, 40), 24)],
}


def main() -> int:
    for size, cases in CASES.items():
        torch.manual_seed(0)
        vae = AutoencoderKL(**VAE_CONFIGS[size]).eval()
        for (h, w), tile in cases:
            g = torch.Generator().manual_seed(1)
            latents = torch.randn(2, 4, h, w, generator=g) / vae.config.scaling_factor * 0.25
            with torch.no_grad():
                ref = vae.decode(latents).sample
            for kwargs in ({}, {"max_bytes": 1}):  # whole-image tensors in RAM / spilled to temporary files
                out, rep = decode_latents(vae, latents, tile_size=tile, **kwargs)
                print(
                    f"{size:4s} latent {h}x{w} b2 tile {tile:2d} spill={rep.spilled_bytes > 0!s:5s} "
                    f"tiles {rep.tiles:2d} attention {rep.attention} norms {rep.norm_stats} "
                    f"max|diff| {(out - ref).abs().max().item():.2e} (output max |x| {ref.abs().max().item():.2f})",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
