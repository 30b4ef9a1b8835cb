"""Time and memory estimates before a run (Upscaler.estimate, its calibration cache), presets, the CLI's
--estimate-only and progress ETA, and POST /v1/estimate — on the tiny random model."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

import sdx4
from sdx4.engine import estimate as est_mod
from sdx4.options import PRESETS, OptionsError, UpscaleOptions

# ---- the estimate -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def up(tiny_upscaler):
    tiny_upscaler.calibrate()  # measured once here (or read from this test run's cache folder)
    return tiny_upscaler


def test_estimate_has_every_field_and_a_summary(up):
    e = up.estimate((32, 24), steps=3)
    assert isinstance(e, sdx4.Estimate)
    assert e.seconds > 0 and e.seconds == pytest.approx(sum(e.parts.values()))
    assert e.steps == 3 and e.tiles == 1 and e.passes == 1
    assert e.output_size == (128, 96)
    assert e.peak_bytes > 0 and isinstance(e.peak_bytes, int)
    assert ": 3 ddim steps over 1 tile" in e.summary and e.summary.startswith(
        ("about ", "under ")
    )
    assert e.as_dict() == {
        "seconds": round(e.seconds, 3),
        "peak_bytes": e.peak_bytes,
        "output_size": [128, 96],
        "summary": e.summary,
    }


def test_faster_hint_only_when_a_preset_has_fewer_steps(up):
    assert up.estimate((16, 16), steps=75).summary.endswith("; faster: --preset fast")
    assert "faster" not in up.estimate((16, 16), steps=20).summary
    assert "faster" not in up.estimate((16, 16), steps=3).summary


def test_estimate_grows_with_steps_size_tiles_guidance_and_images(up):
    s = lambda size=(32, 32), **kw: up.estimate(size, steps=4, **kw).seconds
    assert (
        up.estimate((32, 32), steps=2).seconds
        < up.estimate((32, 32), steps=4).seconds
        < up.estimate((32, 32), steps=8).seconds
    )
    assert s((16, 16)) < s((32, 32)) < s((64, 64))
    whole, tiled = (
        up.estimate((64, 64), steps=4),
        up.estimate((64, 64), steps=4, tile_size=24, tile_overlap=8),
    )
    assert whole.tiles == 1 and tiled.tiles > 1 and tiled.seconds > whole.seconds
    assert s(guidance=1.0) < s(guidance=9.0)
    assert s(num_images=2) > s(num_images=1)
    two_pass = up.estimate((16, 16), steps=4, scale=8)
    assert (
        two_pass.passes == 2
        and two_pass.output_size == (128, 128)
        and two_pass.seconds > s((16, 16))
    )


def test_estimate_of_an_image_equals_that_of_its_size(up, rng_image):
    img = Image.fromarray(rng_image(24, 40))
    assert up.estimate(img, steps=3).output_size == (160, 96)
    assert up.estimate(img, steps=3).seconds == pytest.approx(
        up.estimate((40, 24), steps=3).seconds
    )


def test_bad_size_and_options_are_named(up):
    with pytest.raises(
        OptionsError, match=r"size must be \(width, height\).*\(0, 5\)"
    ) as e:
        up.estimate((0, 5))
    assert e.value.option == "size"
    with pytest.raises(OptionsError, match="steps must be in 1..500; got 0"):
        up.estimate((8, 8), steps=0)


def test_classical_estimate_is_cheap_and_needs_no_model():
    e = sdx4.estimate_classical((100, 50), method="lanczos", scale=3)
    assert e.output_size == (300, 150) and e.steps == 0 and e.passes == 0
    assert 0 < e.seconds < 5 and e.peak_bytes == 4 * (100 * 50 + 300 * 150)
    assert "lanczos filter, no model" in e.summary
    with pytest.raises(OptionsError, match="needs the model"):
        sdx4.estimate_classical((10, 10))


def test_text_encoding_counted_only_for_prompts_not_cached(up):
    cached = up.estimate(
        (16, 16), steps=2
    )  # the default prompts were encoded by earlier calls/tests
    up.encode_prompts([""])
    assert up.estimate((16, 16), steps=2).parts["text_encoding"] == 0.0
    new = up.estimate((16, 16), steps=2, prompt="a prompt never encoded before 12345")
    assert (
        new.parts["text_encoding"] > 0
        and new.seconds > cached.seconds - cached.parts["text_encoding"]
    )


def test_calibration_is_cached_on_disk_and_reused_without_timing(
    tiny_upscaler, tmp_path, monkeypatch
):
    monkeypatch.setenv("SDX4_CACHE", str(tmp_path))
    calls = []
    fake = est_mod.Calibration(
        0.01, 1e-5, 0.001, 2e-5, 1e-9, None, 0.5
    )  # the measuring itself: the fixture's
    monkeypatch.setattr(
        est_mod, "measure_calibration", lambda c: calls.append(1) or fake
    )
    first = sdx4.Upscaler(tiny_upscaler.components, low_memory=False)
    e1 = first.estimate((16, 16), steps=2)
    assert calls == [1]
    kept = json.loads((tmp_path / est_mod.CALIBRATION_FILE).read_text())
    (key,) = kept
    assert (
        key == est_mod.calibration_key(tiny_upscaler.components)
        and "| cpu | unet fp32 | vae fp32 | torch " in key
    )
    first.estimate((32, 16), steps=2)
    second = sdx4.Upscaler(
        tiny_upscaler.components, low_memory=False
    )  # a new process would read the file
    e2 = second.estimate((16, 16), steps=2)
    assert calls == [1]  # no timing the second time
    assert e2.seconds == pytest.approx(e1.seconds)
    assert not list(
        tmp_path.glob(".*.tmp")
    )  # the write was atomic: no temporary file left


def test_malformed_calibration_is_measured_again(tiny_upscaler, tmp_path, monkeypatch):
    monkeypatch.setenv("SDX4_CACHE", str(tmp_path))
    key = est_mod.calibration_key(tiny_upscaler.components)
    (tmp_path / est_mod.CALIBRATION_FILE).write_text(
        json.dumps({key: {"unet_px_s": "fast"}, "other": {"x": 1}})
    )
    fake = est_mod.Calibration(0.01, 1e-5, 0.001, 2e-5, 1e-9, None, 0.5)
    monkeypatch.setattr(est_mod, "measure_calibration", lambda c: fake)
    cal, cached = est_mod.cached_calibration(tiny_upscaler.components)
    assert not cached and cal == fake
    kept = json.loads((tmp_path / est_mod.CALIBRATION_FILE).read_text())
    assert kept[key]["unet_px_s"] == cal.unet_px_s and kept["other"] == {
        "x": 1
    }  # other machines' entries kept
    (tmp_path / est_mod.CALIBRATION_FILE).write_text("{not json")
    assert est_mod.cached_calibration(tiny_upscaler.components)[1] is False


def test_calibration_key_changes_with_the_model_config(tiny_upscaler):
    c = tiny_upscaler.components
    key = est_mod.calibration_key(c)
    old = c.vae.config.scaling_factor
    try:
        c.vae.register_to_config(scaling_factor=0.5)
        assert est_mod.calibration_key(c) != key
    finally:
        c.vae.register_to_config(scaling_factor=old)
    assert est_mod.calibration_key(c) == key


def test_calibration_from_dict_refuses_bad_values():
    good = est_mod.Calibration(0.1, 1e-5, 0.0, 2e-5, 1e-9, None, 1.0)
    assert est_mod.Calibration.from_dict(good.as_dict()) == good
    for bad in (
        {**good.as_dict(), "unet_px_s": 0},
        {**good.as_dict(), "vae_px_s": float("nan")},
        [1, 2],
    ):
        with pytest.raises(ValueError):
            est_mod.Calibration.from_dict(bad)


def test_format_seconds_and_eta():
    from sdx4.cli.upscale import eta_seconds

    assert est_mod.format_seconds(0.05) == "under 0.1 s"
    assert est_mod.format_seconds(12.4) == "12 s"
    assert est_mod.format_seconds(250) == "4 min 10 s"
    assert est_mod.format_seconds(4000) == "1 h 6 min"
    # no steps measured yet: the estimate; 10 measured steps of 1 s against an estimate of 2 s: mostly measured
    assert eta_seconds(0, 10, 0.0, 2.0, 5.0) == pytest.approx(25.0)
    assert eta_seconds(10, 20, 10.0, 2.0, 0.0) == pytest.approx(10 * (10 + 4) / 12)
    assert eta_seconds(20, 20, 30.0, 2.0, 3.0) == pytest.approx(3.0)


# ---- presets -------------------------------------------------------------------------------------------


def test_presets_are_tested_scheduler_step_combinations():
    assert PRESETS["reference"] == {"scheduler": "ddim", "steps": 75}
    assert (
        UpscaleOptions().steps == 75 and UpscaleOptions().scheduler == "ddim"
    )  # reference stays the default
    for name, values in PRESETS.items():
        o = UpscaleOptions.from_preset(name)
        assert (
            o.preset == name
            and o.scheduler == values["scheduler"]
            and o.steps == values["steps"]
        )


def test_preset_sets_only_what_was_not_given():
    o = UpscaleOptions.from_preset(
        "fast", steps=75
    )  # explicit wins, also when it equals the default
    assert (o.scheduler, o.steps, o.preset) == ("dpmpp-2m", 75, "fast")
    o = sdx4.preset_options("balanced", UpscaleOptions(guidance=3.0), scheduler="unipc")
    assert (o.scheduler, o.steps, o.guidance, o.preset) == (
        "unipc",
        30,
        3.0,
        "balanced",
    )
    with pytest.raises(
        OptionsError,
        match="preset must be one of fast, balanced, reference; got 'turbo'",
    ) as e:
        UpscaleOptions.from_preset("turbo")
    assert e.value.option == "preset"
    with pytest.raises(OptionsError, match="preset must be one of"):
        UpscaleOptions(preset="turbo")


def test_preset_in_a_call_is_used_and_recorded(up, rng_image):
    img = rng_image(16, 16)
    r = up(img, preset="fast", steps=2, seed=3)
    assert (r.metadata["steps"], r.metadata["scheduler"], r.metadata["preset"]) == (
        2,
        "dpmpp-2m",
        "fast",
    )
    assert up(img, steps=2, seed=3).metadata["preset"] is None
    assert up.estimate((16, 16), preset="fast").steps == 20


def _cli_options(*argv):
    from sdx4.cli import build_parser
    from sdx4.cli.args import options_from_args

    return options_from_args(build_parser().parse_args(["upscale", "x.png", *argv]))


def test_cli_preset_explicit_flags_win():
    o = _cli_options("--preset", "fast")
    assert (o.scheduler, o.steps, o.preset) == ("dpmpp-2m", 20, "fast")
    o = _cli_options("--preset", "fast", "--steps", "75")
    assert (o.scheduler, o.steps) == ("dpmpp-2m", 75)
    o = _cli_options("--scheduler", "ddim", "--preset", "balanced")
    assert (o.scheduler, o.steps, o.preset) == ("ddim", 30, "balanced")
    o = _cli_options("--steps", "9")
    assert (o.scheduler, o.steps, o.preset) == ("ddim", 9, None)


# ---- the command line ----------------------------------------------------------------------------------


def test_cli_estimate_only_prints_and_writes_nothing(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    from sdx4.cli import main

    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (20, 12), (1, 2, 3)).save("a.png")
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(
        [
            "upscale",
            "a.png",
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--dtype",
            "fp32",
            "--steps",
            "3",
            "-o",
            "new_folder/",
            "--estimate-only",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert (
        out.startswith("a.png (20x12 -> 80x48): ")
        and ": 3 ddim steps over 1 tile" in out
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no folder
    code = main(["upscale", "a.png", "--method", "bicubic", "--dry-run"])
    assert code == 0 and "a.png (20x12 -> 80x48): " in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_cli_prints_the_estimate_before_the_run(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    from sdx4.cli import main

    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (16, 16), (1, 2, 3)).save("a.png")
    code = main(
        [
            "upscale",
            "a.png",
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--dtype",
            "fp32",
            "--preset",
            "fast",
            "--steps",
            "2",
            "--seed",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0 and Path("a_x4.png").exists()
    line = next(x for x in err.splitlines() if x.startswith("a.png: "))
    assert ": 2 dpmpp-2m steps over 1 tile" in line
    assert err.index("a.png: ") < err.index("a.png -> a_x4.png")


def test_cli_estimate_only_refuses_a_folder(tmp_path, capsys):
    from sdx4.cli import main

    (tmp_path / "in").mkdir()
    assert main(["upscale", str(tmp_path / "in"), "--estimate-only"]) == 2
    assert "--estimate-only takes image files, not a folder" in capsys.readouterr().err


# ---- the service ---------------------------------------------------------------------------------------


@contextmanager
def client_for(model, tmp_path, **kw):
    from sdx4.service.app import create_app
    from sdx4.service.jobs import QueueSettings
    from sdx4.service.requests import ServerSettings

    app = create_app(
        model,
        ServerSettings(
            queue=QueueSettings(results_dir=str(tmp_path / "results")), **kw
        ),
    )
    with TestClient(app, base_url="http://localhost") as client:
        yield client


def test_v1_estimate_contract(up, tmp_path):
    with client_for(up, tmp_path) as client:
        r = client.post(
            "/v1/estimate", data={"input_width": "32", "input_height": "24", "steps": "3"}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"seconds", "peak_bytes", "output_size", "summary"}
        assert isinstance(body["seconds"], float) and body["seconds"] > 0
        assert isinstance(body["peak_bytes"], int) and body["peak_bytes"] > 0
        assert (
            body["output_size"] == [128, 96]
            and ": 3 ddim steps over 1 tile" in body["summary"]
        )
        expected = up.estimate((32, 24), steps=3)
        assert body["peak_bytes"] == pytest.approx(
            expected.peak_bytes, rel=0.2
        )  # free memory moves a little
        r = client.post(
            "/v1/estimate",
            data={"input_width": "32", "input_height": "24", "preset": "fast", "scale": "2"},
        )
        assert (
            r.status_code == 200
            and r.json()["output_size"] == [64, 48]
            and "20 dpmpp-2m steps" in r.json()["summary"]
        )
        r = client.post(
            "/v1/estimate",
            files={
                "input_width": (None, "10"),
                "input_height": (None, "10"),
                "method": (None, "lanczos"),
            },
        )
        assert (
            r.status_code == 200
            and r.json()["output_size"] == [40, 40]
            and "lanczos filter" in r.json()["summary"]
        )
        r = client.post(
            "/v1/estimate", data={"input_width": "32", "input_height": "24", "preset": ""}
        )
        assert r.status_code == 200 and "75 ddim steps" in r.json()["summary"]


@pytest.mark.parametrize(
    "data, field, message",
    [
        ({"input_height": "8"}, "input_width", "input_width: missing; send the input's size in pixels as input_width"),
        ({"input_width": "8", "input_height": "x"}, "input_height", "input_height must be an integer; got 'x'"),
        ({"input_width": "0", "input_height": "8"}, "input_width", "input_width must be in 1..4096; got 0"),
        ({"width": "32", "height": "24"}, "input_width", "input_width: missing"),
        (
            {"input_width": "8", "input_height": "8", "width": "4"},
            "width",
            "width 4 is smaller than the input's width 8",
        ),
        (
            {"input_width": "8", "input_height": "8", "width": "16", "scale": "2"},
            "scale",
            "give either scale",
        ),
        (
            {"input_width": "8", "input_height": "8", "steps": "0"},
            "steps",
            "steps must be in 1..500; got 0",
        ),
        (
            {"input_width": "8", "input_height": "8", "preset": "turbo"},
            "preset",
            "preset must be one of fast, balanced, reference",
        ),
        (
            {"input_width": "8", "input_height": "8", "colour": "red"},
            "colour",
            "unknown field 'colour'",
        ),
        (
            {"input_width": "8", "input_height": "8", "max_memory": "5"},
            "max_memory",
            "max_memory must be in 1 GiB..1 PiB",
        ),
    ],
)
def test_v1_estimate_bad_fields_are_422_naming_the_field(
    up, tmp_path, data, field, message
):
    with client_for(up, tmp_path) as client:
        r = client.post("/v1/estimate", data=data)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and message in r.json()["detail"]


def test_v1_estimate_needs_the_api_key_and_jobs_carry_their_estimate(up, tmp_path):
    import io

    with client_for(up, tmp_path, api_key="k" * 20) as client:
        assert (
            client.post("/v1/estimate", data={"input_width": "8", "input_height": "8"}).status_code
            == 401
        )
        ok = client.post(
            "/v1/estimate",
            data={"input_width": "8", "input_height": "8"},
            headers={"X-API-Key": "k" * 20},
        )
        assert ok.status_code == 200
        buf = io.BytesIO()
        Image.new("RGB", (16, 8)).save(buf, "PNG")
        r = client.post(
            "/v1/jobs",
            files={"image": ("a.png", buf.getvalue(), "image/png")},
            data={"steps": "2", "seed": "1"},
            headers={"X-API-Key": "k" * 20},
        )
        assert r.status_code == 202
        snap = client.get(
            f"/v1/jobs/{r.json()['id']}", headers={"X-API-Key": "k" * 20}
        ).json()
        assert snap["estimate_seconds"] == pytest.approx(
            round(up.estimate((16, 8), steps=2, seed=1).seconds, 3), rel=0.05
        )


def test_once_per_run_and_once_per_process_costs(tiny_upscaler):
    from sdx4.engine.estimate import TextCost, estimate_sd

    cal = est_mod.Calibration(
        0.01,
        1e-5,
        0.001,
        2e-5,
        1e-9,
        None,
        0.5,
        new_shape_s=0.3,
        release_s=0.2,
        first_call_s=4.0,
    )
    none = TextCost(0, 0.0, 0.0)
    opts = UpscaleOptions(steps=3)
    warm = estimate_sd(tiny_upscaler.components, opts, (16, 16), cal, none, warm=True)
    cold = estimate_sd(tiny_upscaler.components, opts, (16, 16), cal, none, warm=False)
    assert warm.parts["overhead"] == pytest.approx(
        0.5
    )  # one pass: a new shape + memory handed back
    assert cold.seconds - warm.seconds == pytest.approx(
        4.0
    )  # the first UNet call packs the weights
    two = estimate_sd(
        tiny_upscaler.components, opts.replace(scale=8), (16, 16), cal, none, warm=True
    )
    assert two.parts["overhead"] == pytest.approx(1.0)  # two x4 passes
    step = 3 * (
        0.01 + 1e-5 * 16 * 16 * 2
    )  # 3 steps, one call of a guidance pair on a 16x16 latent
    assert warm.parts["denoising"] == pytest.approx(
        step
    ) and warm.step_seconds == pytest.approx(step / 3)
    assert warm.parts["decoding"] == pytest.approx(
        0.001 + 2e-5 * 256 + 1e-9 * 256 * 256
    )


def test_an_upscaler_is_warm_after_a_run(tiny_upscaler, rng_image):
    up = sdx4.Upscaler(tiny_upscaler.components, low_memory=False)
    up._calibration = est_mod.Calibration(
        0.01, 1e-5, 0.001, 2e-5, 1e-9, None, 0.5, first_call_s=4.0
    )
    before = up.estimate((16, 16), steps=2)
    up(rng_image(16, 16), steps=2, seed=0)
    after = up.estimate((16, 16), steps=2)
    assert before.seconds - after.seconds == pytest.approx(4.0)


def test_estimate_follows_float_scales_and_width_height(up):
    """The estimate's output size, passes and repeats are those of the run (options.output_size, pass_plan)."""
    one = up.estimate((16, 10), steps=2, scale=1.5)
    assert one.output_size == (24, 15) and one.passes == 1
    two = up.estimate((16, 10), steps=2, scale=4.5)
    assert two.output_size == (72, 45) and two.passes == 2
    assert up.estimate((16, 10), steps=2, width=40).output_size == (40, 25)
    assert up.estimate((16, 10), steps=2, height=30).output_size == (48, 30)
    assert up.estimate((16, 10), steps=2, width=100, height=20).passes == 2
    # num_images=2 at a non-4 size: each image through its own passes (as the Upscaler runs it)
    pair, single = (up.estimate((16, 10), steps=2, width=40, num_images=n) for n in (2, 1))
    assert pair.parts["denoising"] == pytest.approx(2 * single.parts["denoising"])
    with pytest.raises(OptionsError, match="width 8 is smaller than the input's width 16") as e:
        up.estimate((16, 10), steps=2, width=8)
    assert e.value.option == "width"
    e = sdx4.estimate_classical((100, 50), method="lanczos", scale=2.5)
    assert e.output_size == (250, 125) and e.peak_bytes == 4 * (100 * 50 + 250 * 125)
    assert sdx4.estimate_classical((100, 50), method="bicubic", height=75).output_size == (150, 75)


def test_v1_estimate_width_height_are_the_output_target(up, tmp_path):
    """input_width/input_height: the input; width/height: the output target, as in /v1/upscale."""
    with client_for(up, tmp_path) as client:
        r = client.post("/v1/estimate", data={"input_width": "16", "input_height": "10", "width": "40", "steps": "2"})
        assert r.status_code == 200, r.text
        assert r.json()["output_size"] == [40, 25]
        assert r.json()["seconds"] == pytest.approx(up.estimate((16, 10), steps=2, width=40).seconds, rel=0.5)
        r = client.post("/v1/estimate", data={"input_width": "16", "input_height": "10", "height": "160",
                                              "width": "100", "method": "bicubic"})
        assert r.status_code == 200 and r.json()["output_size"] == [100, 160], r.text
        r = client.post("/v1/estimate", data={"input_width": "16", "input_height": "10", "scale": "1.5",
                                              "method": "bicubic"})
        assert r.status_code == 200 and r.json()["output_size"] == [24, 15], r.text
