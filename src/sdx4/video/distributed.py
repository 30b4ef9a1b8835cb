"""A clip's chunks spread over Ray actors (`sdx4 upscale clip.mp4 -o out.mp4 --engine ray --workers N`).

The driver does what the local run does around the chunks (checks, the work folder and its manifest,
assembly); each actor loads the model once (from `LoadOptions`, sent as `dataclasses.asdict`), and for one
chunk at a time seeks the clip to the chunk's first frame, upscales its frames and writes the chunk file
into the work folder. The clip and the work folder must be at the same path on every node (a shared file
system), as for folder runs. Ray is imported only here, only when used.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..options import LoadOptions, UpscaleOptions
from .checks import VideoInfo
from .errors import VideoInputError, require_av
from .frames import ChunkWriter
from .options import VideoOptions
from .parts import MANIFEST, chunk_name, remove_folder, write_json_atomic
from .run import VideoReport, complete, frame_record, prepare, upscale_frame


class VideoRayError(RuntimeError):
    """Ray is missing, cannot start, or a chunk failed on a worker; the message says which."""


def frame_times(info: VideoInfo) -> list[int] | None:
    """Every frame's pts in presentation (= decoding output) order, from the packets alone; None when a
    packet has no pts (then workers decode from the start)."""
    av = require_av()
    with av.open(info.path, metadata_errors="replace") as c:
        stream = c.streams.video[0]
        pts = [p.pts for p in c.demux(stream) if p.size]
    if any(p is None for p in pts):
        return None
    return sorted(pts)  # type: ignore[type-var]


def chunk_frames(info: VideoInfo, start: int, count: int, start_pts: int | None) -> Any:
    """Yield (index, frame, rgb) for frames start .. start+count-1: seek to the key frame before the
    chunk's first pts and decode from there (or from the start without pts)."""
    from .checks import sws_colorspace, sws_range

    av = require_av()
    cs, rng = (
        sws_colorspace(info.color.get("colorspace", 0)),
        sws_range(info.color.get("color_range", 0)),
    )
    with av.open(info.path, metadata_errors="replace") as c:
        stream = c.streams.video[0]
        index = 0
        if start_pts is not None and start > 0:
            c.seek(start_pts, stream=stream, backward=True)
            index = None  # known once the chunk's first frame is reached
        for frame in c.decode(stream):
            if index is None:
                if frame.pts is None or frame.pts < start_pts:
                    continue
                index = start
            if index >= start:
                if (frame.width, frame.height) != info.size:
                    raise VideoInputError(
                        f"{info.path}: frame {index} is {frame.width}x{frame.height} but the clip starts at "
                        f"{info.width}x{info.height}; sdx4 upscales one size per clip (split the clip at frame {index})"
                    )
                yield (
                    index,
                    frame,
                    frame.to_ndarray(
                        format="rgb24", src_colorspace=cs, src_color_range=rng
                    ),
                )
            index += 1
            if index >= start + count:
                return


class ChunkActor:
    """A Ray actor: the model loaded once (None for classical methods); `run` writes one chunk file."""

    def __init__(self, load: dict[str, Any] | None) -> None:
        self.upscaler = None
        if load is not None:
            import sdx4
            from sdx4.api import quiet_libraries

            quiet_libraries()
            self.upscaler = sdx4.load(LoadOptions(**load))

    def run(self, info: VideoInfo, enc: Any, options: dict[str, Any], path: str, start: int, count: int,
            start_pts: int | None) -> dict[str, Any]:  # fmt: skip
        import numpy as np

        opts = UpscaleOptions(**options)
        writer = ChunkWriter(Path(path), enc, info)
        metadata: dict[str, Any] = {}
        t0 = time.perf_counter()
        try:
            for i, frame, rgb in chunk_frames(info, start, count, start_pts):
                result = upscale_frame(self.upscaler, rgb, opts)
                metadata = metadata or frame_record(result.metadata)
                writer.add(
                    np.asarray(result.image.convert("RGB")),
                    frame.pts if frame.pts is not None else i,
                )
            if writer.frames == 0:
                raise VideoInputError(f"{info.path}: no frames from frame {start} on")
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        return {"frames": writer.frames, "offset": writer.offset or 0, "metadata": metadata,
                "seconds": time.perf_counter() - t0}  # fmt: skip


