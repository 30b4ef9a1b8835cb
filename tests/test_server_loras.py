"""LoRAs chosen per job in the service: `sdx4 serve --lora` offers them, a job's `lora` field picks all of them
(the default), some, or none; the worker switches the model between jobs (`Upscaler.set_loras`), and each
result's metadata records what was merged. Pixels are compared with `sdx4.load(model, loras=...)` run
directly with the same seed and options: exactly (same process, same CPU kernels, fp32; a PNG keeps them)."""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
import threading
import time
from contextlib import contextmanager
from typing import ClassVar

import numpy as np
import pytest
from fastapi.testclient import TestClient
from lora_helpers import make_lora
from PIL import Image
from server_helpers import png_metadata, wait_until

import sdx4
from sdx4.imageio import LoadedImage
from sdx4.options import LoraSpec, OptionsError, UpscaleOptions
from sdx4.service.app import create_app
from sdx4.service.jobs import JobManager, QueueSettings
from sdx4.service.requests import ApiError, LoraChoices, ServerSettings
from sdx4.service.store import DB_NAME, STORE_DIR, JobStore

RUN = {"prompt": "a photo of a cat", "steps": 2, "seed": 7}
FORM = {k: str(v) for k, v in RUN.items()}
FILM, SHARP = "film.safetensors", "sharp.safetensors"


@pytest.fixture(scope="module")
def lora_files(tiny_model_dir, tmp_path_factory):
    """Two LoRAs on the tiny UNet, served as film (scale 1) and sharp (scale 0.5)."""
    d = tmp_path_factory.mktemp("served-loras")
    return {
        FILM: make_lora(tiny_model_dir, d / FILM, r=4, alpha=8, seed=1),
        SHARP: make_lora(tiny_model_dir, d / SHARP, r=2, alpha=2, seed=5),
    }


def specs(lora_files, *names):
    scale = {FILM: 1.0, SHARP: 0.5}
    return [LoraSpec(str(lora_files[n]), scale[n]) for n in names]


