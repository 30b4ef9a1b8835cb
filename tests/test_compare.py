"""`sdx4 compare`: grid geometry, tiles equal to the method outputs, labels, auto crop, errors, sd path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

import sdx4
from sdx4.cli import main
from sdx4.imageio import read_metadata
from sdx4.quality.compare import (
    auto_crop,
    build_grid,
    label_image,
    parse_crop,
    plan_grid,
)

ROOT = Path(__file__).resolve().parents[1]
CAT = ROOT / "examples" / "cat.png"  # 64x64
PHOTOS = ROOT / "examples" / "photos"


def _box(im: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    x, y, w, h = box
    return np.asarray(im.crop((x, y, x + w, y + h)))


def _nearest(im: Image.Image, f: int) -> Image.Image:
    return im.resize((im.width * f, im.height * f), Image.Resampling.NEAREST)


def test_plan_grid_geometry_by_hand() -> None:
    # 64x64 input, x4: tiles 256x256; crop 16 px -> 64 px in the tile -> zoom 4 -> 256x256 zoom tiles.
    # gap = max(4, 256 // 64) = 4; font = 256 // 14 = 18; label strip = 27.
    lay = plan_grid(3, (64, 64), 4, (0, 0, 16, 16))
    assert lay.zoom == 4 and lay.font_size == 18
    assert lay.size == (4 + 3 * (256 + 4), 4 + 27 + 256 + 4 + 27 + 256 + 4)
    assert lay.tile_boxes == [(4, 31, 256, 256), (264, 31, 256, 256), (524, 31, 256, 256)]
    assert lay.zoom_boxes[2] == (524, 4 + 27 + 256 + 4 + 27, 256, 256)
    # A non-square crop: zoom is limited by the longer side of the crop.
    assert plan_grid(2, (64, 48), 4, (0, 0, 32, 8)).zoom == 2


def test_compare_cli_tiles_labels_and_metadata(tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    rc = main(["compare", str(CAT), "--methods", "bicubic,lanczos", "--crop", "8,12,16,16", "-o", str(out), "-q"])
    assert rc == 0
    grid = Image.open(out).convert("RGB")
    meta = read_metadata(out)
    lay = meta["layout"]
    assert grid.size == (4 + 3 * 260, 578) == tuple(lay["size"])
    assert meta["methods"] == ["bicubic", "lanczos"] and meta["crop"] == [8, 12, 16, 16] and meta["crop_source"] == "user"
    assert meta["labels"] == ["input (nearest x4)", "bicubic", "lanczos"] and meta["sd_options"] is None

    cat = Image.open(CAT).convert("RGB")
    outputs = [sdx4.upscale(CAT, method=m).image.convert("RGB") for m in ("bicubic", "lanczos")]
    assert not np.array_equal(np.asarray(outputs[0]), np.asarray(outputs[1]))
    for i, up in enumerate(outputs, start=1):
        np.testing.assert_array_equal(_box(grid, lay["tile_boxes"][i]), np.asarray(up))
        zoom = _nearest(up.crop((32, 48, 32 + 64, 48 + 64)), 4)
        np.testing.assert_array_equal(_box(grid, lay["zoom_boxes"][i]), np.asarray(zoom))
    # Input tile: nearest x4, with the red box drawn only on the crop's outline.
    inp = np.asarray(_nearest(cat, 4))
    tile = _box(grid, lay["tile_boxes"][0])
    mask = np.ones(inp.shape[:2], bool)
    mask[48 : 48 + 64, 32 : 32 + 64] = False
    mask[50 : 48 + 62, 34 : 32 + 62] = True  # inside the 2 px outline
    np.testing.assert_array_equal(tile[mask], inp[mask])
    assert (tile[48, 32:96] == [255, 0, 0]).all() and (tile[48 + 63, 32:96] == [255, 0, 0]).all()
    np.testing.assert_array_equal(_box(grid, lay["zoom_boxes"][0]), np.asarray(_nearest(cat.crop((8, 12, 24, 28)), 16)))
    # Labels are the rendered label text (and not blank).
    for text, box in zip(meta["labels"], lay["label_boxes"]):
        strip = _box(grid, box)
        np.testing.assert_array_equal(strip, np.asarray(label_image(text, tuple(box[2:]), lay["font_size"])))
        assert (strip < 100).all(axis=2).sum() > 20
    assert not np.array_equal(_box(grid, lay["label_boxes"][1]), _box(grid, lay["label_boxes"][2]))


def test_auto_crop_finds_a_planted_detail_patch() -> None:
    # A real photo, blurred smooth, with a 24x24 patch of fine grey noise planted at (70, 33).
    base = np.asarray(Image.open(PHOTOS / "coffee.png").convert("RGB").resize((128, 96)).filter(ImageFilter.GaussianBlur(6)))
    img = base.copy()
    rng = np.random.default_rng(1)
    patch = img[33 : 33 + 24, 70 : 70 + 24].astype(np.int16) + rng.integers(-60, 61, (24, 24, 1))
    img[33 : 33 + 24, 70 : 70 + 24] = np.clip(patch, 0, 255).astype(np.uint8)
    x, y, w, h = auto_crop(img, (24, 24))
    # Windows straddling the patch edge mix noise with background, so +-2 px is as exact as it gets.
    assert (w, h) == (24, 24) and abs(x - 70) <= 2 and abs(y - 33) <= 2, (x, y)
    x, y, w, h = auto_crop(img, (16, 16))  # a smaller crop lies inside the patch
    assert 70 <= x and x + w <= 94 and 33 <= y and y + h <= 57
    assert auto_crop(Image.fromarray(img)) == auto_crop(img, (24, 24))  # default: 1/4 of the shorter side
    assert auto_crop(base, (24, 24)) != auto_crop(img, (24, 24))  # the patch, not the photo, decided it


def test_parse_crop_errors() -> None:
    assert parse_crop("auto", (64, 64)) is None
    assert parse_crop("1,2,3,4", (64, 64)) == (1, 2, 3, 4)
    with pytest.raises(ValueError, match="four integers"):
        parse_crop("1,2,3", (64, 64))
    with pytest.raises(ValueError, match="not inside the 64x64 input"):
        parse_crop("60,0,8,8", (64, 64))


def test_build_grid_rejects_wrong_output_size() -> None:
    im = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="bicubic: output is 30x32, expected 32x32"):
        build_grid(im, [("bicubic", Image.new("RGB", (30, 32)))], 4, (0, 0, 8, 8))


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--methods", "bicubic,cubic"], "--methods: unknown method 'cubic'"),
        (["--methods", "bicubic,bicubic"], "listed twice"),
        (["--methods", "bicubic", "--crop", "0,0,99,8"], "--crop: crop 0,0,99,8 is not inside the 64x64 input"),
        (["--methods", "bicubic", "-o", "OUT.jpg"], "use a .png name"),
        (["--methods", "sd", "--steps", "0"], "--steps: steps must be in 1..500"),
    ],
)
def test_compare_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    argv = [a.replace("OUT", str(tmp_path / "g")) for a in argv]
    if "-o" not in argv:
        argv += ["-o", str(tmp_path / "g.png")]
    assert main(["compare", str(CAT), *argv]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_compare_refuses_existing_output_and_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "g.png"
    out.write_bytes(b"keep")
    assert main(["compare", str(CAT), "--methods", "bicubic", "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"keep"
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    assert main(["compare", str(bad), "--methods", "bicubic", "-o", str(tmp_path / "h.png")]) == 2
    assert f"{bad}: not an image" in capsys.readouterr().err


def test_classical_compare_does_not_import_torch(tmp_path: Path) -> None:
    code = (
        "import sys; from sdx4.cli import main;"
        f"rc = main(['compare', {str(CAT)!r}, '--methods', 'bicubic,lanczos', '-o', {str(tmp_path / 'g.png')!r}, '-q']);"
        "assert rc == 0, rc; assert 'torch' not in sys.modules, 'torch was imported'"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "g.png").exists()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sdx4.model.random_model import cached_random_model

    # Session temp dir: test_evaluate.py reuses the same tiny model instead of building another.
    return cached_random_model("tiny", cache_dir=tmp_path_factory.getbasetemp() / "sdx4-models")


def test_compare_with_sd_on_tiny_model(tmp_path: Path, tiny_model: Path) -> None:
    small = tmp_path / "small.png"
    Image.open(CAT).convert("RGB").crop((16, 16, 40, 40)).save(small)  # 24x24 -> 96x96
    out = tmp_path / "grid.png"
    argv = ["compare", str(small), "--methods", "sd,bicubic", "--model", str(tiny_model), "--device", "cpu", "--dtype", "fp32"]
    argv += ["--steps", "2", "--seed", "7", "--prompt", "a cat", "-o", str(out), "-q"]
    assert main(argv) == 0
    meta = read_metadata(out)
    assert meta["labels"] == ["input (nearest x4)", "sd (seed 7)", "bicubic"]
    assert meta["sd_options"]["seed"] == 7 and meta["sd_options"]["steps"] == 2 and meta["sd_options"]["prompt"] == "a cat"
    assert meta["per_method"]["sd"]["random_weights"] is True
    want = sdx4.load(str(tiny_model), device="cpu", dtype="fp32")(small, prompt="a cat", steps=2, seed=7).image
    grid = Image.open(out).convert("RGB")
    np.testing.assert_array_equal(_box(grid, meta["layout"]["tile_boxes"][1]), np.asarray(want.convert("RGB")))
    json.dumps(meta)  # metadata is plain JSON
