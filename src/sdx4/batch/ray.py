"""The Ray Data engine for batch runs: the same items, outputs and manifest as the local engine.

    sdx4 upscale photos -o photos_x4 --engine ray --workers 4 --gpus-per-worker 1 --ray-address auto

Each row of the Ray dataset is one `BatchItem` as JSON (a relative path and its parameters, never
pixels). An actor pool (`map_batches` with a callable class on a fixed `ActorPoolStrategy(size=workers)`) runs the items:
each actor loads the model once, reads the images from the shared input folder, writes the outputs
atomically into the shared output folder, and returns the manifest records; the driver alone appends
them to the manifest. So INPUT and OUTDIR must be paths that every Ray node can read and write (the
same path on a shared filesystem).

Ray is an optional extra (`pip install sdx4[ray]`), imported only here and only when used.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..options import LoadOptions, LoraSpec, UpscaleOptions
from .job import BatchItem, BatchJob, Log
from .worker import load_upscaler, run_pipeline


class RayMissingError(ImportError):
    """Ray is not installed; the message says how to install it."""


class RayRunError(RuntimeError):
    """The Ray job itself failed (cluster unreachable, a worker could not load the model, ...)."""


@dataclass(frozen=True)
class RayConfig:
    """Where and how wide to run.

    address: None starts a local Ray instance (all CPUs/GPUs of this machine); "auto" joins the cluster
      this machine belongs to (`ray start --head` / `ray start --address ...`); "ray://HOST:10001"
      connects through Ray Client. If Ray is already initialised in this process, that session is used.
    workers: actors in the pool, each holding one copy of the model.
    gpus_per_worker: GPUs reserved per actor; None = 1 when the cluster has GPUs and the job's device
      is not "cpu", else 0. Fractions (0.5) put several actors on one GPU.
    cpus_per_worker: CPUs reserved per actor (also the torch thread count Ray gives it).
    batch_size: items handed to an actor at once; within a batch the actor overlaps reading, upscaling
      and writing (see batch.run_pipeline).
    """

    address: str | None = None
    workers: int = 1
    gpus_per_worker: float | None = None
    cpus_per_worker: float = 1.0
    batch_size: int = 4


def import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise RayMissingError(
            f"the Ray engine needs Ray Data, which is not installed ({e}): pip install sdx4[ray]  "
            "(or: pip install 'ray[data]')"
        ) from None
    return ray


def item_to_json(item: BatchItem) -> str:
    d = asdict(item)
    d["options"] = item.options.to_dict()
    return json.dumps(d, sort_keys=True)


def item_from_json(text: str) -> BatchItem:
    d = json.loads(text)
    return BatchItem(
        input=d["input"],
        outputs=tuple(d["outputs"]),
        options=UpscaleOptions(**d["options"]),
        prompt_source=d["prompt_source"],
        base_seed=d["base_seed"],
        model=d["model"],
        loras=tuple(LoraSpec.of(x) for x in d.get("loras", ())),
    )


def job_to_dict(job: BatchJob) -> dict[str, Any]:
    """Plain JSON-able data; absolute paths: the actors may run with another working directory (or on
    other machines)."""
    return {
        "input_dir": str(job.input_dir.resolve()),
        "output_dir": str(job.output_dir.resolve()),
        "options": job.options.to_dict(),
        "load": asdict(job.load),  # every LoadOptions field, later ones included
    }


def job_from_dict(d: dict[str, Any]) -> BatchJob:
    return BatchJob(
        input_dir=Path(d["input_dir"]),
        output_dir=Path(d["output_dir"]),
        options=UpscaleOptions(**d["options"]),
        load=LoadOptions(**d["load"]),
    )


class UpscaleActor:
    """One Ray actor: loads the model once, then upscales batches of items (rows: {"item": json})."""

    def __init__(self, job: dict[str, Any]) -> None:
        from ..api import quiet_libraries

        quiet_libraries()
        self.job = job_from_dict(job)
        self.upscaler = load_upscaler(self.job)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        items = [item_from_json(str(s)) for s in batch["item"]]
        records: list[dict[str, Any]] = []
        run_pipeline(items, self.upscaler, self.job.input_dir, self.job.output_dir, records.append)
        return {"record": [json.dumps(r, sort_keys=True) for r in records]}


def gpus_per_worker(ray: Any, config: RayConfig, device: str) -> float:
    if config.gpus_per_worker is not None:
        return config.gpus_per_worker
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    return 1.0 if has_gpus and device != "cpu" else 0.0


def run_ray(
    job: BatchJob,
    items: list[BatchItem],
    on_record: Callable[[dict[str, Any]], None],
    config: RayConfig | None = None,
    log: Log | None = None,
) -> None:
    """Run `items` on a Ray Data actor pool; `on_record` gets each manifest record as it comes back."""
    config = config or RayConfig()
    say = log or (lambda msg: None)
    ray = import_ray()
    started_here = False
    if not ray.is_initialized():
        try:
            ray.init(address=config.address, include_dashboard=False, logging_level=logging.WARNING)
        except Exception as e:
            raise RayRunError(f"cannot start or reach Ray at {config.address or 'a new local instance'}: {e}") from e
        started_here = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        gpus = gpus_per_worker(ray, config, job.load.device)
        cluster_gpus = ray.cluster_resources().get("GPU", 0)
        if gpus > cluster_gpus:  # Ray would wait forever for an actor it can never place
            raise RayRunError(
                f"--gpus-per-worker {gpus:g}: the Ray cluster has {cluster_gpus:g} GPU(s); "
                "use --gpus-per-worker 0 (CPU) or bring up GPU nodes first"
            )
        say(f"ray: {config.workers} worker(s), {gpus:g} GPU and {config.cpus_per_worker:g} CPU each")
        rows = [{"item": item_to_json(item)} for item in items]
        ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 4 * config.workers)))
        ds = ds.map_batches(
            UpscaleActor,
            fn_constructor_kwargs={"job": job_to_dict(job)},
            batch_size=config.batch_size,
            compute=ray.data.ActorPoolStrategy(size=config.workers),  # a fixed pool: one model per actor
            num_gpus=gpus,
            num_cpus=config.cpus_per_worker,
        )
        try:
            for row in ds.iter_rows():
                on_record(json.loads(row["record"]))
        except (KeyboardInterrupt, RayMissingError):
            raise
        except Exception as e:
            raise RayRunError(f"the Ray job failed: {type(e).__name__}: {e}") from e
    finally:
        if started_here:
            ray.shutdown()
