"""`sdx4 evaluate --pairs LR_DIR HR_DIR`: matching by stem, the size check before any work, metrics equal to
a direct computation, and the crop gallery (file, size, pixels, coordinates in report.json)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdx4.cli import main
from sdx4.imageio import ImageInputError
from sdx4.quality.metrics import psnr_y, ssim_y
from sdx4.quality.pairs import check_pairs, gallery_crop, match_pairs

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "examples" / "photos"
PATCH = (
    140,
    60,
    100,
    100,
)  # x, y, w, h of the only detailed region of the "patch" HR image


def _lr_of(hr: Image.Image) -> Image.Image:
    return hr.resize((hr.width // 4, hr.height // 4), Image.Resampling.BICUBIC)


@pytest.fixture()
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    lr, hr = tmp_path / "lr", tmp_path / "hr"
    lr.mkdir()
    hr.mkdir()
    chelsea = Image.open(PHOTOS / "chelsea.png").convert("RGB")
    chelsea.save(hr / "chelsea.png")
    _lr_of(chelsea).save(lr / "chelsea.png")
    coffee = Image.open(PHOTOS / "coffee.png").convert("RGB").resize((256, 192))
    coffee.save(hr / "coffee.webp", lossless=True)
    _lr_of(coffee).save(lr / "coffee.bmp")  # same stem, different suffixes
    # Flat grey with one noisy square: the gallery must pick that square.
    rng = np.random.default_rng(1)
    a = np.full((256, 320, 3), 128, np.uint8)
    x, y, w, h = PATCH
    a[y : y + h, x : x + w] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    patch = Image.fromarray(a)
    patch.save(hr / "patch.png")
    _lr_of(patch).save(lr / "patch.png")
    Image.new("RGB", (16, 16)).save(lr / "extra.png")  # no HR
    Image.new("RGB", (64, 64)).save(hr / "lonely.png")  # no LR
    (hr / "notes.txt").write_text("not an image: ignored")
    return lr, hr


def test_pairs_are_matched_by_stem_and_the_rest_is_listed(
    dirs: tuple[Path, Path],
) -> None:
    lr, hr = dirs
    m = match_pairs(lr, hr)
    assert [(p.name, p.lr.name, p.hr.name) for p in m.pairs] == [
        ("chelsea", "chelsea.png", "chelsea.png"),
        ("coffee", "coffee.bmp", "coffee.webp"),
        ("patch", "patch.png", "patch.png"),
    ]
    assert m.unmatched_lr == ["extra.png"] and m.unmatched_hr == ["lonely.png"]
    assert check_pairs(m, 4) == {
        "chelsea": ((64, 64), (256, 256)),
        "coffee": ((64, 48), (256, 192)),
        "patch": ((80, 64), (320, 256)),
    }


def test_one_stem_twice_in_a_folder_or_no_common_stem_is_an_error(
    dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    lr, hr = dirs
    Image.new("RGB", (64, 64)).save(hr / "chelsea.jpg")
    with pytest.raises(
        ImageInputError,
        match=r"HR folder .*: chelsea.jpg and chelsea.png have the same name stem; keep one",
    ):
        match_pairs(lr, hr)
    other = tmp_path / "other"
    other.mkdir()
    Image.new("RGB", (8, 8)).save(other / "zebra.png")
    with pytest.raises(
        ImageInputError,
        match=r"no LR/HR pairs: no file stem is in both folders \(LR: zebra.png; HR: ",
    ):
        check_pairs(match_pairs(other, lr), 4)


def test_a_pair_off_the_scale_is_refused_naming_both_files_before_any_work(
    dirs, tmp_path, capsys
) -> None:
    lr, hr = dirs
    Image.open(hr / "coffee.webp").resize((250, 192)).save(
        hr / "coffee.webp", lossless=True
    )
    out = tmp_path / "report"
    rc = main(
        [
            "evaluate",
            "--pairs",
            str(lr),
            str(hr),
            "--methods",
            "bicubic",
            "--no-plot",
            "-o",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert (
        f"sdx4: error: pair 'coffee': LR {lr / 'coffee.bmp'} is 64x48 and HR {hr / 'coffee.webp'} is 250x192; "
        "at scale 4 the HR must be 256x192"
    ) in err
    assert not out.exists()  # nothing written, nothing upscaled
    # At --scale 2 every pair is off: the first one is named.
    rc = main(
        [
            "evaluate",
            "--pairs",
            str(lr),
            str(hr),
            "--methods",
            "bicubic",
            "--scale",
            "2",
            "--no-plot",
            "-o",
            str(out),
        ]
    )
    assert (
        rc == 2 and "pair 'chelsea': LR" in capsys.readouterr().err and not out.exists()
    )


def test_usage_errors(dirs, tmp_path, capsys) -> None:
    lr, hr = dirs
    out = str(tmp_path / "r")
    assert (
        main(
            [
                "evaluate",
                str(hr),
                "--pairs",
                str(lr),
                str(hr),
                "--methods",
                "bicubic",
                "-o",
                out,
            ]
        )
        == 2
    )
    assert (
        f"give either HR_DIR ({hr}) or --pairs LR_DIR HR_DIR, not both"
        in capsys.readouterr().err
    )
    assert main(["evaluate", "--methods", "bicubic", "-o", out]) == 2
    assert "give HR_DIR, or --pairs LR_DIR HR_DIR" in capsys.readouterr().err
    assert (
        main(
            [
                "evaluate",
                "--pairs",
                str(tmp_path / "nope"),
                str(hr),
                "--methods",
                "bicubic",
                "-o",
                out,
            ]
        )
        == 2
    )
    assert (
        f"{tmp_path / 'nope'}: the LR folder does not exist or is not a folder"
        in capsys.readouterr().err
    )


def test_pairs_report_metrics_and_gallery(dirs, tmp_path, capsys) -> None:
    lr, hr = dirs
    out = tmp_path / "report"
    rc = main(
        [
            "evaluate",
            "--pairs",
            str(lr),
            str(hr),
            "--methods",
            "bicubic,nearest",
            "--no-plot",
            "-o",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "1 LR file(s) without a partner, not evaluated: extra.png" in err
    assert "1 HR file(s) without a partner, not evaluated: lonely.png" in err
    assert sorted(p.name for p in out.iterdir()) == [
        "gallery",
        "report.json",
        "report.md",
        "results.csv",
    ]
    report = json.loads((out / "report.json").read_text())
    assert (
        report["mode"] == "pairs"
        and report["scale"] == 4
        and report["methods"] == ["bicubic", "nearest"]
    )
    assert report["unmatched"] == {"lr": ["extra.png"], "hr": ["lonely.png"]}

    # Per image and mean: the same numbers as Pillow's resize + the metrics, computed here directly.
    filters = {"bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST}
    files = {
        "chelsea": ("chelsea.png", "chelsea.png"),
        "coffee": ("coffee.bmp", "coffee.webp"),
        "patch": ("patch.png", "patch.png"),
    }
    expected: dict[str, list[tuple[float, float]]] = {m: [] for m in filters}
    rows = {(r["image"], r["method"]): r for r in report["rows"]}
    assert len(rows) == 6
    for name, (lr_name, hr_name) in files.items():
        hr_im = Image.open(hr / hr_name).convert("RGB")
        lr_im = Image.open(lr / lr_name).convert("RGB")
        for m, f in filters.items():
            up = lr_im.resize(hr_im.size, f)
            p, s = psnr_y(hr_im, up, crop=4), ssim_y(hr_im, up, crop=4)
            expected[m].append((p, s))
            assert rows[(name, m)]["psnr_y"] == pytest.approx(p, abs=1e-9)
            assert rows[(name, m)]["ssim_y"] == pytest.approx(s, abs=1e-12)
            assert (
                rows[(name, m)]["size"] == list(hr_im.size)
                and rows[(name, m)]["seconds"] > 0
            )
    for m in filters:
        assert report["means"][m]["psnr_y"] == pytest.approx(
            np.mean([p for p, _ in expected[m]]), abs=1e-9
        )
        assert report["means"][m]["ssim_y"] == pytest.approx(
            np.mean([s for _, s in expected[m]]), abs=1e-12
        )
    assert report["means"]["bicubic"]["psnr_y"] > report["means"]["nearest"]["psnr_y"]

    # The gallery: one PNG per pair, LR | methods | HR, a 128 px crop shown 2x (panels of 256 px).
    galleries = {g["image"]: g for g in report["gallery"]}
    assert sorted(galleries) == ["chelsea", "coffee", "patch"]
    g = galleries["patch"]
    assert g["columns"] == ["LR (nearest x4)", "bicubic", "nearest", "HR"]
    x, y, w, h = g["crop"]
    assert (w, h) == (128, 128) and x % 4 == 0 and y % 4 == 0 and g["zoom"] == 2
    assert g["lr_crop"] == [x // 4, y // 4, 32, 32]
    px, py, pw, ph = PATCH  # the crop covers the only detailed region
    assert x <= px and y <= py and x + w >= px + pw and y + h >= py + ph
    assert (
        list(gallery_crop(Image.open(hr / "patch.png").convert("RGB"), 4)) == g["crop"]
    )
    image = Image.open(out / g["file"])
    assert (
        image.size == tuple(g["size"]) == (6 + 4 * (256 + 6), 6 + 21 + 256 + 6 + 21 + 6)
    )
    hr_patch = (
        Image.open(hr / "patch.png")
        .convert("RGB")
        .crop((x, y, x + w, y + h))
        .resize((256, 256), Image.Resampling.NEAREST)
    )
    bx, by, bw, bh = g["panel_boxes"][3]
    np.testing.assert_array_equal(
        np.asarray(image.crop((bx, by, bx + bw, by + bh))), np.asarray(hr_patch)
    )
    lr_patch = (
        Image.open(lr / "patch.png")
        .convert("RGB")
        .crop((x // 4, y // 4, x // 4 + 32, y // 4 + 32))
        .resize((256, 256), Image.Resampling.NEAREST)
    )
    bx, by, bw, bh = g["panel_boxes"][0]
    np.testing.assert_array_equal(
        np.asarray(image.crop((bx, by, bx + bw, by + bh))), np.asarray(lr_patch)
    )
    md = (out / "report.md").read_text()
    assert (
        "## Crop gallery" in md
        and "![patch: LR (nearest x4), bicubic, nearest, HR](gallery/patch.png)" in md
    )
    assert f"patch: HR x={x} y={y} 128x128, shown 2x." in md
    assert "Not evaluated, no partner: LR extra.png, HR lonely.png." in md
    assert "| patch | 320x256 | bicubic |" in md

    # An existing report is kept unless --overwrite.
    assert (
        main(
            [
                "evaluate",
                "--pairs",
                str(lr),
                str(hr),
                "--methods",
                "bicubic",
                "--no-plot",
                "-o",
                str(out),
            ]
        )
        == 2
    )
    assert (
        f"{out / 'results.csv'}: already exists (pass --overwrite to replace the report)"
        in capsys.readouterr().err
    )
