"""The job store of the HTTP service: every job's state on disk, so that a crash or a restart forgets nothing.

    RESULTS_DIR/
        <id>.png, <id>_2.png ...        result files (as before: named by job id)
        .sdx4-jobs/jobs.sqlite3         one row per job (SQLite, WAL; stdlib sqlite3, no server)
        .sdx4-jobs/inputs/<id>.png      the uploaded image of a job not yet finished (lossless PNG)
        .sdx4-jobs/owner.lock           held (flock) by the process serving this folder; records its pid

The store only records; `jobs.JobManager` decides. A row is written on each change of state (not on each
step). WAL with synchronous=NORMAL survives the death of the process (SIGKILL, a crash), not a power cut
in the last moments. No torch, no FastAPI.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sqlite3
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..imageio import LoadedImage
from ..options import OptionsError

log = logging.getLogger("sdx4.server")

STORE_DIR = ".sdx4-jobs"
DB_NAME = "jobs.sqlite3"
LOCK_NAME = "owner.lock"
TEMP_PREFIX = "sdx4-results-"
#: Result files the service writes (`imageio.numbered_name(uuid4().hex, i, n)`): only such names are ever
#: deleted as left-overs of an earlier run.
RESULT_NAME = re.compile(r"[0-9a-f]{32}(_[0-9]+)?\.png")

_COLUMNS = (
    "id", "state", "options", "input_name", "input_w", "input_h", "files", "nbytes", "metadata",
    "error", "error_kind", "created", "started", "finished", "attempts", "loras",
)
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    state TEXT NOT NULL,
    options TEXT NOT NULL,          -- UpscaleOptions.to_dict() as JSON
    input_name TEXT NOT NULL,
    input_w INTEGER NOT NULL,
    input_h INTEGER NOT NULL,
    files TEXT NOT NULL,            -- JSON list of result file names (in the results folder)
    nbytes INTEGER NOT NULL,
    metadata TEXT,                  -- JSON or NULL
    error TEXT,
    error_kind TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL,      -- times a worker started it (a job that killed the server twice fails)
    loras TEXT                      -- JSON list of the LoRA names merged for it, or NULL (the model as it is)
);
-- {len(_COLUMNS)} columns besides seq
"""


@dataclass(frozen=True)
class StoredJob:
    """One row, as plain data (options still a dict: jobs.py rebuilds UpscaleOptions)."""

    id: str
    state: str
    options: dict[str, Any]
    input_name: str
    input_size: tuple[int, int]
    files: list[str]
    nbytes: int
    metadata: dict[str, Any] | None
    error: str | None
    error_kind: str | None
    created: float
    started: float | None
    finished: float | None
    attempts: int
    loras: list[str] | None = None


class FolderInUse(OptionsError):
    """Another live process serves this results folder (two workers would run the same queued jobs)."""


