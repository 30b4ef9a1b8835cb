"""One item of a folder job, read, upscaled and written: shared by the local and the Ray engine."""

from __future__ import annotations

import hashlib
import os
import stat
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..imageio import ImageInputError, decode_image, is_animated, save_image
from ..metadata import manifest_record, saved_metadata
from ..options import OptionsError
from .job import ESCAPED_KEY, BatchItem, Status, is_escaped, shown_name

#: What a record keeps of the input it read, to tell on resume whether the input changed since. The
#: mtime goes under "timings": it belongs to the file on disk, not to the job (a copy of the folder has
#: other mtimes and the same records), so "everything but timings" stays the same on any engine.
STAMP_KEYS = ("input_bytes", "input_sha256")


@dataclass
class Loaded:
    """An item after the read stage: the decoded image, or the error that stopped it."""

    item: BatchItem
    image: Any = None  # imageio.LoadedImage
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    stamp: dict[str, Any] = field(default_factory=dict)  # STAMP_KEYS and "input_mtime_ns" of what was read


@dataclass
class Done:
    """An item after the upscale stage: the result, or the error."""

    item: BatchItem
    result: Any = None  # api.UpscaleResult
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    stamp: dict[str, Any] = field(default_factory=dict)


def read_input(path: Path, name: str) -> tuple[bytes, dict[str, Any]]:
    """A regular file's bytes and its stamp: size and mtime (ns) before reading, sha256 of what was read.

    Opened non-blocking and checked with fstat before any read, so a FIFO that took an image's place
    fails at once instead of hanging. Raises ImageInputError naming `name`.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ImageInputError(f"{name}: no such file") from None
    except OSError as e:
        raise ImageInputError(f"{name}: cannot open ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)  # before reading: a write during the read then shows as a change on resume
        if stat.S_ISDIR(st.st_mode):
            raise ImageInputError(f"{name}: is a directory, not an image")
        if not stat.S_ISREG(st.st_mode):
            raise ImageInputError(f"{name}: not a regular file ({file_kind(st.st_mode)})")
        try:
            data = f.read()
        except OSError as e:
            raise ImageInputError(f"{name}: cannot read ({e.strerror or e})") from None
    stamp = {
        "input_bytes": st.st_size,
        "input_mtime_ns": st.st_mtime_ns,
        "input_sha256": hashlib.sha256(data).hexdigest(),
    }
    return data, stamp


def sha256_file(path: Path) -> str:
    """sha256 of a regular file, read in chunks (resume re-hashes an input whose size or mtime changed);
    raises OSError, and never blocks on a FIFO."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path}: not a regular file")
        digest = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words, for messages."""
    for test, kind in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def read_item(item: BatchItem, input_dir: Path, output_dir: Path | None = None) -> Loaded:
    t0 = time.perf_counter()
    # Named by the relative path, so records do not depend on where the folder is mounted.
    name = shown_name(item.input)
    stamp: dict[str, Any] = {}
    if output_dir is not None and item.outputs and _is_video(item.input):
        return read_video_item(item, input_dir, output_dir, t0)
    try:
        data, stamp = read_input(input_dir / item.input, name)
        if output_dir is not None and item.outputs and is_animated(data):  # every frame, in the upscale stage
            image = AnimationSource(input_dir / item.input, output_dir / item.outputs[0])
            return Loaded(item, image=image, timings={"read": _secs(t0)}, stamp=stamp)
        image = decode_image(data, name)
    except ImageInputError as e:
        return Loaded(item, error=str(e), timings={"read": _secs(t0)}, stamp=stamp)
    return Loaded(item, image=image, timings={"read": _secs(t0)}, stamp=stamp)


def upscale_item(loaded: Loaded, upscaler: Any) -> Done:
    """Run the model (or classical filter); a failure of this image becomes its error, not the run's."""
    from ..api import upscale_classical_result

    if loaded.error is not None:
        return Done(loaded.item, error=loaded.error, timings=loaded.timings, stamp=loaded.stamp)
    if isinstance(loaded.image, VideoSource):
        return upscale_video_item(loaded, upscaler)
    if isinstance(loaded.image, AnimationSource):
        return upscale_animation_item(loaded, upscaler)
    t0 = time.perf_counter()
    opts = loaded.item.options
    try:
        result = upscaler(loaded.image, opts) if opts.method == "sd" else upscale_classical_result(loaded.image, opts)
    except (ImageInputError, OptionsError, RuntimeError, ValueError, MemoryError) as e:
        # One image's failure (e.g. out of memory on a huge input) must not stop the batch: it is
        # recorded with its message and reported at the end. Interrupts and bugs still propagate.
        error = f"{shown_name(loaded.item.input)}: {type(e).__name__}: {printable(str(e))}"
        return Done(loaded.item, error=error, timings=loaded.timings, stamp=loaded.stamp)
    timings = {
        **loaded.timings,
        "upscale": _secs(t0),
        **{f"stage_{k}": v for k, v in result.metadata.get("timings", {}).items()},
    }
    return Done(loaded.item, result=result, timings=timings, stamp=loaded.stamp)


