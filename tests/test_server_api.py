"""The HTTP API with the tiny random model: every endpoint, every error code, cancel, queue full, limits."""

from __future__ import annotations

import io
import json
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from server_helpers import (
    TIMEOUT,
    Gate,
    bomb_png,
    image_bytes,
    png_bytes,
    png_metadata,
    wait_until,
)

from sdx4.service.app import create_app
from sdx4.service.jobs import QueueSettings
from sdx4.service.requests import ApiError, ServerSettings, parse_options, safe_name
from sdx4.service.store import STORE_DIR


def results_in(folder: Path) -> list[Path]:
    """The result files in a results folder (its job store, .sdx4-jobs/, is not a result)."""
    return [p for p in Path(folder).iterdir() if p.name != STORE_DIR]

FAST = {"steps": "2", "seed": "7"}

@pytest.fixture(scope="module")
def upscaler(tiny_upscaler):  # conftest.py: the tiny random model, loaded once per session
    return tiny_upscaler


@contextmanager
def client_for(model, tmp_path: Path | None = None, **kw):
    queue_kw = {k: kw.pop(k) for k in list(kw) if k in ("max_queue", "result_ttl_s", "max_results", "max_result_bytes")}
    if tmp_path is not None:
        queue_kw["results_dir"] = str(tmp_path / "results")
    settings = ServerSettings(queue=QueueSettings(**queue_kw), **kw)
    app = create_app(model, settings)
    with TestClient(app, base_url="http://localhost") as client:  # Host must be this server's (guard.py)
        client.app_state = app.state
        yield client


def post_job(client, data=None, image=None, name="cat.png", ctype="image/png", path="/v1/jobs", **kw):
    files = {"image": (name, png_bytes() if image is None else image, ctype)}
    return client.post(path, files=files, data=FAST if data is None else data, **kw)


def wait_state(client, job_id, states=("done", "failed", "cancelled")):
    return wait_until(
        lambda: (s := client.get(f"/v1/jobs/{job_id}").json()) and s["state"] in states and s, what=f"job in {states}"
    )


@pytest.fixture(scope="module")
def client(upscaler, tmp_path_factory):
    with client_for(upscaler, tmp_path_factory.mktemp("api")) as c:
        yield c


# ---- happy paths ------------------------------------------------------------------------------------


def test_sync_upscale_returns_png_4x_with_metadata(client):
    r = post_job(client, {"steps": "2", "seed": "123", "prompt": "a cat", "guidance": "1.5", "scheduler": "unipc"}, path="/v1/upscale")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert r.headers["content-disposition"] == 'attachment; filename="cat_x4.png"'
    assert r.headers["x-sdx4-seed"] == "123"
    with Image.open(io.BytesIO(r.content)) as im:
        assert im.size == (96, 64) and im.mode == "RGB"
    meta = png_metadata(r.content)
    assert meta["seed"] == 123 and meta["steps"] == 2 and meta["prompt"] == "a cat" and meta["guidance"] == 1.5
    assert meta["scheduler"] == "unipc"  # every UpscaleOptions field is a form field of the same name
    assert meta["input_size"] == [24, 16] and meta["output_size"] == [96, 64]
    assert meta["input"] == "cat.png" and meta["job_id"] == r.headers["x-sdx4-job-id"]
    assert meta["random_weights"] is True


