"""The Python API: `sdx4.load()` returns an `Upscaler`; calling it upscales one image.

    import sdx4
    up = sdx4.load()                                   # Hub id, cache, device and dtype chosen for you
    result = up("photo.png", prompt="a cat", seed=1)   # or a PIL image / numpy array / tensor
    result.images[0].save("photo_x4.png")
    result.metadata                                    # every parameter, the seed included

Entry points (CLI, server, batch) build a `LoadOptions` and an `UpscaleOptions` and call `load` and an
`Upscaler`; none reaches inside. The errors they catch are re-exported here (`MemoryBudgetError`, the model
errors), so that no front end imports the engine or the model.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ._version import __version__

# Re-exported for the front ends (cli/, batch/, service/, quality/), which import nothing from the engine
# or the model: the errors of loading and of the memory plan (none of these modules imports torch).
from .engine.budget import MemoryBudgetError  # noqa: F401
from .engine.classical import ALPHA_FILTER, resize, upscale_classical
from .imageio import (
    LoadedImage,
    as_loaded,
    attach_alpha,
    check_bit_depth,
    output_mode,
    profile_fits,
    to_output_mode,
)
from .metadata import VERSION_KEY, classical_metadata, gan_metadata, sd_metadata
from .model.errors import (  # noqa: F401
    ModelConfigError,
    ModelNotFoundError,
    ModelPathError,
    NonFiniteOutputError,
)
from .options import (
    DEFAULT_MODEL,
    GAN_METHODS,
    LoadOptions,
    OptionsError,
    UpscaleOptions,
    option_defaults,
)
from .speed import allocator

SCALE = 4


@dataclass(frozen=True)
class UpscaleResult:
    """The upscaled image(s) of one input, and the parameters that made them."""

    images: list[Image.Image]
    metadata: dict[str, Any] = field(default_factory=dict)
    #: The input's ICC profile and EXIF (orientation set to 1): writers embed them (`imageio.save_image`'s
    #: icc_profile= and exif=); the pixels are the input's, never converted between profiles.
    icc_profile: bytes | None = None
    exif: bytes | None = None

    @property
    def image(self) -> Image.Image:
        return self.images[0]

    @property
    def seed(self) -> int | None:
        return self.metadata.get("seed")


def _options(options: UpscaleOptions | None, overrides: dict[str, Any]) -> UpscaleOptions:
    base = options if options is not None else UpscaleOptions()
    return base.replace(**overrides) if overrides else base


def local_model_missing(model: str) -> bool:
    """Whether `model` is clearly a local folder (the rule of `model.hub.looks_like_path`: `./x`, `/x`, `~/x`,
    `a/b/c`, `C:\\x`) that does not exist: front ends check a job with it before any work (a Ray actor would
    only fail once the cluster has started it). A Hub id is never missing here; loading checks the rest."""
    from pathlib import Path

    from .model.hub import looks_like_path  # no torch there

    return looks_like_path(model) and not Path(model).expanduser().exists()


def make_result(images: list[Image.Image], loaded: LoadedImage, options: UpscaleOptions, metadata: dict[str, Any]) -> UpscaleResult:
    """The result of upscaling `loaded`: the images in the input's colour mode (grayscale stays grayscale
    unless options.color_mode is "rgb"), with the input's ICC profile and EXIF to be written with them.
    They also go in each image's `info`: PIL's own `save` embeds the profile from there (EXIF only when
    passed, `im.save(path, exif=result.exif)`)."""
    mode = output_mode(loaded, options.color_mode)
    images = [im if im.mode.startswith("I;16") else to_output_mode(im, mode) for im in images]
    icc = loaded.icc_profile if profile_fits(loaded.icc_profile, mode) else None
    for im in images:
        if icc:
            im.info["icc_profile"] = icc
        if loaded.exif:
            im.info["exif"] = loaded.exif
    return UpscaleResult(images=images, metadata=metadata, icc_profile=icc, exif=loaded.exif)


def grey16_classical(loaded: LoadedImage, method: str, scale: int, size: tuple[int, int] | None = None) -> Image.Image:
    """A 16-bit grey output by a classical filter: the input's own 16-bit values (8-bit ones x 257) resized
    in float32 (Pillow's mode F), rounded to uint16 (mode I;16). `size`: the output size (default scale x input)."""
    import numpy as np

    values = loaded.grey16 if loaded.grey16 is not None else np.asarray(loaded.rgb.convert("L"), np.uint16) * 257
    w, h = loaded.size
    out = resize(Image.fromarray(values.astype(np.float32)), size or (scale * w, scale * h), method)
    return Image.fromarray(np.clip(np.rint(np.asarray(out)), 0, 65535).astype(np.uint16))


def upscale_classical_result(image: Any, options: UpscaleOptions) -> UpscaleResult:
    """A classical method through the same result type (no model, no torch); Real-ESRGAN too (its net is
    loaded once per process, engine/gan.py)."""
    if options.method in GAN_METHODS:
        return upscale_gan_result(image, options)
    loaded = as_loaded(image)
    check_bit_depth(loaded, options.bit_depth, options.color_mode)
    size = options.output_size(loaded.size)  # OptionsError for a width/height out of range, before any work
    t0 = time.perf_counter()
    if options.bit_depth == 16:
        out = grey16_classical(loaded, options.method, options.scale, size)
    else:
        out = upscale_classical(loaded, options.method, options.scale, size)
    return make_result([out], loaded, options, classical_metadata(options, loaded, time.perf_counter() - t0))


def check_method(method: str) -> None:
    """OptionsError (option "method") now, before any work, when `method` cannot run on this installation:
    Real-ESRGAN without the optional extra sdx4[gan] (the message names `pip install -e ".[gan]"`)."""
    if method in GAN_METHODS:
        from .engine.gan import check_available

        check_available(method)


def upscale_gan_result(image: Any, options: UpscaleOptions) -> UpscaleResult:
    """Real-ESRGAN (methods realesrgan, realesrgan-anime) through the same result type: RGB by the network
    (x4 passes, then a Lanczos downsample to the exact size), alpha resized apart with ALPHA_FILTER."""
    from .engine.gan import upscale_gan

    check_method(options.method)
    loaded = as_loaded(image)
    check_bit_depth(loaded, options.bit_depth, options.color_mode)
    size = options.output_size(loaded.size)
    rgb, run = upscale_gan(loaded.rgb, options.method, size, options.tile_size, options.tile_overlap)
    alpha = resize(loaded.alpha, size, ALPHA_FILTER) if loaded.alpha is not None else None
    out = attach_alpha(rgb, alpha)
    return make_result([out], loaded, options, gan_metadata(options, loaded, run, alpha_filter=ALPHA_FILTER))


def upscale(image: Any, options: UpscaleOptions | None = None, **overrides: Any) -> UpscaleResult:
    """Upscaling without the diffusion model: `sdx4.upscale(img, method="lanczos")` (a classical filter) or
    `method="realesrgan"` (Real-ESRGAN, the optional extra sdx4[gan])."""
    opts = _options(options, overrides)
    if opts.method == "sd":
        raise OptionsError("method 'sd' needs the model: use sdx4.load() and call the upscaler it returns", option="method")
    return upscale_classical_result(image, opts)


class Upscaler:
    """Holds the loaded model; call it with an image and options. One image per call."""

    def __init__(self, components: Any, low_memory: bool | None = None) -> None:
        from .engine.prompts import PromptCache

        self.components = components
        self.low_memory = default_low_memory(components.placement.device.type) if low_memory is None else low_memory
        # Prompt embeddings are cached per prompt: a batch with one prompt encodes it once. With the
        # low-memory policy the text encoder is dropped once a call's prompts are encoded.
        self.prompt_cache = PromptCache(components, low_memory=self.low_memory)
        #: Times the UNet was loaded again after the low-memory policy released it for a large decode.
        self.unet_loads = 0

    def encode_prompts(self, prompts: list[str]) -> None:
        """Encode these prompts now, in one go (the cache keeps the last 32): with the low-memory policy
        the text encoder is then loaded at most once for all of them."""
        self.prompt_cache(prompts)

    def _release_unet(self) -> None:
        self.components.unet = None

    def _ensure_unet(self) -> None:
        """Load the UNet again when the low-memory policy released it for the last large decode."""
        if self.components.unet is None:
            self.components.unet = self.components.load_unet()
            self.unet_loads += 1

    @property
    def info(self) -> dict[str, Any]:
        c = self.components
        return {
            "model": c.model,
            "random_weights": c.random_weights,
            "max_noise_level": c.max_noise_level,
            **c.placement.describe(),
            "low_memory": self.low_memory,
            VERSION_KEY: __version__,  # the key metadata.py owns
        }

    def describe(self, seconds: float) -> list[str]:
        """What was loaded, for people: the "loaded MODEL on DEVICE (DTYPE) in N s" line, and a warning
        when the weights are random (the front ends print these lines as they are)."""
        info = self.info
        lines = [f"loaded {info['model']} on {info['device']} ({info['unet_dtype']}) in {seconds:.1f} s"]
        if info["random_weights"]:
            lines.append("warning: this model has RANDOM WEIGHTS (made for tests/benchmarks); its output is noise")
        return lines

    def check(self, options: UpscaleOptions, size: tuple[int, int]) -> None:
        """Raise MemoryBudgetError now, before any heavy work, when a pass over a `size` = (width, height)
        input cannot fit the memory budget (`options.max_memory`, weights included). The classical methods
        use no model: nothing to check."""
        if options.method != "sd":
            return
        from .engine.budget import check_memory

        check_memory(self.components, options, *size)

    def cost(self, options: UpscaleOptions, size: tuple[int, int]) -> Any:
        """What a `size` = (width, height) input with `options` costs, before any work: a `JobCost` whose
        `megapixel_steps` is the UNet's work (latent megapixels x samples x steps over every x4 pass,
        padding and explicit tiles included; engine/budget.py's `job_cost`). Classical methods cost 0."""
        from .engine.budget import job_cost

        return job_cost(size[0], size[1], options, self.components.pad_multiple)

    def __call__(
        self,
        image: Any,
        options: UpscaleOptions | None = None,
        *,
        progress: Any = None,
        cancel_check: Any = None,
        **overrides: Any,
    ) -> UpscaleResult:
        """Upscale one image (path, PIL, numpy HWC uint8/float, or tensor CHW) by exactly `scale` (default 4).

        `options` (or keyword overrides such as prompt=..., seed=...) set the parameters; a missing
        seed is drawn at random and reported in `result.metadata["seed"]`. `progress(i, n)` is called
        after each denoising step and may raise to cancel; `cancel_check()` is called before every UNet call
        (a tiled step makes many) and may raise to cancel within one UNet call.
        """
        opts = _options(options, overrides)
        if opts.method != "sd":
            return upscale_classical_result(image, opts)
        loaded = as_loaded(image)
        check_bit_depth(loaded, opts.bit_depth, opts.color_mode)
        opts.output_size(loaded.size)  # a width/height out of range: OptionsError before any work
        opts = opts.with_seed()
        return self._upscale_sd(loaded, opts, progress, cancel_check)

    def _upscale_sd(self, loaded: LoadedImage, opts: UpscaleOptions, progress: Any, cancel_check: Any = None) -> UpscaleResult:
        import numpy as np
        import torch

        from .engine.loop import to_model_range, to_uint8, upscale_tensor
        from .engine.scale import upscale_to

        t0 = time.perf_counter()
        # With the low-memory policy a decode that would spill to disk gets the UNet's memory instead
        # (not with --compile: a reloaded UNet would be compiled again, minutes on a CPU).
        release = self._release_unet if self.low_memory and not self.components.compiled else None
        generator = torch.Generator("cpu").manual_seed(opts.seed)
        timings: dict[str, float] = {}
        reports: list[dict[str, Any]] = []
        rgb: list[Image.Image] = []
        # Each generated image goes through its own passes (scale != 4 needs several x4 passes or a
        # downsample); with scale 4 this is one pass over all num_images at once, as diffusers does.
        target = opts.output_size(loaded.size)
        if target == (SCALE * loaded.size[0], SCALE * loaded.size[1]):
            pixels = torch.from_numpy(np.array(loaded.rgb, dtype=np.uint8))  # H,W,3
            report: dict[str, Any] = {}
            self._ensure_unet()
            out = upscale_tensor(self.components, to_model_range(pixels), opts, generator, progress, timings,
                                 encode=self.prompt_cache, report=report, release_unet=release,
                                 cancel_check=cancel_check)
            if opts.bit_depth == 16:  # grey (check_bit_depth): ITU-R 601 luma of the float output
                x = (out.float() / 2 + 0.5).clamp(0, 1)  # B,3,H,W
                luma = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]) * 65535  # B,H,W
                rgb = [Image.fromarray(a.round().to(torch.int32).numpy().astype(np.uint16)) for a in luma]
            else:
                rgb = [Image.fromarray(a.numpy(), "RGB") for a in to_uint8(out)]
            reports.append(report)
            passes = 1
        else:
            one = opts.replace(num_images=1)
            for _ in range(opts.num_images):

                def one_pass(im: Image.Image) -> Image.Image:
                    pixels = torch.from_numpy(np.array(im.convert("RGB"), dtype=np.uint8))  # H,W,3
                    report: dict[str, Any] = {}
                    self._ensure_unet()  # released by the previous pass's decode
                    out = upscale_tensor(self.components, to_model_range(pixels), one, generator, progress, timings,
                                         encode=self.prompt_cache, report=report, release_unet=release,
                                         cancel_check=cancel_check)
                    reports.append(report)
                    return Image.fromarray(to_uint8(out)[0].numpy(), "RGB")

                image, passes = upscale_to(loaded.rgb, target, one_pass)
                rgb.append(image)
        alpha = None
        if loaded.alpha is not None:
            alpha = resize(loaded.alpha, rgb[0].size, ALPHA_FILTER)
        images = [attach_alpha(im, alpha) for im in rgb]
        meta = sd_metadata(
            opts,
            loaded,
            self.info,
            passes=passes,
            report=reports[-1],  # how the last pass was tiled and decoded
            alpha_filter=ALPHA_FILTER,
            allocator=allocator.active(),  # tcmalloc or system (sdx4.speed.allocator): part of the speed
            seconds=time.perf_counter() - t0,
            timings=timings,
        )
        return make_result(images, loaded, opts, meta)


