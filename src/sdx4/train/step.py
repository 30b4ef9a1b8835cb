"""One training step of the x4 upscaler's recipe, readable top to bottom (docs/training.md):

    high-res crop -> VAE encode x scaling_factor -> latents; noise them at a uniform timestep t
    low-res crop (made from the high-res one by data.py) -> noised at a uniform level in [0, max_noise_level)
    UNet(concat(noisy latents, noised low-res), t, prompt, class_labels=level) -> v; MSE against get_velocity

Every random draw of a sample comes from that sample's own generator, in a fixed order (t, level, low-res
noise, VAE sample, latent noise), so a sample's loss depends only on the weights and its index.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class StepModel:
    """What a step needs: the UNet with its adapter, the frozen VAE and the model's two noise schedules."""

    unet: Any
    vae: Any
    scheduler: Any  # the model's DDIM scheduler (v-prediction): add_noise / get_velocity on its alphas
    low_res_scheduler: Any  # DDPM: add_noise(image, noise, noise_level)
    max_noise_level: int  # levels are drawn from [0, max_noise_level)
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: plain fp32

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """B,H,W,3 uint8 -> B,3,H,W float32 in [-1,1]."""
    return pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0


@dataclass(frozen=True)
class Draws:
    """One sample's random inputs (all on the CPU, float32)."""

    timestep: torch.Tensor  # 1 (long)
    noise_level: torch.Tensor  # 1 (long)
    low_res_noise: torch.Tensor  # 3,h,w
    vae_noise: torch.Tensor  # 4,h,w (the VAE posterior's sample)
    noise: torch.Tensor  # 4,h,w


def draw(generator: torch.Generator, model: StepModel, lr_hw: tuple[int, int]) -> Draws:
    h, w = lr_hw
    num_timesteps = model.scheduler.config.num_train_timesteps
    latent_channels = model.vae.config.latent_channels
    return Draws(
        timestep=torch.randint(0, num_timesteps, (1,), generator=generator),
        noise_level=torch.randint(0, model.max_noise_level, (1,), generator=generator),
        low_res_noise=torch.randn(3, h, w, generator=generator),
        vae_noise=torch.randn(latent_channels, h, w, generator=generator),
        noise=torch.randn(latent_channels, h, w, generator=generator),
    )


def stack(draws: list[Draws]) -> Draws:
    """The draws of a micro-batch, sample by sample along the batch dimension."""
    return Draws(
        timestep=torch.cat([d.timestep for d in draws]),  # B
        noise_level=torch.cat([d.noise_level for d in draws]),  # B
        low_res_noise=torch.stack([d.low_res_noise for d in draws]),  # B,3,h,w
        vae_noise=torch.stack([d.vae_noise for d in draws]),  # B,4,h,w
        noise=torch.stack([d.noise for d in draws]),  # B,4,h,w
    )


def batch_loss(
    model: StepModel, hr: torch.Tensor, lr: torch.Tensor, embeds: torch.Tensor, d: Draws
) -> torch.Tensor:
    """The recipe's loss on one micro-batch. hr: B,H,W,3 uint8; lr: B,H/4,W/4,3 uint8; embeds: B,77,D."""
    dev = model.device
    t, level = d.timestep.to(dev), d.noise_level.to(dev)  # B, B

    # 1. Latents of the high-res crops: a sample of the VAE posterior, scaled as the pipeline unscales them
    #    before decoding (`vae.decode(latents / scaling_factor)`). The VAE is frozen: no graph.
    with torch.no_grad():
        image = to_model_range(hr).to(dev, model.vae.dtype)  # B,3,H,W
        with model.autocast():  # the frozen encoder in the training precision, as diffusers' LoRA script runs it
            posterior = model.vae.encode(image).latent_dist
        mean, std = posterior.mean.float(), posterior.std.float()
        latents = mean + std * d.vae_noise.to(dev)  # B,4,H/4,W/4
        latents = (latents * model.vae.config.scaling_factor).float()

        # 2. Forward diffusion at t (the model's own schedule) and the target: v (or eps for such a model).
        noise = d.noise.to(dev)
        noisy = model.scheduler.add_noise(latents, noise, t)
        if model.scheduler.config.prediction_type == "v_prediction":
            target = model.scheduler.get_velocity(latents, noise, t)
        else:
            target = noise

        # 3. The low-res conditioning, noise-augmented at `level` (the UNet's class label), as at inference.
        low = model.low_res_scheduler.add_noise(
            to_model_range(lr).to(dev), d.low_res_noise.to(dev), level
        )
        unet_input = torch.cat([noisy, low], dim=1)  # B,7,h,w  (latents first)

    # 4. The UNet (only the LoRA weights get gradients) and the loss in fp32.
    with model.autocast():
        pred = model.unet(
            unet_input, t, encoder_hidden_states=embeds.to(dev), class_labels=level
        ).sample
    return F.mse_loss(pred.float(), target.float())
