"""Planning a folder job (no model, no torch): find the images, read prompts and the manifest, decide what is done."""

from __future__ import annotations

import csv
import json
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..api import local_model_missing
from ..imageio import is_input_image
from ..options import OptionsError, option_defaults
from ..video import is_video
from .items import file_kind, sha256_file
from .job import (
    MANIFEST_NAME,
    SIDECAR_SUFFIX,
    BatchError,
    BatchItem,
    BatchJob,
    BatchPlan,
    Log,
    image_seed,
    output_names,
    record_input,
    shown_name,
    skip_message,
)


@dataclass(frozen=True)
class Found:
    """What `scan` found under an input folder: relative POSIX paths (real names), sorted."""

    images: list[str]
    others: list[str]  # regular files that are not images (nor prompt sidecars)
    not_read: list[tuple[str, str]]  # (path, reason): entries that are never read; folders end in "/"


def scan(input_dir: Path, recursive: bool, exclude: Path | None = None) -> Found:
    """Everything under input_dir, sorted into images, other files, and entries that are not read.

    Hidden files/folders are ignored, and so is `exclude` (the output folder, when inside the input
    folder). Not read, each with its reason: a sub-folder holding a manifest (the output folder of an
    earlier run), a link to a folder (not followed), a folder that cannot be listed, a dangling
    symlink, anything that is not a regular file (FIFO, socket, device: never opened, so never a hang),
    and an image without read permission. Prompt sidecars (`name.txt` next to an image `name.*`) are
    neither images nor "other files". Raises BatchError when input_dir itself cannot be listed.
    """
    exclude_resolved = exclude.resolve() if exclude is not None else None
    files: list[str] = []
    not_read: list[tuple[str, str]] = []
    errors: list[OSError] = []
    for root, dirs, names in os.walk(input_dir, onerror=errors.append):
        root_path = Path(root)
        rel_root = root_path.relative_to(input_dir)
        if not recursive:
            dirs[:] = []
        else:
            kept = []
            for d in sorted(dirs):
                path, rel = root_path / d, (rel_root / d).as_posix() + "/"
                if d.startswith(".") or path.resolve() == exclude_resolved:
                    continue
                if path.is_symlink():
                    not_read.append((rel, "a link to a folder; not followed"))
                elif os.path.lexists(path / MANIFEST_NAME):
                    not_read.append((rel, f"the output folder of an earlier sdx4 run, it holds {MANIFEST_NAME}"))
                else:
                    kept.append(d)
            dirs[:] = kept
        for name in names:
            if name.startswith("."):
                continue
            rel = (rel_root / name).as_posix()
            reason = _not_readable(root_path / name)
            if reason is None:
                files.append(rel)
            else:
                not_read.append((rel, reason))
    for e in errors:  # folders os.walk could not list
        where = Path(e.filename) if e.filename is not None else input_dir
        if where == input_dir:
            raise BatchError(f"{shown_name(str(input_dir))}: cannot list the folder: {e.strerror or e}")
        not_read.append((where.relative_to(input_dir).as_posix() + "/", f"cannot list the folder: {e.strerror or e}"))
    files.sort()
    not_read.sort()
    images = [f for f in files if is_input_image(f) or is_video(f)]  # a video is an item whose output is a video
    image_stems = {os.path.splitext(f)[0] for f in images}
    others = [
        f
        for f in files
        if not (is_input_image(f) or is_video(f))
        and not (Path(f).suffix == SIDECAR_SUFFIX and os.path.splitext(f)[0] in image_stems)
    ]
    return Found(images, others, not_read)