def default_low_memory(device_type: str) -> bool:
    """The text-encoder policy when none is given: drop it after encoding on the CPU (RAM is what limits
    image size there, and the UNet's run dwarfs a reload), keep it on GPUs (a reload costs more than a run)."""
    return device_type == "cpu"


def load(
    model: str | LoadOptions | None = None,
    device: str = "auto",
    dtype: str = "auto",
    *,
    vae_dtype: str = "fp32",
    low_memory: bool | None = None,
    compile: bool = False,
    prompts: Sequence[str] | None = None,
) -> Upscaler:
    """Load the x4 upscaler from a Hub id (default: the published model) or a local diffusers folder.

    `sdx4.load(LoadOptions(...))` or `sdx4.load(model, device, dtype, vae_dtype=..., low_memory=...,
    compile=...)`: the same options either way, documented (with their defaults) in `LoadOptions`;
    `model` None or "" = the published model. With a LoadOptions the other load keywords stay unset
    (change the options with `.replace(...)`).
    prompts: with the low-memory policy, the texts to encode before the UNet is loaded (default: the
    default prompt and negative prompt, ""); the text encoder is then dropped, so that it and the UNet are
    never in memory together (fp32, measured: peak 3.76 -> 2.81 GiB). Other prompts load it again when
    they come. Ignored when the text encoder is kept (the GPU default): it encodes on the first call.
    """
    if isinstance(model, LoadOptions):
        given = {"device": device, "dtype": dtype, "vae_dtype": vae_dtype, "low_memory": low_memory, "compile": compile}
        defaults = option_defaults(LoadOptions)
        extra = [name for name, value in given.items() if value != defaults[name]]
        if extra:
            raise TypeError(
                f"sdx4.load(LoadOptions(...)) takes no {', '.join(extra)} keyword; use LoadOptions(...).replace({extra[0]}=...)"
            )
        options = model
    else:
        options = LoadOptions(
            model=model or DEFAULT_MODEL,
            device=device,
            dtype=dtype,
            vae_dtype=vae_dtype,
            low_memory=low_memory,
            compile=compile,
        )
    return _load(options, prompts)


