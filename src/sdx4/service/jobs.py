"""The job queue of the HTTP service: one worker thread owns the model; request handlers only queue.

    submit() -> queued -> (worker) running, step i of n -> done | failed | cancelled
                  \\-> cancel() while queued -> cancelled

Everything here is plain threading (no asyncio, no FastAPI) so it can be tested alone. The upscaler is
any object called as `upscaler(image, options, progress=fn)` returning an `UpscaleResult`; `fn(i, n)`
is called after each denoising step and raises `JobCancelled` to stop the job at that step. A job may
name the LoRAs merged for it (`Job.loras`): the worker hands them to `switch_loras` before running it, so the
model changes only between jobs, on the worker's thread. Classical
methods (`method=bicubic` ...) go through the same queue and worker: one queue, one order, one place
where CPU/GPU work happens.

Results are written atomically (`imageio.save_image`) into `results_dir` under random ids; finished
jobs are forgotten (and their files deleted) after `result_ttl_s`, beyond `max_results` finished jobs,
or beyond `max_result_bytes` of files, oldest first.

Jobs survive the process (`store.py`): each change of state, the options, the uploaded image and the
result files are recorded in the results folder. A manager started on a folder an earlier one left
(killed, crashed, or stopped) serves its finished jobs, runs its queued ones, and re-queues the one that
was running (once: a job that was running when the server died twice fails with that reason, so a job
that kills the server cannot kill it forever). Jobs a graceful shutdown cancelled run again too.
Without `results_dir` the folder is temporary: removed at close, and at start-up the temporary folders
of dead servers are removed.

(Longer than the ~500 lines a module should keep to: JobManager is one class whose lock guards the queue,
the worker's hand-over and the store's records together; cut in two, that lock would be shared across files.)
"""

from __future__ import annotations

import collections
import inspect
import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..imageio import LoadedImage, numbered_name, save_image
from ..metadata import saved_metadata
from ..options import OptionsError, UpscaleOptions
from .store import (
    RESULT_NAME,
    TEMP_PREFIX,
    JobStore,
    StoredJob,
    remove_abandoned_temp_dirs,
)

log = logging.getLogger("sdx4.server")

State = Literal["queued", "running", "done", "failed", "cancelled"]
FINISHED: tuple[str, ...] = ("done", "failed", "cancelled")
#: A job found "running" by a new start was running when the server died; it runs again unless it
#: has been started this many times already (then it fails with the reason).
MAX_ATTEMPTS = 2


class JobCancelled(Exception):
    """Raised from the progress callback to stop a running job at the next denoising step."""


