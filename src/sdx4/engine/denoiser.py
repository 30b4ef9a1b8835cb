"""The denoiser the loop calls, composed outside it (k-diffusion's `CFGDenoiser(model)`): small callables with
one signature, `denoise(x, t) -> prediction`, each wrapping the next.

    Guided            n,4,h,w      -> [x, x] -> ... -> uncond + g * (text - uncond)      (guidance pairs)
    LowResConditioned (2)n,4,h,w   -> scheduler-scaled, the noised low-res image concatenated: (2)n,7,h,w
    Tiled             (2)n,7,h,w   -> overlapping tiles merged (tiling.merge_tiled); on CUDA OOM the tile halves
    UNetCalls         k*(2)n,7,th,tw -> the UNet, in calls of the plan's batch, guidance prefix shared

Classifier-free guidance: Ho & Salimans 2022, https://arxiv.org/abs/2207.12598. Tiled denoising of one global
latent: MultiDiffusion, Bar-Tal et al. 2023, https://arxiv.org/abs/2302.08113.

Each object lives for one image (the loop builds them); none keeps anything between images.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..speed import guidance_prefix
from . import budget, tiling

#: denoise(x, t) -> the model's prediction for x at timestep t (same batch and size as x, 4 channels).
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def unet_in_calls(
    unet: Any,
    x: torch.Tensor,
    t: torch.Tensor,
    embeds: torch.Tensor,
    labels: torch.Tensor,
    per_call: int | None,
    pair_half: int | None = None,
    check: Callable[[], None] | None = None,
) -> torch.Tensor:
    """The UNet on batch x (B,7,h,w), `per_call` samples per call (None: all at once). Splitting the
    CFG pair halves the working memory for the same FLOPs (the memory plan asks for it when it saves tiles).
    pair_half: with guidance, samples per half of each pair; in one call, the UNet's text-free prefix
    then runs once per pair when the halves are equal (guidance_prefix).
    check: called before every UNet call; it raises to stop the run there (a cancel takes effect within
    one UNet call, not one step: a tiled step makes many calls)."""
    def call(i: int, j: int) -> torch.Tensor:
        if check is not None:
            check()
        return unet(x[i:j], t, encoder_hidden_states=embeds[i:j], class_labels=labels[i:j], return_dict=False)[0]

    b = x.shape[0]
    pairs = pair_half is not None and guidance_prefix.pairs_equal(x, labels, pair_half)
    if per_call is None or per_call >= b:
        if pairs:
            with guidance_prefix.shared(b // (2 * pair_half), pair_half):
                return call(0, b)
        return call(0, b)
    parts = []
    if pairs and per_call == pair_half:  # each call is one half of a pair: the second replays the first's prefix
        for i in range(0, b, 2 * per_call):
            prefix: list[Any] = []
            with guidance_prefix.recording(prefix):
                parts.append(call(i, i + per_call))
            with guidance_prefix.replaying(prefix):
                parts.append(call(i + per_call, i + 2 * per_call))
            del prefix
    else:
        parts = [call(i, i + per_call) for i in range(0, b, per_call)]
    return torch.cat(parts)  # B,4,h,w


class UNetCalls:
    """The UNet with its conditioning: x is k*B,7,h,w (k tiles of the B = (2)n samples, tile-major), and
    gets the prompt embeddings (B,77,D) and noise levels (B) repeated k times.

    The repeats are made once per k and are the SAME tensors at every step: the UNet's cross-attention
    keys and values are then computed once per k (speed/kvcache.py), not at every step; k = 1 (the
    untiled call) uses the given tensors themselves. `check`, when given, is called before every UNet call
    and raises to stop the run (cancellation between the tiles of a step).
    """

    def __init__(
        self, unet: Any, embeds: torch.Tensor, labels: torch.Tensor, per_call: int | None, pair_half: int | None,
        check: Callable[[], None] | None = None,
    ) -> None:
        self.unet, self.per_call, self.pair_half, self.check = unet, per_call, pair_half, check
        self.batch = embeds.shape[0]
        self.conditioning: dict[int, tuple[torch.Tensor, torch.Tensor]] = {1: (embeds, labels)}

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        k, rest = divmod(x.shape[0], self.batch)
        if rest or not k:
            raise ValueError(f"the UNet's input batch must be a multiple of {self.batch} (its prompt batch); got {tuple(x.shape)}")
        if k not in self.conditioning:
            embeds, labels = self.conditioning[1]
            self.conditioning[k] = (embeds.repeat(k, 1, 1), labels.repeat(k))  # k*B,77,D and k*B
        return unet_in_calls(self.unet, x, t, *self.conditioning[k], self.per_call, self.pair_half, self.check)  # k*B,4,h,w


class Tiled:
    """`model` on overlapping tiles of x, `plan.tile_batch` tiles per call, merged with `blend` weights; one
    call on the whole of x when it fits in one tile (exactly the untiled path: no merge).

    On torch.OutOfMemoryError the tile halves and the step runs again (tiling.retry_on_oom); later steps
    keep the smaller tile. `tile_size` is the tile that worked last and `oom_retries` counts the steps that
    had to shrink it (both go into the run report).
    """

    def __init__(self, model: Denoiser, plan: budget.MemoryPlan, blend: tiling.Blend, multiple: int) -> None:
        self.model, self.plan, self.blend, self.multiple = model, plan, blend, multiple
        self.tile_size = plan.tile_size
        self.oom_retries = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        def predict(size: int) -> torch.Tensor:
            overlap = budget.overlap_for(self.plan, size, self.multiple)
            tiles = tiling.plan_tiles(*x.shape[-2:], size, overlap, self.multiple)
            if len(tiles) == 1:  # the untiled path (one call unless the plan splits the guidance batch)
                return self.model(x, t)
            return tiling.merge_tiled(
                lambda crop: self.model(crop, t), [x], tiles, tile_batch=self.plan.tile_batch, blend=self.blend, overlap=overlap
            )  # B,4,h,w

        pred, size = tiling.retry_on_oom(predict, self.tile_size, min_tile=self.multiple, multiple=self.multiple)
        self.oom_retries += size != self.tile_size
        self.tile_size = size
        return pred


class LowResConditioned:
    """latents B,4,h,w -> the UNet's input B,7,h,w: the scheduler-scaled latents FIRST, then the noised
    low-res image (B,3,h,w, the same at every step), as the x4 upscaler was trained."""

    def __init__(self, model: Denoiser, scheduler: Any, image: torch.Tensor) -> None:
        self.model, self.scheduler, self.image = model, scheduler, image

    def __call__(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = self.scheduler.scale_model_input(latents, t)
        return self.model(torch.cat([x, self.image], dim=1), t)  # B,7,h,w in


class Guided:
    """Classifier-free guidance: the model on [latents, latents] against the [negative, positive] prompt
    batch, combined as uncond + guidance * (text - uncond)."""

    def __init__(self, model: Denoiser, guidance: float) -> None:
        self.model, self.guidance = model, guidance

    def __call__(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        pred = self.model(torch.cat([latents] * 2), t)  # 2n,4,h,w: [negative x n, positive x n]
        pred_uncond, pred_text = pred.chunk(2)
        return pred_uncond + self.guidance * (pred_text - pred_uncond)  # n,4,h,w