def _load(options: LoadOptions, prompts: Sequence[str] | None) -> Upscaler:
    """The one loading path of `load`, whichever way its options came."""
    from .engine.prompts import check_prompts
    from .model.loading import load_components

    first = UpscaleOptions().text_prompts if prompts is None else check_prompts(prompts)  # checked before loading
    made: list[Upscaler] = []

    def encode_first(components: Any) -> None:
        up = Upscaler(components, low_memory=options.low_memory)
        if up.low_memory:
            up.encode_prompts(first)
            up.prompt_cache.drop_encoder()  # also when every prompt was already cached (or none given)
        made.append(up)

    load_components(
        options.model,
        device=options.device,
        dtype=options.dtype,
        vae_dtype=options.vae_dtype,
        compile=options.compile,
        before_denoiser=encode_first,
    )
    return made[0]


def quiet_libraries() -> None:
    """Silence the libraries' progress bars ("Loading weights") and info logs: noise in a command line or
    a Ray worker's log. Process-wide (the libraries' own switches); call it before `load`."""
    import logging

    for name in ("transformers", "diffusers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import diffusers.utils.logging as dl
        import transformers.utils.logging as tl

        tl.disable_progress_bar()
        dl.disable_progress_bar()
    except Exception:  # pragma: no cover - only cosmetics
        pass
