"""`sdx4 serve` as a real subprocess on loopback: it serves, and SIGTERM shuts it down cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from server_helpers import TIMEOUT, free_port, png_bytes, wait_until

from sdx4.cli import build_parser, main

STARTUP_TIMEOUT = 180.0  # python + torch import + model load on a busy 2-core machine


def _sse_events(base: str, job_id: str, sink: list) -> None:
    with httpx.Client(base_url=base, timeout=TIMEOUT) as http:
        with http.stream("GET", f"/v1/jobs/{job_id}/events") as r:
            block: list[str] = []
            for line in r.iter_lines():
                if line:
                    block.append(line)
                    continue
                if block and block[0].startswith("event:"):
                    sink.append((block[0][6:].strip(), json.loads(block[1][5:])))
                block = []


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM semantics are POSIX")
def test_serve_subprocess_sigterm_cancels_running_job_and_leaves_no_files(tiny_model_dir, tmp_path):
    port, results = free_port(), tmp_path / "results"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    cmd = [sys.executable, "-m", "sdx4", "serve", "--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "fp32",
           "--port", str(port), "--results-dir", str(results), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            assert proc.poll() is None, f"sdx4 serve exited early: {proc.communicate()[1]}"
            try:
                return httpx.get(f"{base}/health", timeout=2.0).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, STARTUP_TIMEOUT, "sdx4 serve to answer /health")
        with httpx.Client(base_url=base, timeout=TIMEOUT) as http:
            files = {"image": ("a.png", png_bytes((16, 16)), "image/png")}
            r = http.post("/v1/upscale", files=files, data={"steps": "2", "seed": "1"})
            assert r.status_code == 200
            done_png = r.headers["x-sdx4-job-id"] + ".png"
            assert [p.name for p in results.iterdir() if p.name != ".sdx4-jobs"] == [done_png]  # + the job store
            long_job = http.post("/v1/jobs", files=files, data={"steps": "500", "guidance": "1"}).json()
            queued = http.post("/v1/jobs", files=files, data={"steps": "2"}).json()
            wait_until(lambda: http.get(f"/v1/jobs/{long_job['id']}").json()["step"] >= 1, what="the long job to run")
        events: dict[str, list] = {long_job["id"]: [], queued["id"]: []}
        readers = [threading.Thread(target=_sse_events, args=(base, k, v), daemon=True) for k, v in events.items()]
        for t in readers:
            t.start()
        wait_until(lambda: all(events.values()), what="both event streams to start")

        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=TIMEOUT)
        for t in readers:
            t.join(TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    assert proc.returncode == 0, err
    assert "Traceback" not in err
    name, last = events[long_job["id"]][-1]
    assert name == "cancelled" and last["error"] == "the server is shutting down"
    assert 1 <= last["step"] < 500  # stopped at a step boundary, long before the end
    name, last = events[queued["id"]][-1]
    assert name == "cancelled" and last["error"] == "the server is shutting down" and last["step"] == 0
    # A given --results-dir keeps the finished result for the next start (docs/server.md "Jobs survive
    # restarts"); the cancelled jobs wrote nothing, and there is no partial or temp file.
    assert results.is_dir() and sorted(p.name for p in results.iterdir()) == [".sdx4-jobs", done_png]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{base}/health", timeout=2.0)


def test_serve_refuses_a_results_dir_another_server_holds_before_loading(tmp_path, capsys):
    from sdx4.service.jobs import JobManager, QueueSettings

    holder = JobManager(object(), QueueSettings(results_dir=str(tmp_path / "r")))
    try:  # the model folder does not exist: the folder check comes first, before any loading
        assert main(["serve", "--model", str(tmp_path / "missing"), "--results-dir", str(tmp_path / "r")]) == 1
    finally:
        holder.close()
    err = capsys.readouterr().err
    assert f"sdx4: error: --results-dir: results_dir '{tmp_path / 'r'}' is in use by another sdx4 server (pid {os.getpid()})" in err


def test_serve_usage_errors_exit_2(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "missing"), "--port", "7861"]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err
    assert main(["serve", "--port", "70000"]) == 2
    assert "--port must be in 1..65535; got 70000" in capsys.readouterr().err
    assert main(["serve", "--max-queue", "0"]) == 2
    assert "--max-queue: max_queue must be a positive integer; got 0" in capsys.readouterr().err


def test_serve_parser_defaults_and_no_heavy_imports():
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.max_queue, args.api_key) == ("127.0.0.1", 7860, 16, None)
    code = "import sys, sdx4.cli; sdx4.cli.build_parser(); print(sorted(m for m in ('torch','fastapi','uvicorn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    assert out.stdout.strip() == "[]", out.stderr
