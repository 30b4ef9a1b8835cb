"""The x4 upscaler's pipeline, readable top to bottom.

    encode prompt (CFG) -> image to [-1,1] -> noise it at `noise_level` -> initial latents
    -> loop: scale input, concat [latents, image], UNet(class_labels=noise_level), CFG, scheduler step
    -> VAE decode(latents / 0.08333) -> image

Latent diffusion: Rombach et al. 2022, https://arxiv.org/abs/2112.10752 (the x4 upscaler is its
"LDM-SR" trained by Stability AI). Classifier-free guidance: Ho & Salimans 2022,
https://arxiv.org/abs/2207.12598.

Large images (docs/large-images.md): the UNet runs on overlapping latent tiles of ONE global latent,
merged every step (MultiDiffusion, Bar-Tal et al. 2023, https://arxiv.org/abs/2302.08113); tile size and
batch come from a memory budget (`budget.plan_memory`). When the image fits in one tile the loop is
exactly the untiled one.

Built on diffusers' model/scheduler classes, not on its pipeline class. For the same weights, seed and
parameters (fp32, CPU) the result equals `StableDiffusionUpscalePipeline`'s, because the random draws
happen in the same order: image noise first, then the initial latents, both from one generator.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from .. import speed
from ..model.loading import Components
from ..options import OptionsError, UpscaleOptions
from . import budget, tiling
from .colorfix import color_fix, reference_for
from .denoiser import unet_in_calls
from .prompts import EncodeFn, prompt_embeddings
from .schedulers import make_scheduler
from .vae import decode_latents, plan_decode

log = logging.getLogger("sdx4")

#: progress(step_index_1_based, total_steps). It may raise to cancel: the loop stops at that step.
ProgressFn = Callable[[int, int], None]



def pad_to_multiple(image: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad B,C,H,W on the bottom/right to a multiple (reflect; replicate where too small to reflect).

    diffusers resizes to a multiple instead, which distorts the image; padding and cropping keeps the
    output exactly 4W x 4H. Returns the padded image and the original (H, W).
    """
    h, w = image.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    out = image
    # Reflect padding needs pad < size; for tiny images reflect what we can, then replicate the rest.
    while (ph or pw) and min(out.shape[-2] - 1, ph) + min(out.shape[-1] - 1, pw) > 0:
        rh, rw = min(out.shape[-2] - 1, ph), min(out.shape[-1] - 1, pw)
        out = F.pad(out, (0, rw, 0, rh), mode="reflect")
        ph, pw = ph - rh, pw - rw
    if ph or pw:
        out = F.pad(out, (0, pw, 0, ph), mode="replicate")
    return out, (h, w)


def check_noise_level(components: Components, noise_level: int) -> None:
    if noise_level > components.max_noise_level:
        raise OptionsError(f"noise_level must be in 0..{components.max_noise_level}; got {noise_level}")


