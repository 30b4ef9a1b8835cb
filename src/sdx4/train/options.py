"""How a LoRA fine-tuning run is set up: one frozen, validated object with every default (no torch here).

The defaults follow the model's own recipe (shared/DESIGN.md, docs/training.md): v-prediction loss on the
model's DDIM/DDPM schedule, 512 px high-res crops, the low-res image made by antialiased bicubic /4 and
noised at a random level in [0, max_noise_level).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Literal, get_args

from ..options import MAX_SEED, OptionsError

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
LrSchedule = Literal["constant", "cosine"]
LR_SCHEDULES: tuple[str, ...] = get_args(LrSchedule)
Degradation = Literal["bicubic", "realistic"]
DEGRADATIONS: tuple[str, ...] = get_args(Degradation)

#: LoRA target presets: module-name suffixes of diffusers' UNet2DConditionModel (peft matches a name or a
#: ".name" suffix). This UNet is mostly convolutions, so attention alone adapts little (OSEDiff also targets
#: the resnets' convolutions, proj_in/out and the feed-forward layers).
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
CONV_TARGETS = (
    "conv1",
    "conv2",
    "conv_shortcut",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
)
EXTRA_TARGETS = (
    "time_emb_proj",
    "conv_in",
    "conv_out",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
)
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attn": ATTENTION_TARGETS,
    "attn+conv": ATTENTION_TARGETS + CONV_TARGETS,
    "all": ATTENTION_TARGETS + CONV_TARGETS + EXTRA_TARGETS,
}
MIN_CROP, MAX_CROP = 16, 4096
MAX_RANK = 1024
MAX_TRAIN_STEPS = 10_000_000


@dataclass(frozen=True)
class TrainOptions:
    """Everything that decides a training run (besides the model, the images and the run folder).

    rank / alpha: LoRA rank and alpha (the update is scaled by alpha / rank); alpha None = rank.
    targets: a preset ("attn", "attn+conv", "all"; see TARGET_PRESETS) or a comma-separated list of module-name
      suffixes ("to_q,to_v,conv1").
    learning_rate: AdamW's peak learning rate; lr_schedule "constant" or "cosine" (to 0), after warmup_steps
      of linear warm-up.
    steps: optimizer steps; batch_size: crops per micro-batch; grad_accumulation: micro-batches per step.
    max_grad_norm: gradients are clipped to this norm (0 = no clipping).
    gradient_checkpointing: recompute the UNet's activations in the backward pass (less memory, ~30% more time).
    precision: auto | fp32 | bf16 | fp16: the frozen UNet's weights and the autocast dtype (the LoRA weights and
      the optimizer stay fp32). auto = bf16 on CUDA where supported (else fp16), bf16 on a CPU where bf16
      measured faster than fp32 (model/placement.py), fp32 otherwise. fp32 is the exact path.
    crop: high-res crop side in pixels (a multiple of 4 times the UNet's pad multiple: 32 for the real model);
      the low-res input is crop/4. pad_small: pad (reflect) images smaller than the crop instead of refusing them.
    degradation: "bicubic" (antialiased bicubic /4, as the model was trained) or "realistic" (blur, bicubic /4,
      noise, JPEG, each with a random strength: for real-world low-res inputs).
    max_noise_level: the low-res image is noised at a level drawn uniformly from [0, max_noise_level)
      (None = the model's own maximum, 350).
    seed: every random draw (data order, crops, noise, timesteps) derives from it and the sample's index.
    workers: data-loader worker processes (0 = load in the training process).
    checkpoint_every: steps between checkpoints (0 = only at the end); keep_checkpoints: how many are kept.
    val_every: steps between validations (0 = none); val_count: images of HR_DIR held out for validation when
      no val_dir is given (None = 1 when HR_DIR has at least 8 images, else 0); val_steps: sampling steps
      of a validation upscale (DDIM).
    """

    rank: int = 16
    alpha: float | None = None
    targets: str = "attn+conv"
    learning_rate: float = 1e-4
    lr_schedule: LrSchedule = "constant"
    warmup_steps: int = 0
    steps: int = 1000
    batch_size: int = 1
    grad_accumulation: int = 1
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = True
    precision: Precision = "auto"
    crop: int = 512
    pad_small: bool = False
    degradation: Degradation = "bicubic"
    max_noise_level: int | None = None
    seed: int = 0
    workers: int = 0
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    val_every: int = 250
    val_count: int | None = None
    val_steps: int = 20

    def __post_init__(self) -> None:
        _int("rank", self.rank, 1, MAX_RANK)
        if self.alpha is not None:
            _float("alpha", self.alpha, 1e-6, 1e6)
        self.target_modules  # noqa: B018 - validates
        _float("learning_rate", self.learning_rate, 1e-12, 1.0)
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _int("steps", self.steps, 1, MAX_TRAIN_STEPS)
        _int("warmup_steps", self.warmup_steps, 0, self.steps)
        _int("batch_size", self.batch_size, 1, 1024)
        _int("grad_accumulation", self.grad_accumulation, 1, 1024)
        _float("max_grad_norm", self.max_grad_norm, 0.0, 1e6)
        _bool("gradient_checkpointing", self.gradient_checkpointing)
        _choice("precision", self.precision, PRECISIONS)
        _int("crop", self.crop, MIN_CROP, MAX_CROP)
        if self.crop % 4:
            raise OptionsError(
                f"crop must be a multiple of 4 (the low-res input is crop/4); got {self.crop}",
                option="crop",
            )
        _bool("pad_small", self.pad_small)
        _choice("degradation", self.degradation, DEGRADATIONS)
        if self.max_noise_level is not None:
            _int("max_noise_level", self.max_noise_level, 1, 1000)
        _int("seed", self.seed, 0, MAX_SEED)
        _int("workers", self.workers, 0, 64)
        _int("checkpoint_every", self.checkpoint_every, 0, MAX_TRAIN_STEPS)
        _int("keep_checkpoints", self.keep_checkpoints, 1, 1000)
        _int("val_every", self.val_every, 0, MAX_TRAIN_STEPS)
        if self.val_count is not None:
            _int("val_count", self.val_count, 0, 1000)
        _int("val_steps", self.val_steps, 1, 500)

    @property
    def target_modules(self) -> tuple[str, ...]:
        """The module-name suffixes LoRA adapts (a preset expanded, or the explicit list)."""
        if not isinstance(self.targets, str):
            raise OptionsError(
                f"targets must be a string; got {self.targets!r}", option="targets"
            )
        if self.targets in TARGET_PRESETS:
            return TARGET_PRESETS[self.targets]
        names = tuple(n.strip() for n in self.targets.split(","))
        bad = [
            n
            for n in names
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", n)
        ]
        if not names or bad:
            raise OptionsError(
                f"targets must be one of {', '.join(TARGET_PRESETS)} or a comma-separated list of module names "
                f"(e.g. to_q,to_v,conv1); got {self.targets!r}",
                option="targets",
            )
        return names

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.grad_accumulation

    def replace(self, **changes: object) -> TrainOptions:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    #: Fields that may change when a run is resumed: they do not change the weights.
    RUN_ONLY_FIELDS = (
        "workers",
        "checkpoint_every",
        "keep_checkpoints",
        "val_every",
        "val_count",
        "val_steps",
    )

    def recipe(self) -> dict[str, object]:
        """The fields that decide the weights (a resumed run must keep them)."""
        return {
            k: v for k, v in self.to_dict().items() if k not in self.RUN_ONLY_FIELDS
        }


def _choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise OptionsError(
            f"{name} must be one of {', '.join(choices)}; got {value!r}", option=name
        )


def _bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise OptionsError(f"{name} must be True or False; got {value!r}", option=name)


def _int(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionsError(
            f"{name} must be an integer in {lo}..{hi}; got {value!r}", option=name
        )
    if not lo <= value <= hi:
        raise OptionsError(f"{name} must be in {lo}..{hi}; got {value}", option=name)


def _float(name: str, value: object, lo: float, hi: float) -> None:
    import math

    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
    ):
        raise OptionsError(
            f"{name} must be a number in {lo:g}..{hi:g}; got {value!r}", option=name
        )
    if not lo <= value <= hi:
        raise OptionsError(
            f"{name} must be in {lo:g}..{hi:g}; got {value:g}", option=name
        )