def test_job_lifecycle_poll_events_result_delete(client):
    r = post_job(client, {"steps": "2", "seed": "5"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert len(job["id"]) == 32 and r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["state"] in ("queued", "running") and job["options"]["seed"] == 5
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        events = [(e.split("\n")[0], json.loads(e.split("\n")[1][6:])) for e in s.read().decode().strip().split("\n\n")]
    names = [e[0] for e in events]
    assert names[-1] == "event: done" and all(n == "event: progress" for n in names[:-1])
    steps = [d["step"] for _, d in events if d["state"] == "running"]
    assert steps == sorted(steps) and max(steps) <= 2
    final = events[-1][1]
    assert final["step"] == 2 and final["total"] == 2 and final["progress"] == 1.0
    assert final["result_urls"] == [f"/v1/jobs/{job['id']}/result"]
    status = client.get(f"/v1/jobs/{job['id']}").json()
    assert status["state"] == "done" and status["metadata"]["seed"] == 5 and status["queue_position"] is None
    res = client.get(status["result_urls"][0])
    assert res.status_code == 200 and png_metadata(res.content)["seed"] == 5
    assert res.headers["content-disposition"] == 'inline; filename="cat_x4.png"'
    assert client.get(f"/v1/jobs/{job['id']}/result?index=1").status_code == 404
    files = list(results_in(client.app_state.manager.results_dir))
    assert f"{job['id']}.png" in [f.name for f in files]
    d = client.delete(f"/v1/jobs/{job['id']}")
    assert d.status_code == 200 and d.json()["result"] == "deleted"
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert f"{job['id']}.png" not in [f.name for f in results_in(client.app_state.manager.results_dir)]


def test_num_images_and_classical_method(client):
    r = post_job(client, {"steps": "2", "seed": "1", "num_images": "2"})
    done = wait_state(client, r.json()["id"])
    assert done["state"] == "done" and done["num_images"] == 2 and len(done["result_urls"]) == 2
    a, b = (client.get(u).content for u in done["result_urls"])
    assert a != b and png_metadata(a)["num_images"] == 2
    r = post_job(client, {"method": "lanczos"}, image=png_bytes((5, 3), (1, 2, 3, 128), "RGBA"), path="/v1/upscale")
    assert r.status_code == 200
    with Image.open(io.BytesIO(r.content)) as im:
        assert im.size == (20, 12) and im.mode == "RGBA"
    assert png_metadata(r.content)["method"] == "lanczos"


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "BMP", "TIFF", "GIF"])
def test_accepted_formats(client, fmt):
    r = post_job(client, {"method": "bicubic"}, image=image_bytes(fmt), name=f"x.{fmt.lower()}", path="/v1/upscale")
    assert r.status_code == 200, r.text
    with Image.open(io.BytesIO(r.content)) as im:
        assert im.size == (80, 48)


def test_info_health_page_openapi(client):
    info = client.get("/v1/info").json()
    assert info["model"]["random_weights"] is True and info["model"]["device"] == "cpu"
    assert info["model"]["unet_dtype"] == "fp32" and info["sdx4_version"]
    assert info["limits"]["max_output_pixels"] == 2048 * 2048 and info["limits"]["max_queue"] == 16
    assert info["defaults"]["steps"] == 75 and "sd" in info["methods"] and info["api_key_required"] is False
    h = client.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    page = client.get("/")
    assert page.status_code == 200 and "<title>sdx4" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text  # no CDN
    js = client.get("/static/app.js")
    assert js.status_code == 200 and "/v1/jobs" in js.text and "https://" not in js.text
    spec = client.get("/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/result", "/v1/upscale",
            "/v1/info", "/health"} <= set(spec["paths"])
    form = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["properties"]["steps"] == {"type": "integer", "default": 75}
    assert set(form["properties"]) == {"image"} | set(info["defaults"])
    assert form["properties"]["scheduler"]["enum"] == info["choices"]["scheduler"]
    assert form["required"] == ["image"]


# ---- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, status, field, message",
    [
        ({"steps": "0"}, 422, "steps", "steps must be in 1..500; got 0"),
        ({"steps": "99999999999999999999999"}, 422, "steps", "steps must be in 1..500"),
        ({"steps": "two"}, 422, "steps", "steps must be an integer; got 'two'"),
        ({"guidance": "1e309"}, 422, "guidance", "guidance must be a number in 0..100; got inf"),
        ({"guidance": "nan"}, 422, "guidance", "guidance must be a number in 0..100"),
        ({"noise_level": "351"}, 422, "noise_level", "noise_level must be in 0..350; got 351"),
        ({"seed": "-1"}, 422, "seed", "seed must be in 0.."),
        ({"eta": "2"}, 422, "eta", "eta must be in 0..1; got 2"),
        ({"num_images": "17"}, 422, "num_images", "num_images must be in 1..16"),
        ({"method": "magic"}, 422, "method", "method must be one of sd, nearest"),
        ({"scheduler": "plms"}, 422, "scheduler", "scheduler must be one of ddim, dpmpp-2m"),
        ({"prompt": "x" * 2001}, 422, "prompt", "prompt is 2001 characters; the limit is 2000"),
        ({"stepz": "2"}, 422, "stepz", "unknown field 'stepz'"),
    ],
)
def test_bad_options_422_name_the_option(client, data, status, field, message):
    r = post_job(client, data)
    assert r.status_code == status, r.text
    assert r.json()["field"] == field and message in r.json()["detail"]