class JobStore:
    """The SQLite file and the input images of one results folder. Thread-safe (one connection, a lock);
    `jobs.JobManager` calls it under its own lock anyway."""

    def __init__(self, results_dir: Path) -> None:
        self.results_dir = results_dir
        self.dir = results_dir / STORE_DIR
        self.inputs = self.dir / "inputs"
        self.inputs.mkdir(parents=True, exist_ok=True)
        self._lock_file = _take_ownership(self.dir / LOCK_NAME, results_dir)
        self._lock = threading.Lock()
        self._closed = False
        self._db = sqlite3.connect(self.dir / DB_NAME, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        if "loras" not in {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}:
            self._db.execute("ALTER TABLE jobs ADD COLUMN loras TEXT")  # a folder an older sdx4 wrote

    # ---- rows -------------------------------------------------------------------------------------

    def put(self, job: StoredJob) -> None:
        """Insert or update one job (one transaction)."""
        row = (
            job.id, job.state, json.dumps(job.options), job.input_name, job.input_size[0], job.input_size[1],
            json.dumps(job.files), job.nbytes, None if job.metadata is None else json.dumps(job.metadata),
            job.error, job.error_kind, job.created, job.started, job.finished, job.attempts,
            None if job.loras is None else json.dumps(job.loras),
        )
        updates = ", ".join(f"{c}=excluded.{c}" for c in _COLUMNS[1:])
        with self._lock:
            if self._closed:  # a worker that outlived close(): its job stays as last recorded
                log.warning("job %s: %s after the store was closed; not recorded", job.id, job.state)
                return
            self._db.execute(
                f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
                f"ON CONFLICT(id) DO UPDATE SET {updates}",
                row,
            )

    def delete(self, job_id: str) -> None:
        with self._lock:
            if self._closed:
                return
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        self.drop_input(job_id)

    def load(self) -> list[StoredJob]:
        """Every job, oldest first."""
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs ORDER BY seq").fetchall()
        jobs = []
        for r in rows:
            d = dict(zip(_COLUMNS, r))
            jobs.append(StoredJob(
                id=d["id"], state=d["state"], options=json.loads(d["options"]), input_name=d["input_name"],
                input_size=(d["input_w"], d["input_h"]), files=json.loads(d["files"]), nbytes=d["nbytes"],
                metadata=None if d["metadata"] is None else json.loads(d["metadata"]), error=d["error"],
                error_kind=d["error_kind"], created=d["created"], started=d["started"], finished=d["finished"],
                attempts=d["attempts"], loras=None if d["loras"] is None else json.loads(d["loras"]),
            ))
        return jobs

    # ---- input images -----------------------------------------------------------------------------

    def save_input(self, job_id: str, image: LoadedImage) -> None:
        """The decoded upload, losslessly (RGB or RGBA PNG with its ICC profile), written atomically."""
        im = image.rgb if image.alpha is None else Image.merge("RGBA", (*image.rgb.split(), image.alpha))
        path = self.inputs / f"{job_id}.png"
        tmp = path.with_suffix(".tmp")
        kw = {"icc_profile": image.icc_profile} if image.icc_profile else {}
        with open(tmp, "wb") as f:
            im.save(f, "PNG", compress_level=1, **kw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load_input(self, job_id: str) -> LoadedImage | None:
        path = self.inputs / f"{job_id}.png"
        try:
            with Image.open(path) as im:
                im.load()
                icc = im.info.get("icc_profile")
                if im.mode == "RGBA":
                    return LoadedImage(im.convert("RGB"), im.getchannel("A"), icc)
                return LoadedImage(im.convert("RGB"), None, icc)
        except (OSError, ValueError) as e:
            log.warning("input of job %s unreadable (%s)", job_id, e)
            return None

    def drop_input(self, job_id: str) -> None:
        (self.inputs / f"{job_id}.png").unlink(missing_ok=True)

    def input_ids(self) -> set[str]:
        return {p.stem for p in self.inputs.glob("*.png")}

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._db.close()
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None


# ---- ownership of a results folder ------------------------------------------------------------------


def _take_ownership(path: Path, results_dir: Path, write_pid: bool = True) -> Any:
    """Hold an exclusive flock on `path` for this process's life (the kernel drops it when the process dies,
    even by SIGKILL) and write our pid into it. Another live owner -> FolderInUse."""
    f = open(path, "a+")  # noqa: SIM115 - held open until close()
    try:
        import fcntl
    except ImportError:  # Windows: no flock; the pid is still recorded
        fcntl = None  # type: ignore[assignment]
    if fcntl is not None:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            pid = f.read().strip() or "?"
            f.close()
            raise FolderInUse(
                f"results_dir {str(results_dir)!r} is in use by another sdx4 server (pid {pid}); "
                "give each server its own folder",
                option="results_dir",
            ) from None
    if write_pid:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
    return f


def folder_in_use(results_dir: str | Path) -> FolderInUse | None:
    """The error a server starting on `results_dir` would meet now, or None: a check before the model loads."""
    lock = Path(results_dir) / STORE_DIR / LOCK_NAME
    if not lock.is_file():
        return None
    try:
        _take_ownership(lock, Path(results_dir), write_pid=False).close()
    except FolderInUse as e:
        return e
    except OSError:
        return None
    return None


def _owner_gone(folder: Path, min_age_s: float = 60.0) -> bool:
    """Whether the temporary results folder's owner has died: its lock file exists, is older than
    `min_age_s` (a server still starting has not locked it yet) and can be locked."""
    import time

    lock = folder / STORE_DIR / LOCK_NAME
    if not lock.is_file():
        return False  # not ours to judge (an older sdx4, or still being created)
    if time.time() - lock.stat().st_mtime < min_age_s:
        return False
    try:
        import fcntl
    except ImportError:
        return False
    try:
        with open(lock, "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True  # released when the file closes
    except OSError:
        return False


def remove_abandoned_temp_dirs(base: str | None = None, min_age_s: float = 60.0) -> list[Path]:
    """Delete the `sdx4-results-*` temporary folders whose owner process is gone (killed before it could
    remove its own); folders of live servers and folders without an owner record are left alone."""
    removed = []
    for folder in Path(base or tempfile.gettempdir()).glob(TEMP_PREFIX + "*"):
        try:
            if folder.is_dir() and not folder.is_symlink() and _owner_gone(folder, min_age_s):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
        except OSError:
            continue
    if removed:
        log.info("removed %d results folder(s) left by stopped servers", len(removed))
    return removed
