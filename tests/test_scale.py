"""--scale: exact output sizes from x4 passes plus Lanczos downsampling; classical methods too."""

from __future__ import annotations

import pytest
from PIL import Image

import sdx4
from sdx4.cli import main
from sdx4.engine.scale import pass_plan, upscale_by
from sdx4.imageio import read_metadata
from sdx4.options import OptionsError, UpscaleOptions


def _bicubic_x4(im: Image.Image) -> Image.Image:
    return im.resize((4 * im.width, 4 * im.height), Image.Resampling.BICUBIC)


@pytest.mark.parametrize("size", [(1, 1), (7, 13), (64, 33)])
@pytest.mark.parametrize("scale,passes", [(2, 1), (3, 1), (4, 1), (5, 2), (8, 2), (11, 2), (16, 2)])
def test_exact_size_and_pass_count(size, scale, passes):
    calls = []

    def one_pass(im):
        calls.append(im.size)
        return _bicubic_x4(im)

    out, n = upscale_by(Image.new("RGB", size, (10, 20, 30)), scale, one_pass)
    assert out.size == (scale * size[0], scale * size[1])
    assert n == passes == len(calls)
    assert calls[0] == size


def test_x8_is_x4_down_to_x2_then_x4():
    assert pass_plan((10, 7), (80, 56)) == [(20, 14), (80, 56)]
    assert pass_plan((10, 7), (40, 28)) == [(40, 28)]
    assert pass_plan((10, 7), (30, 21)) == [(30, 21)]
    # x5: the first pass goes to ceil(target / 4), so the last step only ever downsamples.
    assert pass_plan((10, 7), (50, 35)) == [(13, 9), (50, 35)]


def test_a_pass_of_the_wrong_size_is_an_error():
    with pytest.raises(RuntimeError, match=r"an x4 pass returned \(8, 8\), expected \(12, 12\)"):
        upscale_by(Image.new("RGB", (3, 3)), 3, lambda im: im.resize((8, 8)))


@pytest.mark.parametrize("bad", [1, 0, 17, 16.01, 1.0, float("nan"), True, "4"])  # 2.5 is a scale now (test_any_scale.py)
def test_scale_option_is_checked(bad):
    with pytest.raises(OptionsError, match="scale must be"):
        UpscaleOptions(scale=bad)


def test_scale_error_names_the_range():
    with pytest.raises(OptionsError, match=r"scale must be in \(1, 16\] \(above 1, at most 16\); got 17"):
        UpscaleOptions(scale=17)


@pytest.mark.parametrize("scale", [2, 3, 8])
def test_classical_methods_give_the_exact_size(scale):
    im = Image.new("RGBA", (9, 5), (200, 100, 50, 128))
    res = sdx4.upscale(im, method="lanczos", scale=scale)
    assert res.image.size == (9 * scale, 5 * scale) and res.image.mode == "RGBA"
    assert res.metadata["scale"] == scale and res.metadata["output_size"] == [9 * scale, 5 * scale]


def test_cli_scale_names_the_output_and_stores_it(tmp_path):
    src = tmp_path / "in.png"
    Image.new("RGB", (7, 3), (1, 2, 3)).save(src)
    assert main(["upscale", str(src), "--method", "bicubic", "--scale", "3", "-q"]) == 0
    out = tmp_path / "in_x3_bicubic.png"
    with Image.open(out) as im:
        assert im.size == (21, 9)
    assert read_metadata(out)["scale"] == 3


def test_cli_rejects_bad_scale(tmp_path, capsys):
    src = tmp_path / "in.png"
    Image.new("RGB", (7, 3)).save(src)
    assert main(["upscale", str(src), "--method", "bicubic", "--scale", "1"]) == 2
    assert "--scale: scale must be in (1, 16] (above 1, at most 16); got 1" in capsys.readouterr().err
    assert not (tmp_path / "in_x1_bicubic.png").exists()
