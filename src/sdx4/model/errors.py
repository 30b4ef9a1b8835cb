"""Errors of finding and loading the model. No torch here: the CLI catches them at every exit."""

from __future__ import annotations


class ModelNotFoundError(RuntimeError):
    """The model could not be found or fetched; the message says which and how to fix it."""


class ModelPathError(ModelNotFoundError):
    """`--model` names a folder that does not exist, or a folder or Hub repo not in diffusers layout (bad usage,
    exit 2)."""


class ModelConfigError(ValueError):
    """The model's components do not fit together, or a file is damaged (truncated, misshapen, NaN weights):
    the user's model is wrong (exit 2). The message names the file (relative to the model folder), the
    first bad key or value and what was expected."""


class LoraError(ModelConfigError):
    """A LoRA file cannot be used with this model (model/lora.py): not safetensors, empty, NaN weights, a
    text-encoder LoRA, or a key that names no layer of this UNet or has the wrong shape. The message names
    the file and the first bad key (exit 2)."""


class NonFiniteOutputError(RuntimeError):
    """The decoded image holds NaN or inf (a run-time failure, exit 1): never written as a black image."""
