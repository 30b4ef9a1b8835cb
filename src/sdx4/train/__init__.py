"""`sdx4.train`: LoRA fine-tuning of the x4 upscaler's UNet (peft), with the model's own recipe.

    from sdx4.train import TrainOptions, train
    result = train("photos/", "runs/first", TrainOptions(steps=500, crop=256))
    result.lora          # runs/first/lora.safetensors: pipe.load_lora_weights(path) in diffusers

Importing this package imports no torch (front ends import it); `train` loads it.
"""

from __future__ import annotations

from typing import Any

from .errors import CheckpointError, TrainInputError
from .options import PRECISIONS, TARGET_PRESETS, TrainOptions

__all__ = [
    "PRECISIONS",
    "TARGET_PRESETS",
    "CheckpointError",
    "TrainInputError",
    "TrainOptions",
    "train",
]


def train(*args: Any, **kwargs: Any) -> Any:
    """See `sdx4.train.run.train` (imported on first use: it needs torch)."""
    from .run import train as run_train

    return run_train(*args, **kwargs)


train.__doc__ = "Fine-tune a LoRA on the x4 upscaler's UNet; see sdx4.train.run.train for the arguments."
