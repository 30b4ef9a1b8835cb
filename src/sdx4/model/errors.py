"""Errors of finding and loading the model. No torch here: the CLI catches them at every exit."""

from __future__ import annotations


class ModelNotFoundError(RuntimeError):
    """The model could not be found or fetched; the message says which and how to fix it."""


class ModelPathError(ModelNotFoundError):
    """`--model` names a local folder that does not exist or is not in diffusers layout (bad usage)."""


class ModelConfigError(ValueError):
    """The model's components do not fit together (or one is broken); the message says which."""

