"""Running a folder job: plan it, keep its manifest, and hand the items to an engine (local: `worker`, in
this process; ray: `ray`, on a Ray Data actor pool); then the summary."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .items import make_record, printable
from .job import (
    TEMP_FILE,
    BatchError,
    BatchItem,
    BatchJob,
    BatchSummary,
    Engine,
    Log,
    is_escaped,
    shown_name,
    skip_message,
)
from .plan import plan
from .worker import distinct_prompts, load_upscaler, run_pipeline


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
        line = json.dumps(record, sort_keys=True, ensure_ascii=False)
        if is_escaped(line):  # a file name's undecodable bytes slipped into a message: never a reason to stop
            line = json.dumps(_printable(record), sort_keys=True, ensure_ascii=False)
        self._file.seek(0, os.SEEK_END)
        self._file.write((line + "\n").encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _printable(value: Any) -> Any:
    """`value` with every string made valid UTF-8 (`items.printable`), in dicts and lists too."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable(k): _printable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_printable(v) for v in value]
    return value


def remove_stale_temp_files(output_dir: Path) -> list[Path]:
    """Temp files of outputs whose writer was killed (SIGKILL) mid-write; nothing else is touched."""
    removed = []
    if output_dir.is_dir():
        for root, _dirs, names in os.walk(output_dir):
            for name in names:
                if TEMP_FILE.match(name):
                    p = Path(root) / name
                    p.unlink(missing_ok=True)
                    removed.append(p)
    return removed


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
        from .ray import import_ray

        import_ray()
    elif engine != "local":
        raise BatchError(f"engine must be local or ray; got {engine!r}")
    p = plan(job)
    summary = BatchSummary(
        already_done=p.done, base_seed=p.base_seed, skipped=list(p.not_images), not_read=list(p.not_read)
    )
    job.output_dir.mkdir(parents=True, exist_ok=True)
    with Manifest(job.manifest_path) as manifest:
        for path in remove_stale_temp_files(job.output_dir):
            say(f"removed a partial file left by an interrupted run: {shown_name(str(path))}")
        for rel in p.new_skips:
            manifest.append(make_record(rel, "skipped", skip_message(rel)))
        for rel, reason in p.new_not_read:
            manifest.append(make_record(rel, "skipped", skip_message(rel, reason)))
        say(
            f"{len(p.items)} image(s) in {shown_name(str(job.input_dir))}: {p.done} already done, {len(p.todo)} to do"
            + (f"; {len(p.not_images)} other file(s) skipped" if p.not_images else "")
            + (f"; {len(p.not_read)} path(s) not read (listed at the end)" if p.not_read else "")
            + f"; base seed {p.base_seed}"
        )
        for rel in p.changed:
            say(f"{shown_name(rel)}: changed since its last run (other bytes); redone")
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
                from .ray import run_ray

                run_ray(job, todo, on_record, ray_config, log=say)
            else:
                if upscaler is None and job.options.method == "sd":
                    t1 = time.perf_counter()
                    upscaler = load_upscaler(job, distinct_prompts(todo))
                    for line in upscaler.describe(time.perf_counter() - t1):
                        say(line)
                run_pipeline(todo, upscaler, job.input_dir, job.output_dir, on_record)
    summary.seconds = round(time.perf_counter() - t0, 3)
    return summary


def summary_lines(summary: BatchSummary, job: BatchJob) -> Iterator[str]:
    yield (
        f"done in {summary.seconds:.1f} s: {len(summary.ok)} upscaled, {summary.already_done} already done, "
        f"{len(summary.failed)} failed, {len(summary.skipped)} not images"
        + (f", {len(summary.not_read)} not read" if summary.not_read else "")
        + f"; manifest {shown_name(str(job.manifest_path))}"
    )
    for rel in summary.skipped:
        yield f"  skipped (not an image): {shown_name(rel)}"
    for rel, reason in summary.not_read:
        yield f"  skipped ({reason}): {shown_name(rel)}"
    for _rel, error in summary.failed:
        yield f"  failed: {error}"

