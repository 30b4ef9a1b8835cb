"""The errors of the video path: each names the clip (or output) and the problem."""

from __future__ import annotations

from ..imageio import ImageInputError

#: What to install when PyAV is missing (sdx4 is not on PyPI: extras install from the checkout).
VIDEO_EXTRA = 'pip install -e ".[video]"'


class VideoInputError(ImageInputError):
    """A clip (or a video output) cannot be used: not a video, no video stream, no frames, too large, a codec
    this PyAV build cannot decode or encode, a size change mid-clip, a work folder of another run. A subclass
    of ImageInputError: front ends treat both the same (the CLI exits 2)."""


class VideoMissingError(ImportError):
    """PyAV (the `av` package) is not installed."""


class VideoCancelled(Exception):
    """The run was cancelled between frames; the finished chunks are kept and the same call continues."""

    def __init__(self, message: str, parts: str) -> None:
        super().__init__(message)
        self.parts = parts  # the work folder that holds the finished chunks


def require_av():  # -> the av module
    """Import PyAV, or raise VideoMissingError naming the extra to install."""
    try:
        import av
    except ImportError as e:
        raise VideoMissingError(
            f"video needs PyAV (the `av` package): {VIDEO_EXTRA}"
        ) from e
    return av