def test_bad_uploads(client):
    cases = [
        (b"", "image/png", 422, "cat.png: empty file (0 bytes)"),
        (b"this is not an image at all", "image/png", 415, "not a supported image; send one of PNG, JPEG"),
        (png_bytes()[:60], "image/png", 422, "cannot decode the image"),
        (png_bytes(), "text/plain", 415, "content type 'text/plain' is not an image"),
        (image_bytes("PPM"), "image/x-portable-pixmap", 415, "not a supported image"),
    ]
    for data, ctype, status, message in cases:
        r = post_job(client, image=data, ctype=ctype)
        assert r.status_code == status, (message, r.text)
        assert message in r.json()["detail"] and r.json()["field"] == "image"
    r = client.post("/v1/jobs", json={"image": "x"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
    r = client.post("/v1/jobs", data=FAST, files={"other": ("a.txt", b"x", "text/plain")})
    assert r.status_code == 422 and r.json()["field"] == "other" and "unknown field 'other'" in r.json()["detail"]
    r = client.post("/v1/jobs", data=FAST, files={"image": ("a.png", png_bytes(), "image/png"), "steps": ("s.txt", b"2", "text/plain")})
    assert r.status_code == 400 and "Too many files" in r.json()["detail"]  # one file per request
    r = client.post("/v1/jobs", content=b"--xx\r\ngarbage", headers={"content-type": "multipart/form-data; boundary=xx"})
    assert r.status_code == 422 and "image: missing" in r.json()["detail"]
    r = client.post("/v1/jobs", content=b"x", headers={"content-type": "multipart/form-data"})
    assert r.status_code == 400 and r.json()["detail"] == "malformed multipart body: Missing boundary in multipart."
    r = client.post("/v1/jobs", data={"steps": "2"})  # no file at all (urlencoded body)
    assert r.status_code == 415
    r = client.post("/v1/jobs", files={"prompt": (None, "a")}, data={"steps": "2"})
    assert r.status_code == 422 and "image: missing" in r.json()["detail"]
    # the server keeps serving after all that
    assert post_job(client, path="/v1/upscale").status_code == 200


def test_decompression_bomb_refused_before_decoding(client, monkeypatch):
    bomb = bomb_png(20000, 20000)  # 400 MP; ~400 KB upload
    assert len(bomb) < 1_000_000

    def no_decode(self, *a, **k):  # the full decode must never start
        raise AssertionError("the bomb was decoded")

    monkeypatch.setattr(Image.Image, "load", no_decode)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decode)
    r = post_job(client, image=bomb)
    assert r.status_code == 413, r.text
    assert "over the input limit of 1048576 pixels" in r.json()["detail"]
    assert "400000000 pixels" in r.json()["detail"]  # Pillow's guard fires in the header already
    r = post_job(client, image=bomb_png(6000, 5000))  # 30 MP: under Pillow's guard, over ours
    assert r.status_code == 413
    assert r.json()["detail"] == "cat.png: 6000x5000 = 30000000 pixels is over the input limit of 1048576 pixels"


def test_pixel_and_byte_limits(upscaler, tmp_path):
    with client_for(upscaler, tmp_path, max_input_pixels=30 * 30, max_output_pixels=12000, max_upload_bytes=4000) as c:
        r = post_job(c, image=png_bytes((31, 30)))
        assert r.status_code == 413 and r.json()["detail"] == "cat.png: 31x30 = 930 pixels is over the input limit of 900 pixels"
        r = post_job(c, image=png_bytes((28, 28)))
        assert r.status_code == 413
        assert r.json()["detail"] == "cat.png: the output would be 112x112 = 12544 pixels, over the output limit of 12000 pixels"
        r = post_job(c, {"steps": "2", "num_images": "2"}, image=png_bytes((20, 20)))
        assert r.status_code == 413 and "x 2 images = 12800 pixels" in r.json()["detail"]
        r = post_job(c, {"method": "bicubic", "scale": "8"}, image=png_bytes((14, 14)))  # the limit follows --scale
        assert r.status_code == 413
        assert r.json()["detail"] == "cat.png: the output would be 112x112 = 12544 pixels, over the output limit of 12000 pixels"
        r = post_job(c, {"method": "bicubic", "scale": "2"}, image=png_bytes((28, 28)), path="/v1/upscale")
        assert r.status_code == 200 and png_metadata(r.content)["output_size"] == [56, 56]
        assert 'filename="cat_x2.png"' in r.headers.get("content-disposition", "")
        noisy = Image.frombytes("RGB", (27, 27), (bytes(range(256)) * 9)[: 27 * 27 * 3])
        buf = io.BytesIO()
        noisy.save(buf, "BMP")
        assert len(buf.getvalue()) < 4000
        r = post_job(c, {"method": "nearest"}, image=buf.getvalue(), path="/v1/upscale")
        assert r.status_code == 200 and png_metadata(r.content)["output_size"] == [108, 108]
        r = post_job(c, image=b"\x89PNG" + bytes(5000))  # the file part is over the limit
        assert r.status_code == 413 and r.json()["detail"] == "upload is over the limit of 4000 bytes"
        r = post_job(c, image=bytes(200_000))  # the whole body is over limit + form overhead: refused while reading
        assert r.status_code == 413 and r.json()["detail"] == "upload is over the limit of 4000 bytes"


def test_api_key(upscaler, tmp_path):
    with client_for(upscaler, tmp_path, api_key="s3cret") as c:
        for method, path in [("get", "/v1/info"), ("post", "/v1/jobs"), ("get", "/v1/jobs/abc"), ("delete", "/v1/jobs/abc")]:
            r = getattr(c, method)(path)
            assert r.status_code == 401 and "API key" in r.json()["detail"], path
        assert c.get("/v1/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/info", headers={"Authorization": "Bearer s3cret"}).json()["api_key_required"] is True
        assert c.get("/v1/info", headers={"X-API-Key": "s3cret"}).status_code == 200
        r = post_job(c, path="/v1/upscale", headers={"X-API-Key": "s3cret"})
        assert r.status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200  # open


def test_unknown_job_404_and_result_not_ready_409(upscaler, tmp_path):
    gate = Gate(upscaler)
    with client_for(gate, tmp_path) as c:
        for path in ("/v1/jobs/nope", "/v1/jobs/nope/result", "/v1/jobs/nope/events", "/v1/jobs/../../etc/passwd"):
            assert c.get(path).status_code == 404, path
        assert c.delete("/v1/jobs/nope").status_code == 404
        job = post_job(c, {"steps": "3", "seed": "1"}).json()
        assert gate.paused.wait(TIMEOUT)
        r = c.get(f"/v1/jobs/{job['id']}/result")
        assert r.status_code == 409 and "is running; no result yet" in r.json()["detail"]
        gate.release.set()
        assert wait_state(c, job["id"])["state"] == "done"


def test_cancel_running_job_stops_at_next_step(upscaler, tmp_path):
    gate = Gate(upscaler, pause_at=1)
    with client_for(gate, tmp_path) as c:
        job = post_job(c, {"steps": "6", "seed": "1"}).json()
        assert gate.paused.wait(TIMEOUT)
        r = c.delete(f"/v1/jobs/{job['id']}")
        assert r.status_code == 202 and r.json()["result"] == "cancelling"
        assert c.get(f"/v1/jobs/{job['id']}").json()["cancel_requested"] is True
        gate.release.set()
        final = wait_state(c, job["id"])
        assert final["state"] == "cancelled" and final["error"] == "cancelled by request"
        assert final["step"] == 2 and gate.steps_seen == [1, 2]  # step 2 ran, 3..6 never did
        r = c.get(f"/v1/jobs/{job['id']}/result")
        assert r.status_code == 409 and "cancelled" in r.json()["detail"]
        assert results_in(tmp_path / "results") == []  # nothing written
        assert c.get("/health").json()["jobs"]["cancelled"] == 1


def test_queue_full_429_then_cancel_queued(upscaler, tmp_path):
    gate = Gate(upscaler)
    with client_for(gate, tmp_path, max_queue=2) as c:
        running = post_job(c).json()
        assert gate.paused.wait(TIMEOUT)
        q1, q2 = post_job(c).json(), post_job(c).json()
        assert c.get(f"/v1/jobs/{q1['id']}").json()["queue_position"] == 0
        assert c.get(f"/v1/jobs/{q2['id']}").json()["queue_position"] == 1
        r = post_job(c)
        assert r.status_code == 429 and "the queue is full (2 jobs waiting)" in r.json()["detail"]
        assert int(r.headers["retry-after"]) >= 1
        assert post_job(c, path="/v1/upscale").status_code == 429
        d = c.delete(f"/v1/jobs/{q1['id']}")
        assert d.status_code == 200 and d.json()["result"] == "cancelled"
        assert c.get(f"/v1/jobs/{q2['id']}").json()["queue_position"] == 0
        gate.release.set()
        assert wait_state(c, running["id"])["state"] == "done"
        assert wait_state(c, q2["id"])["state"] == "done"
        assert c.get(f"/v1/jobs/{q1['id']}").json()["state"] == "cancelled"
        assert gate.calls == 2  # the cancelled job never reached the model


def test_shutdown_refuses_new_work_503_and_cancels(upscaler, tmp_path):
    gate = Gate(upscaler)
    with client_for(gate, tmp_path) as c:
        running = post_job(c, {"steps": "4", "seed": "1"}).json()
        assert gate.paused.wait(TIMEOUT)
        queued = post_job(c).json()
        c.app_state.manager.begin_shutdown()
        r = post_job(c)
        assert r.status_code == 503 and r.json()["detail"] == "the server is shutting down"
        assert c.get("/health").status_code == 503
        assert c.get(f"/v1/jobs/{queued['id']}").json()["error"] == "the server is shutting down"
        gate.release.set()
        final = wait_state(c, running["id"])
        assert final["state"] == "cancelled" and final["error"] == "the server is shutting down"
        assert results_in(tmp_path / "results") == []


def test_model_failure_fails_job_and_worker_keeps_going(upscaler, tmp_path):
    class Flaky:
        info = upscaler.info
        calls = 0

        def __call__(self, image, options, progress=None):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("CUDA out of memory (simulated)")
            return upscaler(image, options, progress=progress)

    with client_for(Flaky(), tmp_path) as c:
        r = post_job(c, path="/v1/upscale")
        assert r.status_code == 500 and r.json()["detail"] == "internal error: RuntimeError: CUDA out of memory (simulated)"
        assert post_job(c, path="/v1/upscale").status_code == 200


def test_results_bounded_by_count(upscaler, tmp_path):
    with client_for(upscaler, tmp_path, max_results=2) as c:
        ids = []
        for _ in range(3):
            r = post_job(c, {"method": "nearest"}, path="/v1/upscale")
            ids.append(r.headers["x-sdx4-job-id"])
        assert c.get(f"/v1/jobs/{ids[0]}").status_code == 404  # the oldest was forgotten
        assert all(c.get(f"/v1/jobs/{i}/result").status_code == 200 for i in ids[1:])
        assert sorted(p.name for p in results_in(tmp_path / "results")) == sorted(f"{i}.png" for i in ids[1:])


def test_results_bounded_by_bytes(upscaler, tmp_path):
    with client_for(upscaler, tmp_path, max_result_bytes=1) as c:  # every result is over: only the newest stays
        a = post_job(c, {"method": "nearest"}, path="/v1/upscale").headers["x-sdx4-job-id"]
        assert c.get(f"/v1/jobs/{a}/result").status_code == 200  # the newest is always kept
        b = post_job(c, {"method": "nearest"}, path="/v1/upscale").headers["x-sdx4-job-id"]
        assert c.get(f"/v1/jobs/{a}").status_code == 404
        assert [p.name for p in results_in(tmp_path / "results")] == [f"{b}.png"]
        assert c.get("/v1/info").json()["queue"]["result_bytes"] == (tmp_path / "results" / f"{b}.png").stat().st_size


def test_results_expire_after_ttl(upscaler, tmp_path):
    import time

    with client_for(upscaler, tmp_path, result_ttl_s=0.5) as c:
        r = post_job(c, {"method": "nearest"}, path="/v1/upscale")
        job_id = r.headers["x-sdx4-job-id"]
        assert (tmp_path / "results" / f"{job_id}.png").exists()
        time.sleep(0.7)
        assert c.get(f"/v1/jobs/{job_id}").status_code == 404
        assert results_in(tmp_path / "results") == []


# ---- pure helpers -----------------------------------------------------------------------------------


def test_parse_options_pure():
    o = parse_options({"steps": " 3 ", "guidance": "1", "seed": "", "method": "sd", "prompt": " keep spaces "})
    assert (o.steps, o.guidance, o.seed, o.prompt) == (3, 1.0, None, " keep spaces ")
    with pytest.raises(ApiError) as e:
        parse_options({"eta": "x"})
    assert (e.value.status, e.value.field, e.value.detail) == (422, "eta", "eta must be a number; got 'x'")


def test_safe_name_strips_paths():
    assert safe_name("../../etc/passwd") == "passwd"
    assert safe_name("C:\\Users\\me\\photo 1.jpg") == "photo 1.jpg"
    assert safe_name("<script>.png") == "_script_.png"
    assert safe_name(None) == "image" and safe_name("...") == "image"
