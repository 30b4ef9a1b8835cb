"""Jobs that survive: the job store (service/store.py), recovery on start, GET /v1/jobs, abandoned temporary
folders, and `sdx4 serve` killed with SIGKILL and started again on the same --results-dir."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from server_helpers import TIMEOUT, free_port, png_bytes, wait_until

import sdx4
from sdx4.imageio import LoadedImage
from sdx4.options import OptionsError, UpscaleOptions
from sdx4.service.app import create_app
from sdx4.service.jobs import JobManager, QueueSettings
from sdx4.service.requests import ServerSettings
from sdx4.service.store import (
    LOCK_NAME,
    STORE_DIR,
    TEMP_PREFIX,
    JobStore,
    remove_abandoned_temp_dirs,
)

SRC = Path(__file__).resolve().parents[1] / "src"
NEAREST = UpscaleOptions(method="nearest")


class Classical:
    """An upscaler without a model (the classical methods): fast, exact, no torch."""

    info: ClassVar[dict] = {"model": "none", "max_noise_level": 350}

    def __call__(self, image, options, progress=None):
        return sdx4.upscale(image, options)


def loaded(color=(200, 30, 40), size=(6, 4), alpha: int | None = None) -> LoadedImage:
    rgb = Image.new("RGB", size, color)
    return LoadedImage(rgb, None if alpha is None else Image.new("L", size, alpha))


def wait_done(manager: JobManager, job_id: str) -> dict:
    return wait_until(lambda: (s := manager.snapshot(job_id)) and s["state"] in ("done", "failed", "cancelled") and s,
                      what=f"job {job_id} to finish")


# ---- the store and recovery, in one process ------------------------------------------------------


def test_a_restart_on_the_same_folder_serves_finished_jobs_and_runs_the_ones_a_shutdown_stopped(tmp_path):
    folder = tmp_path / "results"
    a = JobManager(Classical(), QueueSettings(results_dir=str(folder)))
    a.start()
    done = a.submit(loaded(alpha=128), NEAREST, "cat.png")
    snap = wait_done(a, done.id)
    assert snap["state"] == "done"
    first_bytes = a.result_file(done.id, 0).read_bytes()
    a.begin_shutdown()  # the worker stops; a job submitted now is refused ...
    with pytest.raises(Exception, match="shutting down"):
        a.submit(loaded(), NEAREST)
    a.close()
    assert (folder / f"{done.id}.png").read_bytes() == first_bytes  # kept: a given folder is not temporary

    # A job still queued at a shutdown is cancelled (reason: the shutdown), and runs after the restart.
    b = JobManager(Classical(), QueueSettings(results_dir=str(folder)))
    assert b.recovered["finished"] == 1
    assert b.snapshot(done.id)["state"] == "done" and b.result_file(done.id, 0).read_bytes() == first_bytes
    cancelled = b.submit(loaded((1, 2, 3)), NEAREST, "queued.png")  # queued: b's worker never started
    b.close()
    assert b.snapshot(cancelled.id) is None  # close() forgets in memory, the store keeps it

    c = JobManager(Classical(), QueueSettings(results_dir=str(folder)))
    assert c.recovered["requeued"] == 1
    assert c.snapshot(cancelled.id)["state"] == "queued"
    c.start()
    snap = wait_done(c, cancelled.id)
    assert snap["state"] == "done" and snap["input_name"] == "queued.png"
    with Image.open(c.result_file(cancelled.id, 0)) as im:
        assert im.size == (24, 16) and im.convert("RGB").getpixel((0, 0)) == (1, 2, 3)  # the stored input ran
    assert not (folder / STORE_DIR / "inputs" / f"{cancelled.id}.png").exists()  # input dropped once done
    c.close()


def test_results_are_pruned_across_restarts_and_orphans_removed(tmp_path):
    folder = tmp_path / "results"
    a = JobManager(Classical(), QueueSettings(results_dir=str(folder)))
    a.start()
    ids = []
    for i in range(3):
        job = a.submit(loaded((i, i, i)), NEAREST)
        wait_done(a, job.id)
        ids.append(job.id)
    a.close()
    orphan = folder / ("ab" * 16 + ".png")  # a result the store never recorded (killed between write and record)
    orphan.write_bytes(png_bytes())
    mine = folder / "notes.txt"  # not a result name: never touched
    mine.write_text("keep")
    b = JobManager(Classical(), QueueSettings(results_dir=str(folder), max_results=2))
    assert b.snapshot(ids[0]) is None and b.snapshot(ids[1])["state"] == "done"  # the oldest went first
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(f"{i}.png" for i in ids[1:])
    assert mine.read_text() == "keep" and b.recovered["orphans"] == 1
    assert b.status()["results_kept"] == 2
    b.close()
    c = JobManager(Classical(), QueueSettings(results_dir=str(folder), result_ttl_s=1e-3))
    assert c.snapshot(ids[2]) is None and list(folder.glob("*.png")) == []  # expired while no server ran
    c.close()


def test_a_job_running_when_the_server_died_runs_again_once_then_fails_with_the_reason(tmp_path):
    folder = tmp_path / "results"
    store = JobStore(folder)  # what a killed server leaves: a row "running", its input kept
    from sdx4.service.store import StoredJob

    row = StoredJob(id="c" * 32, state="running", options=NEAREST.to_dict(), input_name="x.png", input_size=(6, 4),
                    files=[], nbytes=0, metadata=None, error=None, error_kind=None, created=time.time(),
                    started=time.time(), finished=None, attempts=1)
    store.put(row)
    store.save_input(row.id, loaded())
    store.put(StoredJob(**{**row.__dict__, "id": "d" * 32, "attempts": 2}))
    store.save_input("d" * 32, loaded())
    store.put(StoredJob(**{**row.__dict__, "id": "e" * 32, "state": "queued", "attempts": 0}))  # input lost
    store.close()
    m = JobManager(Classical(), QueueSettings(results_dir=str(folder)))
    assert m.snapshot("c" * 32)["state"] == "queued"
    died = m.snapshot("d" * 32)
    assert died["state"] == "failed" and died["error"] == "the server stopped while running this job (2 times); not run again"
    lost = m.snapshot("e" * 32)
    assert lost["state"] == "failed" and lost["error"] == "its input image was lost when the server stopped"
    m.start()
    assert wait_done(m, "c" * 32)["state"] == "done"
    m.close()


def test_a_folder_served_by_a_live_server_is_refused_with_its_name(tmp_path):
    folder = tmp_path / "results"
    a = JobManager(Classical(), QueueSettings(results_dir=str(folder)))
    with pytest.raises(OptionsError, match=r"results_dir .*results' is in use by another sdx4 server \(pid \d+\)") as e:
        JobManager(Classical(), QueueSettings(results_dir=str(folder)))
    assert e.value.option == "results_dir"
    a.close()
    JobManager(Classical(), QueueSettings(results_dir=str(folder))).close()  # free again once closed


def test_temporary_folders_of_dead_servers_are_removed_live_and_unknown_ones_kept(tmp_path):
    import fcntl

    def temp_dir(name: str, lock: bool) -> Path:
        d = tmp_path / f"{TEMP_PREFIX}{name}"
        (d / STORE_DIR).mkdir(parents=True)
        if lock:
            (d / STORE_DIR / LOCK_NAME).write_text("999999\n")
        return d

    dead, live, unknown = temp_dir("dead", True), temp_dir("live", True), temp_dir("unknown", False)
    with open(live / STORE_DIR / LOCK_NAME, "a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # a live owner holds its lock
        assert remove_abandoned_temp_dirs(str(tmp_path), min_age_s=3600) == []  # too young to judge
        assert remove_abandoned_temp_dirs(str(tmp_path), min_age_s=0) == [dead]
    assert not dead.exists() and live.is_dir() and unknown.is_dir()


def test_without_results_dir_the_temporary_folder_is_locked_and_removed_at_close():
    m = JobManager(Classical())
    folder = m.results_dir
    assert folder.name.startswith(TEMP_PREFIX) and int((folder / STORE_DIR / LOCK_NAME).read_text()) == os.getpid()
    assert remove_abandoned_temp_dirs(str(folder.parent), min_age_s=0).count(folder) == 0  # ours: alive
    m.close()
    assert not folder.exists()


# ---- GET /v1/jobs ------------------------------------------------------------------------------------


def test_list_jobs_newest_first_paged_with_the_api_key_rule(tmp_path):
    settings = ServerSettings(api_key="k3y", queue=QueueSettings(results_dir=str(tmp_path / "results")))
    app = create_app(Classical(), settings)
    key = {"X-API-Key": "k3y"}
    with TestClient(app, base_url="http://localhost") as c:
        ids = []
        for i in range(5):
            r = c.post("/v1/jobs", files={"image": (f"p{i}.png", png_bytes(), "image/png")}, data={"method": "nearest"}, headers=key)
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        wait_until(lambda: all(c.get(f"/v1/jobs/{i}", headers=key).json()["state"] == "done" for i in ids), what="jobs done")
        assert c.get("/v1/jobs").status_code == 401
        first = c.get("/v1/jobs?limit=2", headers=key).json()
        assert [j["id"] for j in first["jobs"]] == ids[:-3:-1] and first["next"] == ids[3]
        job = first["jobs"][0]
        assert job["state"] == "done" and job["input_name"] == "p4.png" and job["progress"] == 1.0
        assert job["url"] == f"/v1/jobs/{ids[4]}" and not any(str(tmp_path) in str(v) for v in job.values())
        second = c.get(f"/v1/jobs?limit=2&before={first['next']}", headers=key).json()
        assert [j["id"] for j in second["jobs"]] == [ids[2], ids[1]]
        last = c.get(f"/v1/jobs?before={second['next']}", headers=key).json()
        assert [j["id"] for j in last["jobs"]] == [ids[0]] and last["next"] is None
        for query, field in (("limit=0", "limit"), ("limit=101", "limit"), ("limit=x", "limit"), ("before=nope", "before")):
            r = c.get(f"/v1/jobs?{query}", headers=key)
            assert r.status_code == 422 and r.json()["field"] == field, query
        assert "got 'nope'" in c.get("/v1/jobs?before=nope", headers=key).json()["detail"]


# ---- kill -9 ------------------------------------------------------------------------------------------


def _serve(model: Path, folder: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(
        [sys.executable, "-m", "sdx4", "serve", "--model", str(model), "--device", "cpu", "--dtype", "fp32",
         "--port", str(port), "--results-dir", str(folder), "--log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def _up(proc: subprocess.Popen, base: str) -> None:
    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"sdx4 serve exited {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            return httpx.get(base + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, timeout=240, what="sdx4 serve to answer")


def test_sigkill_loses_no_job(tiny_model_dir, tmp_path):
    """Finished jobs keep their bytes, queued ones run, the running one runs again, a cancelled one stays
    cancelled: every job submitted before the SIGKILL is accounted for after the restart."""
    folder, port = tmp_path / "results", free_port()
    base = f"http://127.0.0.1:{port}"

    def post(c: httpx.Client, name: str, **data: str) -> str:
        r = c.post("/v1/jobs", files={"image": (name, png_bytes((12, 8)), "image/png")}, data=data)
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def state(c: httpx.Client, job_id: str) -> dict:
        r = c.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, (job_id, r.text)
        return r.json()

    proc = _serve(tiny_model_dir, folder, port)
    try:
        _up(proc, base)
        with httpx.Client(base_url=base, timeout=30) as c:
            finished = [post(c, "a.png", method="nearest"), post(c, "b.png", steps="2", seed="3")]
            for job_id in finished:
                wait_until(lambda job_id=job_id: state(c, job_id)["state"] == "done", what="finished jobs")
            kept = {job_id: c.get(f"/v1/jobs/{job_id}/result").content for job_id in finished}
            running = post(c, "long.png", steps="6", seed="4")
            queued = [post(c, "q1.png", method="nearest"), post(c, "q2.png", steps="2", seed="5")]
            cancelled = post(c, "gone.png", method="nearest")
            assert c.delete(f"/v1/jobs/{cancelled}").json()["result"] == "cancelled"
            wait_until(lambda: (s := state(c, running))["state"] == "running" and s["step"] >= 1, what="the long job to run")
            assert [state(c, q)["state"] for q in queued] == ["queued", "queued"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(TIMEOUT)
        assert proc.returncode == -signal.SIGKILL

        proc = _serve(tiny_model_dir, folder, port)
        _up(proc, base)
        with httpx.Client(base_url=base, timeout=30) as c:
            listed = {j["id"]: j for j in c.get("/v1/jobs?limit=100").json()["jobs"]}
            assert set(listed) == {*finished, running, *queued, cancelled}  # 0 jobs lost
            for job_id, data in kept.items():
                assert state(c, job_id)["state"] == "done"
                assert c.get(f"/v1/jobs/{job_id}/result").content == data  # the same bytes
            assert state(c, cancelled)["state"] == "cancelled"
            for job_id in (running, *queued):
                final = wait_until(lambda job_id=job_id: (s := state(c, job_id))["state"] in ("done", "failed", "cancelled") and s,
                                   timeout=300, what=f"{job_id} to finish after the restart")
                assert final["state"] == "done", final
                r = c.get(f"/v1/jobs/{job_id}/result")
                assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
            assert state(c, running)["metadata"]["seed"] == 4  # the same job, its options kept
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
        assert {p.name for p in folder.glob("*.png")} == {f"{j}.png" for j in (*finished, running, *queued)}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)


def test_a_worker_that_outlives_close_does_not_crash_on_the_closed_store(tmp_path):
    store = JobStore(tmp_path / "r")
    store.close()
    store.close()  # twice is fine
    from sdx4.service.store import StoredJob

    store.put(StoredJob(id="f" * 32, state="done", options={}, input_name="x", input_size=(1, 1), files=[], nbytes=0,
                        metadata=None, error=None, error_kind=None, created=0.0, started=None, finished=None, attempts=1))
    store.delete("f" * 32)  # no sqlite3.ProgrammingError: the late change is logged, not recorded
    again = JobStore(tmp_path / "r")
    assert again.load() == []
    again.close()
