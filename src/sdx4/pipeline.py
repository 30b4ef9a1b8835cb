"""The x4 upscaler's pipeline, readable top to bottom.

    encode prompt (CFG) -> image to [-1,1] -> noise it at `noise_level` -> initial latents
    -> loop: scale input, concat [latents, image], UNet(class_labels=noise_level), CFG, scheduler step
    -> VAE decode(latents / 0.08333) -> image

Latent diffusion: Rombach et al. 2022, https://arxiv.org/abs/2112.10752 (the x4 upscaler is its
"LDM-SR" trained by Stability AI). Classifier-free guidance: Ho & Salimans 2022,
https://arxiv.org/abs/2207.12598.

Built on diffusers' model/scheduler classes, not on its pipeline class. For the same weights, seed and
parameters (fp32, CPU) the result equals `StableDiffusionUpscalePipeline`'s, because the random draws
happen in the same order: image noise first, then the initial latents, both from one generator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from .models import Components
from .options import OptionsError, UpscaleOptions
from .schedulers import make_scheduler

#: progress(step_index_1_based, total_steps). It may raise to cancel: the loop stops at that step.
ProgressFn = Callable[[int, int], None]


@torch.no_grad()
def encode_prompt(components: Components, prompt: str) -> torch.Tensor:
    """Prompt -> CLIP text hidden states, 1 x 77 x D (last hidden state, as diffusers uses it)."""
    tok, enc = components.tokenizer, components.text_encoder
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    mask = None
    if getattr(enc.config, "use_attention_mask", False):
        mask = ids.attention_mask.to(enc.device)
    return enc(ids.input_ids.to(enc.device), attention_mask=mask)[0]  # 1,77,D


EncodeFn = Callable[[str], torch.Tensor]


def prompt_embeddings(components: Components, options: UpscaleOptions, encode: EncodeFn | None = None) -> torch.Tensor:
    """The UNet's encoder_hidden_states: [negative x n, positive x n] with guidance, [positive x n] without.

    `encode` (prompt -> 1,77,D) defaults to running the text encoder; the Upscaler passes a cache.
    """
    encode = encode or (lambda text: encode_prompt(components, text))
    n = options.num_images
    cond = encode(options.prompt).repeat(n, 1, 1)  # n,77,D
    if not options.do_guidance:
        return cond
    uncond = encode(options.negative_prompt).repeat(n, 1, 1)  # n,77,D
    return torch.cat([uncond, cond])  # 2n,77,D  (CFG batch order: negative first)


class PromptCache:
    """Prompt -> embeddings, least recently used first out; the text encoder runs once per prompt.

    With `low_memory`, the text encoder is dropped after each use and loaded again from the model
    folder only when a prompt that is not cached arrives (saves ~1.4 GB fp32 between prompts).
    """

    def __init__(self, components: Components, max_entries: int = 32, low_memory: bool = False) -> None:
        import threading
        from collections import OrderedDict

        self.components, self.max_entries, self.low_memory = components, max_entries, low_memory
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.encoder_runs = 0

    def __call__(self, prompt: str) -> torch.Tensor:
        with self._lock:
            if prompt in self._entries:
                self._entries.move_to_end(prompt)
                return self._entries[prompt]
            c = self.components
            if c.text_encoder is None:
                c.text_encoder = c.load_text_encoder()
            emb = encode_prompt(c, prompt).to(c.placement.unet_dtype)  # 1,77,D
            self.encoder_runs += 1
            if self.low_memory:
                c.text_encoder = None
                import gc

                gc.collect()
            self._entries[prompt] = emb
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            return emb


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
) -> torch.Tensor:
    """1,3,H,W in [-1,1] -> num_images,3,4H,4W in [-1,1] (float32, on CPU).

    `timings`, when given, receives the seconds spent in each stage (text_encoding, denoising, decoding).
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
    image, (h, w) = pad_to_multiple(image.to(device=device, dtype=dtype), components.pad_multiple)  # 1,3,h',w'

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

    # 5. Denoising loop.
    step_kwargs = _step_kwargs(scheduler, generator, options.eta)
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        model_in = torch.cat([latents] * 2) if options.do_guidance else latents  # (2)n,4,h',w'
        model_in = scheduler.scale_model_input(model_in, t)
        model_in = torch.cat([model_in, image], dim=1)  # (2)n,7,h',w'  latents FIRST
        pred = unet(model_in, t, encoder_hidden_states=embeds, class_labels=noise_level, return_dict=False)[0]
        if options.do_guidance:
            pred_uncond, pred_text = pred.chunk(2)
            pred = pred_uncond + options.guidance * (pred_text - pred_uncond)  # n,4,h',w'
        latents = scheduler.step(pred, t, latents, **step_kwargs, return_dict=False)[0]
        if progress is not None:
            progress(i + 1, len(timesteps))
    clock.lap("denoising")

    # 6. Decode in the VAE's precision (fp32: fp16 overflows to NaN), crop the padding away.
    latents = latents.to(components.placement.vae_dtype) / vae.config.scaling_factor
    decoded = vae.decode(latents, return_dict=False)[0]  # n,3,4h',4w'
    out = decoded[:, :, : 4 * h, : 4 * w].float().cpu()
    clock.lap("decoding")
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
