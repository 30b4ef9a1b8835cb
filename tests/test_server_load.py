"""Load: 20 concurrent clients against a real uvicorn on loopback; every job completes exactly once."""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from server_helpers import (
    TIMEOUT,
    free_port,
    live_server,
    png_bytes,
    png_metadata,
    wait_until,
)

from sdx4.service.app import create_app, uvicorn_config
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


# ---- abuse: floods of idle, slow and oversized connections (guard.py, app.uvicorn_config) ------------

@contextlib.contextmanager
def guarded_server(app, settings):
    """The service as `sdx4 serve` runs it (its uvicorn settings and protocol) on 127.0.0.1, in a thread."""
    import uvicorn

    config = uvicorn_config(app, settings, "127.0.0.1", free_port(), "warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-guarded", daemon=True)
    thread.start()
    wait_until(lambda: server.started, what="uvicorn to start")
    try:
        yield config.port
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)


def open_idle(port: int, n: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(n)]


def closed_by_server(s: socket.socket, wait: float) -> bytes | None:
    """What the server sent before closing (b"" for nothing), or None if it is still open after `wait` s."""
    s.settimeout(wait)
    data = b""
    try:
        while chunk := s.recv(4096):
            data += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return data


def health_ms(port: int) -> float:
    """Milliseconds for GET /health on a new connection, connect to last byte (a raw socket: no client setup timed)."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = closed_by_server(s, 5.0)
    ms = (time.perf_counter() - t0) * 1000
    assert answer is not None and answer.startswith(b"HTTP/1.1 200"), answer
    return ms


def post_head(port: int, length: int, body: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
              + f"Content-Length: {length}\r\n\r\n".encode() + body)
    return s


def test_idle_flood_is_capped_and_reaped_and_health_stays_fast(upscaler, tmp_path, caplog):
    settings = ServerSettings(max_connections=30, header_timeout_s=3.0, queue=QueueSettings(results_dir=str(tmp_path / "r")))
    app = create_app(upscaler, settings)
    with caplog.at_level(logging.WARNING, "sdx4.server"), guarded_server(app, settings) as port:
        idle = open_idle(port, 25)
        time.sleep(0.2)
        times = [health_ms(port) for _ in range(5)]  # 25 idle connections open
        assert max(times) < 100, times
        extra = open_idle(port, 15)  # 40 open: the oldest idle ones are closed to keep 30
        time.sleep(0.2)
        times = [health_ms(port) for _ in range(5)]  # each evicts one more idle connection: never locked out
        assert max(times) < 100, times
        evicted = [closed_by_server(s, 0.05) for s in idle]
        assert sum(d == b"" for d in evicted) >= 10, evicted  # at least the oldest 10 (and some for the probes)
        assert all(closed_by_server(s, 0.05) is None for s in extra)  # the newest stay
        reaped = [closed_by_server(s, 5.0) for s in extra]  # no request head within 3 s: closed
        assert all(d == b"" for d in reaped), reaped
        for s in idle + extra:
            s.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "sdx4.server" and r.levelno == logging.WARNING]
    # one line per kind at most every 10 s, with the count of the ones not logged
    assert len([m for m in lines if "closed the oldest idle connection" in m]) == 1, lines
    assert len([m for m in lines if "sent no request" in m]) == 1, lines


def test_slow_body_408_oversized_stream_413_and_upload_slots_503(upscaler, tmp_path):
    settings = ServerSettings(max_uploads=2, body_timeout_s=3.0, max_upload_bytes=4000,
                              queue=QueueSettings(results_dir=str(tmp_path / "r")))
    app = create_app(upscaler, settings)
    with guarded_server(app, settings) as port:
        t0 = time.monotonic()
        slow = [post_head(port, 5000, b"--x\r\n") for _ in range(2)]  # 2 bytes/s uploads hold both slots
        time.sleep(0.2)
        third = post_head(port, 100, b"")  # waits 2 s for a slot (UPLOAD_WAIT_S), then 503
        answer = closed_by_server(third, 2.5)
        assert answer is not None and answer.startswith(b"HTTP/1.1 503") and b"retry-after: 5" in answer.lower()
        assert b"too many uploads at once (the limit is 2)" in answer
        for s in slow:
            answer = closed_by_server(s, 3.0)
            assert answer is not None and answer.startswith(b"HTTP/1.1 408"), answer
            assert b"the request body was not received within 3 s" in answer
        assert time.monotonic() - t0 < 4.0
        # Chunked, no Content-Length: the size is counted while streaming and the upload cut off at the limit.
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        sent = 0
        with contextlib.suppress(OSError):
            for _ in range(200):
                s.sendall(b"2000\r\n" + bytes(0x2000) + b"\r\n")
                sent += 0x2000
        answer = closed_by_server(s, 3.0)
        assert answer is not None and answer.startswith(b"HTTP/1.1 413"), answer
        assert b"upload is over the limit of 4000 bytes" in answer
        assert health_ms(port) < 100  # the slots were given back: a normal upload goes through
        r = httpx.post(f"http://127.0.0.1:{port}/v1/jobs", files={"image": ("a.png", png_bytes(), "image/png")},
                       data={"steps": "2", "method": "bicubic"}, timeout=TIMEOUT)
        assert r.status_code == 202, r.text


SERVER_UNDER_FD_LIMIT = """
import resource, sys, uvicorn
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
from sdx4.service.app import create_app, uvicorn_config
from sdx4.service.jobs import QueueSettings
from sdx4.service.requests import ServerSettings

class StandIn:  # no model: this checks connections only
    info = {"model": "stand-in"}
    def __call__(self, image, options, progress=None):
        raise RuntimeError("not used")

settings = ServerSettings(queue=QueueSettings(results_dir=sys.argv[2]))  # the defaults: 100 connections
uvicorn.Server(uvicorn_config(create_app(StandIn(), settings), settings, "127.0.0.1", int(sys.argv[1]), "warning")).run()
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX rlimits")
def test_under_a_256_descriptor_limit_300_idle_connections_leave_health_fast_and_the_log_short(tmp_path):
    port = free_port()
    env = {"PYTHONPATH": str(Path(__file__).parents[1] / "src"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SERVER_UNDER_FD_LIMIT, str(port), str(tmp_path / "r")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    conns: list[socket.socket] = []
    try:
        wait_until(lambda: proc.poll() is None and _connectable(port), timeout=60, what="the server to listen")
        conns = open_idle(port, 300)
        time.sleep(1.5)  # the server has taken in the flood (on a busy 2-core machine, that is not instant)
        times = [health_ms(port) for _ in range(10)]
        print(f"/health with 300 idle connections under a 256-descriptor limit: {sorted(round(t, 1) for t in times)} ms")
        assert max(times) < 100, times
    finally:
        for s in conns:
            s.close()
        proc.terminate()
        log_text = proc.communicate(timeout=TIMEOUT)[0].decode(errors="replace")
    lines = [line for line in log_text.splitlines() if line.strip()]
    assert "Traceback" not in log_text and "Too many open files" not in log_text, log_text[-2000:]
    assert len(lines) < 10, lines  # one line for ~210 closed connections, not one each


def _connectable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False