def _not_readable(path: Path) -> str | None:
    """Why a folder entry (not a folder) will not be read, or None; looks only at its metadata."""
    try:
        st = os.stat(path)  # follows links: a link to an image is read like the image
    except FileNotFoundError:
        return "a dangling symlink, its target does not exist" if os.path.islink(path) else "vanished while listing"
    except OSError as e:  # a symlink loop, a name too long, ...
        return f"cannot stat it: {e.strerror or e}"
    if not stat.S_ISREG(st.st_mode):
        return f"{file_kind(st.st_mode)}, not a regular file"
    if (is_input_image(path) or is_video(path)) and not os.access(path, os.R_OK):
        return "permission denied"
    return None


def discover(input_dir: Path, recursive: bool, exclude: Path | None = None) -> tuple[list[str], list[str]]:
    """(images, other files) under input_dir as sorted POSIX relative paths (see `scan`, which also
    lists the entries that are not read)."""
    found = scan(input_dir, recursive, exclude)
    return found.images, found.others


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
    found = scan(in_dir, job.recursive, exclude=out_dir)
    images, others = found.images, found.others

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

    model = job.load.model if job.options.method == "sd" else None
    if model is not None and local_model_missing(model):
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
            raise BatchError(f"{shown_name(rel)}: {e}") from None
        items.append(BatchItem(rel, output_names(rel, opts), opts, source, base_seed, model,
                               job.load.loras if model is not None else ()))

    owners: dict[str, str] = {}
    for item in items:
        for out in item.outputs:
            if out in owners:
                raise BatchError(
                    f"{shown_name(str(in_dir / owners[out]))} and {shown_name(str(in_dir / item.input))} "
                    f"would both write {shown_name(str(out_dir / out))}; rename one"
                )
            owners[out] = item.input

    last: dict[str, dict[str, Any]] = {}
    for rec in records:
        last[record_input(rec)] = rec
    todo, changed = [], []
    for item in items:
        rec = last.get(item.input)
        if not _is_done(item, rec, out_dir):
            todo.append(item)
        elif rec is not None and input_changed(rec, in_dir / item.input):
            todo.append(item)
            changed.append(item.input)

    def recorded(rel: str, error: str) -> bool:
        rec = last.get(rel, {})
        return rec.get("status") == "skipped" and rec.get("error") == error

    new_skips = tuple(rel for rel in others if not recorded(rel, skip_message(rel)))
    new_not_read = tuple((rel, why) for rel, why in found.not_read if not recorded(rel, skip_message(rel, why)))
    return BatchPlan(
        job, base_seed, tuple(items), tuple(todo), tuple(others), new_skips,
        not_read=tuple(found.not_read), new_not_read=new_not_read, changed=tuple(changed),
    )  # fmt: skip


def _is_done(item: BatchItem, last: dict[str, Any] | None, out_dir: Path) -> bool:
    """Done = the last record of this input is ok, has the same parameters, and its outputs exist.

    An option added to UpscaleOptions after a record was written is missing from its parameters; the run
    that wrote it behaved as that option's default does, so the default stands in for it (a new sdx4 does not
    redo a whole folder because it learned a new option)."""
    if last is None or last.get("status") != "ok" or not isinstance(last.get("params"), dict):
        return False
    recorded = {**option_defaults(), **last["params"]}
    return recorded == item.params and all((out_dir / out).is_file() for out in item.outputs)


def input_changed(record: dict[str, Any], path: Path) -> bool:
    """Whether the input differs from the bytes `record` was made from.

    Same size and mtime (ns, under "timings") as recorded: unchanged, without reading it. Otherwise the file is hashed
    again: a touched file with the same bytes is unchanged; other bytes are a change. A record without
    a stamp (written before sdx4 kept one) counts as unchanged, as it did then.
    """
    if "input_sha256" not in record:
        return False
    try:
        st = os.stat(path)
        mtime_ns = (record.get("timings") or {}).get("input_mtime_ns")
        if st.st_size == record.get("input_bytes") and st.st_mtime_ns == mtime_ns:
            return False
        return sha256_file(path) != record["input_sha256"]
    except OSError:
        return True  # gone or unreadable since planning: redo it, and the read will say why
