"""Any scale (1 < scale <= 16, floats too) and --width/--height, for every method: exact sizes, errors
naming the option, output names, metadata, the cost of the passes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

import sdx4
from sdx4.cli import main
from sdx4.engine.budget import job_cost
from sdx4.imageio import output_name
from sdx4.options import OptionsError, UpscaleOptions, size_tag
from sdx4.service.requests import (
    ApiError,
    ServerSettings,
    check_header,
    download_name,
    parse_options,
)

SIZE = (10, 6)  # w, h of the test input
#: scale -> exact output size of a 10x6 input (sides rounded half up: 3.5 x 6 = 21, 1.5 x 6 = 9)
SCALES = {1.5: (15, 9), 2: (20, 12), 3.5: (35, 21), 4: (40, 24), 8: (80, 48)}
#: width/height -> exact output size of a 10x6 input
TARGETS = {(25, None): (25, 15), (None, 20): (33, 20), (30, 30): (30, 30)}


def image() -> Image.Image:
    return Image.fromarray(
        np.random.RandomState(0).randint(0, 256, (SIZE[1], SIZE[0], 3), np.uint8)
    )


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv(
        "SDX4_GAN_THREADS", "1"
    )  # ncnn on a shared CPU (see test_gan.py)


@pytest.mark.parametrize("scale", list(SCALES))
@pytest.mark.parametrize("method", ["bicubic", "lanczos", "realesrgan"])
def test_exact_size_for_any_scale_without_the_diffusion_model(method, scale):
    result = sdx4.upscale(image(), method=method, scale=scale)
    assert result.image.size == SCALES[scale]
    assert result.metadata["output_size"] == list(SCALES[scale])
    assert result.metadata["scale"] == scale and "target" not in result.metadata


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("method", ["bicubic", "realesrgan"])
def test_exact_size_for_width_height_without_the_diffusion_model(method, target):
    width, height = target
    result = sdx4.upscale(image(), method=method, width=width, height=height)
    assert result.image.size == TARGETS[target]
    assert result.metadata["target"] == {"width": width, "height": height}
    assert result.metadata["scale"] == round(TARGETS[target][0] / SIZE[0], 4)


@pytest.mark.parametrize(
    "kw, size, passes",
    [({"scale": 1.5}, (15, 9), 1), ({"width": 25}, (25, 15), 1), ({"width": 30, "height": 30}, (30, 30), 2)],
    # integer scales 2, 3, 4, 8 with sd: tests/test_scale.py and test_pipeline.py (kept short: the UNet is slow here)
)  # fmt: skip
def test_exact_size_with_the_diffusion_model(tiny_upscaler, kw, size, passes):
    result = tiny_upscaler(image(), steps=2, seed=1, guidance=1.0, **kw)
    assert result.image.size == size
    assert result.metadata["output_size"] == list(size)
    assert result.metadata["passes"] == passes
    cost = tiny_upscaler.cost(UpscaleOptions(steps=2, guidance=1.0, **kw), SIZE)
    assert cost.passes == passes


def test_job_cost_counts_the_passes_of_float_scales_and_targets():
    one = job_cost(64, 64, UpscaleOptions(steps=10, guidance=1.0, scale=3.5))
    assert (one.passes, one.latent_pixels) == (1, 64 * 64)
    two = job_cost(64, 64, UpscaleOptions(steps=10, guidance=1.0, scale=4.5))
    assert (
        two.passes == 2 and two.latent_pixels == 64 * 64 + 72 * 72
    )  # second pass over ceil(288 / 4) = 72
    assert (
        job_cost(64, 64, UpscaleOptions(steps=10, guidance=1.0, width=512)).passes == 2
    )
    assert (
        job_cost(64, 64, UpscaleOptions(method="realesrgan", scale=3.5)).megapixel_steps
        == 0
    )


@pytest.mark.parametrize(
    "kw, option, message",
    [
        ({"scale": 0}, "scale", "scale must be in (1, 16]"),
        ({"scale": 1}, "scale", "got 1"),
        ({"scale": -2}, "scale", "got -2"),
        ({"scale": 17}, "scale", "got 17"),
        ({"scale": "abc"}, "scale", "scale must be a number"),
        (
            {"scale": 2, "width": 100},
            "scale",
            "give either scale (2) or width/height, not both",
        ),
        ({"width": 0}, "width", "width must be in 1..65536; got 0"),
        ({"height": -5}, "height", "height must be in 1..65536; got -5"),
        ({"width": 2.5}, "width", "width must be an integer"),
    ],
)
def test_bad_values_name_the_option(kw, option, message):
    with pytest.raises(OptionsError) as err:
        UpscaleOptions(**kw)
    assert err.value.option == option
    assert message in str(err.value)


@pytest.mark.parametrize(
    "kw, option, message",
    [
        (
            {"width": 8},
            "width",
            "width 8 is smaller than the input's width 10: sdx4 only enlarges",
        ),
        ({"width": 200}, "width", "width 200 is over 16 x the input's width 10"),
        (
            {"width": 20, "height": 4},
            "height",
            "height 4 is smaller than the input's height 6",
        ),
        ({"height": 100}, "height", "height 100 is over 16 x the input's height 6"),
    ],
)
def test_targets_out_of_range_for_the_input_are_refused_before_any_work(
    kw, option, message
):
    with pytest.raises(OptionsError) as err:
        sdx4.upscale(image(), method="bicubic", **kw)
    assert err.value.option == option and message in str(err.value)


def test_integral_float_scales_are_integer_scales():
    opts = UpscaleOptions(scale=4.0)
    assert opts.scale == 4 and isinstance(opts.scale, int) and opts.size_tag == "x4"
    assert UpscaleOptions(scale=2.0) == UpscaleOptions(scale=2)


def test_output_and_download_names():
    assert output_name("a", 4) == "a_x4.png"  # as ever
    assert output_name("a", 1.5, "bicubic") == "a_x1.5_bicubic.png"
    assert output_name("a", 4.0) == "a_x4.png"
    assert output_name("a", "3840w", "realesrgan") == "a_3840w_realesrgan.png"
    assert [size_tag(4), size_tag(3.5), size_tag(4, 3840), size_tag(4, None, 2160), size_tag(4, 3840, 2160)] == [
        "x4", "x3.5", "3840w", "2160h", "3840x2160"
    ]  # fmt: skip
    assert download_name("my photo.jpg", 0, 1, 1.5) == "my_photo_x1.5.png"
    assert download_name("my photo.jpg", 1, 2, "100x50") == "my_photo_100x50_2.png"


def test_server_form_reads_float_scales_and_targets():
    assert parse_options({"scale": "1.5"}).scale == 1.5
    assert parse_options({"scale": "4.0"}).scale == 4
    opts = parse_options({"width": "300", "height": ""})
    assert (opts.width, opts.height) == (300, None)
    with pytest.raises(ApiError) as err:
        parse_options({"scale": "2", "width": "300"})
    assert err.value.status == 422 and err.value.field == "scale"
    with pytest.raises(
        ApiError, match=r"give either scale \(4\) or width/height, not both"
    ):
        parse_options({"scale": "4", "height": "300"})
    # the header check uses the exact output size, and refuses a target out of range for this image
    import io

    buf = io.BytesIO()
    Image.new("RGB", (100, 50)).save(buf, "PNG")
    with pytest.raises(ApiError) as err:
        check_header(buf.getvalue(), ServerSettings(max_output_pixels=500 * 500), 1,
                     output_size=UpscaleOptions(width=1200).output_size)  # fmt: skip
    assert (
        err.value.status == 413
        and "the output would be 1200x600 = 720000 pixels" in err.value.detail
    )
    with pytest.raises(ApiError) as err:
        check_header(
            buf.getvalue(),
            ServerSettings(),
            1,
            output_size=UpscaleOptions(width=50).output_size,
        )
    assert err.value.status == 422 and err.value.field == "width"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--scale", "0"], "sdx4: error: --scale: scale must be in (1, 16]"),
        (
            ["--scale", "17"],
            "sdx4: error: --scale: scale must be in (1, 16] (above 1, at most 16); got 17",
        ),
        (
            ["--scale", "-2"],
            "sdx4: error: --scale: scale must be in (1, 16] (above 1, at most 16); got -2",
        ),
        (
            ["--scale", "4", "--width", "100"],
            "sdx4: error: --scale: give either --scale (4) or --width/--height, not both",
        ),
        (["--width", "0"], "sdx4: error: --width: width must be in 1..65536; got 0"),
        (
            ["--width", "5"],
            "in.png: --width: width 5 is smaller than the input's width 10",
        ),
    ],
)
def test_cli_bad_values_exit_2_with_the_flag(tmp_path, capsys, args, message):
    src = tmp_path / "in.png"
    image().save(src)
    assert main(["upscale", str(src), "--method", "bicubic", *args]) == 2
    assert message in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["in.png"]


def test_cli_scale_abc_is_an_argparse_error(tmp_path):
    r = run_cli("upscale", str(tmp_path / "in.png"), "--scale", "abc")
    assert r.returncode == 2 and "--scale: invalid float value: 'abc'" in r.stderr


def test_cli_writes_exact_sizes_with_names_and_metadata(tmp_path):
    src = tmp_path / "in.png"
    image().save(src)
    for args, name, size in [
        (["--scale", "1.5"], "in_x1.5_lanczos.png", (15, 9)),
        (["--scale", "3"], "in_x3_lanczos.png", (30, 18)),
        (["--width", "25"], "in_25w_lanczos.png", (25, 15)),
        (["--width", "30", "--height", "30"], "in_30x30_lanczos.png", (30, 30)),
    ]:
        assert main(["upscale", str(src), "--method", "lanczos", "-q", *args]) == 0
        with Image.open(tmp_path / name) as im:
            assert im.size == size
            meta = json.loads(im.text["sdx4"])
        assert meta["output_size"] == list(size)
        if "--width" in args:
            assert meta["target"]["width"] == int(args[1])
        else:
            assert meta["scale"] == float(args[1])


def test_sides_are_rounded_half_up():
    from sdx4.options import scaled_size

    assert scaled_size((3, 5), 1.5) == (
        5,
        8,
    )  # 4.5 -> 5, 7.5 -> 8 (not banker's 4, 8; not truncated 4, 7)
    assert UpscaleOptions(width=25).output_size((10, 7)) == (25, 18)  # 17.5 -> 18
    assert UpscaleOptions(height=11).output_size((7, 5)) == (15, 11)  # 15.4 -> 15
    assert sdx4.upscale(
        Image.new("RGB", (3, 5)), method="nearest", scale=1.5
    ).image.size == (5, 8)


def test_evaluate_refuses_a_float_scale_with_a_clear_message(tmp_path, capsys):
    """quality/ crops HR images to a multiple of an integer scale: evaluate keeps whole scales (4.0 is 4)."""
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(tmp_path), "-o", str(tmp_path / "r"), "--scale", "1.5", "--methods", "bicubic"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument --scale: evaluate takes whole scales only (2..8" in err and "got 1.5" in err
    from sdx4.cli import build_parser

    args = build_parser().parse_args(["evaluate", str(tmp_path), "-o", "r", "--scale", "4.0"])
    assert args.scale == 4 and isinstance(args.scale, int)
    assert not (tmp_path / "r").exists()
