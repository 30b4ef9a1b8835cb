"""Tiled VAE decoding that matches the untiled decode, in bounded memory.

`decode_latents(vae, latents, tile_size=..)` runs diffusers' own AutoencoderKL decoder modules (post_quant_conv,
conv_in, mid_block, up_blocks, conv_norm_out, conv_act, conv_out) on tiles, with every GroupNorm normalised by
statistics of the WHOLE image. The decoder is written out as a flat list of ops (`program`); each op is
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
Modules, in the order the data flows: `ops` (the decoder as ops, pooled statistics), `plan` (pure planning),
`run` (planes, the tile runner, windowed attention), `decode` (decode_latents and its report).
"""

from .decode import DecodeReport, decode_latents
from .ops import DEFAULT_MAX_ATTENTION_TOKENS, SPILL_SUPPORTED
from .plan import (
    DecodeMemory,
    DecodePlan,
    attention_bounds,
    attention_core,
    estimate_decode_bytes,
    plan_decode,
)

__all__ = [
    "DEFAULT_MAX_ATTENTION_TOKENS",
    "SPILL_SUPPORTED",
    "DecodeMemory",
    "DecodePlan",
    "DecodeReport",
    "attention_bounds",
    "attention_core",
    "decode_latents",
    "estimate_decode_bytes",
    "plan_decode",
]
