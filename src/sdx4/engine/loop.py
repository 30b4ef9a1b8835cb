"""The x4 upscaler's pipeline, readable top to bottom.

    encode prompt (CFG) -> image to [-1,1] -> noise it at `noise_level` -> initial latents
    -> loop: pred = denoise(latents, t), scheduler step   (denoise, composed in denoiser.py: CFG pairs
       <- scaled latents concat the noised image <- latent tiles <- UNet(class_labels=noise_level))
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
from ..model.errors import NonFiniteOutputError
from ..model.loading import Components
from ..options import OptionsError, UpscaleOptions
from . import budget, tiling
from .colorfix import color_fix, reference_for
from .decode_fit import TILED_DECODE_FACTOR, DecodeFit, fit_decode
from .denoiser import Denoiser, Guided, LowResConditioned, Tiled, UNetCalls
from .prompts import EncodeFn, prompt_embeddings
from .schedulers import make_scheduler
from .vae import DecodeReport, decode_latents

log = logging.getLogger("sdx4")

#: progress(step_index_1_based, total_steps). It may raise to cancel: the loop stops at that step.
ProgressFn = Callable[[int, int], None]
#: cancel_check() is called before every UNet call (several per step when the step is tiled). It raises to
#: cancel: the loop stops within one UNet call.
CancelCheck = Callable[[], None]


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
    cancel_check: CancelCheck | None = None,
) -> torch.Tensor:
    """1,3,H,W in [-1,1] -> num_images,3,4H,4W in [-1,1] (float32, on CPU). One x4 pass (`options.scale`
    is handled by the caller, see `scale.py`).

    `timings`, when given, receives the seconds spent in each stage (text_encoding, denoising, decoding).
    `report`, when given, receives how the image was tiled and decoded ("tiling", "vae_decode", "color_fix").
    `release_unet`, when given (the low-memory policy), is called after the denoising loop when the VAE
    decode would otherwise spill whole-image tensors to disk: it drops the caller's reference to the UNet
    (`components.unet = None`), whose memory then goes to the decode; the caller loads it again next time.
    `cancel_check`, when given, is called before every UNet call and raises to stop (`progress` is called
    once per step: with tiles a step is many UNet calls).
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

    # 5. The denoiser, composed once (denoiser.py): the UNet in the plan's calls <- on overlapping tiles of
    #    the one global latent, merged (halved on CUDA out-of-memory) <- scaled latents + the noised image
    #    <- classifier-free guidance over the [negative x n, positive x n] pairs.
    unet_calls = UNetCalls(unet, embeds, noise_level, plan.unet_batch, pair_half=n if options.do_guidance else None,
                           check=cancel_check)
    tiled = Tiled(unet_calls, plan, options.tile_blend, components.pad_multiple)
    denoise: Denoiser = LowResConditioned(tiled, scheduler, image)
    if options.do_guidance:
        denoise = Guided(denoise, options.guidance)

    # 6. Denoising loop: the scheduler step stays global, on the whole latent.
    step_kwargs = _step_kwargs(scheduler, generator, options.eta)
    timesteps = scheduler.timesteps
    try:
        for i, t in enumerate(timesteps):
            pred = denoise(latents, t)  # n,4,h',w'
            latents = scheduler.step(pred, t, latents, **step_kwargs, return_dict=False)[0]
            if progress is not None:
                progress(i + 1, len(timesteps))
    finally:
        speed.reset(unet)  # per-call state (the key/value cache) goes, also when progress() cancels
    tile_size, oom_retries = tiled.tile_size, tiled.oom_retries
    # The loop's references to the UNet (a low-memory decode may release it) and the repeated embeddings.
    del unet, unet_calls, tiled, denoise
    clock.lap("denoising")

    # 7. Decode in the VAE's precision (fp32: fp16 overflows to NaN), crop the padding away. The loop's
    #    freed activations go back to the OS first (the decode is often the run's memory peak).
    budget.release_memory()
    latents = latents.to(components.placement.vae_dtype) / vae.config.scaling_factor
    # Tiled when the plan says so: exact whole-image GroupNorm statistics, within what the run left of the
    # budget (whole-image tensors spill to temp files beyond; the UNet may make room, see decode_fit).
    # Attention global up to vae_attention_window^2 latent pixels, windowed beyond (linear cost).
    tokens = options.vae_attention_window**2
    fit = fit_decode(plan, components, tuple(latents.shape[-2:]), n, tokens, release_unet)
    decoded, decode_report = decode_latents(
        vae, latents, tile_size=fit.tile_size, max_attention_tokens=tokens, max_bytes=fit.max_bytes,
        work_factor=TILED_DECODE_FACTOR,
    )  # n,3,4h',4w'
    out = decoded[:, :, : 4 * h, : 4 * w].float().cpu()
    check_finite_image(out)  # NaN/inf would be written as a black image: an error instead (one pass, ~1 ms/MP)
    clock.lap("decoding")

    # 8. Colour fix against the bicubic-upscaled input (no-op for "none").
    if options.color_fix != "none":
        out = color_fix(out, reference_for(original.cpu(), out.shape[-2:]), options.color_fix)
        clock.lap("color_fix")
    if report is not None:
        report.update(run_report(plan, options, tuple(image.shape[-2:]), components.pad_multiple, tile_size,
                                 oom_retries, decode_report, fit))
    return out