def upscale_video_ray(
    load: LoadOptions | None,
    src: str | Path,
    dst: str | Path,
    options: UpscaleOptions | None = None,
    video: VideoOptions | None = None,
    *,
    workers: int = 2,
    address: str | None = None,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    progress: Callable[[int, int], None] | None = None,
    work_dir: str | Path | None = None,
) -> VideoReport:
    """`upscale_video` with the chunks spread over `workers` Ray actors (each loads the model from `load`;
    None for classical methods). Same checks, work folder, manifest (a rerun, local or on Ray, continues
    it), output and record as the local run; no flicker measure (no actor sees every frame)."""
    try:
        import ray
    except ImportError as e:
        raise VideoRayError('--engine ray needs Ray: pip install -e ".[ray]"') from e
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    options = options if options is not None else UpscaleOptions()
    video = video if video is not None else VideoOptions()
    if options.method == "sd" and load is None:
        raise VideoInputError("method 'sd' needs the model: pass its LoadOptions")
    plan = prepare(_NoCheck(load.model) if load is not None else None, src, dst, options, video,
                   Path(work_dir) if work_dir is not None else None)  # fmt: skip
    info, enc, opts, folder, manifest = plan.parts()
    n = video.chunk_frames
    times = frame_times(info)
    total = len(times) if times is not None else info.frames
    chunks = range((total + n - 1) // n)
    done = {int(k) for k in manifest["chunks"]}
    todo = [k for k in chunks if k not in done]
    reused = len(done)
    frames_done = sum(v["frames"] for v in manifest["chunks"].values())
    started_here = False
    if not ray.is_initialized():
        try:
            ray.init(
                address=address, include_dashboard=False, logging_level=logging.WARNING
            )
        except Exception as e:
            raise VideoRayError(
                f"cannot start or reach Ray at {address or 'a new local instance'}: {e}"
            ) from e
        started_here = True
    upscaled = 0
    upscale_s = 0.0
    try:
        actor_class = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(
            ChunkActor
        )
        load_dict = (
            dataclasses.asdict(load)
            if load is not None and opts.method == "sd"
            else None
        )
        actors = (
            [
                actor_class.remote(load_dict)
                for _ in range(max(1, min(workers, len(todo))))
            ]
            if todo
            else []
        )
        suffix = dst.suffix.lower()
        pending: dict[Any, tuple[int, Any]] = {}

        def submit(actor: Any) -> None:
            if todo:
                k = todo.pop(0)
                start = k * n
                start_pts = times[start] if times is not None else None
                ref = actor.run.remote(
                    info,
                    enc,
                    opts.to_dict(),
                    str(folder / chunk_name(k, suffix)),
                    start,
                    n,
                    start_pts,
                )
                pending[ref] = (k, actor)

        for actor in actors:
            submit(actor)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            k, actor = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except Exception as e:  # a worker's error: its cause when it is the clip's
                cause = getattr(e, "cause", None)
                if isinstance(cause, VideoInputError):
                    remove_folder(folder)
                    raise cause from None
                raise VideoRayError(
                    f"chunk {k} failed on a Ray worker: {type(e).__name__}: {e}"
                ) from e
            manifest["chunks"][str(k)] = {
                "frames": result["frames"],
                "offset": result["offset"],
            }
            if manifest["metadata"] is None and result["metadata"]:
                manifest["metadata"] = result["metadata"]
            write_json_atomic(folder / MANIFEST, manifest)
            upscaled += result["frames"]
            upscale_s += result["seconds"]
            frames_done += result["frames"]
            if progress is not None:
                progress(frames_done, total)
            submit(actor)
    finally:
        if started_here:
            ray.shutdown()
    return complete(
        plan,
        dst,
        video,
        frames_done,
        reused,
        upscaled,
        time.perf_counter() - t0,
        upscale_s,
        None,
    )


class _NoCheck:
    """Stands in for the Upscaler in the driver's checks: the model loads only on the workers (each checks
    its own memory when it runs)."""

    def __init__(self, model: str) -> None:
        self.info = {"model": model}

    def check(self, options: Any, size: Any) -> None:
        pass
