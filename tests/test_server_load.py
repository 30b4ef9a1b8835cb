"""Load: 20 concurrent clients against a real uvicorn on loopback; every job completes exactly once."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from server_helpers import (
    TIMEOUT,
    live_server,
    png_bytes,
    png_metadata,
)

from sdx4.service.app import create_app
from sdx4.service.jobs import QueueSettings
from sdx4.service.requests import ServerSettings

CLIENTS = 20


@pytest.fixture(scope="module")
def upscaler(tiny_upscaler):  # conftest.py: the tiny random model, loaded once per session
    return tiny_upscaler


def test_twenty_clients_every_job_completes_exactly_once(upscaler, tmp_path):
    # A queue smaller than the number of clients: some submissions get 429 and retry after Retry-After.
    settings = ServerSettings(queue=QueueSettings(max_queue=6, results_dir=str(tmp_path / "results")))
    app = create_app(upscaler, settings)
    results: dict[int, dict] = {}
    errors: list[str] = []
    health: list[tuple[int, object]] = []
    stop_health = threading.Event()
    retries = [0] * CLIENTS

    with live_server(app) as base:

        def client(i: int) -> None:
            size = (8 + i, 8 + (i % 5))  # each client's own input size, to tell results apart
            try:
                with httpx.Client(base_url=base, timeout=TIMEOUT) as http:
                    deadline = time.monotonic() + 4 * TIMEOUT
                    while True:
                        r = http.post(
                            "/v1/jobs",
                            files={"image": (f"c{i}.png", png_bytes(size, (i * 10, 50, 90)), "image/png")},
                            data={"steps": "2", "seed": str(1000 + i), "guidance": "1.0"},
                        )
                        if r.status_code != 429:
                            break
                        retries[i] += 1
                        assert time.monotonic() < deadline, "still 429 at the deadline"
                        time.sleep(min(float(r.headers["retry-after"]), 2.0))
                    assert r.status_code == 202, r.text
                    job_id = r.json()["id"]
                    while True:  # poll
                        s = http.get(f"/v1/jobs/{job_id}").json()
                        if s["state"] in ("done", "failed", "cancelled"):
                            break
                        assert time.monotonic() < deadline, f"job {job_id} still {s['state']} at the deadline"
                        time.sleep(0.2)
                    assert s["state"] == "done", s
                    png = http.get(f"/v1/jobs/{job_id}/result").content
                    results[i] = {"id": job_id, "meta": png_metadata(png), "size": size}
            except Exception as e:  # collected and asserted on below, with the client's number
                errors.append(f"client {i}: {type(e).__name__}: {e}")

        def watch_health() -> None:
            with httpx.Client(base_url=base, timeout=10.0) as http:
                while not stop_health.is_set():
                    r = http.get("/health")
                    health.append((r.status_code, r.json()["running"]))
                    time.sleep(0.05)

        watcher = threading.Thread(target=watch_health, daemon=True)
        watcher.start()
        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(6 * TIMEOUT)
        stop_health.set()
        watcher.join(TIMEOUT)
        with httpx.Client(base_url=base, timeout=TIMEOUT) as http:
            final_health = http.get("/health").json()

    assert errors == []
    assert sorted(results) == list(range(CLIENTS))
    assert len({r["id"] for r in results.values()}) == CLIENTS  # no job shared or duplicated
    for i, r in results.items():
        w, h = r["size"]
        assert r["meta"]["seed"] == 1000 + i and r["meta"]["job_id"] == r["id"]
        assert r["meta"]["input_size"] == [w, h] and r["meta"]["output_size"] == [4 * w, 4 * h]
    # exactly once: the worker started and finished each accepted job once, lost none
    assert final_health["jobs"] == {"submitted": CLIENTS, "started": CLIENTS, "done": CLIENTS, "failed": 0, "cancelled": 0}
    assert sum(retries) > 0, "the queue never filled: the 429 path was not exercised"
    # responsive throughout: every health probe answered 200, some while a job was running
    assert health and all(code == 200 for code, _ in health)
    assert any(running is not None for _, running in health)
