"""Who may call the service, and what a job may cost: Host, Origin, API key on every route, security
headers, no file-system paths, cost-based admission (guard.py, requests.py, app.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from server_helpers import TIMEOUT, Gate, png_bytes, png_metadata
from test_server_api import client_for, post_job, wait_state

from sdx4.options import UpscaleOptions
from sdx4.service.guard import (
    RateLimitedLog,
    RefusalLogFilter,
    host_allowed,
    origin_allowed,
)
from sdx4.service.requests import public_model_name


@pytest.fixture(scope="module")
def upscaler(tiny_upscaler):
    return tiny_upscaler


# ---- Host and Origin --------------------------------------------------------------------------------


def test_host_check_refuses_dns_rebinding_names(upscaler, tmp_path):
    with client_for(upscaler, tmp_path, allowed_hosts=("upscaler.lan",)) as c:
        r = c.get("/v1/info", headers={"Host": "evil.example"})
        assert r.status_code == 400 and r.json()["field"] == "host" and "'evil.example'" in r.json()["detail"]
        assert c.get("/", headers={"Host": "evil.example:7860"}).status_code == 400  # the page too
        for host in ("localhost:7860", "127.0.0.1:7860", "[::1]:7860", "10.1.2.3", "upscaler.lan:7860", "UPSCALER.LAN"):
            assert c.get("/v1/info", headers={"Host": host}).status_code == 200, host


def test_pure_host_and_origin_rules():
    assert host_allowed("app.localhost:1", ()) and not host_allowed(None, ()) and not host_allowed("", ())
    assert not host_allowed("localhost.evil.example", ()) and host_allowed("anything.example", ("*",))
    assert origin_allowed("http://127.0.0.1:7860", "http", "127.0.0.1:7860", ())
    assert not origin_allowed("http://127.0.0.1:7861", "http", "127.0.0.1:7860", ())
    assert not origin_allowed("null", "http", "127.0.0.1:7860", ())
    assert origin_allowed("https://up.lan", "http", "up.lan", ())  # behind a TLS proxy
    assert not origin_allowed("ftp://up.lan", "http", "up.lan", ()) and not origin_allowed("up.lan", "http", "up.lan", ())
    assert origin_allowed("https://tool.example", "http", "127.0.0.1:7860", ("https://tool.example",))


def test_cross_site_pages_cannot_submit_or_read(upscaler, tmp_path):
    with client_for(upscaler, tmp_path, allowed_origins=("https://tool.example",)) as c:
        r = post_job(c, headers={"Origin": "http://evil.example"})
        assert r.status_code == 403 and r.json()["field"] == "origin" and "'http://evil.example'" in r.json()["detail"]
        assert c.get("/v1/info", headers={"Origin": "null"}).status_code == 403
        assert c.get("/health").json()["jobs"]["submitted"] == 0  # nothing was queued
        assert post_job(c, headers={"Origin": "http://localhost"}).status_code == 202  # the page's own origin
        assert post_job(c, headers={"Origin": "https://tool.example"}).status_code == 202
        assert post_job(c).status_code == 202  # no Origin: curl, scripts


# ---- the API key ------------------------------------------------------------------------------------


def test_api_key_guards_every_route_but_health_and_the_page(upscaler, tmp_path):
    with client_for(upscaler, tmp_path, api_key="s3cret") as c:
        for path in ("/docs", "/redoc", "/openapi.json", "/v1/info", "/docs/oauth2-redirect", "/nowhere"):
            r = c.get(path)
            assert r.status_code == 401 and "API key" in r.json()["detail"] and r.headers["www-authenticate"] == "Bearer", path
        assert c.get("/openapi.json", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/docs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        for path in ("/health", "/", "/static/app.js"):
            assert c.get(path).status_code == 200, path


# ---- headers and paths ------------------------------------------------------------------------------


def test_security_headers_on_every_response_and_the_page_keeps_its_csp(upscaler, tmp_path):
    with client_for(upscaler, tmp_path) as c:
        for r in (c.get("/health"), c.get("/v1/info"), c.get("/v1/jobs/nope"), c.get("/static/app.js"),
                  c.get("/openapi.json"), c.get("/v1/info", headers={"Host": "evil.example"})):
            assert r.headers["x-content-type-options"] == "nosniff", r.url
            assert r.headers["referrer-policy"] == "no-referrer" and r.headers["x-frame-options"] == "DENY"
            assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        page = c.get("/").headers["content-security-policy"]
        assert page.startswith("default-src 'self'") and "script-src 'self'" in page and "frame-ancestors 'none'" in page


def test_no_file_system_paths_unless_exposed(upscaler, tmp_path, tiny_model_dir):
    full = str(tiny_model_dir)
    assert upscaler.info["model"] == full and Path(full).name == "tiny"
    with client_for(upscaler, tmp_path / "a") as c:
        info = c.get("/v1/info")
        assert info.json()["model"]["model"] == "tiny" and full not in info.text
        r = post_job(c, path="/v1/upscale")
        assert r.status_code == 200 and png_metadata(r.content)["model"] == "tiny" and full.encode() not in r.content
        job = c.get(f"/v1/jobs/{r.headers['x-sdx4-job-id']}")
        assert job.json()["metadata"]["model"] == "tiny" and full not in job.text
    with client_for(upscaler, tmp_path / "b", expose_paths=True) as c:
        assert c.get("/v1/info").json()["model"]["model"] == full
        assert png_metadata(post_job(c, path="/v1/upscale").content)["model"] == full


def test_public_model_name():
    assert public_model_name("stabilityai/stable-diffusion-x4-upscaler") == "stabilityai/stable-diffusion-x4-upscaler"
    assert public_model_name("/home/me/models/x4/") == "x4" and public_model_name("./x4") == "x4"
    assert public_model_name("C:\\models\\x4") == "x4" and public_model_name("~/x4") == "x4"


# ---- cost-based admission ---------------------------------------------------------------------------


def test_side_and_aspect_limits_refuse_thin_strips_before_decoding(upscaler, tmp_path):
    with client_for(upscaler, tmp_path, max_input_pixels=10**6, max_output_pixels=10**8) as c:
        r = post_job(c, image=png_bytes((100_000, 1)))  # 0.1 MP: under the pixel limit
        assert r.status_code == 413 and r.json()["detail"] == "cat.png: 100000x1 has a side over the limit of 4096 pixels"
        r = post_job(c, image=png_bytes((170, 10)))
        assert r.status_code == 422 and r.json()["field"] == "image"
        assert r.json()["detail"] == "cat.png: 170x10 has an aspect ratio of 17, over the limit of 16"
        assert post_job(c, image=png_bytes((160, 10))).status_code == 202
        assert c.get("/v1/info").json()["limits"]["max_aspect"] == 16


def test_job_cost_limit_413_names_limit_and_cost(upscaler, tmp_path):
    opts = UpscaleOptions(steps=40, guidance=9.0)
    cost = upscaler.cost(opts, (24, 16)).megapixel_steps
    assert cost > 0 and upscaler.cost(UpscaleOptions(method="bicubic"), (24, 16)).megapixel_steps == 0
    with client_for(upscaler, tmp_path, max_job_cost=cost * 0.99) as c:
        r = post_job(c, {"steps": "40", "guidance": "9"})
        body = r.json()
        assert r.status_code == 413 and body["limit"] == cost * 0.99 and body["cost"] == pytest.approx(cost, abs=1e-3)
        assert "megapixel-steps, over the limit of" in body["detail"] and body["unit"] == "megapixel-steps"
        assert post_job(c, {"steps": "20", "guidance": "9"}).status_code == 202  # half the steps: admitted
        assert post_job(c, {"steps": "40", "guidance": "1"}).status_code == 202  # no guidance: half the UNet batch
        assert post_job(c, {"method": "bicubic"}).status_code == 202  # classical methods cost nothing


def test_queue_bounded_by_total_cost_429_with_retry_after(upscaler, tmp_path):
    gate = Gate(upscaler)
    gate.cost = upscaler.cost
    one = upscaler.cost(UpscaleOptions(steps=2, seed=7), (24, 16)).megapixel_steps
    with client_for(gate, tmp_path, max_queue_cost=one * 2.5) as c:
        running = post_job(c).json()
        assert gate.paused.wait(TIMEOUT)
        q1, q2 = post_job(c), post_job(c)  # the running job is not queued: 2 x one waiting
        assert (q1.status_code, q2.status_code) == (202, 202)
        r = post_job(c)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["queued_cost"] == pytest.approx(2 * one, abs=1e-3) and "the queue is full" in r.json()["detail"]
        assert post_job(c, {"method": "bicubic"}).status_code == 202  # costs nothing: fits
        assert c.delete(f"/v1/jobs/{q1.json()['id']}").status_code == 200
        assert post_job(c).status_code == 202  # the cancelled job's cost was given back
        gate.release.set()
        assert wait_state(c, running["id"])["state"] == "done"


def test_rate_limited_log_says_what_it_dropped(caplog):
    say = RateLimitedLog(logging.getLogger("sdx4.test"), every_s=3600)
    with caplog.at_level(logging.WARNING, "sdx4.test"):
        assert say("host", "refused a") and not say("host", "refused b") and not say("host", "refused c")
        assert say("origin", "other kind")
        say._last["host"] -= 7200  # an hour later
        assert say("host", "refused d")
    assert [r.getMessage() for r in caplog.records] == ["refused a", "other kind", "refused d (2 more like it not logged)"]


def test_access_log_keeps_one_refusal_per_status_per_interval():
    f = RefusalLogFilter(every_s=3600)

    def line(status):
        return logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                                 ("127.0.0.1:1", "GET", "/v1/info", "1.1", status), None)

    assert [f.filter(line(400)) for _ in range(3)] == [True, False, False]
    assert f.filter(line(403)) and not f.filter(line(403)) and f.filter(line(503))
    assert all(f.filter(line(200)) for _ in range(3)) and f.filter(line(404))  # answers that are not refusals all pass


def test_the_runner_installs_the_filter_once(upscaler, tmp_path):
    from sdx4.service.app import create_app, uvicorn_config
    from sdx4.service.jobs import QueueSettings
    from sdx4.service.requests import ServerSettings

    for i in range(2):  # two apps: each holds its own results folder (the job store locks it)
        settings = ServerSettings(queue=QueueSettings(results_dir=str(tmp_path / f"r{i}")))
        uvicorn_config(create_app(upscaler, settings), settings)
    access = logging.getLogger("uvicorn.access")
    assert sum(isinstance(x, RefusalLogFilter) for x in access.filters) == 1