def write_item(done: Done, output_dir: Path) -> dict[str, Any]:
    """Write the outputs atomically (replacing stale ones) and return the item's manifest record."""
    item = done.item
    timings = dict(done.timings)
    error = done.error
    meta: dict[str, Any] = {}
    if error is None:
        t0 = time.perf_counter()
        meta = done.result.metadata
        try:
            for image, rel in zip(done.result.images, item.outputs):
                target = output_dir / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                save_image(image, target, saved_metadata(meta, shown_name(item.input)), overwrite=True,
                           icc_profile=done.result.icc_profile, exif=done.result.exif)
        except (OSError, ImageInputError) as e:
            error = f"{shown_name(item.input)}: cannot write output ({printable(str(e))})"
        timings["write"] = _secs(t0)
    return make_record(item, "ok" if error is None else "failed", error, meta, timings, done.stamp)


def make_record(
    item_or_input: BatchItem | str,
    status: Status,
    error: str | None,
    meta: dict[str, Any] | None = None,
    timings: dict[str, float] | None = None,
    stamp: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One manifest line. Everything but "timings" is the same for the same job on any engine.

    Names that are not valid UTF-8 are written escaped (`job.shown_name`) and the record says so
    (ESCAPED_KEY), so every line is valid UTF-8 JSON. `stamp`: the input's size and sha256 as read
    (`read_input`), and its mtime under "timings", which resume compares with the file on disk.
    """
    timings = {**(timings or {}), "finished_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}
    error = None if error is None else printable(error)
    if isinstance(item_or_input, str):  # a file that is not an image, or an entry that is not read
        record = {"input": shown_name(item_or_input), "status": status, "error": error, "timings": timings}
        if is_escaped(item_or_input):
            record[ESCAPED_KEY] = True
        return record
    item = item_or_input
    record = manifest_record(
        input=shown_name(item.input),
        outputs=[shown_name(out) for out in item.outputs] if status == "ok" else (),
        status=status,
        error=error,
        seed=item.options.seed,
        base_seed=item.base_seed,
        prompt_source=item.prompt_source,
        params=item.params,
        result_metadata=meta or {},
        timings=timings,
    )
    stamp = dict(stamp or {})
    if "input_mtime_ns" in stamp:
        record["timings"]["input_mtime_ns"] = stamp.pop("input_mtime_ns")
    record.update(stamp)
    if is_escaped(item.input):
        record[ESCAPED_KEY] = True
    return record


def printable(text: str) -> str:
    """A message with any undecodable bytes of a file name (surrogates) shown as `\\xNN`: valid UTF-8."""
    if not is_escaped(text):
        return text
    return "".join(
        f"\\x{ord(ch) - 0xDC00:02x}" if "\udc80" <= ch <= "\udcff"
        else f"\\u{ord(ch):04x}" if "\ud800" <= ch <= "\udfff"
        else ch
        for ch in text
    )  # fmt: skip


def _secs(t0: float) -> float:
    return round(time.perf_counter() - t0, 4)


# --------------------------------------------------------------------------------------------------
# Videos in a folder: one item each, upscaled and written by sdx4.video in the upscale stage
# --------------------------------------------------------------------------------------------------


def _is_video(rel: str) -> bool:
    from ..video import is_video

    return is_video(rel)


@dataclass(frozen=True)
class VideoSource:
    """A video item after the read stage: where it is and where its output goes (never read into memory)."""

    src: Path
    dst: Path


@dataclass(frozen=True)
class VideoDone:
    """A video item's result in the shape write_item takes: no images to write (sdx4.video wrote the file)."""

    metadata: dict[str, Any]
    images: tuple[()] = ()
    icc_profile: None = None
    exif: None = None


def read_video_item(item: BatchItem, input_dir: Path, output_dir: Path, t0: float) -> Loaded:
    """A video's stamp (size, mtime, sha256 streamed) for resume; the clip itself is checked by sdx4.video."""
    path = input_dir / item.input
    name = shown_name(item.input)
    try:
        st = os.stat(path)
        stamp = {"input_bytes": st.st_size, "input_mtime_ns": st.st_mtime_ns, "input_sha256": sha256_file(path)}
    except OSError as e:
        return Loaded(item, error=f"{name}: cannot read ({e.strerror or e})", timings={"read": _secs(t0)})
    return Loaded(item, image=VideoSource(path, output_dir / item.outputs[0]), timings={"read": _secs(t0)}, stamp=stamp)


def upscale_video_item(loaded: Loaded, upscaler: Any) -> Done:
    """Upscale a video item straight into its output (atomic; its chunks in OUTPUT.sdx4-parts/ let a rerun of
    the folder continue it); its failure becomes its error, not the run's."""
    from ..video import upscale_video

    source: VideoSource = loaded.image
    opts = loaded.item.options
    t0 = time.perf_counter()
    try:
        source.dst.parent.mkdir(parents=True, exist_ok=True)
        report = upscale_video(upscaler if opts.method == "sd" else None, source.src, source.dst, opts)
    except (ImageInputError, OptionsError, RuntimeError, ValueError, MemoryError, OSError, ImportError) as e:
        error = f"{shown_name(loaded.item.input)}: {type(e).__name__}: {printable(str(e))}"
        return Done(loaded.item, error=error, timings=loaded.timings, stamp=loaded.stamp)
    timings = {**loaded.timings, "upscale": _secs(t0)}
    return Done(loaded.item, result=VideoDone(report.metadata), timings=timings, stamp=loaded.stamp)


# --------------------------------------------------------------------------------------------------
# Animated GIF/WebP/APNG in a folder: one item each, every frame upscaled by sdx4.video in the upscale stage;
# written under the item's usual output name NAME_x4.png, as an animated PNG (APNG)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnimationSource:
    """An animated item after the read stage: where it is and where its output goes."""

    src: Path
    dst: Path


def upscale_animation_item(loaded: Loaded, upscaler: Any) -> Done:
    """Upscale an animation item straight into its output (atomic); its failure becomes its error."""
    from ..video import upscale_animation

    source: AnimationSource = loaded.image
    opts = loaded.item.options
    t0 = time.perf_counter()
    try:
        source.dst.parent.mkdir(parents=True, exist_ok=True)
        result = upscale_animation(upscaler if opts.method == "sd" else None, source.src, source.dst, opts,
                                   overwrite=True, name=shown_name(loaded.item.input))  # fmt: skip
    except (ImageInputError, OptionsError, RuntimeError, ValueError, MemoryError, OSError) as e:
        error = f"{shown_name(loaded.item.input)}: {type(e).__name__}: {printable(str(e))}"
        return Done(loaded.item, error=error, timings=loaded.timings, stamp=loaded.stamp)
    timings = {**loaded.timings, "upscale": _secs(t0)}
    return Done(loaded.item, result=VideoDone(result.metadata), timings=timings, stamp=loaded.stamp)