def load(model_dir, loras=()):
    return sdx4.load(str(model_dir), device="cpu", dtype="fp32", low_memory=False, loras=list(loras))


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(np.random.RandomState(0).randint(0, 256, (16, 24, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def upload(image):
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def reference(tiny_model_dir, lora_files, image):
    """name tuple -> the pixels `sdx4.load(model, loras=those)` gives for RUN, made once each."""
    made: dict[tuple[str, ...], np.ndarray] = {}

    def pixels(*names: str) -> np.ndarray:
        if names not in made:
            made[names] = np.asarray(load(tiny_model_dir, specs(lora_files, *names))(image, **RUN).image)
        return made[names]

    return pixels


@contextmanager
def serving(upscaler, tmp_path=None):
    settings = ServerSettings(queue=QueueSettings(results_dir=None if tmp_path is None else str(tmp_path / "results")))
    app = create_app(upscaler, settings)
    with TestClient(app, base_url="http://localhost") as client:
        client.manager = app.state.manager
        yield client


@pytest.fixture(scope="module")
def client(tiny_model_dir, lora_files):
    """`sdx4 serve --lora film.safetensors --lora sharp.safetensors:0.5` on the tiny model."""
    with serving(load(tiny_model_dir, specs(lora_files, FILM, SHARP))) as c:
        yield c


def post(client, upload, lora=None, path="/v1/upscale", **fields):
    data = {**FORM, **fields} | ({} if lora is None else {"lora": lora})
    return client.post(path, files={"image": ("cat.png", upload, "image/png")}, data=data)


def pixels_of(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB"))


def record(lora_files, name, scale):
    return {"name": name, "sha256": LoraSpec(str(lora_files[name])).sha256(), "scale": scale}


# ---- the field, parsed alone ---------------------------------------------------------------------------


def test_the_lora_field_picks_offered_loras_by_name_in_the_offered_order(lora_files):
    choices = LoraChoices(tuple(specs(lora_files, FILM, SHARP)))
    assert choices.default == f"{FILM},{SHARP}"
    assert choices.parse(None, "sd") == (FILM, SHARP)  # absent: the serve default, every offered LoRA
    assert choices.parse("  ", "sd") == (FILM, SHARP)  # empty: the same (as the page sends nothing)
    assert choices.parse("none", "sd") == ()
    assert choices.parse(SHARP, "sd") == (SHARP,)
    assert choices.parse(f" {SHARP} , {FILM}", "sd") == (FILM, SHARP)  # merged in the order serve was given them
    assert choices.parse(None, "bicubic") is None  # no model: nothing to switch
    assert choices.specs_of((SHARP,)) == (LoraSpec(str(lora_files[SHARP]), 0.5),)
    with pytest.raises(ValueError, match=f"LoRA gone.safetensors is not offered by this server \\(it offers: {FILM}, {SHARP}\\)"):
        choices.specs_of(("gone.safetensors",))
    assert LoraChoices().default == "none" and LoraChoices().parse("none", "sd") == ()


@pytest.mark.parametrize(
    "value, method, message",
    [
        ("grain.safetensors", "sd", (f"lora: 'grain.safetensors' is not a LoRA this server offers; allowed: none, or one or "
                                     f"more of {FILM}, {SHARP} separated by commas")),
        (f"{FILM},{FILM}", "sd", f"lora: {FILM} is named twice"),
        (f"none,{FILM}", "sd", "lora: none is the base model and takes no other LoRA"),
        (f"{FILM},", "sd", "lora: '' is not a LoRA this server offers"),
        (FILM, "bicubic", "lora is for method sd (the diffusion model); method bicubic merges no LoRA"),
        ("none", "realesrgan", "lora is for method sd (the diffusion model); method realesrgan merges no LoRA"),
    ],
)
def test_a_bad_lora_value_is_a_422_naming_the_field(lora_files, value, method, message):
    with pytest.raises(ApiError) as e:
        LoraChoices(tuple(specs(lora_files, FILM, SHARP))).parse(value, method)
    assert (e.value.status, e.value.field) == (422, "lora") and e.value.detail.startswith(message), e.value.detail


def test_a_server_that_offers_none_says_so_when_a_name_is_asked_for():
    with pytest.raises(ApiError, match=r"allowed: none \(this server offers no LoRAs; `sdx4 serve --lora FILE\[:SCALE\]`"):
        LoraChoices().parse(FILM, "sd")


def test_two_offered_loras_with_one_name_are_refused_at_start(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / FILM).write_bytes(b"not read")
    with pytest.raises(OptionsError, match=f"loras: 2 LoRAs are named {FILM} .*give each a different name"):
        LoraChoices((LoraSpec(str(tmp_path / "a" / FILM)), LoraSpec(str(tmp_path / "b" / FILM))))
    (tmp_path / "a,b.safetensors").write_bytes(b"not read")
    with pytest.raises(OptionsError, match="has a comma in its name"):
        LoraChoices((LoraSpec(str(tmp_path / "a,b.safetensors")),))


def test_serve_refuses_two_loras_with_one_name_before_loading(tmp_path, capsys):
    from sdx4.cli import main

    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / FILM).write_bytes(b"not read")
    argv = ["serve", "--model", str(tmp_path / "no-model-needed"), "--lora", str(tmp_path / "a" / FILM),
            "--lora", f"{tmp_path / 'b' / FILM}:0.5"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--lora: loras: 2 LoRAs are named {FILM}" in err and "loading" not in err


# ---- the real service, tiny model, two LoRAs -------------------------------------------------------------


def test_info_offers_the_loras_and_names_the_default_selection(client, lora_files):
    info = client.get("/v1/info").json()
    assert info["loras"] == [record(lora_files, FILM, 1.0), record(lora_files, SHARP, 0.5)]
    assert info["defaults"]["lora"] == f"{FILM},{SHARP}"
    form = client.get("/openapi.json").json()["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    assert "lora" in form["multipart/form-data"]["schema"]["properties"]


def test_each_job_gets_the_pixels_and_metadata_of_the_loras_it_names(client, upload, reference, lora_files):
    both = [record(lora_files, FILM, 1.0), record(lora_files, SHARP, 0.5)]
    # (field sent, the LoRAs that must be merged, the metadata's "loras" (None: no key), the job's "lora")
    runs = [
        (None, (FILM, SHARP), both, [FILM, SHARP]),  # absent: the serve default, as before this field
        (FILM, (FILM,), [record(lora_files, FILM, 1.0)], [FILM]),
        ("none", (), None, []),
        (FILM, (FILM,), [record(lora_files, FILM, 1.0)], [FILM]),  # A -> none -> A: A's pixels again
        (f"{SHARP},{FILM}", (FILM, SHARP), both, [FILM, SHARP]),
        (SHARP, (SHARP,), [record(lora_files, SHARP, 0.5)], [SHARP]),
    ]
    seen = {}
    for sent, merged, recorded, chosen in runs:
        r = post(client, upload, sent)
        assert r.status_code == 200, r.text
        got = pixels_of(r.content)
        assert np.array_equal(got, reference(*merged)), (sent, np.abs(got.astype(int) - reference(*merged)).max())
        meta = png_metadata(r.content)
        assert meta.get("loras") == recorded, sent
        job = client.get(f"/v1/jobs/{r.headers['x-sdx4-job-id']}").json()
        assert job["lora"] == chosen and job["metadata"].get("loras") == recorded
        seen[merged] = got
    # The four selections are four different models (so the equalities above say something).
    assert len({a.tobytes() for a in seen.values()}) == 4


def test_a_queued_job_reports_its_lora_choice(client, upload):
    r = post(client, upload, "none", path="/v1/jobs")
    assert r.status_code == 202 and r.json()["lora"] == []
    job = wait_until(lambda: (s := client.get(f"/v1/jobs/{r.json()['id']}").json())["state"] == "done" and s)
    assert "loras" not in job["metadata"]  # the base model claims no LoRA
    r = post(client, upload, None, path="/v1/jobs", method="lanczos")
    assert r.status_code == 202 and r.json()["lora"] is None  # a classical job merges nothing and switches nothing


@pytest.mark.parametrize(
    "fields, detail",
    [
        ({"lora": "grain.safetensors"}, (f"lora: 'grain.safetensors' is not a LoRA this server offers; allowed: none, or "
                                         f"one or more of {FILM}, {SHARP} separated by commas")),
        ({"lora": f"{SHARP},{SHARP}"}, f"lora: {SHARP} is named twice"),
        ({"lora": FILM, "method": "bicubic"}, "lora is for method sd (the diffusion model); method bicubic merges no LoRA"),
    ],
)
def test_a_bad_lora_field_is_refused_before_anything_is_queued(client, upload, fields, detail):
    before = client.get("/v1/info").json()["queue"]["jobs"]["submitted"]
    for path in ("/v1/jobs", "/v1/upscale"):
        r = post(client, upload, path=path, **fields)
        assert r.status_code == 422 and r.json()["field"] == "lora" and r.json()["detail"].startswith(detail), r.text
    est = client.post("/v1/estimate", data={"input_width": "24", "input_height": "16", **fields})
    assert est.status_code == 422 and est.json()["field"] == "lora" and est.json()["detail"].startswith(detail)
    assert client.get("/v1/info").json()["queue"]["jobs"]["submitted"] == before


def test_the_estimate_takes_the_lora_field(client):
    for lora in (FILM, "none", ""):
        r = client.post("/v1/estimate", data={"input_width": "24", "input_height": "16", "steps": "2", "lora": lora})
        assert r.status_code == 200 and r.json()["output_size"] == [96, 64], r.text


def test_a_failed_switch_fails_that_job_with_the_reason_and_the_server_goes_on(
    tiny_model_dir, lora_files, upload, reference, tmp_path, monkeypatch
):
    # Served: a copy of film (damaged after the start, as a file replaced on disk would be) and sharp.
    copy = tmp_path / "loras" / FILM
    copy.parent.mkdir()
    shutil.copy(lora_files[FILM], copy)
    up = load(tiny_model_dir, [LoraSpec(str(copy)), *specs(lora_files, SHARP)])
    with serving(up, tmp_path) as client:
        copy.write_bytes(b"nope")
        r = post(client, upload, FILM)
        assert r.status_code == 500
        assert r.json()["detail"].startswith(f"could not merge this job's LoRAs ({FILM}): LoraError: "), r.json()
        assert FILM in r.json()["detail"] and "not a safetensors file" in r.json()["detail"]
        r = post(client, upload, SHARP)  # the model was left as it was; this job switches from it
        assert r.status_code == 200 and np.array_equal(pixels_of(r.content), reference(SHARP))

        # The UNet fails to load while switching: that job fails; the next one loads it again.
        load_unet, failed = up.components.load_unet, []

        def fail_once():
            if not failed:
                failed.append(1)
                raise RuntimeError("out of memory (a test)")
            return load_unet()

        monkeypatch.setattr(up.components, "load_unet", fail_once)
        r = post(client, upload, "none")
        assert r.status_code == 500
        assert r.json()["detail"] == ("could not merge this job's LoRAs (none (the base model)): "
                                      "RuntimeError: out of memory (a test)")
        for lora, merged in (("none", ()), (SHARP, (SHARP,))):
            r = post(client, upload, lora)
            assert r.status_code == 200 and np.array_equal(pixels_of(r.content), reference(*merged)), lora
        assert client.get("/health").json()["status"] == "ok"


# ---- the worker: when it switches ------------------------------------------------------------------------


class Recording:
    """A stand-in upscaler that records each switch: on which thread, and whether a job was running then."""

    info: ClassVar[dict] = {"model": "none", "max_noise_level": 350}

    def __init__(self) -> None:
        self.switches: list[tuple[tuple[str, ...], str, bool]] = []
        self.running = False
        self.merged: tuple[str, ...] = ()

    def switch(self, names: tuple[str, ...]) -> None:
        self.switches.append((names, threading.current_thread().name, self.running))
        self.merged = names

    def __call__(self, image, options, progress=None):
        self.running = True
        time.sleep(0.05)  # long enough for a switch at the wrong time to be seen
        result = sdx4.upscale(image, options.replace(method="nearest"))
        self.running = False
        return type(result)(result.images, {**result.metadata, "merged": list(self.merged)})


def small() -> LoadedImage:
    return LoadedImage(Image.new("RGB", (4, 4), (1, 2, 3)), None)


def test_the_worker_switches_between_jobs_on_its_own_thread(tmp_path):
    fake = Recording()
    manager = JobManager(fake, QueueSettings(results_dir=str(tmp_path)), switch_loras=fake.switch)
    wanted = [("a",), (), ("a", "b"), None]  # None: a classical job, nothing to switch
    jobs = [manager.submit(small(), UpscaleOptions(method="sd" if w is not None else "nearest"), loras=w) for w in wanted]
    manager.start()
    try:
        snaps = [wait_until(lambda j=j: (s := manager.snapshot(j.id))["state"] == "done" and s) for j in jobs]
    finally:
        manager.close()
    assert fake.switches == [(("a",), "sdx4-worker", False), ((), "sdx4-worker", False), (("a", "b"), "sdx4-worker", False)]
    assert [s["metadata"]["merged"] for s in snaps] == [["a"], [], ["a", "b"], ["a", "b"]]
    assert [s["lora"] for s in snaps] == [["a"], [], ["a", "b"], None]


def test_a_jobs_lora_choice_survives_a_restart(tmp_path):
    folder = str(tmp_path / "results")
    a = JobManager(Recording(), QueueSettings(results_dir=folder))
    none, film = a.submit(small(), UpscaleOptions(), loras=()), a.submit(small(), UpscaleOptions(), loras=(FILM,))
    a.close()  # never started: both were queued, the shutdown cancelled them; the next start runs them
    fake = Recording()
    b = JobManager(fake, QueueSettings(results_dir=folder), switch_loras=fake.switch)
    assert (b.get(none.id).loras, b.get(film.id).loras) == ((), (FILM,))
    b.start()
    try:
        wait_until(lambda: b.snapshot(film.id)["state"] == "done")
    finally:
        b.close()
    assert [names for names, _, _ in fake.switches] == [(), (FILM,)]


def test_a_job_store_an_older_sdx4_wrote_gains_the_column(tmp_path):
    d = tmp_path / STORE_DIR
    d.mkdir()
    with sqlite3.connect(d / DB_NAME) as db:  # the schema before this field: no loras column
        db.execute("CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, state TEXT NOT NULL, "
                   "options TEXT NOT NULL, input_name TEXT NOT NULL, input_w INTEGER NOT NULL, input_h INTEGER NOT NULL, "
                   "files TEXT NOT NULL, nbytes INTEGER NOT NULL, metadata TEXT, error TEXT, error_kind TEXT, "
                   "created REAL NOT NULL, started REAL, finished REAL, attempts INTEGER NOT NULL)")
        db.execute("INSERT INTO jobs (id, state, options, input_name, input_w, input_h, files, nbytes, created, attempts) "
                   "VALUES ('old', 'failed', ?, 'a.png', 4, 4, '[]', 0, 1.0, 1)", (json.dumps(UpscaleOptions().to_dict()),))
    store = JobStore(tmp_path)
    try:
        (row,) = store.load()
        assert row.id == "old" and row.loras is None  # the model as it was: an old job names no choice
    finally:
        store.close()
