"""The training errors a user can cause (bad images, a run folder in the way): a front end shows the message."""

from __future__ import annotations

from pathlib import Path


class TrainInputError(ValueError):
    """The training data or the run folder cannot be used; the message names the file or folder and the problem.
    `path` is that file or folder (None when the problem is not one path's)."""

    def __init__(self, message: str, path: Path | str | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)


class CheckpointError(OSError):
    """A checkpoint could not be written (disk full, no permission); the previous one is kept."""
