"""The final file: the chunks' video packets in order, remuxed (never re-encoded) with the clip's audio and
subtitle packets copied untouched, its chapters, rotation and tags, and sdx4's record."""

from __future__ import annotations

import heapq
import json
import os
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from .checks import Encoding, VideoInfo
from .errors import require_av

#: Container-level tags of the source that describe the old file, not the new one.
_DROPPED_TAGS = {
    "encoder",
    "major_brand",
    "minor_version",
    "compatible_brands",
    "creation_time",
}
#: The tag that holds sdx4's record (JSON) in the output container.
VIDEO_METADATA_KEY = "sdx4"


def _video_packets(
    chunks: Sequence[tuple[Path, int]], time_base: Fraction
) -> Iterator[tuple[float, int, Any]]:
    """Every chunk's video packets in order, moved by the chunk's offset (its first source pts, in the
    source's `time_base`: each chunk file starts at 0) back to the source's timestamps. Each chunk's encoder started afresh, so a chunk's first decode
    timestamps can reach back before the previous chunk's last one (B-frame delay): they are moved forward
    by the smallest step that keeps dts increasing (pts, what players show, never change)."""
    av = require_av()
    last = None
    n = 0
    for path, offset in chunks:
        with av.open(str(path)) as c:
            stream = c.streams.video[0]
            shift = round(offset * time_base / stream.time_base)
            for pkt in c.demux(stream):
                if pkt.size == 0:
                    continue
                if pkt.pts is not None:
                    pkt.pts += shift
                if pkt.dts is not None:
                    pkt.dts += shift
                if pkt.dts is not None:
                    if last is not None and pkt.dts <= last:
                        pkt.dts = last + 1
                    last = pkt.dts
                ts = pkt.dts if pkt.dts is not None else pkt.pts
                n += 1
                yield float(ts * pkt.time_base), n, pkt


def _copied_packets(
    src: Any, streams: Sequence[Any]
) -> Iterator[tuple[float, int, Any]]:
    n = 0
    for pkt in src.demux(*streams):
        ts = pkt.dts if pkt.dts is not None else pkt.pts
        if pkt.size == 0 or ts is None:
            continue
        n -= 1
        yield float(ts * pkt.time_base), n, pkt


def assemble(
    dst: Path,
    chunks: Sequence[tuple[Path, int]],
    info: VideoInfo,
    enc: Encoding,
    keep_audio: bool,
    record: dict[str, Any],
) -> None:
    """Write `dst` (atomically: a temp file beside it, renamed) from the finished chunk files."""
    av = require_av()
    tmp = dst.with_name(f".{dst.name}.sdx4-tmp")
    options = (
        {"movflags": "+use_metadata_tags"} if enc.container in ("mp4", "mov") else {}
    )
    try:
        with av.open(str(tmp), "w", format=enc.container, container_options=options) as out, \
                av.open(info.path, metadata_errors="replace") as src:  # fmt: skip
            with av.open(str(chunks[0][0])) as first:
                # opaque: the chunk's own codec context (a decoder such as libdav1d has no encoder of that name)
                video = out.add_stream_from_template(
                    first.streams.video[0], opaque=True
                )
            video.metadata.update(_stream_tags(src.streams.video[0]))
            if info.rotation:
                video.set_display_rotation(info.rotation)
            copies: dict[int, Any] = {}
            if keep_audio:
                for s in list(src.streams.audio) + list(src.streams.subtitles):
                    o = out.add_stream_from_template(s)
                    o.metadata.update(_stream_tags(s))
                    copies[s.index] = o
            for key, value in src.metadata.items():
                if key not in _DROPPED_TAGS:
                    out.metadata[key] = value
            out.metadata[VIDEO_METADATA_KEY] = json.dumps(record, separators=(",", ":"))
            chapters = src.chapters()
            if chapters:
                out.set_chapters(chapters)
            sources = [_video_packets(chunks, info.time_base)]
            if copies:
                sources.append(_copied_packets(src, [src.streams[i] for i in copies]))
            for _, _, pkt in heapq.merge(*sources, key=lambda t: (t[0], t[1])):
                pkt.stream = (
                    video if pkt.stream.type == "video" else copies[pkt.stream.index]
                )
                out.mux(pkt)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _stream_tags(stream: Any) -> dict[str, str]:
    return {
        k: v
        for k, v in stream.metadata.items()
        if k in ("language", "title", "handler_name")
    }
