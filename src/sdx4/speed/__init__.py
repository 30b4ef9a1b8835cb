"""Speed tricks, behind one door: `install(unet, placement)` puts every trick on a loaded UNet in a stated
order and returns what it installed (`Installed`); `Installed.uninstall()` takes all of it off again.
Nothing else in sdx4 patches a model for speed.

Order (each step sees what the previous one left):
1. channels_last.keep_transformer_outputs_channels_last (CPU, channels-last): transformer blocks hand back
   NHWC tensors (no two layout copies around each block).
2. with `compile`: torch.compile the UNet in place, and nothing else (its graph must not see our wrappers).
3. guidance_prefix.install: down blocks that can run the text-free prefix once per guidance pair.
4. prepack.install (CPU only): every Conv2d/Linear packs its weight once into oneDNN's layout.
5. kvcache.install: the cross-attention layers get an attention processor (diffusers' hook) that computes
   the prompt's keys and values once per image.

`uninstall` undoes them in the reverse order, each from what its module left on the UNet's submodules (no
second copy of any weight is kept: prepack unpacks its packed weights): afterwards the UNet is diffusers'
plain module, with the weights, forwards and attention processors it was loaded with.

The allocator (tcmalloc, `speed.allocator`) is process-wide and chosen by the CLI before anything loads.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Installed:
    """What `install` put on one UNet (how many modules each trick changed); kept as `Components.speed`."""

    channels_last_blocks: int = 0  # transformer blocks that hand back channels-last tensors
    compiled: bool = False  # torch.compile'd in place (then none of the tricks below)
    guidance_prefix_modules: int = 0  # modules that can run once per guidance pair
    prepacked_layers: int = 0  # Conv2d/Linear layers that pack their weight for oneDNN (0 off the CPU, SDX4_PREPACK=0)
    kv_cached_projections: int = 0  # cross-attention key/value projections computed once per image (2 per layer)
    # The UNet, weakly: a UNet the low-memory policy releases must be freed, not kept alive by its record.
    unet_ref: Any = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, int | bool]:
        """The counts, for reports (the benchmark, metadata)."""
        return {
            "channels_last_blocks": self.channels_last_blocks,
            "compiled": self.compiled,
            "guidance_prefix_modules": self.guidance_prefix_modules,
            "prepacked_layers": self.prepacked_layers,
            "kv_cached_projections": self.kv_cached_projections,
        }

    def uninstall(self) -> None:
        """Take every trick off the UNet: it is diffusers' plain module again, weights, forwards and attention
        processors as loaded. Idempotent; a no-op once the UNet has been freed."""
        unet = self.unet_ref() if self.unet_ref is not None else None
        if unet is not None:
            uninstall(unet)


def install(unet: Any, placement: Any, *, compile: bool = False) -> Installed:
    """Put every speed trick on `unet` (already placed on its device and dtype), in the order above."""
    from . import guidance_prefix, kvcache, prepack
    from .channels_last import keep_transformer_outputs_channels_last

    blocks = keep_transformer_outputs_channels_last(unet) if placement.channels_last else 0
    if compile:
        unet.compile()  # in place: the module keeps its type and config (no prefix wrappers in its graph)
        return Installed(channels_last_blocks=blocks, compiled=True, unet_ref=weakref.ref(unet))
    prefix = guidance_prefix.install(unet)  # inert until a guided call enters one of guidance_prefix's contexts
    packed = prepack.install(unet) if placement.device.type == "cpu" else 0  # each conv/linear packs on first use
    kv = kvcache.install(unet)
    return Installed(
        channels_last_blocks=blocks,
        guidance_prefix_modules=prefix,
        prepacked_layers=packed,
        kv_cached_projections=kv,
        unet_ref=weakref.ref(unet),
    )


def uninstall(unet: Any) -> None:
    """Take every trick `install` puts on off `unet`, in the reverse order (what `Installed.uninstall` does)."""
    from . import channels_last, guidance_prefix, kvcache, prepack

    kvcache.uninstall(unet)
    prepack.uninstall(unet)
    guidance_prefix.uninstall(unet)
    if "_compiled_call_impl" in vars(unet):  # Module.compile() set it; the class's own is None
        del unet._compiled_call_impl
    channels_last.uninstall(unet)


def reset(unet: Any) -> None:
    """Forget the per-call state the tricks keep (the key/value cache's remembered inputs and results); the loop
    calls it in a `finally`, so a cancelled or failed run leaves nothing held. No-op for None."""
    from . import kvcache

    kvcache.clear(unet)
