"""How a clip is encoded: `VideoOptions` (frozen; defaults here and nowhere else) and the container/codec tables.

No PyAV import here: the CLI's --help and option checks stay fast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from ..options import OptionsError
from .errors import VideoInputError

#: The suffixes sdx4 reads as videos (what `is_video` and folder runs go by), any case.
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
#: The suffixes sdx4 writes videos to -> PyAV (FFmpeg) container format. AVI is read, never written (it has no
#: room for B-frame timestamps); write .mkv or .mp4 instead.
OUTPUT_CONTAINERS = {
    ".mp4": "mp4",
    ".m4v": "mp4",
    ".mov": "mov",
    ".mkv": "matroska",
    ".webm": "webm",
}
VideoCodec = Literal["h264", "h265", "vp9", "av1", "ffv1"]
VIDEO_CODECS: tuple[str, ...] = get_args(VideoCodec)
#: The FFmpeg encoders of each codec, the first this PyAV build has is used.
ENCODERS = {"h264": ("libx264",), "h265": ("libx265",), "vp9": ("libvpx-vp9",), "av1": ("libsvtav1", "libaom-av1"),
            "ffv1": ("ffv1",)}  # fmt: skip
#: The codecs each output container holds.
CONTAINER_CODECS = {"mp4": ("h264", "h265", "vp9", "av1"), "mov": ("h264", "h265", "vp9", "av1"),
                    "matroska": VIDEO_CODECS, "webm": ("vp9", "av1")}  # fmt: skip
#: The codec when none is given: H.264 (plays everywhere) except in WebM (VP9).
DEFAULT_CODEC = {"mp4": "h264", "mov": "h264", "matroska": "h264", "webm": "vp9"}
#: Constant-rate-factor defaults (visually near-lossless for an upscale) and ranges; FFV1 is lossless (no CRF).
DEFAULT_CRF = {"h264": 18, "h265": 20, "vp9": 30, "av1": 30}
CRF_RANGE = {"h264": (0, 51), "h265": (0, 51), "vp9": (0, 63), "av1": (0, 63)}
#: Pixel format when none is given: yuv420p (what players expect); FFV1 (archival) keeps full chroma.
DEFAULT_PIX_FMT = {
    "h264": "yuv420p",
    "h265": "yuv420p",
    "vp9": "yuv420p",
    "av1": "yuv420p",
    "ffv1": "yuv444p",
}
#: Temporal treatments of the frames (the anim helper's module adds values); "none" = each frame on its own.
TEMPORAL_MODES: tuple[str, ...] = ("none",)
MAX_CHUNK_FRAMES = 100_000


@dataclass(frozen=True)
class VideoOptions:
    """How an upscaled clip is encoded and cut into resumable chunks.

    codec: h264, h265, vp9, av1 or ffv1 (lossless, .mkv only); None = h264 (.mp4 .mov .m4v .mkv), vp9 (.webm).
    crf: constant rate factor (lower = better, larger); None = 18 h264, 20 h265, 30 vp9/av1; ffv1 takes none.
    pix_fmt: the encoded pixel format; None = yuv420p (ffv1: yuv444p). A yuv420p/yuv422p output of odd width
        or height (an odd --scale of an odd-sized clip) is padded by one pixel, repeating the last column/row.
    chunk_frames: frames per finished segment in the work folder (OUT.sdx4-parts/): the most a kill can lose.
    temporal: how frames relate to each other; "none" = each frame upscaled alone, with the same seed.
    keep_audio: copy the audio and subtitle streams (packets untouched, never re-encoded); chapters are kept always.
    """

    codec: str | None = None
    crf: int | None = None
    pix_fmt: str | None = None
    chunk_frames: int = 48
    temporal: str = "none"
    keep_audio: bool = True

    def __post_init__(self) -> None:
        if self.codec is not None and self.codec not in VIDEO_CODECS:
            raise OptionsError(
                f"codec must be one of {', '.join(VIDEO_CODECS)}; got {self.codec!r}",
                option="codec",
            )
        if self.crf is not None:
            if isinstance(self.crf, bool) or not isinstance(self.crf, int):
                raise OptionsError(
                    f"crf must be an integer; got {self.crf!r}", option="crf"
                )
            if self.codec == "ffv1":
                raise OptionsError(
                    "crf: ffv1 is lossless and takes no crf", option="crf"
                )
            lo, hi = (
                CRF_RANGE.get(self.codec or "h264", (0, 63)) if self.codec else (0, 63)
            )
            if not lo <= self.crf <= hi:
                raise OptionsError(
                    f"crf must be {lo}..{hi} for {self.codec or 'these codecs'}; got {self.crf}",
                    option="crf",
                )
        if self.pix_fmt is not None and (
            not isinstance(self.pix_fmt, str) or not self.pix_fmt.isidentifier()
        ):
            raise OptionsError(
                f"pix_fmt must be a pixel format name such as yuv420p; got {self.pix_fmt!r}",
                option="pix_fmt",
            )
        if (
            isinstance(self.chunk_frames, bool)
            or not isinstance(self.chunk_frames, int)
            or not 1 <= self.chunk_frames <= MAX_CHUNK_FRAMES
        ):
            raise OptionsError(
                f"chunk_frames must be an integer 1..{MAX_CHUNK_FRAMES}; got {self.chunk_frames!r}",
                option="chunk_frames",
            )
        if self.temporal not in TEMPORAL_MODES:
            raise OptionsError(
                f"temporal must be one of {', '.join(TEMPORAL_MODES)}; got {self.temporal!r}",
                option="temporal",
            )
        if not isinstance(self.keep_audio, bool):
            raise OptionsError(
                f"keep_audio must be True or False; got {self.keep_audio!r}",
                option="keep_audio",
            )

    def replace(self, **changes: object) -> VideoOptions:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def is_video(path: str | Path) -> bool:
    """Whether `path` names a video by its suffix (VIDEO_SUFFIXES, any case); the file is not opened."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def output_container(path: str | Path) -> str:
    """The container format an output path names, or VideoInputError naming the suffixes sdx4 writes."""
    fmt = OUTPUT_CONTAINERS.get(Path(path).suffix.lower())
    if fmt is None:
        raise VideoInputError(
            f"{path}: a video output must end in {', '.join(OUTPUT_CONTAINERS)} (AVI is read, not written)"
        )
    return fmt


def video_output_suffix(path: str | Path) -> str:
    """The suffix of a video input's output: its own when sdx4 writes it, else .mkv (an .avi input)."""
    suffix = Path(path).suffix.lower()
    return suffix if suffix in OUTPUT_CONTAINERS else ".mkv"
