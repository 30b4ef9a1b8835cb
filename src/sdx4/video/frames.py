"""Frames in and out: decode a clip frame by frame (a stream, never the whole clip in memory) and encode
upscaled frames into a chunk file with their original timestamps."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .checks import Encoding, VideoInfo, sws_colorspace, sws_range
from .errors import VideoInputError, require_av


def decode_frames(info: VideoInfo) -> Iterator[tuple[int, Any, np.ndarray]]:
    """Yield (index, frame, rgb HxWx3 uint8) for every frame of the clip's first video stream, in decoding
    order with their own timestamps. A frame whose size differs from the first one's is a VideoInputError
    naming its index. The colour matrix and range of the clip are used for the conversion to RGB."""
    av = require_av()
    container = av.open(info.path, metadata_errors="replace")
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        src_cs, src_range = (
            sws_colorspace(info.color.get("colorspace", 0)),
            sws_range(info.color.get("color_range", 0)),
        )
        index = -1
        try:
            for frame in container.decode(stream):
                index += 1
                if (frame.width, frame.height) != info.size:
                    raise VideoInputError(
                        f"{info.path}: frame {index} is {frame.width}x{frame.height} but the clip starts at "
                        f"{info.width}x{info.height}; sdx4 upscales one size per clip (split the clip at frame {index})"
                    )
                rgb = frame.to_ndarray(
                    format="rgb24", src_colorspace=src_cs, src_color_range=src_range
                )
                yield index, frame, rgb
        except av.FFmpegError as e:
            raise VideoInputError(
                f"{info.path}: frame {index + 1} cannot be decoded ({e.strerror or e})"
            ) from None
    finally:
        container.close()


class ChunkWriter:
    """One chunk file: upscaled RGB frames encoded with the run's encoder, each with its source timestamp, into
    a temp file renamed to `path` only when the chunk is complete (`finish`); `abort` removes the temp file."""

    def __init__(self, path: Path, enc: Encoding, info: VideoInfo) -> None:
        av = require_av()
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.enc = enc
        self.time_base = info.time_base
        self.cs = sws_colorspace(info.color.get("colorspace", 0))
        self.range = sws_range(info.color.get("color_range", 0))
        self.container = av.open(str(self.tmp), "w", format=enc.container)
        s = self.container.add_stream(
            enc.encoder, rate=info.fps or 25, options=enc.codec_options
        )
        s.width, s.height = enc.size
        s.pix_fmt = enc.pix_fmt
        s.time_base = info.time_base
        ctx = s.codec_context
        ctx.time_base = (
            info.time_base
        )  # the source's: every frame keeps its pts exactly (VFR too)
        for (
            key,
            value,
        ) in (
            info.color.items()
        ):  # range, matrix, primaries, transfer tagged as in the source
            if value and key != "color_range" or value in (1, 2):
                setattr(ctx, key, value)
        self.stream = s
        self.frames = 0
        #: MP4/MOV: the chunk's first source pts; frames are written from 0 (an MP4 that starts later gets an edit
        #: list that moves its timestamps by a rounding error) and moved back by `offset` when assembled.
        #: Matroska/WebM (milliseconds) keep the source pts (0): two roundings could be 1 ms off.
        self.offset: int | None = None
        self.last_dts: int | None = None

    def add(self, rgb: np.ndarray, pts: int) -> None:
        """Encode one upscaled frame (H,W,3 uint8; padded here to the encoded size) with its source pts."""
        av = require_av()
        w, h = self.enc.size
        if (
            rgb.shape[1] != w or rgb.shape[0] != h
        ):  # odd size in a subsampled format: repeat the last column/row
            rgb = np.pad(
                rgb, ((0, h - rgb.shape[0]), (0, w - rgb.shape[1]), (0, 0)), mode="edge"
            )
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame = frame.reformat(
            format=self.enc.pix_fmt, dst_colorspace=self.cs, dst_color_range=self.range
        )
        if self.offset is None:
            self.offset = pts if self.enc.container in ("mp4", "mov") else 0
        frame.pts = pts - self.offset
        frame.time_base = self.time_base
        self._mux(self.stream.encode(frame))
        self.frames += 1

    def _mux(self, packets: list[Any]) -> None:
        """Mux the encoder's packets; a decode timestamp past its pts (libx265 gives garbage for the
        last frame of a short stream) is set to the pts, and kept above the one before."""
        for p in packets:
            if p.pts is not None and (p.dts is None or p.dts > p.pts):
                p.dts = (
                    p.pts if self.last_dts is None else max(p.pts, self.last_dts + 1)
                )
            if p.dts is not None:
                self.last_dts = p.dts
            self.container.mux(p)

    def finish(self) -> None:
        self._mux(self.stream.encode(None))
        self.container.close()
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        import contextlib

        with contextlib.suppress(
            Exception
        ):  # a broken half-written chunk: the temp file goes anyway
            self.container.close()
        self.tmp.unlink(missing_ok=True)