def run_report(
    plan: budget.MemoryPlan,
    options: UpscaleOptions,
    latent_hw: tuple[int, int],
    multiple: int,
    tile_size: int,
    oom_retries: int,
    decode_report: DecodeReport,
    fit: DecodeFit,
) -> dict[str, Any]:
    """How one x4 pass ran: {"tiling", "vae_decode", "color_fix"} (metadata keys, in this order).

    tile_size: the UNet tile that worked last (the plan's, or smaller after `oom_retries` out-of-memory retries).
    """
    overlap = budget.overlap_for(plan, tile_size, multiple)
    tiles = len(tiling.plan_tiles(*latent_hw, tile_size, overlap, multiple))
    tiled = {
        **plan.describe(),
        "tile_size": min(tile_size, max(latent_hw)),
        "tile_overlap": overlap if tiles > 1 else 0,
        "tiles": tiles,
        "tiled": tiles > 1,
        "tile_blend": options.tile_blend,
        "oom_retries": oom_retries,
        "latent_size": list(latent_hw),
        "pad_multiple": multiple,
    }
    if options.max_memory is None:
        # The default budget follows the free memory of the moment: not part of the reproducible record.
        tiled["memory_budget_gib"] = "auto"
    return {
        "tiling": tiled,
        "vae_decode": {**dataclasses.asdict(decode_report), "unet_released": fit.unet_released},
        "color_fix": options.color_fix,
    }


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


def check_finite_image(images: torch.Tensor) -> None:
    """Refuse a decoded image (n,3,H,W) with NaN or inf values: saved, they would be black pixels."""
    bad = int((~torch.isfinite(images)).sum())
    if bad:
        raise NonFiniteOutputError(
            f"the decoded image has {bad} non-finite values (NaN or inf) of {images.numel()}; the model overflowed "
            "in this precision or its weights are damaged: try --dtype fp32 --vae-dtype fp32"
        )


def to_model_range(rgb_uint8: torch.Tensor) -> torch.Tensor:
    """H,W,3 uint8 -> 1,3,H,W float32 in [-1,1] (diffusers: x/255 * 2 - 1)."""
    x = rgb_uint8.permute(2, 0, 1)[None].float() / 255.0
    return x * 2.0 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """B,3,H,W in [-1,1] -> B,H,W,3 uint8, rounded as diffusers' postprocess does."""
    x = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    return (x * 255).round().to(torch.uint8)

