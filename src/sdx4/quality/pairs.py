"""Real-world evaluation: given LR/HR pairs (`sdx4 evaluate --pairs LR_DIR HR_DIR`) instead of LR made
from HR, and a crop gallery that shows every method on the same detailed region.

  1. match the two folders by file stem (`cat.png` with `cat.jpg`); files without a partner are listed;
  2. check every pair before any upscaling: both readable, HR exactly `scale` x the LR in both sides;
  3. upscale each LR with each method (timed) and compare with its HR: PSNR-Y / SSIM-Y with a `scale`
     pixel border crop, as the synthetic mode (`evaluate.py`) does;
  4. per pair, one gallery PNG: the region of the HR with the most fine detail (`compare.auto_crop`,
     snapped to the LR pixel grid) cut from the LR (nearest), every method's output and the HR, side by
     side, enlarged with nearest neighbour. Its coordinates go into report.json.

Pure functions over PIL images plus the report writer; no torch (the runner loads the model for sd).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..imageio import ImageInputError, open_image, write_atomic
from ..metadata import evaluate_settings
from .compare import Box, auto_crop, enlarge_nearest, label_image
from .evaluate import (
    PerceptualStatus,
    Report,
    Row,
    list_images,
    plot_png,
    to_csv,
    to_markdown,
)
from .methods import MethodRunner
from .metrics import min_size_for_metrics, psnr_y, ssim_y

LR_GIVEN = "given (--pairs): each LR file upscaled as it is"
#: Largest side of the gallery crop in HR pixels, and the side each panel is enlarged towards.
GALLERY_CROP = 128
GALLERY_PANEL = 256
GALLERY_GAP = 6
GALLERY_FONT = 13
PAIRS_FILES = (
    "results.csv",
    "report.md",
    "report.json",
    "quality_vs_time.png",
    "gallery",
)


@dataclass(frozen=True)
class Pair:
    name: str  # the common stem
    lr: Path
    hr: Path


@dataclass(frozen=True)
class PairMatch:
    pairs: list[Pair]
    unmatched_lr: list[str]  # file names in LR_DIR without an HR partner
    unmatched_hr: list[str]


def _by_stem(folder: Path, role: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise ImageInputError(
            f"{folder}: the {role} folder does not exist or is not a folder"
        )
    out: dict[str, Path] = {}
    for p in list_images(folder):
        if p.stem in out:
            raise ImageInputError(
                f"{role} folder {folder}: {out[p.stem].name} and {p.name} have the same name stem; keep one"
            )
        out[p.stem] = p
    return out


def match_pairs(lr_dir: str | Path, hr_dir: str | Path) -> PairMatch:
    """Pair the images of two folders by file stem (suffixes may differ); the rest is listed unmatched."""
    lr, hr = _by_stem(Path(lr_dir), "LR"), _by_stem(Path(hr_dir), "HR")
    common = sorted(set(lr) & set(hr))
    return PairMatch(
        pairs=[Pair(s, lr[s], hr[s]) for s in common],
        unmatched_lr=sorted(lr[s].name for s in set(lr) - set(hr)),
        unmatched_hr=sorted(hr[s].name for s in set(hr) - set(lr)),
    )


def check_pairs(
    match: PairMatch, scale: int
) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
    """Read every pair (the images are decoded once here, before any upscaling) and check that the HR is
    exactly `scale` x the LR and large enough for the metrics. name -> (LR size, HR size)."""
    if not match.pairs:
        raise ImageInputError(
            "no LR/HR pairs: no file stem is in both folders"
            + (
                f" (LR: {', '.join(match.unmatched_lr[:5])}; HR: {', '.join(match.unmatched_hr[:5])})"
                if match.unmatched_lr or match.unmatched_hr
                else ""
            )
        )
    sizes = {}
    need = max(min_size_for_metrics(scale), scale)
    for p in match.pairs:
        lw, lh = open_image(p.lr).rgb.size
        hw, hh = open_image(p.hr).rgb.size
        if (hw, hh) != (scale * lw, scale * lh):
            raise ImageInputError(
                f"pair {p.name!r}: LR {p.lr} is {lw}x{lh} and HR {p.hr} is {hw}x{hh}; "
                f"at scale {scale} the HR must be {scale * lw}x{scale * lh}"
            )
        if min(hw, hh) < need:
            raise ImageInputError(
                f"pair {p.name!r}: HR {p.hr} is {hw}x{hh}; the metrics need at least {need}x{need}"
            )
        sizes[p.name] = ((lw, lh), (hw, hh))
    return sizes


# ---------------------------------------------------------------------------------------------------
# The crop gallery.


def gallery_crop(hr: Image.Image, scale: int, side: int = GALLERY_CROP) -> Box:
    """(x, y, w, h) in HR pixels: the square of up to `side` px (a multiple of `scale`) whose inside has
    the most local luma variance, moved up-left onto the LR pixel grid (x, y multiples of `scale`)."""
    w, h = hr.size
    c = max(scale, min(side, w, h) // scale * scale)
    x, y, _, _ = auto_crop(hr, (c, c))
    return x // scale * scale, y // scale * scale, c, c


@dataclass(frozen=True)
class Gallery:
    image: str  # the pair's name
    file: str  # relative to the report folder
    crop: Box  # HR pixels
    lr_crop: Box  # the same region in LR pixels
    zoom: int  # nearest-neighbour factor of every panel (HR pixels -> gallery pixels)
    columns: list[str]
    panel_boxes: list[Box]  # where each column's crop is in the gallery, gallery pixels
    size: tuple[int, int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_gallery(
    name: str,
    lr: Image.Image,
    hr: Image.Image,
    outputs: list[tuple[str, Image.Image]],
    scale: int,
    crop: Box,
) -> tuple[Image.Image, Gallery]:
    """One row: LR (nearest to the HR's size), each method, HR; the same `crop` of each, enlarged."""
    x, y, cw, ch = crop
    zoom = max(1, GALLERY_PANEL // max(cw, ch))
    pw, ph = cw * zoom, ch * zoom
    lr_crop = (x // scale, y // scale, cw // scale, ch // scale)
    lx, ly, lw, lh = lr_crop
    panels = [
        (
            f"LR (nearest x{scale})",
            enlarge_nearest(lr.crop((lx, ly, lx + lw, ly + lh)), scale),
        )
    ]
    panels += [(label, out.crop((x, y, x + cw, y + ch))) for label, out in outputs]
    panels += [("HR", hr.crop((x, y, x + cw, y + ch)))]
    gap, label_h = GALLERY_GAP, round(GALLERY_FONT * 1.6)
    width = gap + len(panels) * (pw + gap)
    height = gap + label_h + ph + gap + label_h + gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    boxes = []
    for i, (label, region) in enumerate(panels):
        px = gap + i * (pw + gap)
        canvas.paste(label_image(label, (pw, label_h), GALLERY_FONT), (px, gap))
        canvas.paste(enlarge_nearest(region.convert("RGB"), zoom), (px, gap + label_h))
        boxes.append((px, gap + label_h, pw, ph))
    caption = f"{name}: HR pixels x={x} y={y} {cw}x{ch} (LR x={lx} y={ly} {lw}x{lh}), shown {zoom}x"
    canvas.paste(
        label_image(caption, (width - 2 * gap, label_h), GALLERY_FONT),
        (gap, gap + label_h + ph + gap),
    )
    meta = Gallery(
        image=name,
        file=f"gallery/{name}.png",
        crop=crop,
        lr_crop=lr_crop,
        zoom=zoom,
        columns=[label for label, _ in panels],
        panel_boxes=boxes,
        size=(width, height),
    )
    return canvas, meta


# ---------------------------------------------------------------------------------------------------
# The evaluation.


@dataclass(frozen=True)
class PairsResult:
    report: Report
    match: PairMatch
    galleries: list[tuple[Gallery, Image.Image]]


def evaluate_pairs(
    match: PairMatch,
    methods: tuple[str, ...],
    runner: MethodRunner,
    scale: int,
    on_event: Callable[[str], None] | None = None,
) -> PairsResult:
    """Every pair through every method: Rows as in the synthetic mode, plus one gallery per pair.
    Call check_pairs first (this re-reads the images and trusts their sizes)."""
    rows: list[Row] = []
    galleries = []
    for p in match.pairs:
        lr, hr = open_image(p.lr).rgb, open_image(p.hr).rgb
        outputs = []
        for method in methods:
            out = runner.run(method, lr, scale)
            if out.image.size != hr.size:
                raise RuntimeError(
                    f"{p.name}: {method} returned {out.image.size}, expected {hr.size}"
                )
            rows.append(
                Row(
                    p.name,
                    hr.size,
                    method,
                    psnr_y(hr, out.image, crop=scale),
                    ssim_y(hr, out.image, crop=scale),
                    out.seconds,
                )
            )
            outputs.append((method, out.image))
        meta_image = build_gallery(
            p.name, lr, hr, outputs, scale, gallery_crop(hr, scale)
        )
        galleries.append((meta_image[1], meta_image[0]))
        if on_event is not None:
            on_event(
                p.name
                + ": "
                + ", ".join(
                    f"{r.method} {r.psnr_y:.2f} dB {r.ssim_y:.4f} {r.seconds:.3g} s"
                    for r in rows[-len(methods) :]
                )
            )
    report = Report(
        folder=str(match.pairs[0].hr.parent),
        scale=scale,
        methods=methods,
        rows=rows,
        failures=[],
        perceptual=[PerceptualStatus("lpips", False, "not computed in --pairs mode")],
        settings=evaluate_settings(LR_GIVEN),
    )
    return PairsResult(report, match, galleries)


def _finite(v: float) -> float | str:
    return v if np.isfinite(v) else "inf"


def to_json(result: PairsResult) -> dict[str, Any]:
    r = result.report
    return {
        "mode": "pairs",
        "scale": r.scale,
        "methods": list(r.methods),
        "settings": r.settings,
        "pairs": [
            {"name": p.name, "lr": p.lr.name, "hr": p.hr.name}
            for p in result.match.pairs
        ],
        "unmatched": {"lr": result.match.unmatched_lr, "hr": result.match.unmatched_hr},
        "rows": [
            {
                "image": x.image,
                "size": list(x.size),
                "method": x.method,
                "psnr_y": _finite(x.psnr_y),
                "ssim_y": x.ssim_y,
                "seconds": x.seconds,
            }
            for x in r.rows
        ],
        "means": {
            m: {
                k: (_finite(v) if isinstance(v, float) else v)
                for k, v in d.items()
                if k != "lpips"
            }
            for m, d in r.means().items()
        },
        "gallery": [g.to_dict() for g, _ in result.galleries],
    }


def to_pairs_markdown(
    result: PairsResult, lr_dir: str | Path, hr_dir: str | Path
) -> str:
    """The synthetic report's tables with the pairs protocol, the unmatched files and the gallery."""
    tables = to_markdown(result.report)
    tables = tables[tables.index("## Mean per method") :]
    r, m = result.report, result.match
    lines = [
        f"# Quality report: pairs `{Path(lr_dir).name}` -> `{Path(hr_dir).name}`",
        "",
        f"{len(m.pairs)} pair(s) evaluated; x{r.scale}; sdx4 {r.settings.get('sdx4_version')}.",
        "",
        (
            "Protocol: files are paired by name stem; each LR file is upscaled as it is by each method and "
            f"compared with its HR (exactly {r.scale}x the LR's size) by PSNR and SSIM on the BT.601 Y channel "
            f"after removing {r.scale} border pixels (the same metrics as the synthetic mode). Time: wall clock "
            "of the upscaling call alone, per image, in milliseconds (no warm-up run). LPIPS: not computed."
        ),
        "",
    ]
    sd = r.settings.get("sd_options")
    if sd:
        lines += [
            "sd settings: "
            + ", ".join(
                f"{k}={sd[k]!r}"
                for k in (
                    "prompt",
                    "negative_prompt",
                    "steps",
                    "guidance",
                    "noise_level",
                    "eta",
                    "seed",
                )
            ),
            f"model: {r.settings.get('model')}",
            "",
        ]
    if m.unmatched_lr or m.unmatched_hr:
        lines += [
            "Not evaluated, no partner: "
            + ", ".join(
                [f"LR {n}" for n in m.unmatched_lr]
                + [f"HR {n}" for n in m.unmatched_hr]
            )
            + ".",
            "",
        ]
    lines.append(tables.rstrip("\n"))
    lines += [
        "",
        "## Crop gallery",
        "",
        "The region of each HR image with the most fine detail (local luma variance), the same pixels from every method, enlarged with nearest neighbour.",
        "",
    ]
    for g, _ in result.galleries:
        x, y, w, h = g.crop
        lines += [
            f"![{g.image}: {', '.join(g.columns)}]({g.file})",
            "",
            f"{g.image}: HR x={x} y={y} {w}x{h}, shown {g.zoom}x.",
            "",
        ]
    return "\n".join(lines)


def write_pairs_report(
    result: PairsResult,
    out_dir: Path,
    lr_dir: str | Path,
    hr_dir: str | Path,
    plot: bool = True,
) -> list[Path]:
    """results.csv, report.md, report.json, quality_vs_time.png (optional) and gallery/NAME.png."""
    files: dict[str, bytes] = {
        "results.csv": to_csv(result.report).encode(),
        "report.md": to_pairs_markdown(result, lr_dir, hr_dir).encode(),
        "report.json": (json.dumps(to_json(result), indent=1) + "\n").encode(),
    }
    if plot and result.report.rows:
        files["quality_vs_time.png"] = plot_png(result.report)
    (out_dir / "gallery").mkdir(parents=True, exist_ok=True)
    written = []
    for g, image in result.galleries:
        path = out_dir / g.file
        write_atomic(path, lambda f, image=image: image.save(f, "PNG"))
        written.append(path)
    for name, data in files.items():
        write_atomic(out_dir / name, lambda f, data=data: f.write(data))
        written.append(out_dir / name)
    return written
