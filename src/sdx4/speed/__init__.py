"""Speed tricks, behind one door: `install(unet, placement)` puts every trick on a loaded UNet in a stated
order; nothing else in sdx4 patches a model for speed.

Order (each step sees what the previous one left):
1. channels_last.keep_transformer_outputs_channels_last (CPU, channels-last): transformer blocks hand back
   NHWC tensors (no two layout copies around each block).
2. with `compile`: torch.compile the UNet in place, and nothing else (its graph must not see our wrappers).
3. guidance_prefix.install: down blocks that can run the text-free prefix once per guidance pair.
4. prepack.install (CPU only): every Conv2d/Linear packs its weight once into oneDNN's layout.
5. kvcache.install: the cross-attention key/value projections remember their results for the prompt
   (after prepack: it wraps the forward prepack installed).

The allocator (tcmalloc, `speed.allocator`) is process-wide and chosen by the CLI before anything loads.
"""

from __future__ import annotations

from typing import Any


def install(unet: Any, placement: Any, *, compile: bool = False) -> Any:
    """Put every speed trick on `unet` (already placed on its device and dtype), in the order above."""
    from . import guidance_prefix, kvcache, prepack
    from .channels_last import keep_transformer_outputs_channels_last

    if placement.channels_last:
        keep_transformer_outputs_channels_last(unet)
    if compile:
        unet.compile()  # in place: the module keeps its type and config (no prefix wrappers in its graph)
        return unet
    guidance_prefix.install(unet)  # inert until a guided call enters one of guidance_prefix's contexts
    if placement.device.type == "cpu":
        prepack.install(unet)  # each conv/linear packs its weight on first use
    kvcache.install(unet)  # after prepack: wraps the forward it installed
    return unet


def reset(unet: Any) -> None:
    """Forget the per-call state the tricks keep (the key/value cache's remembered inputs and results); the loop
    calls it in a `finally`, so a cancelled or failed run leaves nothing held. No-op for None."""
    from . import kvcache

    kvcache.clear(unet)
