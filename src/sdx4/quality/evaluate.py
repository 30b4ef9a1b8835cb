"""Quality evaluation over a folder of high-resolution images, the way SR papers do it.

For every HR image:
  1. crop to a multiple of `scale` (top-left part kept: MATLAB's `modcrop`);
  2. make the LR input with Pillow's `resize(..., BICUBIC)`: bicubic (Keys, a = -0.5) WITH antialiasing
     (Pillow widens the kernel by the scale factor when reducing, like MATLAB's `imresize`), rounded to
     uint8. This is close to MATLAB's `imresize(hr, 1/scale, 'bicubic')`, the usual way SR test sets
     are made, but not bit-identical: Pillow renormalises the kernel at the border instead of mirror
     padding, and works in fixed point. Measured on the four bundled photos against a numpy
     re-implementation of MATLAB's algorithm: the LR images differ by 0.13-0.19 grey levels on
     average (up to 16 at the image border), which moves bicubic x4 PSNR-Y by at most 0.003 dB.
     Published numbers made from MATLAB LR images are comparable to ours that closely, not exactly;
  3. upscale the LR with each method (timed: the upscaling call only, wall clock, no warm-up run);
  4. PSNR-Y and SSIM-Y against the cropped HR with a `scale`-pixel border crop (see `sdx4.metrics`);
  5. perceptual metrics (LPIPS) only where the `lpips` package AND all its weights are on this
     machine; otherwise the report says "unavailable" and why. No number is ever made up.

Results go to a CSV, a markdown report and a plot (quality vs time per method; needs matplotlib,
the `sdx4[eval]` extra). Files that cannot be read (corrupt, too small) are listed in the report
and skipped; the others are evaluated.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..imageio import (
    INPUT_SUFFIXES,
    ImageInputError,
    is_input_image,
    open_image,
    write_atomic,
)
from ..metadata import evaluate_settings
from .methods import MethodRunner
from .metrics import min_size_for_metrics, psnr_y, ssim_y

IMAGE_SUFFIXES = INPUT_SUFFIXES  # what a batch run reads too (imageio owns the list)
REPORT_FILES = ("results.csv", "report.md", "quality_vs_time.png")
LR_METHOD = "Pillow resize BICUBIC (a=-0.5, antialiased), rounded to uint8"


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Files with an image suffix directly in `folder`, sorted by name (other files are ignored)."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and is_input_image(p))


def mod_crop(rgb: Image.Image, scale: int) -> Image.Image:
    """Keep the top-left part whose sides are multiples of `scale` (MATLAB modcrop)."""
    w, h = rgb.size
    return rgb.crop((0, 0, w - w % scale, h - h % scale))


def make_lr(hr: Image.Image, scale: int) -> Image.Image:
    """The low-resolution input: antialiased bicubic reduction by exactly `scale` (see module docstring)."""
    w, h = hr.size
    if w % scale or h % scale:
        raise ValueError(f"HR size {w}x{h} is not a multiple of {scale}; mod_crop it first")
    return hr.resize((w // scale, h // scale), Image.Resampling.BICUBIC, reducing_gap=None)


# ---------------------------------------------------------------------------------------------------
# Perceptual metrics: only real ones.


@dataclass(frozen=True)
class PerceptualStatus:
    name: str
    available: bool
    reason: str  # why not, or what is used


def _torch_hub_checkpoints() -> Path:
    # torch.hub.get_dir() without importing torch: $TORCH_HOME/hub or $XDG_CACHE_HOME/torch/hub.
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch")
    return Path(home) / "hub" / "checkpoints"


#: torchvision's ImageNet AlexNet weights, the backbone lpips(net="alex") loads through torchvision.
ALEXNET_CHECKPOINT = "alexnet-owt-7be5be79.pth"


def lpips_status() -> PerceptualStatus:
    """Is LPIPS (Zhang et al. 2018, AlexNet variant) computable here without any download?"""
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        return PerceptualStatus("lpips", False, "the lpips package is not installed; it also needs torchvision")
    if importlib.util.find_spec("torchvision") is None:
        return PerceptualStatus("lpips", False, "lpips needs torchvision, which is not installed")
    linear = Path(spec.origin).parent / "weights" / "v0.1" / "alex.pth"
    if not linear.is_file():
        return PerceptualStatus("lpips", False, f"lpips weights missing: {linear}")
    backbone = _torch_hub_checkpoints() / ALEXNET_CHECKPOINT
    if not backbone.is_file():
        return PerceptualStatus("lpips", False, f"AlexNet weights not downloaded: {backbone} (LPIPS would download them)")
    return PerceptualStatus("lpips", True, "lpips 0.1, net=alex, inputs in [-1, 1], same border crop as PSNR")


class LpipsMetric:
    """LPIPS distance (lower is better) between two uint8 RGB images, with the same border crop."""

    def __init__(self) -> None:
        import lpips  # only reached when lpips_status() said everything is local

        self._model = lpips.LPIPS(net="alex", verbose=False).eval()

    def __call__(self, reference: Image.Image, test: Image.Image, crop: int) -> float:
        import torch

        def tensor(im: Image.Image) -> torch.Tensor:
            a = np.asarray(im.convert("RGB"), dtype=np.float32)
            a = a[crop : a.shape[0] - crop, crop : a.shape[1] - crop]  # H,W,3
            return torch.from_numpy(a).permute(2, 0, 1)[None] / 127.5 - 1.0  # 1,3,H,W in [-1,1]

        with torch.no_grad():
            return float(self._model(tensor(reference), tensor(test)).mean())


# ---------------------------------------------------------------------------------------------------
# The evaluation itself.


@dataclass(frozen=True)
class Row:
    image: str
    size: tuple[int, int]  # HR size after mod_crop
    method: str
    psnr_y: float
    ssim_y: float
    seconds: float
    lpips: float | None = None


@dataclass(frozen=True)
class Failure:
    image: str
    problem: str


@dataclass(frozen=True)
class Report:
    folder: str
    scale: int
    methods: tuple[str, ...]
    rows: list[Row]
    failures: list[Failure]
    perceptual: list[PerceptualStatus]
    settings: dict[str, Any] = field(default_factory=dict)

    def means(self) -> dict[str, dict[str, float | None]]:
        """Mean PSNR-Y (of the per-image dB values, as papers do), SSIM-Y, LPIPS, seconds per method."""
        out: dict[str, dict[str, float | None]] = {}
        for m in self.methods:
            rows = [r for r in self.rows if r.method == m]
            if not rows:
                continue
            lp = [r.lpips for r in rows if r.lpips is not None]
            out[m] = {
                "psnr_y": float(np.mean([r.psnr_y for r in rows])),
                "ssim_y": float(np.mean([r.ssim_y for r in rows])),
                "lpips": float(np.mean(lp)) if len(lp) == len(rows) else None,
                "seconds": float(np.mean([r.seconds for r in rows])),
                "seconds_median": float(np.median([r.seconds for r in rows])),
                "images": float(len(rows)),
            }
        return out


def evaluate_image(
    hr: Image.Image,
    name: str,
    methods: tuple[str, ...],
    runner: MethodRunner,
    scale: int,
    lpips_metric: Callable[[Image.Image, Image.Image, int], float] | None = None,
) -> list[Row]:
    """One HR image (RGB, already mod-cropped) -> one Row per method."""
    lr = make_lr(hr, scale)
    rows = []
    for method in methods:
        out = runner.run(method, lr, scale)
        if out.image.size != hr.size:
            raise RuntimeError(f"{name}: {method} returned {out.image.size}, expected {hr.size}")
        rows.append(
            Row(
                image=name,
                size=hr.size,
                method=method,
                psnr_y=psnr_y(hr, out.image, crop=scale),
                ssim_y=ssim_y(hr, out.image, crop=scale),
                seconds=out.seconds,
                lpips=lpips_metric(hr, out.image, scale) if lpips_metric is not None else None,
            )
        )
    return rows


def load_hr(path: Path, scale: int) -> Image.Image:
    """Read one HR image as RGB and mod-crop it; ImageInputError if unreadable or too small."""
    hr = mod_crop(open_image(path).rgb, scale)  # alpha, if any, is not evaluated
    need = max(min_size_for_metrics(scale), scale)
    if min(hr.size) < need:
        raise ImageInputError(f"{path}: {hr.width}x{hr.height} after cropping to a multiple of {scale} is too small; need at least {need}x{need}")
    return hr


def evaluate_folder(
    folder: str | os.PathLike[str],
    methods: tuple[str, ...],
    runner: MethodRunner,
    scale: int = 4,
    use_lpips: bool = True,
    on_event: Callable[[str], None] | None = None,
    on_failure: Callable[[Failure], None] | None = None,
) -> Report:
    """Evaluate every image in `folder`; unreadable ones become Failures, the rest Rows."""
    paths = list_images(folder)
    if not paths:
        raise ImageInputError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    status = lpips_status() if use_lpips else PerceptualStatus("lpips", False, "not requested (--no-perceptual)")
    lpips_metric = LpipsMetric() if status.available else None
    rows: list[Row] = []
    failures: list[Failure] = []
    for path in paths:
        try:
            hr = load_hr(path, scale)
        except ImageInputError as e:
            failure = Failure(path.name, str(e))
            failures.append(failure)
            if on_failure is not None:
                on_failure(failure)
            continue
        image_rows = evaluate_image(hr, path.name, methods, runner, scale, lpips_metric)
        rows.extend(image_rows)
        if on_event is not None:
            on_event(path.name + ": " + ", ".join(f"{r.method} {r.psnr_y:.2f} dB {r.ssim_y:.4f} {r.seconds:.3g} s" for r in image_rows))
    return Report(
        folder=str(folder),
        scale=scale,
        methods=methods,
        rows=rows,
        failures=failures,
        perceptual=[status],
        settings=evaluate_settings(LR_METHOD),
    )


# ---------------------------------------------------------------------------------------------------
# Writing the report.


def _num(v: float | None, digits: int) -> str:
    if v is None:
        return ""
    if math.isinf(v):
        return "inf"
    return f"{v:.{digits}f}"


def to_csv(report: Report) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "width", "height", "method", "psnr_y", "ssim_y", "lpips", "seconds", "error"])
    for r in report.rows:
        w.writerow([r.image, r.size[0], r.size[1], r.method, _num(r.psnr_y, 4), _num(r.ssim_y, 6), _num(r.lpips, 6), f"{r.seconds:.6f}", ""])
    for f in report.failures:
        w.writerow([f.image, "", "", "", "", "", "", "", f.problem])
    return buf.getvalue()


def _ms(seconds: float) -> str:
    ms = seconds * 1000.0
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def _lpips_cell(v: float | None, status: PerceptualStatus) -> str:
    return _num(v, 4) if status.available and v is not None else "unavailable"


def to_markdown(report: Report) -> str:
    lp = report.perceptual[0]
    means = report.means()
    n_images = len({r.image for r in report.rows})
    lines = [
        f"# Quality report: `{Path(report.folder).name}`",
        "",
        f"{n_images} image(s) evaluated, {len(report.failures)} not evaluated; x{report.scale}; sdx4 {report.settings.get('sdx4_version')}.",
        "",
        "Protocol: each HR image is cropped to a multiple of the scale (top-left kept); the LR input is "
        f"made with {LR_METHOD} (close to MATLAB `imresize` bicubic, not bit-identical); each method "
        "upscales the LR; PSNR and SSIM are computed on the BT.601 Y channel (MATLAB `rgb2ycbcr`, Y in "
        f"16..235, not rounded) after removing {report.scale} border pixels; SSIM uses an 11x11 Gaussian "
        "window, sigma 1.5, K1 0.01, K2 0.03, L 255. Time: wall clock of the upscaling call alone, per image, in milliseconds (no warm-up run).",
        "",
        f"Perceptual metric LPIPS: {'available: ' + lp.reason if lp.available else 'unavailable (' + lp.reason + ')'}.",
        "",
    ]
    sd = report.settings.get("sd_options")
    if sd:
        lines += [
            "sd settings: " + ", ".join(f"{k}={sd[k]!r}" for k in ("prompt", "negative_prompt", "steps", "guidance", "noise_level", "eta", "seed")),
            f"model: {report.settings.get('model')}",
            "",
        ]
        for m, records in (report.settings.get("loras") or {}).items():
            merged = ", ".join(f"{r['name']} (sha256 {r['sha256']}) x{r['scale']:g}" for r in records) or "no LoRA"
            lines.insert(len(lines) - 1, f"{m}: {merged}")
    lines += ["## Mean per method", "", "| method | PSNR-Y (dB) | SSIM-Y | LPIPS | ms / image (mean) | ms (median) | images |", "|---|---:|---:|---:|---:|---:|---:|"]
    for m, v in means.items():
        lines.append(
            f"| {m} | {_num(v['psnr_y'], 2)} | {_num(v['ssim_y'], 4)} | {_lpips_cell(v['lpips'], lp)} | {_ms(float(v['seconds'] or 0.0))} | {_ms(float(v['seconds_median'] or 0.0))} | {int(v['images'] or 0)} |"  # type: ignore[arg-type]
        )
    lines += ["", "## Per image", "", "| image | size | method | PSNR-Y (dB) | SSIM-Y | LPIPS | ms |", "|---|---|---|---:|---:|---:|---:|"]
    for r in report.rows:
        lines.append(
            f"| {r.image} | {r.size[0]}x{r.size[1]} | {r.method} | {_num(r.psnr_y, 2)} | {_num(r.ssim_y, 4)} | {_lpips_cell(r.lpips, lp)} | {_ms(r.seconds)} |"
        )
    if report.failures:
        lines += ["", "## Not evaluated", "", "| file | problem |", "|---|---|"]
        lines += [f"| {f.image} | {f.problem.replace('|', '/')} |" for f in report.failures]
    return "\n".join(lines) + "\n"


def matplotlib_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


MATPLOTLIB_MISSING = "the plot needs matplotlib: pip install 'sdx4[eval]' (or pass --no-plot)"


def plot_png(report: Report) -> bytes:
    """Mean PSNR-Y and SSIM-Y against the MEDIAN seconds per image (log scale), one point per method.

    The median, because one stalled call on a busy machine would otherwise move a point by 10x.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeError(MATPLOTLIB_MISSING) from None

    means = report.means()
    # Figure + Agg canvas directly: no pyplot global state, no GUI backend.
    fig = Figure(figsize=(9, 3.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for ax, key, label in zip(fig.subplots(1, 2), ("psnr_y", "ssim_y"), ("PSNR-Y (dB)", "SSIM-Y")):
        for m, v in means.items():
            x, y = max(float(v["seconds_median"] or 0.0), 1e-6), float(v[key] or 0.0)
            ax.scatter([x], [y], s=40)
            ax.annotate(m, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=9)
        ax.set_xscale("log")
        ax.set_xlabel("median seconds per image (log)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.margins(x=0.25, y=0.15)  # room for the method names
    n = len({r.image for r in report.rows})
    fig.suptitle(f"{Path(report.folder).name}: {n} images, x{report.scale} (higher is better, left is faster)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_report(report: Report, out_dir: Path, plot: bool = True) -> list[Path]:
    """Write results.csv, report.md and (optionally) quality_vs_time.png into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # Render everything first, so a failing plot leaves no half-written set behind.
    files = {"results.csv": to_csv(report).encode(), "report.md": to_markdown(report).encode()}
    if plot and report.rows:
        files["quality_vs_time.png"] = plot_png(report)
    written = []
    for name, data in files.items():
        write_atomic(out_dir / name, lambda f, data=data: f.write(data))
        written.append(out_dir / name)
    return written
