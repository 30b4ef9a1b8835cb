"""Batch runs over a folder of images: discovery, prompts, per-image seeds, a manifest, resume.

    from . import BatchJob, run_batch
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

Modules, in the order of the flow: `job` (the job, its items, seeds and output names), `plan`, `items` (read,
upscale, write one item), `worker` (load the model once, run items in three stages), `run` (plan, manifest, engine, summary), `ray` (the
Ray Data engine).
This package imports no torch: planning and the classical methods stay fast.
"""

from .job import (
    IMAGE_SUFFIXES,
    MANIFEST_NAME,
    BatchError,
    BatchItem,
    BatchJob,
    BatchPlan,
    BatchSummary,
    image_seed,
    output_names,
)
from .plan import discover, plan, read_manifest, read_prompt_mapping, scan
from .run import Manifest, run_batch, summary_lines
from .worker import run_pipeline

__all__ = [
    "IMAGE_SUFFIXES",
    "MANIFEST_NAME",
    "BatchError",
    "BatchItem",
    "BatchJob",
    "BatchPlan",
    "BatchSummary",
    "Manifest",
    "discover",
    "image_seed",
    "output_names",
    "plan",
    "read_manifest",
    "read_prompt_mapping",
    "run_batch",
    "run_pipeline",
    "scan",
    "summary_lines",
]