@torch.no_grad()
def upscale_tensor(
    components: Components,
    image: torch.Tensor,
    options: UpscaleOptions,
    generator: torch.Generator,
    progress: ProgressFn | None = None,
    timings: dict[str, float] | None = None,
    encode: EncodeFn | None = None,
    *,
    report: dict[str, Any] | None = None,
    release_unet: Callable[[], None] | None = None,
) -> torch.Tensor:
    """1,3,H,W in [-1,1] -> num_images,3,4H,4W in [-1,1] (float32, on CPU). One x4 pass (`options.scale`
    is handled by the caller, see `scale.py`).

    `timings`, when given, receives the seconds spent in each stage (text_encoding, denoising, decoding).
    `report`, when given, receives how the image was tiled and decoded ("tiling", "vae_decode", "color_fix").
    `release_unet`, when given (the low-memory policy), is called after the denoising loop when the VAE
    decode would otherwise spill whole-image tensors to disk: it drops the caller's reference to the UNet
    (`components.unet = None`), whose memory then goes to the decode; the caller loads it again next time.
    """
    clock = _StageClock(components.placement.device, timings)
    if image.ndim != 4 or image.shape[0] != 1 or image.shape[1] != 3:
        raise ValueError(f"image must be 1x3xHxW; got {tuple(image.shape)}")
    check_noise_level(components, options.noise_level)
    unet, vae = components.unet, components.vae
    scheduler = make_scheduler(options.scheduler, components.scheduler.config)  # fresh: no state between images
    device, dtype = components.placement.device, components.placement.unet_dtype
    n = options.num_images

    # 1. Prompt embeddings, CFG order [negative, positive].
    embeds = prompt_embeddings(components, options, encode).to(device=device, dtype=dtype)  # (2)n,77,D
    clock.lap("text_encoding")

    # 2. Low-res image in [-1,1], padded to what the UNet's down/up-sampling needs.
    original = image.float()  # 1,3,h,w  (the colour fix's reference)
    image, (h, w) = pad_to_multiple(image.to(device=device, dtype=dtype), components.pad_multiple)  # 1,3,h',w'
    plan = budget.plan_for(components, options, *image.shape[-2:])

    # 3. Noise the low-res image at `noise_level` (the model was trained on such noised inputs).
    #    This is the FIRST draw from the generator, as in diffusers.
    scheduler.set_timesteps(options.steps, device=device)
    noise_level = torch.tensor([options.noise_level], dtype=torch.long, device=device)
    noise = randn_tensor(image.shape, generator=generator, device=device, dtype=dtype)  # 1,3,h',w'
    image = components.low_res_scheduler.add_noise(image, noise, noise_level)
    batch = 2 * n if options.do_guidance else n
    image = image.repeat(batch, 1, 1, 1)  # (2)n,3,h',w'
    noise_level = noise_level.repeat(batch)  # (2)n

    # 4. Initial latents: the SECOND draw; latent size == image size for this VAE (x4 is all in the UNet's conditioning).
    latent_channels = vae.config.latent_channels
    latents = randn_tensor((n, latent_channels, *image.shape[-2:]), generator=generator, device=device, dtype=dtype)
    latents = latents * scheduler.init_noise_sigma  # n,4,h',w'

    # 5. Denoising loop. The UNet sees the whole latent, or overlapping tiles of it merged with blend
    #    weights (the scheduler step stays global); on CUDA out-of-memory the tile is halved and retried.
    step_kwargs = _step_kwargs(scheduler, generator, options.eta)
    timesteps = scheduler.timesteps
    pair_half = n if options.do_guidance else None  # guidance pairs: [negative x n, positive x n] per tile
    tile_size, retries = plan.tile_size, 0
    # Tiled calls take k tiles' worth of embeddings: the same tensors at every step, so that the UNet's
    # cross-attention keys and values are computed once per k (kvcache.py), not at every step.
    per_k: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        for i, t in enumerate(timesteps):
            model_in = torch.cat([latents] * 2) if options.do_guidance else latents  # (2)n,4,h',w'
            model_in = scheduler.scale_model_input(model_in, t)
            model_in = torch.cat([model_in, image], dim=1)  # (2)n,7,h',w'  latents FIRST

            def unet_fn(x: torch.Tensor, t: torch.Tensor = t) -> torch.Tensor:
                k = x.shape[0] // batch  # x: k*(2)n,7,th,tw, tile-major
                if k not in per_k:
                    per_k[k] = (embeds.repeat(k, 1, 1), noise_level.repeat(k))
                return unet_in_calls(unet, x, t, *per_k[k], plan.unet_batch, pair_half)

            def predict(size: int, model_in: torch.Tensor = model_in) -> torch.Tensor:
                tiles = tiling.plan_tiles(*model_in.shape[-2:], size, budget.overlap_for(plan, size, components.pad_multiple), components.pad_multiple)
                if len(tiles) == 1:  # the untiled path (one call unless the budget splits the CFG batch)
                    return unet_in_calls(unet, model_in, t, embeds, noise_level, plan.unet_batch, pair_half)
                return tiling.merge_tiled(
                    unet_fn,
                    [model_in],
                    tiles,
                    tile_batch=plan.tile_batch,
                    blend=options.tile_blend,
                    overlap=budget.overlap_for(plan, size, components.pad_multiple),
                )

            pred, new_size = tiling.retry_on_oom(predict, tile_size, min_tile=components.pad_multiple, multiple=components.pad_multiple)
            retries += new_size != tile_size
            tile_size = new_size
            if options.do_guidance:
                pred_uncond, pred_text = pred.chunk(2)
                pred = pred_uncond + options.guidance * (pred_text - pred_uncond)  # n,4,h',w'
            latents = scheduler.step(pred, t, latents, **step_kwargs, return_dict=False)[0]
            if progress is not None:
                progress(i + 1, len(timesteps))
    finally:
        speed.reset(unet)  # per-call state (the key/value cache) goes, also when progress() cancels
    per_k.clear()  # the repeated embeddings of the tiled calls
    clock.lap("denoising")

    # 6. Decode in the VAE's precision (fp32: fp16 overflows to NaN), crop the padding away. The loop's
    #    freed activations go back to the OS first (the decode is often the run's memory peak).
    budget.release_memory()
    latents = latents.to(components.placement.vae_dtype) / vae.config.scaling_factor
    # Tiled when the plan says so: exact whole-image GroupNorm statistics, within the budget's activation
    # share (whole-image tensors spill to temp files beyond).
    # Attention global up to vae_attention_window^2 latent pixels, windowed beyond (linear cost).
    vae_tile, vae_bytes, tokens = plan.vae_tile_size, None, options.vae_attention_window**2
    unet_released = False
    if vae_tile is not None:  # the tile (<= the plan's) whose measured decode cost fits what is left, spilling least
        free = plan.budget_bytes - plan.weights_bytes - budget.global_bytes(*latents.shape[-2:], n)
        hw = tuple(latents.shape[-2:])

        def decode_plan(t: int, b: int) -> Any:
            return plan_decode(vae, hw, t, batch_size=n, max_attention_tokens=tokens, max_bytes=b,
                               work_factor=budget.TILED_DECODE_FACTOR)

        def cost(t: int, b: int) -> tuple[int, int]:  # planned RAM, bytes written to temporary files
            m = decode_plan(t, b).memory
            return m.total, m.spill_traffic

        fitted = budget.fit_vae_tile(cost, vae_tile, free)
        if release_unet is not None and decode_plan(*fitted).spill:
            # Spilling costs 1.2-1.3x the decode's time; the UNet's weights are not needed until the next
            # image: give their memory to the decode instead (the caller reloads the UNet, a few seconds).
            free += budget.weights_bytes(unet)
            del unet  # the loop's closures share this reference: the caller's is the last one
            release_unet()
            budget.release_memory()
            unet_released = True
            fitted = budget.fit_vae_tile(cost, vae_tile, free)
        vae_tile, vae_bytes = fitted
    decoded, decode_report = decode_latents(
        vae, latents, tile_size=vae_tile, max_attention_tokens=tokens, max_bytes=vae_bytes,
        work_factor=budget.TILED_DECODE_FACTOR,
    )  # n,3,4h',4w'
    out = decoded[:, :, : 4 * h, : 4 * w].float().cpu()
    clock.lap("decoding")

    # 7. Colour fix against the bicubic-upscaled input (no-op for "none").
    if options.color_fix != "none":
        out = color_fix(out, reference_for(original.cpu(), out.shape[-2:]), options.color_fix)
        clock.lap("color_fix")
    if report is not None:
        final_tiles = tiling.plan_tiles(*image.shape[-2:], tile_size, budget.overlap_for(plan, tile_size, components.pad_multiple), components.pad_multiple)
        report["tiling"] = {
            **plan.describe(),
            "tile_size": min(tile_size, max(image.shape[-2:])),
            "tile_overlap": budget.overlap_for(plan, tile_size, components.pad_multiple) if len(final_tiles) > 1 else 0,
            "tiles": len(final_tiles),
            "tiled": len(final_tiles) > 1,
            "tile_blend": options.tile_blend,
            "oom_retries": retries,
            "latent_size": list(image.shape[-2:]),
            "pad_multiple": components.pad_multiple,
        }
        if options.max_memory is None:
            # The default budget follows the free memory of the moment: not part of the reproducible record.
            report["tiling"]["memory_budget_gib"] = "auto"
        report["vae_decode"] = {**dataclasses.asdict(decode_report), "unet_released": unet_released}
        report["color_fix"] = options.color_fix
    return out



class _StageClock:
    """Wall time per stage; synchronises CUDA so GPU work is attributed to the right stage."""

    def __init__(self, device: torch.device, sink: dict[str, float] | None) -> None:
        import time

        self._now = time.perf_counter
        self.device, self.sink, self.t = device, sink, time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.sink is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = self._now()
        self.sink[stage] = self.sink.get(stage, 0.0) + now - self.t
        self.t = now


def _step_kwargs(scheduler: Any, generator: torch.Generator, eta: float) -> dict[str, Any]:
    """eta / generator only for schedulers whose step() takes them (DDIM takes both)."""
    import inspect

    params = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def to_model_range(rgb_uint8: torch.Tensor) -> torch.Tensor:
    """H,W,3 uint8 -> 1,3,H,W float32 in [-1,1] (diffusers: x/255 * 2 - 1)."""
    x = rgb_uint8.permute(2, 0, 1)[None].float() / 255.0
    return x * 2.0 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """B,3,H,W in [-1,1] -> B,H,W,3 uint8, rounded as diffusers' postprocess does."""
    x = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    return (x * 255).round().to(torch.uint8)

