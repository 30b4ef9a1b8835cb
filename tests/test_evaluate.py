"""`sdx4 evaluate`: LR making, per-image numbers, report files, corrupt inputs, LPIPS availability, sd path."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sdx4.quality.evaluate as ev
from sdx4.cli import main
from sdx4.quality.methods import MethodRunner
from sdx4.quality.metrics import psnr_y, ssim_y

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "examples" / "photos"


def _independent(hr: Image.Image, method: str) -> tuple[float, float]:
    """PSNR/SSIM by a path that does not go through sdx4.evaluate: Pillow down, Pillow up."""
    filt = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}[method]
    w, h = hr.size
    lr = hr.resize((w // 4, h // 4), Image.Resampling.BICUBIC)
    up = lr.resize((w, h), filt)
    return psnr_y(hr, up, crop=4), ssim_y(hr, up, crop=4)


@pytest.fixture()
def hr_dir(tmp_path: Path) -> Path:
    d = tmp_path / "hr"
    d.mkdir()
    shutil.copy(PHOTOS / "chelsea.png", d / "a_chelsea.png")
    # 259x130: not a multiple of 4 -> evaluated on the top-left 256x128
    Image.open(PHOTOS / "coffee.png").convert("RGB").resize((259, 130)).save(d / "b_coffee.png")
    (d / "c_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    Image.new("RGB", (16, 16), (9, 9, 9)).save(d / "d_tiny.png")
    (d / "notes.txt").write_text("not an image, ignored")
    return d


def test_mod_crop_and_lr_are_antialiased_bicubic() -> None:
    im = Image.fromarray(np.arange(130 * 259 * 3, dtype=np.uint32).reshape(130, 259, 3).astype(np.uint8))
    cropped = ev.mod_crop(im, 4)
    assert cropped.size == (256, 128)
    np.testing.assert_array_equal(np.asarray(cropped), np.asarray(im)[:128, :256])
    # A 1-px checkerboard has no content below its frequency: antialiased reduction gives flat grey,
    # a point-sampled (aliasing) reduction would give black or white.
    board = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)
    lr = np.asarray(ev.make_lr(Image.fromarray(board).convert("RGB"), 4))
    assert lr.shape == (16, 16, 3)
    assert np.abs(lr[2:-2, 2:-2].astype(int) - 128).max() <= 2
    with pytest.raises(ValueError, match="not a multiple of 4"):
        ev.make_lr(im, 4)


def test_evaluate_folder_numbers_and_failures(hr_dir: Path) -> None:
    report = ev.evaluate_folder(hr_dir, ("bicubic", "lanczos"), MethodRunner(), 4)
    assert [(r.image, r.method, r.size) for r in report.rows] == [
        ("a_chelsea.png", "bicubic", (256, 256)),
        ("a_chelsea.png", "lanczos", (256, 256)),
        ("b_coffee.png", "bicubic", (256, 128)),
        ("b_coffee.png", "lanczos", (256, 128)),
    ]
    for r in report.rows:
        hr = ev.mod_crop(Image.open(hr_dir / r.image).convert("RGB"), 4)
        want_psnr, want_ssim = _independent(hr, r.method)
        assert r.psnr_y == pytest.approx(want_psnr, abs=1e-9) and r.ssim_y == pytest.approx(want_ssim, abs=1e-12)
        assert 20 < r.psnr_y < 40 and r.seconds > 0 and r.lpips is None
    assert [f.image for f in report.failures] == ["c_broken.png", "d_tiny.png"]
    assert report.failures[0].problem == f"{hr_dir / 'c_broken.png'}: cannot decode image (Truncated File Read)"
    assert "16x16 after cropping to a multiple of 4 is too small; need at least 19x19" in report.failures[1].problem
    means = report.means()
    lanczos = [r for r in report.rows if r.method == "lanczos"]
    assert means["lanczos"]["psnr_y"] == pytest.approx(np.mean([r.psnr_y for r in lanczos]))
    assert means["lanczos"]["ssim_y"] == pytest.approx(np.mean([r.ssim_y for r in lanczos]))
    assert means["lanczos"]["seconds"] == pytest.approx(np.mean([r.seconds for r in lanczos]))
    assert means["lanczos"]["seconds_median"] == pytest.approx(np.median([r.seconds for r in lanczos]))
    assert report.perceptual[0].available is False


def test_evaluate_cli_writes_report_and_flags_corrupt_files(hr_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    rc = main(["evaluate", str(hr_dir), "--methods", "bicubic,lanczos", "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2  # some files could not be evaluated; the report is still written
    assert f"{hr_dir / 'c_broken.png'}: cannot decode image" in err and "d_tiny.png" in err
    assert "2 file(s) could not be evaluated" in err
    assert sorted(p.name for p in out.iterdir()) == ["quality_vs_time.png", "report.md", "results.csv"]

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["image"], r["method"]) for r in rows] == [
        ("a_chelsea.png", "bicubic"), ("a_chelsea.png", "lanczos"), ("b_coffee.png", "bicubic"),
        ("b_coffee.png", "lanczos"), ("c_broken.png", ""), ("d_tiny.png", ""),
    ]  # fmt: skip
    hr = Image.open(hr_dir / "a_chelsea.png").convert("RGB")
    assert float(rows[0]["psnr_y"]) == pytest.approx(_independent(hr, "bicubic")[0], abs=1e-4)
    assert rows[0]["lpips"] == "" and "cannot decode image" in rows[4]["error"]

    md = (out / "report.md").read_text()
    mean_bicubic = np.mean([float(r["psnr_y"]) for r in rows if r["method"] == "bicubic"])
    assert f"| bicubic | {mean_bicubic:.2f} |" in md
    assert "## Not evaluated" in md and "| c_broken.png |" in md and "| d_tiny.png |" in md
    assert "LPIPS: unavailable (" in md and "| unavailable |" in md
    with Image.open(out / "quality_vs_time.png") as plot:
        assert plot.format == "PNG" and plot.size == (900, 380)

    # A second run refuses to overwrite the report and changes nothing.
    before = (out / "report.md").read_bytes()
    assert main(["evaluate", str(hr_dir), "--methods", "bicubic", "-o", str(out)]) == 2
    assert f"{out / 'results.csv'}: already exists (pass --overwrite to replace the report)" in capsys.readouterr().err
    assert (out / "report.md").read_bytes() == before
    assert main(["evaluate", str(hr_dir), "--methods", "bicubic", "-o", str(out), "--overwrite", "-q"]) == 2
    assert "| lanczos |" not in (out / "report.md").read_text() and sorted(p.name for p in out.iterdir())[0][0] != "."


def test_evaluate_all_good_exits_0_and_no_plot(tmp_path: Path) -> None:
    d = tmp_path / "hr"
    d.mkdir()
    shutil.copy(PHOTOS / "rocket.png", d)
    out = tmp_path / "r"
    assert main(["evaluate", str(d), "--methods", "nearest", "--scale", "2", "--no-plot", "-o", str(out), "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "results.csv"]
    assert "x2" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--methods", "sd", "--scale", "2"], "--scale 2: method sd upscales by exactly 4"),
        (["--methods", "bicubic", "--scale", "9"], "--scale must be in 2..8"),
        (["--methods", "bicubic,foo"], "--methods: unknown method 'foo'"),
    ],
)
def test_evaluate_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert main(["evaluate", str(PHOTOS), *argv, "-o", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_evaluate_folder_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", str(tmp_path / "empty"), "--methods", "bicubic", "-o", str(tmp_path / "r")]) == 2
    assert "no images in this folder" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "nope"), "--methods", "bicubic", "-o", str(tmp_path / "r")]) == 2
    assert "nope: not a folder" in capsys.readouterr().err


def test_missing_matplotlib_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ev, "matplotlib_available", lambda: False)
    assert main(["evaluate", str(PHOTOS), "--methods", "bicubic", "-o", str(tmp_path / "r")]) == 2
    assert "the plot needs matplotlib: pip install 'sdx4[eval]' (or pass --no-plot)" in capsys.readouterr().err


def test_classical_evaluate_does_not_import_torch(tmp_path: Path) -> None:
    code = (
        "import sys; from sdx4.cli import main;"
        f"rc = main(['evaluate', {str(PHOTOS)!r}, '--methods', 'bicubic', '--no-plot', '-o', {str(tmp_path / 'r')!r}, '-q']);"
        "assert rc == 0, rc; assert 'torch' not in sys.modules, 'torch was imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "r" / "results.csv").exists()


# --- LPIPS: never faked. Here the package is absent; a stand-in package checks the plumbing. ---


def test_lpips_unavailable_here_says_why() -> None:
    import importlib.util

    if importlib.util.find_spec("lpips") is not None:
        pytest.skip("lpips is installed on this machine")
    status = ev.lpips_status()
    assert status.available is False and "lpips package is not installed" in status.reason


STAND_IN_LPIPS = '''
import torch
class LPIPS(torch.nn.Module):
    """Stand-in: mean absolute difference, so the test can predict the number."""
    def __init__(self, net="alex", verbose=True):
        super().__init__()
        assert net == "alex"
    def forward(self, a, b):
        assert a.min() >= -1 and a.max() <= 1 and a.shape[:2] == (1, 3)
        return (a - b).abs().mean().reshape(1, 1, 1, 1)
'''


def test_lpips_plumbing_with_a_stand_in_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    pkgs = tmp_path / "site"
    (pkgs / "lpips" / "weights" / "v0.1").mkdir(parents=True)
    (pkgs / "lpips" / "__init__.py").write_text(STAND_IN_LPIPS)
    (pkgs / "torchvision").mkdir()
    (pkgs / "torchvision" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(pkgs))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for mod in ("lpips", "torchvision"):
        monkeypatch.delitem(sys.modules, mod, raising=False)

    # Each missing piece is named; nothing is computed until all are local.
    assert "lpips weights missing" in ev.lpips_status().reason
    (pkgs / "lpips" / "weights" / "v0.1" / "alex.pth").write_bytes(b"")
    status = ev.lpips_status()
    assert not status.available and "AlexNet weights not downloaded" in status.reason
    ckpt = tmp_path / "torch" / "hub" / "checkpoints" / ev.ALEXNET_CHECKPOINT
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    assert ev.lpips_status().available

    d = tmp_path / "hr"
    d.mkdir()
    shutil.copy(PHOTOS / "coffee.png", d)
    report = ev.evaluate_folder(d, ("bicubic",), MethodRunner(), 4)
    hr = Image.open(d / "coffee.png").convert("RGB")
    up = hr.resize((64, 64), Image.Resampling.BICUBIC).resize((256, 256), Image.Resampling.BICUBIC)
    a, b = (np.asarray(x, dtype=np.float32)[4:-4, 4:-4] / 127.5 for x in (hr, up))
    assert report.rows[0].lpips == pytest.approx(float(np.abs(a - b).mean()), rel=1e-5)
    assert f"| {report.rows[0].lpips:.4f} |" in ev.to_markdown(report)


# --- sd on the tiny random model ---


def test_evaluate_with_sd_on_tiny_model(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    from sdx4.model.random_model import cached_random_model

    model = cached_random_model("tiny", cache_dir=tmp_path_factory.getbasetemp() / "sdx4-models")
    d = tmp_path / "hr"
    d.mkdir()
    Image.open(PHOTOS / "chelsea.png").convert("RGB").resize((96, 96)).save(d / "c.png")
    out = tmp_path / "r"
    argv = ["evaluate", str(d), "--methods", "sd,bicubic", "--model", str(model), "--device", "cpu", "--dtype", "fp32"]
    assert main(argv + ["--steps", "2", "--seed", "3", "--no-plot", "-o", str(out), "-q"]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["method"] for r in rows] == ["sd", "bicubic"]
    import sdx4

    lr = Image.open(d / "c.png").convert("RGB").resize((24, 24), Image.Resampling.BICUBIC)
    up = sdx4.load(str(model), device="cpu", dtype="fp32")(lr, steps=2, seed=3).image
    hr = Image.open(d / "c.png").convert("RGB")
    assert float(rows[0]["psnr_y"]) == pytest.approx(psnr_y(hr, up), abs=1e-4)
    md = (out / "report.md").read_text()
    assert "seed=3" in md and "steps=2" in md and str(model) in md