class QueueFull(Exception):
    """The queue holds `max_queue` jobs already; `retry_after` is a guess in seconds."""

    def __init__(self, max_queue: int, retry_after: int) -> None:
        super().__init__(f"the queue is full ({max_queue} jobs waiting); retry in about {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The service is stopping and takes no new jobs."""


@dataclass(frozen=True)
class QueueSettings:
    """Bounds of the queue and of the results kept on disk."""

    max_queue: int = 16  # jobs waiting (the running one not counted)
    result_ttl_s: float = 3600.0  # finished jobs (and their files) are forgotten after this
    max_results: int = 100  # finished jobs remembered at most
    max_result_bytes: int = 2 * 1024**3  # bytes of result files kept at most (oldest evicted first)
    results_dir: str | None = None  # None: a fresh temporary folder, removed at shutdown

    def __post_init__(self) -> None:
        for name in ("max_queue", "max_results", "max_result_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionsError(f"{name} must be a positive integer; got {value!r}", option=name)
        if not self.result_ttl_s > 0:
            raise OptionsError(f"result_ttl_s must be > 0; got {self.result_ttl_s!r}", option="result_ttl_s")


@dataclass(eq=False)
class Job:
    """One request's work. Mutable; every field is read and written under JobManager's lock."""

    id: str
    options: UpscaleOptions
    image: LoadedImage | None  # dropped once the job has run (memory)
    input_name: str
    input_size: tuple[int, int]
    state: State = "queued"
    step: int = 0
    total: int = 0
    error: str | None = None
    error_kind: str | None = None  # "options" (the request's fault), "cancelled", "shutdown", "internal"
    files: list[Path] = field(default_factory=list)
    nbytes: int = 0
    metadata: dict[str, Any] | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    version: int = 0  # bumped on every change: server-sent events send a message when it moves
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = "cancelled"
    attempts: int = 0  # times a worker started it (recorded: survives restarts)
    seq: int = 0  # order of submission (listing order)
    media: str | None = None  # "animation" or "video" (service/media.py): progress counts frames
    frames: int = 0  # the media's frames
    loras: tuple[str, ...] | None = None  # the offered LoRAs (by name) merged for it; () the base model; None: as is


class LoraSwitchFailed(Exception):
    """Merging a job's LoRAs failed (a file gone or changed since the start, out of memory): that job fails."""


class JobManager:
    """A bounded FIFO queue in front of one worker thread that owns the upscaler."""

    def __init__(self, upscaler: Any, settings: QueueSettings | None = None,
                 switch_loras: Callable[[tuple[str, ...]], None] | None = None) -> None:
        self.upscaler = upscaler
        #: Called on the worker thread before a job with `loras` runs, with them (a no-op when they are merged
        #: already: `Upscaler.set_loras`); None: jobs run on the model as it is.
        self.switch_loras = switch_loras
        self.settings = settings or QueueSettings()
        if self.settings.results_dir is None:
            remove_abandoned_temp_dirs()  # left by servers killed before they could clean up
            self.results_dir = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
            self._own_dir = True
        else:
            self.results_dir = Path(self.settings.results_dir)
            self.results_dir.mkdir(parents=True, exist_ok=True)
            self._own_dir = False
        # Raises store.FolderInUse (an OptionsError naming results_dir) when a live server holds the folder.
        self.store = JobStore(self.results_dir)
        # Only an upscaler that takes cancel_check (sdx4.Upscaler does) can stop within one UNet call;
        # any other is stopped at its next step through progress().
        self._pass_check = _takes(upscaler, "cancel_check")
        self._seq = 0
        self._cond = threading.Condition()
        self._jobs: dict[str, Job] = {}
        self._queue: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._stopping = False
        self._durations: collections.deque[float] = collections.deque(maxlen=20)
        self.counters = {"submitted": 0, "started": 0, "done": 0, "failed": 0, "cancelled": 0}
        self._thread = threading.Thread(target=self._work, name="sdx4-worker", daemon=True)
        #: Called (under the lock, from any thread; must not block) whenever any job changes: the
        #: server uses it to wake its waiting requests and event streams instead of polling fast.
        self.on_change: Callable[[], None] | None = None
        self.recovered = self._recover()

    # ---- called from request handlers --------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def submit(self, image: LoadedImage, options: UpscaleOptions, input_name: str = "image",
               loras: tuple[str, ...] | None = None) -> Job:
        self._check_room()  # refuse before writing the input file
        job_id = uuid.uuid4().hex
        media = getattr(image, "kind", None)  # a service.media.MediaInput: held in memory, not stored
        if media is None:
            self.store.save_input(job_id, image)  # outside the lock: a big PNG takes a while
        try:
            with self._cond:
                self._check_room()
                self._seq += 1
                job = Job(
                    id=job_id,
                    options=options.with_seed() if options.method == "sd" else options,
                    image=image,
                    input_name=input_name,
                    input_size=image.size,
                    seq=self._seq,
                    media=media,
                    frames=getattr(image, "frames", 0),
                    loras=loras,
                )
                self._record(job)
                self._jobs[job.id] = job
                self._queue.append(job)
                self.counters["submitted"] += 1
                self._bump(job)
                self._cond.notify_all()
                return job
        except BaseException:
            self.store.drop_input(job_id)
            raise

    def _check_room(self) -> None:
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down and takes no new jobs")
            if len(self._queue) >= self.settings.max_queue:
                raise QueueFull(self.settings.max_queue, self._retry_after())

    def list_jobs(self, limit: int = 20, before: str | None = None) -> dict[str, Any]:
        """Jobs newest first, `limit` of them, starting after job `before` (the previous page's `next`).
        No file-system paths. KeyError when `before` is not a known job."""
        with self._cond:
            self._evict(time.time())
            jobs = sorted(self._jobs.values(), key=lambda j: j.seq, reverse=True)
            if before is not None:
                anchor = self._jobs.get(before)
                if anchor is None:
                    raise KeyError(before)
                jobs = [j for j in jobs if j.seq < anchor.seq]
            page = jobs[:limit]
            return {
                "jobs": [
                    {
                        "id": j.id,
                        "state": j.state,
                        "created": j.created,
                        "finished": j.finished,
                        "step": j.step,
                        "total": j.total,
                        "progress": round(j.step / j.total, 4) if j.total else (1.0 if j.state == "done" else 0.0),
                        "input_name": j.input_name,
                        "error": j.error,
                        "url": f"/v1/jobs/{j.id}",
                    }
                    for j in page
                ],
                "next": page[-1].id if len(jobs) > limit else None,
            }

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def snapshot(self, job_id: str) -> dict[str, Any] | None:
        """The job's public state as plain data (a copy: safe to serialise outside the lock)."""
        with self._cond:
            self._evict(time.time())
            job = self._jobs.get(job_id)
            if job is None:
                return None
            position = self._queue.index(job) if job.state == "queued" else None
            return {
                "id": job.id,
                "state": job.state,
                "step": job.step,
                "total": job.total,
                "progress": round(job.step / job.total, 4) if job.total else (1.0 if job.state == "done" else 0.0),
                "queue_position": position,  # jobs ahead of this one (0 = next); None unless queued
                "cancel_requested": job.cancel.is_set() and job.state == "running",
                "error": job.error,
                "error_kind": job.error_kind,
                "input_name": job.input_name,
                "input_size": list(job.input_size),
                "output_size": list(job.options.output_size(tuple(job.input_size))),
                "num_images": len(job.files) if job.state == "done" else job.options.num_images,
                "options": job.options.to_dict(),
                "lora": None if job.loras is None else list(job.loras),  # the LoRAs it merges by name ([]: none)
                "created": job.created,
                "started": job.started,
                "finished": job.finished,
                "metadata": job.metadata,
                "version": job.version,
                "media": job.media,
                "frames_done": job.step if job.media else None,
                "frames_total": job.frames if job.media else None,
            }

    def version(self, job_id: str) -> int | None:
        with self._cond:
            job = self._jobs.get(job_id)
            return None if job is None else job.version

    def result_file(self, job_id: str, index: int) -> Path | None:
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.state != "done" or not 0 <= index < len(job.files):
                return None
            return job.files[index]

    def cancel(self, job_id: str, reason: str = "cancelled by request") -> str | None:
        """Cancel a queued job now, a running one at its next step; forget a finished one.

        Returns what happened ("cancelled", "cancelling", "deleted") or None for an unknown id.
        """
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            if job.state == "queued":
                self._queue.remove(job)
                self._finish(job, "cancelled", reason, "cancelled")
                return "cancelled"
            if job.state == "running":
                job.cancel_reason = reason
                job.cancel.set()
                self._bump(job)
                return "cancelling"
            self._forget(job)
            return "deleted"

    def status(self) -> dict[str, Any]:
        with self._cond:
            self._evict(time.time())
            return {
                "queued": len(self._queue),
                "max_queue": self.settings.max_queue,
                "running": self._running.id if self._running else None,
                "jobs": dict(self.counters),
                "results_kept": sum(1 for j in self._jobs.values() if j.state in FINISHED),
                "result_bytes": sum(j.nbytes for j in self._jobs.values()),
                "stopping": self._stopping,
            }

    def begin_shutdown(self) -> None:
        """Take no new jobs, cancel the queued ones, stop the running one at its next step."""
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            log.info("shutting down: %d queued job(s) cancelled", len(self._queue))
            while self._queue:
                self._finish(self._queue.popleft(), "cancelled", "the server is shutting down", "shutdown")
            if self._running is not None:
                self._running.cancel_reason = "the server is shutting down"
                self._running.cancel.set()
            self._cond.notify_all()

    def close(self, timeout: float = 60.0) -> None:
        """Stop the worker (waiting up to `timeout` s for the current UNet call). A temporary results folder
        is deleted with every file in it; a given `results_dir` keeps its results and its job store, so that
        a server started on it again serves them (and runs the jobs this shutdown cancelled)."""
        self.begin_shutdown()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._cond:
            if self._own_dir:
                for job in list(self._jobs.values()):
                    self._delete_files(job)
            self._jobs.clear()
            self.store.close()
        if self._own_dir:
            shutil.rmtree(self.results_dir, ignore_errors=True)

    # ---- the worker ----------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait(timeout=10.0)
                    self._evict(time.time())
                if self._stopping:
                    return
                job = self._queue.popleft()
                self._running = job
                job.state, job.started = "running", time.time()
                job.total = job.options.steps if job.options.method == "sd" else 1
                if job.media:
                    job.total = job.frames
                job.attempts += 1
                self._record(job)
                self._bump(job)
                self.counters["started"] += 1
                self._cond.notify_all()
            self._run(job)
            with self._cond:
                self._running = None
                self._evict(time.time())
                self._cond.notify_all()

    def _run(self, job: Job) -> None:
        def progress(i: int, n: int) -> None:
            with self._cond:
                job.step, job.total = i, n
                self._bump(job)
            if job.cancel.is_set():
                raise JobCancelled(job.cancel_reason)

        def check() -> None:  # before every UNet call: a cancel stops a tiled step between its tiles
            if job.cancel.is_set():
                raise JobCancelled(job.cancel_reason)

        extra = {"cancel_check": check} if self._pass_check else {}
        t0 = time.perf_counter()
        try:
            if job.cancel.is_set():
                raise JobCancelled(job.cancel_reason)
            assert job.image is not None
            self._switch_loras(job)
            result = self.upscaler(job.image, job.options, progress=progress, **extra)
            if job.cancel.is_set():  # cancelled during decoding: honour it, write nothing
                raise JobCancelled(job.cancel_reason)
            meta = saved_metadata(result.metadata, job.input_name, job.id)
            files: list[Path] = []
            media_path = getattr(result, "path", None)  # an animation or video job: one file, already written
            if media_path is not None:
                files.append(media_path.replace(self.results_dir / f"{job.id}{media_path.suffix}"))
            try:
                for i, image in enumerate(result.images):
                    name = numbered_name(job.id, i, len(result.images))
                    files.append(save_image(image, self.results_dir / name, meta,
                                            icc_profile=result.icc_profile, exif=result.exif))
            except BaseException:
                for f in files:
                    f.unlink(missing_ok=True)
                raise
        except JobCancelled as e:
            kind = "shutdown" if self._stopping else "cancelled"
            with self._cond:
                self._finish(job, "cancelled", str(e), kind)
            log.info("job %s cancelled at step %d/%d: %s", job.id, job.step, job.total, e)
            return
        except LoraSwitchFailed as e:  # the model is as it was, or reloads at the next job: the server goes on
            log.error("job %s failed: %s", job.id, e, exc_info=e.__cause__)
            with self._cond:
                self._finish(job, "failed", str(e), "internal")
            return
        except (ValueError, MemoryError) as e:
            # Bad options for this model (ValueError) or an input too large for this machine: the job
            # fails with the reason; the worker and the server keep going.
            with self._cond:
                self._finish(job, "failed", f"{type(e).__name__}: {e}", "options" if isinstance(e, ValueError) else "internal")
            log.warning("job %s failed: %s", job.id, e)
            return
        except Exception as e:  # noqa: BLE001 - one job's failure must not stop the worker; logged in full
            log.exception("job %s failed", job.id)
            with self._cond:
                self._finish(job, "failed", f"internal error: {type(e).__name__}: {e}", "internal")
            return
        seconds = time.perf_counter() - t0
        with self._cond:
            self._durations.append(seconds)
            job.files = files
            job.nbytes = sum(f.stat().st_size for f in files)
            job.metadata = meta
            job.step = job.total
            self._finish(job, "done", None, None)
        log.info("job %s done in %.2f s", job.id, seconds)

    def _switch_loras(self, job: Job) -> None:
        """Merge the job's LoRAs (worker thread, between jobs); any failure is the job's LoraSwitchFailed."""
        if job.loras is None or self.switch_loras is None:
            return
        try:
            self.switch_loras(job.loras)
        except Exception as e:  # noqa: BLE001 - the job fails with the reason; the worker goes on
            chosen = ", ".join(job.loras) or "none (the base model)"
            raise LoraSwitchFailed(f"could not merge this job's LoRAs ({chosen}): {type(e).__name__}: {e}") from e

    # ---- helpers (caller holds the lock) ---------------------------------------------------------

    def _finish(self, job: Job, state: State, error: str | None, kind: str | None) -> None:
        job.state, job.error, job.error_kind = state, error, kind
        job.finished = time.time()
        job.image = None
        self._record(job)
        if kind != "shutdown":  # a job a shutdown cancelled keeps its input: the next start runs it
            self.store.drop_input(job.id)
        self._bump(job)
        self.counters[state] += 1
        self._cond.notify_all()

    def _bump(self, job: Job) -> None:
        job.version += 1
        if self.on_change is not None:
            self.on_change()

    def _retry_after(self) -> int:
        per_job = sum(self._durations) / len(self._durations) if self._durations else 5.0
        return max(1, min(3600, round(per_job * (len(self._queue) + 1) / 2)))

    def _delete_files(self, job: Job) -> None:
        for f in job.files:
            try:
                f.unlink(missing_ok=True)
            except OSError as e:
                log.warning("could not delete %s: %s", f, e)
        job.files, job.nbytes = [], 0

    def _forget(self, job: Job) -> None:
        self._delete_files(job)
        self._jobs.pop(job.id, None)
        self.store.delete(job.id)

    def _record(self, job: Job) -> None:
        self.store.put(StoredJob(
            id=job.id, state=job.state, options=job.options.to_dict(), input_name=job.input_name,
            input_size=job.input_size, files=[f.name for f in job.files], nbytes=job.nbytes, metadata=job.metadata,
            error=job.error, error_kind=job.error_kind, created=job.created, started=job.started,
            finished=job.finished, attempts=job.attempts, loras=None if job.loras is None else list(job.loras),
        ))

    def _recover(self) -> dict[str, int]:
        """Take over what an earlier server left in the store: finished jobs are served again (those whose
        files are gone are forgotten), unfinished ones queued again in their order, the one that was
        running included (failed instead after MAX_ATTEMPTS starts, or when its input is lost). Result
        files and inputs no job owns are deleted. Returns counts by outcome (logged)."""
        counts = {"finished": 0, "requeued": 0, "failed": 0, "dropped": 0, "orphans": 0}
        with self._cond:
            for row in self.store.load():
                try:
                    options = UpscaleOptions(**row.options)
                except (TypeError, OptionsError) as e:  # written by another sdx4 version
                    log.warning("job %s: recorded options no longer valid (%s); forgotten", row.id, e)
                    self._forget(Job(row.id, UpscaleOptions(), None, row.input_name, row.input_size,
                                     files=[self.results_dir / f for f in row.files]))
                    counts["dropped"] += 1
                    continue
                self._seq += 1
                job = Job(
                    id=row.id, options=options, image=None, input_name=row.input_name, input_size=row.input_size,
                    state=row.state,  # type: ignore[arg-type]
                    error=row.error, error_kind=row.error_kind, files=[self.results_dir / f for f in row.files],
                    nbytes=row.nbytes, metadata=row.metadata, created=row.created, started=row.started,
                    finished=row.finished, attempts=row.attempts, seq=self._seq,
                    loras=None if row.loras is None else tuple(row.loras),
                )
                job.total = options.steps if options.method == "sd" else 1
                self._jobs[job.id] = job
                resume = job.state in ("queued", "running") or (job.state == "cancelled" and job.error_kind == "shutdown")
                if not resume:
                    if job.state == "done":
                        job.step = job.total
                        if not all(f.is_file() for f in job.files):
                            self._forget(job)
                            counts["dropped"] += 1
                            continue
                    counts["finished"] += 1
                    continue
                was_running = job.state == "running"
                image = self.store.load_input(job.id)
                if image is None and job.state == "cancelled":
                    counts["finished"] += 1  # stopped by a shutdown, input gone: it stays cancelled
                    continue
                if was_running and job.attempts >= MAX_ATTEMPTS:
                    why = f"the server stopped while running this job ({job.attempts} times); not run again"
                elif image is None:
                    why = "its input image was lost when the server stopped"
                else:
                    why = None
                if why is not None:
                    self._finish(job, "failed", why, "internal")
                    counts["failed"] += 1
                    continue
                job.state, job.image, job.error, job.error_kind = "queued", image, None, None
                job.started = job.finished = None
                self._record(job)
                self._queue.append(job)
                counts["requeued"] += 1
            owned = {f.name for j in self._jobs.values() for f in j.files}
            for f in self.results_dir.iterdir():
                if RESULT_NAME.fullmatch(f.name) and f.name not in owned:
                    f.unlink(missing_ok=True)  # written by a job the store never recorded as done
                    counts["orphans"] += 1
            queued = {j.id for j in self._queue}
            for job_id in self.store.input_ids() - queued:
                self.store.drop_input(job_id)
            self._evict(time.time())
        if any(counts.values()):
            log.info("results folder %s: %s", self.results_dir, ", ".join(f"{v} {k}" for k, v in counts.items() if v))
        return counts

    def _evict(self, now: float) -> None:
        """Forget finished jobs past the TTL, then the oldest beyond the count and byte bounds; the
        newest finished job is kept whatever its size (its client is about to fetch it)."""
        s = self.settings
        finished = sorted((j for j in self._jobs.values() if j.state in FINISHED), key=lambda j: j.finished or 0.0)
        for job in finished:
            if now - (job.finished or now) > s.result_ttl_s:
                self._forget(job)
        finished = [j for j in finished if j.id in self._jobs]
        total = sum(j.nbytes for j in finished)
        while len(finished) > 1 and (len(finished) > s.max_results or total > s.max_result_bytes):
            oldest = finished.pop(0)
            total -= oldest.nbytes
            self._forget(oldest)


def _takes(fn: Any, name: str) -> bool:
    """Whether `fn` has a parameter called `name` (a `**kwargs` does not count)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
