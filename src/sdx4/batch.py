"""Batch runs over a folder of images: discovery, prompts, per-image seeds, a manifest, resume.

    from sdx4.batch import BatchJob, run_batch
    summary = run_batch(BatchJob("photos", "photos_x4", UpscaleOptions(steps=30, seed=7), recursive=True))

The flow, top to bottom:
  1. plan (no model, no torch): find the images, read the prompt mapping and sidecars, derive each
     image's seed, read the manifest, and decide what is already done. Every problem with the job
     itself (a missing or malformed mapping, two inputs writing one output, ...) is raised here, as a
     `BatchError`, before any work starts.
  2. run: the local engine loads the model once and runs a three-stage pipeline (a reader thread
     decodes the next image, the main thread upscales the current one, a writer thread writes the
     previous one and its manifest record); `batch_ray` runs the same items on a Ray Data actor pool.
  3. every input attempt leaves one JSON line in `OUTDIR/sdx4-manifest.jsonl` (appended, flushed and
     fsynced after each image); outputs are written atomically (temp file + rename).

Seeds: `image_seed(base_seed, rel_path)` = the first 4 bytes (big-endian) of
sha256(f"{base_seed}:{rel_path}") -> 0 .. 2**32-1, with `rel_path` the input's path relative to the
input folder, in POSIX form ("sub/a.png"). The same image gets the same seed (and so the same output)
whatever the order, the sharding or the resume. Without a seed, a base seed is drawn once, recorded in
every manifest record ("base_seed"), and reused when the run is resumed.

This module imports no torch: planning and the classical methods stay fast.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import queue
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from ._version import __version__
from .imageio import ImageInputError, open_image, save_image
from .options import DEFAULT_MODEL, OptionsError, UpscaleOptions

MANIFEST_NAME = "sdx4-manifest.jsonl"
#: Files read as images (by suffix, case-insensitive); other files are skipped and reported.
IMAGE_SUFFIXES = (
    ".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".tif", ".tiff", ".bmp", ".dib", ".gif",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".qoi", ".avif", ".jp2", ".j2k",
)  # fmt: skip
#: A prompt sidecar: `name.txt` next to `name.png`.
SIDECAR_SUFFIX = ".txt"
#: Temp files that `imageio.save_image` leaves only when the process is killed (SIGKILL) mid-write.
_TEMP_FILE = re.compile(r"^\..+\.(png|jpg|jpeg|webp)\.[A-Za-z0-9_]+\.tmp$")

Status = Literal["ok", "failed", "skipped"]
Engine = Literal["local", "ray"]
Log = Callable[[str], None]


class BatchError(ValueError):
    """The job cannot start (bad folder, mapping, manifest, ...); the message names the file and the problem."""


# --------------------------------------------------------------------------------------------------
# The job and its items
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchJob:
    """One batch run: every image under `input_dir` upscaled into the mirrored tree under `output_dir`.

    options: the parameters for every image; `prompt`/`negative_prompt` are the fallback when an image
      has no mapping entry and no sidecar, and `seed` is the BASE seed (None: drawn once per run and
      reused on resume) from which each image's own seed is derived.
    model/device/dtype/vae_dtype/low_memory/compile: as for `sdx4.load` (not used by the classical methods).
    recursive: also walk sub-folders (hidden files and folders, names starting with ".", are ignored).
    prompts_file: a CSV or JSONL mapping of relative path -> prompt [/ negative prompt].
    """

    input_dir: Path
    output_dir: Path
    options: UpscaleOptions = field(default_factory=UpscaleOptions)
    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    recursive: bool = False
    prompts_file: Path | None = None
    vae_dtype: str = "fp32"
    low_memory: bool | None = None  # None: sdx4.load's default (on for the CPU)
    compile: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_dir", Path(self.input_dir))
        object.__setattr__(self, "output_dir", Path(self.output_dir))
        if self.prompts_file is not None:
            object.__setattr__(self, "prompts_file", Path(self.prompts_file))

    @property
    def manifest_path(self) -> Path:
        return self.output_dir / MANIFEST_NAME


@dataclass(frozen=True)
class BatchItem:
    """One input image and everything needed to upscale it; plain data (it travels to Ray workers)."""

    input: str  # relative to the input folder, POSIX form
    outputs: tuple[str, ...]  # relative to the output folder, one per generated image
    options: UpscaleOptions  # this image's prompt and seed filled in
    prompt_source: str  # "mapping", "sidecar" or "option"
    base_seed: int
    model: str | None  # None for the classical methods (no model involved)

    @property
    def params(self) -> dict[str, Any]:
        """What decides the output: compared with the manifest to tell done from to-do."""
        return {**self.options.to_dict(), "model": self.model}


@dataclass(frozen=True)
class BatchPlan:
    job: BatchJob
    base_seed: int
    items: tuple[BatchItem, ...]  # every image found, in sorted order
    todo: tuple[BatchItem, ...]  # those not done yet with the same parameters
    not_images: tuple[str, ...]  # other files (reported as skipped)
    new_skips: tuple[str, ...]  # of those, the ones the manifest does not list as skipped yet

    @property
    def done(self) -> int:
        return len(self.items) - len(self.todo)


@dataclass
class BatchSummary:
    ok: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (input, error)
    skipped: list[str] = field(default_factory=list)  # not images
    already_done: int = 0
    base_seed: int = 0
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def image_seed(base_seed: int, rel_path: str) -> int:
    """The seed of one image: sha256(f"{base_seed}:{rel_path}")[:4] as a big-endian int, 0..2**32-1."""
    digest = hashlib.sha256(f"{base_seed}:{rel_path}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def output_names(rel_input: str, options: UpscaleOptions) -> tuple[str, ...]:
    """`sub/a.jpg` -> `sub/a_x4.png` (`_x4_bicubic` for classical methods; `_1`, `_2`... per image)."""
    parent, stem = os.path.split(rel_input)
    stem = os.path.splitext(stem)[0]
    tag = f"_x{options.scale}" if options.method == "sd" else f"_x{options.scale}_{options.method}"
    n = options.num_images
    names = [f"{stem}{tag}.png"] if n == 1 else [f"{stem}{tag}_{i + 1}.png" for i in range(n)]
    return tuple(f"{parent}/{name}" if parent else name for name in names)


# --------------------------------------------------------------------------------------------------
# 1. Plan
# --------------------------------------------------------------------------------------------------


def discover(input_dir: Path, recursive: bool, exclude: Path | None = None) -> tuple[list[str], list[str]]:
    """(images, other files) under input_dir as sorted POSIX relative paths.

    Hidden files/folders are ignored, and so is `exclude` (an output folder inside the input folder).
    Prompt sidecars (`name.txt` next to an image `name.*`) are neither images nor "other files".
    """
    exclude_resolved = exclude.resolve() if exclude is not None else None
    files: list[str] = []
    for root, dirs, names in os.walk(input_dir):
        root_path = Path(root)
        if not recursive:
            dirs[:] = []
        else:
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (root_path / d).resolve() != exclude_resolved)
        for name in names:
            if name.startswith("."):
                continue
            rel = (root_path / name).relative_to(input_dir).as_posix()
            if (root_path / name).is_file():
                files.append(rel)
    files.sort()
    images = [f for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    image_stems = {os.path.splitext(f)[0] for f in images}
    others = [
        f
        for f in files
        if Path(f).suffix.lower() not in IMAGE_SUFFIXES
        and not (Path(f).suffix == SIDECAR_SUFFIX and os.path.splitext(f)[0] in image_stems)
    ]
    return images, others


def read_prompt_mapping(path: Path) -> dict[str, tuple[str, str | None]]:
    """CSV (header: path,prompt[,negative_prompt]) or JSONL ({"path", "prompt"[, "negative_prompt"]}).

    Returns relative path -> (prompt, negative prompt or None). Raises BatchError naming the file and
    line for anything malformed: unknown suffix, missing columns/keys, non-string values, duplicates.
    """
    if not path.is_file():
        raise BatchError(f"{path}: prompt mapping file not found")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise BatchError(f"{path}: cannot read prompt mapping ({e})") from None
    rows: list[tuple[int, dict[str, Any]]] = []
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        fields = reader.fieldnames or []
        missing = [c for c in ("path", "prompt") if c not in fields]
        if missing:
            raise BatchError(
                f"{path}: CSV header must have columns path,prompt[,negative_prompt]; "
                f"missing {', '.join(missing)} (header: {','.join(fields) or 'empty'})"
            )
        unknown = [c for c in fields if c not in ("path", "prompt", "negative_prompt")]
        if unknown:
            raise BatchError(
                f"{path}: unknown CSV column(s) {', '.join(unknown)}; allowed: path, prompt, negative_prompt"
            )
        for row in reader:
            if None in row or any(v is None for v in row.values()):
                raise BatchError(
                    f"{path} line {reader.line_num}: expected {len(fields)} fields, got a different number"
                )
            rows.append((reader.line_num, row))
    elif suffix in (".jsonl", ".ndjson"):
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise BatchError(f"{path} line {line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise BatchError(f"{path} line {line_no}: expected a JSON object, got {type(obj).__name__}")
            unknown = [k for k in obj if k not in ("path", "prompt", "negative_prompt")]
            if unknown:
                raise BatchError(
                    f"{path} line {line_no}: unknown key(s) {', '.join(unknown)}; allowed: path, prompt, negative_prompt"
                )
            if "path" not in obj or "prompt" not in obj:
                raise BatchError(f'{path} line {line_no}: needs "path" and "prompt"; got keys {sorted(obj)}')
            rows.append((line_no, obj))
    else:
        raise BatchError(f"{path}: prompt mapping must be a .csv or .jsonl file; got {suffix or 'no suffix'}")
    mapping: dict[str, tuple[str, str | None]] = {}
    for line_no, row in rows:
        for key in ("path", "prompt", "negative_prompt"):
            if key in row and not isinstance(row[key], str):
                raise BatchError(f"{path} line {line_no}: {key} must be a string; got {row[key]!r}")
        rel = row["path"].strip().replace("\\", "/")
        if not rel:
            raise BatchError(f"{path} line {line_no}: empty path")
        if rel in mapping:
            raise BatchError(f"{path} line {line_no}: {rel} is listed twice")
        neg = row.get("negative_prompt")
        mapping[rel] = (row["prompt"], neg if neg else None)
    return mapping


def read_sidecar(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise BatchError(f"{path}: cannot read prompt sidecar ({e})") from None


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """All records of a manifest ([] when there is none).

    A torn LAST line (the process was killed while appending it) is ignored; any other line that is not
    a JSON object is an error (someone edited the file), named with its line number.
    """
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    records = []
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict) or "input" not in rec or "status" not in rec:
                raise ValueError("not a manifest record")
        except ValueError as e:
            if i == len(lines):  # the torn tail of a killed run: no newline after it
                continue
            raise BatchError(f"{path} line {i}: not a valid manifest record ({e}); fix or remove that line") from None
        records.append(rec)
    return records


def plan(job: BatchJob, log: Log | None = None) -> BatchPlan:
    """Everything about the job that can be checked without the model; raises BatchError on problems."""
    in_dir, out_dir = job.input_dir, job.output_dir
    if not in_dir.is_dir():
        raise BatchError(f"{in_dir}: not a folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise BatchError(f"{out_dir}: exists and is not a folder")
    if out_dir.resolve() == in_dir.resolve():
        raise BatchError(f"{out_dir}: the output folder must differ from the input folder")
    images, others = discover(in_dir, job.recursive, exclude=out_dir)

    mapping = read_prompt_mapping(job.prompts_file) if job.prompts_file is not None else {}
    unknown = sorted(set(mapping) - set(images))
    if unknown:
        raise BatchError(
            f"{job.prompts_file}: {len(unknown)} path(s) match no image under {in_dir}"
            + ("" if job.recursive else " (without --recursive)")
            + f", e.g. {unknown[0]!r}; paths are relative to the input folder, like 'sub/a.png'"
        )

    records = read_manifest(job.manifest_path)
    if job.options.seed is not None:
        base_seed = job.options.seed
    else:  # resume: the run seed recorded by the previous run
        recorded = [r["base_seed"] for r in records if isinstance(r.get("base_seed"), int)]
        base_seed = recorded[-1] if recorded else secrets.randbelow(2**32)

    model = job.model if job.options.method == "sd" else None
    if model is not None and _missing_local_model(model):
        raise BatchError(
            f"model folder {model!r} does not exist (--model takes a folder in diffusers layout or a Hub id)"
        )
    items = []
    for rel in images:
        prompt, negative, source = job.options.prompt, job.options.negative_prompt, "option"
        sidecar = in_dir / (os.path.splitext(rel)[0] + SIDECAR_SUFFIX)
        if rel in mapping:
            prompt, neg = mapping[rel]
            negative, source = (neg if neg is not None else negative), "mapping"
        elif sidecar.is_file():
            prompt, source = read_sidecar(sidecar), "sidecar"
        try:
            opts = job.options.replace(prompt=prompt, negative_prompt=negative, seed=image_seed(base_seed, rel))
        except OptionsError as e:
            raise BatchError(f"{rel}: {e}") from None
        items.append(BatchItem(rel, output_names(rel, opts), opts, source, base_seed, model))

    owners: dict[str, str] = {}
    for item in items:
        for out in item.outputs:
            if out in owners:
                raise BatchError(
                    f"{in_dir / owners[out]} and {in_dir / item.input} would both write {out_dir / out}; rename one"
                )
            owners[out] = item.input

    last: dict[str, dict[str, Any]] = {}
    for rec in records:
        last[rec["input"]] = rec
    todo = tuple(item for item in items if not _is_done(item, last.get(item.input), out_dir))
    new_skips = tuple(rel for rel in others if last.get(rel, {}).get("status") != "skipped")
    return BatchPlan(job, base_seed, tuple(items), todo, tuple(others), new_skips)


def _missing_local_model(model: str) -> bool:
    """A --model that is clearly a local path (the rule of models._looks_like_path) but is not there.

    Checked while planning, so that a typo fails at once on every engine (a Ray actor would only fail
    after the cluster has started it); the full check happens when the model loads.
    """
    looks_like_path = model.startswith((".", "/", "~")) or "\\" in model or model.count("/") != 1
    return looks_like_path and not Path(model).expanduser().exists()


def _is_done(item: BatchItem, last: dict[str, Any] | None, out_dir: Path) -> bool:
    """Done = the last record of this input is ok, has the same parameters, and its outputs exist."""
    return (
        last is not None
        and last.get("status") == "ok"
        and last.get("params") == item.params
        and all((out_dir / out).is_file() for out in item.outputs)
    )


# --------------------------------------------------------------------------------------------------
# 2. Run one item (shared by the local and the Ray engine)
# --------------------------------------------------------------------------------------------------


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
    from .api import upscale_classical_result

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
                save_image(image, target, {**meta, "input": item.input}, overwrite=True)
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
    item, meta = item_or_input, meta or {}
    record: dict[str, Any] = {
        "input": item.input,
        "outputs": list(item.outputs) if status == "ok" else [],
        "status": status,
        "error": error,
        "seed": item.options.seed,
        "base_seed": item.base_seed,
        "prompt_source": item.prompt_source,
        "params": item.params,
        "sdx4_version": __version__,
    }
    for key in ("input_size", "output_size", "device", "unet_dtype", "random_weights"):
        if key in meta:
            record[key] = meta[key]
    record["timings"] = timings
    return record


def _secs(t0: float) -> float:
    return round(time.perf_counter() - t0, 4)


# --------------------------------------------------------------------------------------------------
# 3. The manifest writer and the local engine
# --------------------------------------------------------------------------------------------------


class Manifest:
    """Append-only JSON Lines; each record is flushed and fsynced, so a kill loses at most the line in
    flight (a torn last line is ignored when read, and cut off here before appending).

    Holds an exclusive lock on the file while open: two runs into one folder would mix their records.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "a+b")  # noqa: SIM115 - closed in close()
        try:
            import fcntl

            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - not POSIX: no lock
            pass
        except OSError:
            self._file.close()
            raise BatchError(f"{path}: another sdx4 run is writing to this folder") from None
        self._cut_torn_tail()

    def _cut_torn_tail(self) -> None:
        f = self._file
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return
        f.seek(0)
        data = f.read()
        if not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
            f.flush()
            os.fsync(f.fileno())

    def append(self, record: dict[str, Any]) -> None:
        self._file.seek(0, os.SEEK_END)
        self._file.write((json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remove_stale_temp_files(output_dir: Path) -> list[Path]:
    """Temp files of outputs whose writer was killed (SIGKILL) mid-write; nothing else is touched."""
    removed = []
    if output_dir.is_dir():
        for root, _dirs, names in os.walk(output_dir):
            for name in names:
                if _TEMP_FILE.match(name):
                    p = Path(root) / name
                    p.unlink(missing_ok=True)
                    removed.append(p)
    return removed


_END = object()


def distinct_prompts(items: list[BatchItem], limit: int = 32) -> list[str]:
    """The prompts (and negative prompts where guidance needs them) the diffusion items use, first
    seen first, at most `limit` (the prompt cache's size): later ones are encoded when they come."""
    prompts: dict[str, None] = {}
    for item in items:
        o = item.options
        if o.method == "sd":
            prompts.update(dict.fromkeys(o.text_prompts))
    return list(prompts)[:limit]


def run_pipeline(
    items: Iterable[BatchItem],
    upscaler: Any,
    input_dir: Path,
    output_dir: Path,
    on_record: Callable[[dict[str, Any]], None],
    prefetch: int = 2,
) -> None:
    """Read -> upscale -> write with the three stages overlapped.

    A reader thread decodes up to `prefetch` images ahead; the calling thread runs the model; a writer
    thread writes outputs and calls `on_record` (in input order) while the next image runs. On an
    interrupt (Ctrl-C) the reader stops, the writer finishes the images already upscaled, and the
    interrupt propagates.
    """
    items = list(items)
    if upscaler is not None:
        # All prompts up front: with the low-memory policy the text encoder is then loaded once.
        upscaler.encode_prompts(distinct_prompts(items))
    read_q: queue.Queue[Any] = queue.Queue(maxsize=prefetch)
    write_q: queue.Queue[Any] = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            for item in items:
                if stop.is_set():
                    break
                loaded = read_item(item, input_dir)
                while not stop.is_set():
                    try:
                        read_q.put(loaded, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread below
            errors.append(e)
        finally:
            _put_end(read_q, stop)

    def writer() -> None:
        try:
            while True:
                done = write_q.get()
                if done is _END:
                    return
                on_record(write_item(done, output_dir))
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread below
            errors.append(e)
            stop.set()
            while write_q.get() is not _END:  # drain so the main thread never blocks on put
                pass

    threads = [threading.Thread(target=reader, name="sdx4-reader", daemon=True)]
    threads.append(threading.Thread(target=writer, name="sdx4-writer", daemon=True))
    for t in threads:
        t.start()
    try:
        while not stop.is_set():
            loaded = read_q.get()
            if loaded is _END:
                break
            write_q.put(upscale_item(loaded, upscaler))
    finally:
        stop.set()
        write_q.put(_END)
        threads[1].join()  # the writer finishes what was already upscaled
        while threads[0].is_alive():  # unblock the reader if it waits on a full queue
            try:
                read_q.get_nowait()
            except queue.Empty:
                pass
            threads[0].join(timeout=0.05)
    if errors:
        raise errors[0]


def _put_end(q: queue.Queue[Any], stop: threading.Event) -> None:
    while True:
        try:
            q.put(_END, timeout=0.1)
            return
        except queue.Full:
            if stop.is_set():
                try:
                    q.get_nowait()
                except queue.Empty:
                    pass


def load_upscaler(job: BatchJob, prompts: list[str] | None = None) -> Any:
    """The model, once per engine worker (None for the classical methods: no model, no torch).
    `prompts` are encoded before the UNet is loaded (see sdx4.load); default: the job's own."""
    if job.options.method != "sd":
        return None
    from .api import load

    return load(
        job.model,
        device=job.device,
        dtype=job.dtype,
        vae_dtype=job.vae_dtype,
        low_memory=job.low_memory,
        compile=job.compile,
        prompts=job.options.text_prompts if prompts is None else prompts,
    )


def run_batch(
    job: BatchJob,
    *,
    engine: Engine = "local",
    ray_config: Any = None,
    upscaler: Any = None,
    log: Log | None = None,
    order: Callable[[list[BatchItem]], Iterable[BatchItem]] | None = None,
) -> BatchSummary:
    """Plan, then run the items not done yet; returns what happened (the manifest has the details).

    upscaler: an already loaded `Upscaler` to use (local engine only); loaded from `job` when None.
    order: reorders (or selects from) the to-do items; tests use it to show that results do not
      depend on the order or the sharding.
    """
    say = log or (lambda msg: None)
    t0 = time.perf_counter()
    if engine == "ray":  # before anything is written: a missing Ray is reported up front
        from .batch_ray import import_ray

        import_ray()
    elif engine != "local":
        raise BatchError(f"engine must be local or ray; got {engine!r}")
    p = plan(job)
    summary = BatchSummary(already_done=p.done, base_seed=p.base_seed, skipped=list(p.not_images))
    job.output_dir.mkdir(parents=True, exist_ok=True)
    with Manifest(job.manifest_path) as manifest:
        for path in remove_stale_temp_files(job.output_dir):
            say(f"removed a partial file left by an interrupted run: {path}")
        for rel in p.new_skips:
            manifest.append(make_record(rel, "skipped", f"{rel}: not an image (suffix {Path(rel).suffix or 'none'})"))
        say(
            f"{len(p.items)} image(s) in {job.input_dir}: {p.done} already done, {len(p.todo)} to do"
            + (f"; {len(p.not_images)} other file(s) skipped" if p.not_images else "")
            + f"; base seed {p.base_seed}"
        )
        todo = list(p.todo) if order is None else list(order(list(p.todo)))
        n = len(todo)
        counter = iter(range(1, n + 1))

        def on_record(record: dict[str, Any]) -> None:
            manifest.append(record)
            i = next(counter)
            if record["status"] == "ok":
                summary.ok.append(record["input"])
                outs = ", ".join(record["outputs"])
                say(
                    f"[{i}/{n}] {record['input']} -> {outs} (seed {record['seed']}, {record['timings'].get('upscale', 0):.1f} s)"
                )
            else:
                summary.failed.append((record["input"], record["error"]))
                say(f"[{i}/{n}] {record['input']} FAILED: {record['error']}")

        if todo:
            if engine == "ray":
                from .batch_ray import run_ray

                run_ray(job, todo, on_record, ray_config, log=say)
            else:
                if upscaler is None and job.options.method == "sd":
                    t1 = time.perf_counter()
                    upscaler = load_upscaler(job, distinct_prompts(todo))
                    info = upscaler.info
                    say(
                        f"loaded {job.model} on {info['device']} ({info['unet_dtype']}) in {time.perf_counter() - t1:.1f} s"
                    )
                    if info["random_weights"]:
                        say("warning: this model has RANDOM WEIGHTS (made for tests/benchmarks); its output is noise")
                run_pipeline(todo, upscaler, job.input_dir, job.output_dir, on_record)
    summary.seconds = round(time.perf_counter() - t0, 3)
    return summary


def summary_lines(summary: BatchSummary, job: BatchJob) -> Iterator[str]:
    yield (
        f"done in {summary.seconds:.1f} s: {len(summary.ok)} upscaled, {summary.already_done} already done, "
        f"{len(summary.failed)} failed, {len(summary.skipped)} not images; manifest {job.manifest_path}"
    )
    for rel in summary.skipped:
        yield f"  skipped (not an image): {rel}"
    for _rel, error in summary.failed:
        yield f"  failed: {error}"


__all__ = [
    "IMAGE_SUFFIXES",
    "MANIFEST_NAME",
    "BatchError",
    "BatchItem",
    "BatchJob",
    "BatchPlan",
    "BatchSummary",
    "image_seed",
    "output_names",
    "plan",
    "read_manifest",
    "read_prompt_mapping",
    "run_batch",
    "run_pipeline",
]
