"""`upscale_video`: a clip upscaled frame by frame in resumable chunks, then assembled without re-encoding.

    decode (a stream) -> upscale each frame (any method, one seed) -> encode into chunk files of N frames
    (OUT.sdx4-parts/, manifest after each) -> remux the chunks + the clip's audio/subtitles/chapters -> OUT

A killed run leaves the finished chunks and the manifest; the same call continues after the last finished
chunk (the manifest must match the source's fingerprint and the options, else a clear error).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._version import __version__
from ..metadata import VERSION_KEY
from ..options import OptionsError, UpscaleOptions
from .assemble import assemble
from .checks import Encoding, VideoInfo, plan_encoding, probe
from .errors import VideoCancelled, VideoInputError
from .frames import ChunkWriter, decode_frames
from .options import VideoOptions
from .parts import (
    MANIFEST,
    MANIFEST_VERSION,
    chunk_name,
    clean_temps,
    fingerprint,
    mismatch,
    parts_folder,
    read_manifest,
    remove_folder,
    write_json_atomic,
)

#: Per-frame keys of an image's metadata that make no sense for a whole clip.
_PER_FRAME_KEYS = (
    "seconds",
    "timings",
    "input_size",
    "output_size",
    "alpha",
    "alpha_method",
)


@dataclass(frozen=True)
class VideoReport:
    """What a clip's run did: frames and chunks (those reused from an earlier, interrupted run included), the
    sizes, the seconds in all and in the upscaler, the record written into the output, the flicker measure."""

    output: str
    frames: int
    chunks: int
    chunks_reused: int
    frames_upscaled: int
    input_size: tuple[int, int]
    output_size: tuple[int, int]
    seconds: float
    upscale_seconds: float
    metadata: dict[str, Any] = field(default_factory=dict)
    flicker: dict[str, Any] | None = None


@dataclass
class _Plan:
    info: VideoInfo
    enc: Encoding
    options: UpscaleOptions  # with the run's seed
    folder: Path
    manifest: dict[str, Any]
    created: bool  # this call made the work folder

    def parts(self) -> tuple[VideoInfo, Encoding, UpscaleOptions, Path, dict[str, Any]]:
        """(info, enc, options, folder, manifest): what the runners (here and distributed.py) work with."""
        return self.info, self.enc, self.options, self.folder, self.manifest


def check_video_options(upscaler: Any, options: UpscaleOptions) -> None:
    """The UpscaleOptions a clip cannot take, before anything is opened."""
    if options.method == "sd" and upscaler is None:
        raise OptionsError(
            "method 'sd' needs the model: pass the Upscaler sdx4.load() returns",
            option="method",
        )
    if options.num_images != 1:
        raise OptionsError(
            f"num_images: a clip is upscaled once (got {options.num_images})",
            option="num_images",
        )
    if options.bit_depth != 8:
        raise OptionsError(
            f"bit_depth: videos are 8-bit (got {options.bit_depth})", option="bit_depth"
        )


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=str))


def prepare(
    upscaler: Any,
    src: Path,
    dst: Path,
    options: UpscaleOptions,
    video: VideoOptions,
    work_dir: Path | None = None,
) -> _Plan:
    """Every check before heavy work (clip, output, options, memory budget, an earlier run's work folder),
    then the work folder and its manifest (new, or the earlier run's when it matches)."""
    check_video_options(upscaler, options)
    info = probe(src)
    enc = plan_encoding(dst, info, video, options.scale, options.output_size)
    if not dst.parent.is_dir():
        raise VideoInputError(f"{dst}: the folder {dst.parent} does not exist")
    if src.resolve() == dst.resolve():
        raise VideoInputError(f"{dst}: the output would overwrite its input")
    if upscaler is not None and options.method == "sd":
        upscaler.check(options, info.size)  # MemoryBudgetError before any frame
    model = {}
    if upscaler is not None and options.method == "sd":
        model = {"model": upscaler.info.get("model")}
    record = _jsonable({
        "source": {"path": str(src.resolve()), **fingerprint(src)},
        "options": options.to_dict(),  # seed None = drawn once, kept in the manifest
        "video": video.to_dict(),
        "encoding": enc.to_dict(),
        "model": model,
    })  # fmt: skip
    folder = Path(work_dir) if work_dir is not None else parts_folder(dst)
    manifest = read_manifest(folder) if folder.is_dir() else None
    created = False
    if manifest is not None:
        diff = mismatch(manifest["record"], record)
        if diff:
            raise VideoInputError(
                f"{folder}: holds an unfinished run of another source or other options ({diff}); run the same command "
                f"again to continue it, or delete the folder to start over (rm -r '{folder}')"
            )
        options = options.replace(seed=manifest["seed"])
        clean_temps(folder)
    else:
        options = options.with_seed()
        folder.mkdir(exist_ok=True)
        created = True
        manifest = {"version": MANIFEST_VERSION, "sdx4_version": __version__, "record": record, "seed": options.seed,
                    "chunk_frames": video.chunk_frames, "chunks": {}, "frames": None, "metadata": None}  # fmt: skip
        write_json_atomic(folder / MANIFEST, manifest)
    return _Plan(info, enc, options, folder, manifest, created)


def _flicker_meter() -> Any:
    """The flicker measure of a run (sdx4.video.flicker; without OpenCV it says its difference is unwarped)."""
    from .flicker import FlickerMeter

    return FlickerMeter()


def upscale_video(
    upscaler: Any,
    src: str | Path,
    dst: str | Path,
    options: UpscaleOptions | None = None,
    video: VideoOptions | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    work_dir: str | Path | None = None,
) -> VideoReport:
    """Upscale the clip `src` into `dst` (.mp4 .mov .m4v .mkv .webm) frame by frame.

    upscaler: an `sdx4.Upscaler` (any method), or None for the classical methods (as `sdx4.upscale`).
    options: the single-image options (method, scale, tiles, colour fix, seed: every frame gets the SAME seed,
        drawn once when None and kept in the manifest). video: codec, crf, pixel format, chunk size, audio.
    progress(frames_done, frames_total) after each frame; cancel() -> True stops between frames with
    VideoCancelled (the finished chunks stay: the same call continues). work_dir: default `dst` + ".sdx4-parts".
    Raises VideoInputError (bad clip, output or work folder) and OptionsError before any heavy work.
    """
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    options = options if options is not None else UpscaleOptions()
    video = video if video is not None else VideoOptions()
    plan = prepare(
        upscaler,
        src,
        dst,
        options,
        video,
        Path(work_dir) if work_dir is not None else None,
    )
    info, enc, opts, folder, manifest = plan.parts()
    n = video.chunk_frames
    done: dict[int, dict[str, int]] = {int(k): v for k, v in manifest["chunks"].items()}
    reused = len(done)
    meter = (
        _flicker_meter() if not done else None
    )  # a resumed run cannot see the earlier frames
    suffix = dst.suffix.lower()
    writer: ChunkWriter | None = None
    frames = upscaled = 0
    upscale_s = 0.0
    total = info.frames

    def finish(k: int) -> None:
        nonlocal writer
        assert writer is not None
        writer.finish()
        done[k] = {"frames": writer.frames, "offset": writer.offset or 0}
        manifest["chunks"][str(k)] = done[k]
        write_json_atomic(folder / MANIFEST, manifest)
        writer = None

    try:
        for i, frame, rgb in decode_frames(info):
            k = i // n
            if k not in done:
                if cancel is not None and cancel():
                    raise VideoCancelled(
                        f"{src}: cancelled at frame {i}; {len(done)} finished chunk(s) kept in {folder}: run the same "
                        f"command again to continue",
                        str(folder),
                    )
                if writer is None:
                    writer = ChunkWriter(folder / chunk_name(k, suffix), enc, info)
                t1 = time.perf_counter()
                result = upscale_frame(upscaler, rgb, opts)
                upscale_s += time.perf_counter() - t1
                import numpy as np

                out = np.asarray(result.image.convert("RGB"))
                if meter is not None:
                    meter.add(out, rgb)
                if manifest["metadata"] is None:
                    manifest["metadata"] = frame_record(result.metadata)
                writer.add(out, frame.pts if frame.pts is not None else i)
                upscaled += 1
                if (i + 1) % n == 0:
                    finish(k)
            frames = i + 1
            if progress is not None:
                progress(frames, max(total, frames))
        if writer is not None:
            finish(frames // n if frames % n else frames // n - 1)
    except VideoInputError:
        if writer is not None:
            writer.abort()
        remove_folder(
            folder
        )  # a clip that changes size mid-way can never be finished: nothing is kept
        raise
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return complete(plan, dst, video, frames, reused, upscaled, time.perf_counter() - t0, upscale_s,
                    meter.result() if meter is not None else None)  # fmt: skip


def upscale_frame(upscaler: Any, rgb: Any, opts: UpscaleOptions) -> Any:
    """One frame (H,W,3 uint8) through the Upscaler, or the classical path when there is none."""
    return upscaler(rgb, opts) if upscaler is not None else _classical(rgb, opts)


def frame_record(metadata: dict[str, Any]) -> dict[str, Any]:
    """What a frame's metadata gives the clip's record (its per-frame keys dropped)."""
    return _jsonable({k: v for k, v in metadata.items() if k not in _PER_FRAME_KEYS})


def complete(plan: _Plan, dst: Path, video: VideoOptions, frames: int, reused: int, upscaled: int, seconds: float,
             upscale_s: float, flicker: dict[str, Any] | None) -> VideoReport:  # fmt: skip
    """Every chunk is finished: record the frame count, assemble the output, remove the work folder."""
    info, enc, opts, folder, manifest = plan.parts()
    t0 = time.perf_counter()
    manifest["frames"] = frames
    write_json_atomic(folder / MANIFEST, manifest)
    suffix = dst.suffix.lower()
    done = {int(k): v for k, v in manifest["chunks"].items()}
    chunks = [(folder / chunk_name(k, suffix), done[k]["offset"]) for k in sorted(done)]
    w, h = opts.output_size((info.width, info.height))  # what every frame became (float scale, width/height)
    record = {
        **(manifest["metadata"] or {}),
        VERSION_KEY: __version__,
        "method": opts.method,
        "seed": opts.seed,
        "scale": opts.scale if not opts.has_target else round(w / info.width, 4),  # as metadata.py records it
        "input_size": [info.width, info.height],
        "output_size": [w, h],
        "frames": frames,
        "source_codec": info.codec,
        **enc.to_dict(),
    }
    assemble(dst, chunks, info, enc, video.keep_audio, record)
    remove_folder(folder)
    return VideoReport(
        output=str(dst),
        frames=frames,
        chunks=len(chunks),
        chunks_reused=reused,
        frames_upscaled=upscaled,
        input_size=info.size,
        output_size=(w, h),
        seconds=seconds + time.perf_counter() - t0,
        upscale_seconds=upscale_s,
        metadata=record,
        flicker=flicker,
    )


def _classical(rgb: Any, opts: UpscaleOptions) -> Any:
    from ..api import upscale

    return upscale(rgb, opts)


def read_video_metadata(path: str | Path) -> dict[str, Any]:
    """sdx4's record in a video it wrote ({} when there is none)."""
    from .assemble import VIDEO_METADATA_KEY
    from .errors import require_av

    av = require_av()
    with av.open(str(path), metadata_errors="replace") as c:
        text = c.metadata.get(VIDEO_METADATA_KEY)
    return json.loads(text) if text else {}
