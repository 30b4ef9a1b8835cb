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


def _captured_settings(monkeypatch, argv):
    """Run `sdx4 serve ARGV` with the model load and the server replaced: what settings would it serve?"""
    import sdx4.cli.args
    import sdx4.service.app

    seen = {}
    monkeypatch.setattr(sdx4.cli.args, "load_from_args", lambda args, say: object())
    monkeypatch.setattr(sdx4.service.app, "serve", lambda upscaler, settings, **kw: seen.update(settings=settings, **kw))
    assert main(["serve", *argv]) == 0
    return seen["settings"]


def test_serve_hardening_flags_reach_the_settings(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("SDX4_API_KEY", raising=False)
    s = _captured_settings(monkeypatch, [
        "--max-side", "2048", "--max-aspect", "8", "--max-job-cost", "50", "--max-queue-cost", "200",
        "--max-connections", "32", "--max-uploads", "2", "--body-timeout", "30", "--header-timeout", "3",
        "--keep-alive", "2", "--allowed-host", "up.lan", "--allowed-host", "box", "--allow-origin", "https://a.example",
        "--expose-paths"])
    assert (s.max_side, s.max_aspect, s.max_job_cost, s.max_queue_cost) == (2048, 8.0, 50.0, 200.0)
    assert (s.max_connections, s.max_uploads, s.body_timeout_s, s.header_timeout_s, s.keep_alive_s) == (32, 2, 30.0, 3.0, 2.0)
    assert s.allowed_hosts == ("up.lan", "box") and s.allowed_origins == ("https://a.example",) and s.expose_paths
    assert s.api_key is None
    d = _captured_settings(monkeypatch, [])
    assert (d.max_side, d.max_aspect, d.max_job_cost, d.max_connections, d.expose_paths) == (4096, 16.0, 400.0, 100, False)


def test_serve_api_key_from_env_or_file_and_a_warning_for_argv(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("SDX4_API_KEY", "from-env")
    assert _captured_settings(monkeypatch, []).api_key == "from-env"
    assert "visible" not in capsys.readouterr().err
    key_file = tmp_path / "key"
    key_file.write_text("from-file  \nsecond line ignored\n")
    assert _captured_settings(monkeypatch, ["--api-key-file", str(key_file)]).api_key == "from-file"
    assert "visible" not in capsys.readouterr().err
    assert _captured_settings(monkeypatch, ["--api-key", "on-argv"]).api_key == "on-argv"
    assert "warning: --api-key is visible to every user of this machine (ps, /proc)" in capsys.readouterr().err
    monkeypatch.delenv("SDX4_API_KEY")
    assert _captured_settings(monkeypatch, ["--host", "0.0.0.0"]).api_key is None
    assert "without an API key: anyone who can reach it can use it (set $SDX4_API_KEY or --api-key-file)" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--api-key-file", "MISSING"], "--api-key-file: cannot read MISSING"),
    (["--api-key", "k", "--api-key-file", "x"], "give --api-key or --api-key-file, not both"),
    (["--max-aspect", "0.5"], "--max-aspect: max_aspect must be a number >= 1; got 0.5"),
    (["--body-timeout", "0"], "--body-timeout: body_timeout_s must be a positive number; got 0.0"),
    (["--max-job-cost", "nan"], "--max-job-cost: max_job_cost must be a positive number; got nan"),
    (["--max-connections", "0"], "--max-connections: max_connections must be a positive integer; got 0"),
    (["--allowed-host", ""], "--allowed-host: allowed_hosts: '' is not a host name or origin"),
])
def test_serve_hardening_usage_errors_exit_2(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err


def test_empty_key_file_is_refused(tmp_path, capsys):
    (tmp_path / "key").write_text("\n")
    assert main(["serve", "--api-key-file", str(tmp_path / "key")]) == 2
    assert f"--api-key-file: {tmp_path / 'key'} is empty" in capsys.readouterr().err
