"""The user's options: one frozen, typed object that holds every setting and its default.

Defaults live here and nowhere else; the CLI, the API and the server read them from this class, so
help texts and docstrings cannot drift from the code. The defaults equal diffusers'
`StableDiffusionUpscalePipeline.__call__` so that moving over changes nothing.

This module imports no torch: the CLI's `--help` and the classical methods stay fast.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from dataclasses import dataclass
from typing import Literal, get_args

Method = Literal["sd", "nearest", "bilinear", "bicubic", "lanczos"]
METHODS: tuple[str, ...] = get_args(Method)
Scheduler = Literal["ddim", "dpmpp-2m", "euler", "unipc"]
SCHEDULERS: tuple[str, ...] = get_args(Scheduler)
CLASSICAL_METHODS: tuple[str, ...] = tuple(m for m in METHODS if m != "sd")

#: The low-res scheduler of the published model was trained with noise levels up to 350.
MAX_NOISE_LEVEL = 350
#: Generous upper bounds that catch typos (`--steps 7500`) before hours of work start. Steps stop at
#: 500: with the model's 1000 training steps and steps_offset=1, DDIM's 1000 steps would index t=1000.
MAX_STEPS = 500
MAX_IMAGES_PER_PROMPT = 16
#: Seeds are drawn from and must fit in 0 .. 2**63-1 (what torch.Generator.manual_seed accepts).
MAX_SEED = 2**63 - 1


class OptionsError(ValueError):
    """An option has a value outside what is allowed; the message names the option and the range."""


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

    def __post_init__(self) -> None:
        _check_str("prompt", self.prompt)
        _check_str("negative_prompt", self.negative_prompt)
        _check_int("steps", self.steps, 1, MAX_STEPS)
        _check_float("guidance", self.guidance, 0.0, 100.0)
        _check_int("noise_level", self.noise_level, 0, MAX_NOISE_LEVEL)
        _check_float("eta", self.eta, 0.0, 1.0)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, MAX_SEED)
        _check_int("num_images", self.num_images, 1, MAX_IMAGES_PER_PROMPT)
        if self.method not in METHODS:
            raise OptionsError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.scheduler not in SCHEDULERS:
            raise OptionsError(f"scheduler must be one of {', '.join(SCHEDULERS)}; got {self.scheduler!r}")

    @property
    def do_guidance(self) -> bool:
        """Classifier-free guidance needs a second (unconditional) UNet pass only when guidance > 1."""
        return self.guidance > 1.0

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


def option_defaults() -> dict[str, object]:
    """Field name -> default, for help texts (the CLI and the server show these)."""
    return {f.name: f.default for f in dataclasses.fields(UpscaleOptions)}


def _check_str(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise OptionsError(f"{name} must be a string; got {type(value).__name__} {value!r}")


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionsError(f"{name} must be an integer in {lo}..{hi}; got {value!r}")
    if not lo <= value <= hi:
        raise OptionsError(f"{name} must be in {lo}..{hi}; got {value}")


def _check_float(name: str, value: object, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise OptionsError(f"{name} must be a number in {lo:g}..{hi:g}; got {value!r}")
    if not lo <= value <= hi:
        raise OptionsError(f"{name} must be in {lo:g}..{hi:g}; got {value:g}")
