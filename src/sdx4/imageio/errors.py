"""The errors of reading and writing images: each message names the input or output and the problem."""

from __future__ import annotations


class ImageInputError(ValueError):
    """An input image cannot be used; the message names the file (or the input) and the problem."""


class ImageOutputError(OSError):
    """An output cannot be written (no space, no permission, read-only disk); the message names the output
    the user asked for, never the temp file sdx4 writes first."""
