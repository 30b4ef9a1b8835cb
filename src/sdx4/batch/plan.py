"""Planning a folder job (no model, no torch): find the images, read prompts and the manifest, decide what is done."""

from __future__ import annotations

import csv
import json
import os
import secrets
from pathlib import Path
from typing import Any

from ..api import local_model_missing
from ..imageio import is_input_image
from ..options import OptionsError
from .job import (
    SIDECAR_SUFFIX,
    BatchError,
    BatchItem,
    BatchJob,
    BatchPlan,
    Log,
    image_seed,
    output_names,
)


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
    images = [f for f in files if is_input_image(f)]
    image_stems = {os.path.splitext(f)[0] for f in images}
    others = [
        f
        for f in files
        if not is_input_image(f)
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


def _is_done(item: BatchItem, last: dict[str, Any] | None, out_dir: Path) -> bool:
    """Done = the last record of this input is ok, has the same parameters, and its outputs exist."""
    return (
        last is not None
        and last.get("status") == "ok"
        and last.get("params") == item.params
        and all((out_dir / out).is_file() for out in item.outputs)
    )
