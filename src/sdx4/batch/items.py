"""One item of a folder job, read, upscaled and written: shared by the local and the Ray engine."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..imageio import ImageInputError, open_image, save_image
from ..metadata import manifest_record, saved_metadata
from ..options import OptionsError
from .job import BatchItem, Status


@dataclass
class Loaded:
    """An item after the read stage: the decoded image, or the error that stopped it."""

    item: BatchItem
    image: Any = None  # imageio.LoadedImage
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Done:
    """An item after the upscale stage: the result, or the error."""

    item: BatchItem
    result: Any = None  # api.UpscaleResult
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


def read_item(item: BatchItem, input_dir: Path) -> Loaded:
    t0 = time.perf_counter()
    try:
        image = open_image(input_dir / item.input)
    except ImageInputError as e:
        # Named by the relative path, so records do not depend on where the folder is mounted.
        message = str(e).removeprefix(f"{input_dir / item.input}: ")
        return Loaded(item, error=f"{item.input}: {message}", timings={"read": _secs(t0)})
    return Loaded(item, image=image, timings={"read": _secs(t0)})


def upscale_item(loaded: Loaded, upscaler: Any) -> Done:
    """Run the model (or classical filter); a failure of this image becomes its error, not the run's."""
    from ..api import upscale_classical_result

    if loaded.error is not None:
        return Done(loaded.item, error=loaded.error, timings=loaded.timings)
    t0 = time.perf_counter()
    opts = loaded.item.options
    try:
        result = upscaler(loaded.image, opts) if opts.method == "sd" else upscale_classical_result(loaded.image, opts)
    except (ImageInputError, OptionsError, RuntimeError, ValueError, MemoryError) as e:
        # One image's failure (e.g. out of memory on a huge input) must not stop the batch: it is
        # recorded with its message and reported at the end. Interrupts and bugs still propagate.
        return Done(loaded.item, error=f"{loaded.item.input}: {type(e).__name__}: {e}", timings=loaded.timings)
    timings = {
        **loaded.timings,
        "upscale": _secs(t0),
        **{f"stage_{k}": v for k, v in result.metadata.get("timings", {}).items()},
    }
    return Done(loaded.item, result=result, timings=timings)


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
                save_image(image, target, saved_metadata(meta, item.input), overwrite=True,
                           icc_profile=done.result.icc_profile, exif=done.result.exif)
        except (OSError, ImageInputError) as e:
            error = f"{item.input}: cannot write output ({e})"
        timings["write"] = _secs(t0)
    return make_record(item, "ok" if error is None else "failed", error, meta, timings)


def make_record(
    item_or_input: BatchItem | str,
    status: Status,
    error: str | None,
    meta: dict[str, Any] | None = None,
    timings: dict[str, float] | None = None,
) -> dict[str, Any]:
    """One manifest line. Everything but "timings" is the same for the same job on any engine."""
    timings = {**(timings or {}), "finished_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}
    if isinstance(item_or_input, str):  # a file that is not an image
        return {"input": item_or_input, "status": status, "error": error, "timings": timings}
    item = item_or_input
    return manifest_record(
        input=item.input,
        outputs=item.outputs if status == "ok" else (),
        status=status,
        error=error,
        seed=item.options.seed,
        base_seed=item.base_seed,
        prompt_source=item.prompt_source,
        params=item.params,
        result_metadata=meta or {},
        timings=timings,
    )


def _secs(t0: float) -> float:
    return round(time.perf_counter() - t0, 4)
