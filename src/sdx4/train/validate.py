"""Validation during training: each held-out image upscaled by the base model and by the current LoRA through
the engine's own loop (`engine.loop.upscale_tensor`, a few DDIM steps), scored against the high-res original,
and shown in a grid (bicubic | base | LoRA | high-res); the loss/validation plot at the end."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..options import UpscaleOptions
from . import data as data_mod
from .files import LOG_FILE, PLOT_FILE, VAL_LOG_FILE, read_log, smoothed, truncate_log
from .lora_file import write_bytes_atomic
from .options import TrainOptions
from .step import StepModel

VAL_DIR = "validation"
COLUMNS = ("bicubic", "base", "LoRA", "high-res")


class Validator:
    def __init__(
        self,
        model: StepModel,
        components: Any,
        embeds: dict[str, torch.Tensor],
        examples: tuple[data_mod.Example, ...],
        options: TrainOptions,
        run_dir: Path,
        metrics: dict[str, Callable[[Any, Any], float]],
    ) -> None:
        self.model, self.components, self.embeds, self.options = (
            model,
            components,
            embeds,
            options,
        )
        self.run_dir, self.metrics = run_dir, metrics
        self.samples = [
            data_mod.center_sample(e, options) for e in examples
        ]  # (hr, lr) uint8
        self.prompts = [e.prompt for e in examples]
        self.base: list[Image.Image] | None = (
            None  # the base model's outputs: the same at every validation
        )
        self.results: list[dict[str, Any]] = []

    def truncate(self, step: int) -> None:
        truncate_log(self.run_dir / VAL_LOG_FILE, step)
        self.results = read_log(self.run_dir / VAL_LOG_FILE)

    def _encode(self, texts: list[str]) -> list[torch.Tensor]:
        return [self.embeds[t].to(self.components.placement.unet_dtype) for t in texts]

    def _upscale_all(self) -> list[Image.Image]:
        from ..engine.loop import to_uint8, upscale_tensor

        out = []
        for (_, lr), prompt in zip(self.samples, self.prompts):
            opts = UpscaleOptions(
                prompt=prompt, steps=self.options.val_steps, seed=self.options.seed
            )
            image = (
                torch.from_numpy(lr).permute(2, 0, 1)[None].float() / 127.5 - 1
            )  # 1,3,h,w
            generator = torch.Generator("cpu").manual_seed(self.options.seed)
            with self.model.autocast():
                up = upscale_tensor(
                    self.components, image, opts, generator, encode=self._encode
                )  # 1,3,4h,4w
            out.append(Image.fromarray(to_uint8(up)[0].numpy(), "RGB"))
        return out

    def __call__(self, step: int) -> dict[str, Any]:
        unet = self.model.unet
        unet.eval()
        try:
            if self.base is None:
                unet.disable_adapters()
                try:
                    self.base = self._upscale_all()
                finally:
                    unet.enable_adapters()
            tuned = self._upscale_all()
        finally:
            unet.train()
        hr = [Image.fromarray(h) for h, _ in self.samples]
        bicubic = [
            Image.fromarray(lr).resize(h.size, Image.Resampling.BICUBIC)
            for h, (_, lr) in zip(hr, self.samples)
        ]
        record: dict[str, Any] = {"step": step, "images": len(hr)}
        for name, fn in self.metrics.items():
            for label, images in (
                ("bicubic", bicubic),
                ("base", self.base),
                ("lora", tuned),
            ):
                record[f"{label}_{name}"] = float(
                    np.mean([fn(r, t) for r, t in zip(hr, images)])
                )
        folder = self.run_dir / VAL_DIR
        folder.mkdir(exist_ok=True)
        grid = make_grid(
            [list(row) for row in zip(bicubic, self.base, tuned, hr)], COLUMNS
        )
        path = folder / f"step-{step:07d}.png"
        import io

        buf = io.BytesIO()
        grid.save(buf, format="PNG")
        write_bytes_atomic(path, buf.getvalue())
        record["grid"] = str(path.relative_to(self.run_dir))
        with open(self.run_dir / VAL_LOG_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.results.append(record)
        return record

    def describe(self, record: dict[str, Any]) -> str:
        scores = ", ".join(
            f"{k} {v:.4g}"
            for k, v in record.items()
            if k.startswith(("bicubic_", "base_", "lora_"))
        )
        return f"validation at step {record['step']}: {scores or 'no metrics'}; grid {record['grid']}"


def make_grid(rows: list[list[Image.Image]], labels: tuple[str, ...]) -> Image.Image:
    """Rows of same-size images under a header of column labels."""
    w, h = rows[0][0].size
    header = 14
    grid = Image.new("RGB", (w * len(labels), header + h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(labels):
        draw.text((c * w + 2, 1), label, fill="black")
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid.paste(im.resize((w, h)), (c * w, header + r * h))
    return grid


def plot_curves(run_dir: Path) -> tuple[Path | None, list[str]]:
    """curves.png: the loss per step (and its running mean) and each validation score; skipped with a note
    when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None, [
            'no loss plot: matplotlib is not installed (pip install -e ".[train]")'
        ]
    steps = read_log(run_dir / LOG_FILE)
    vals = read_log(run_dir / VAL_LOG_FILE)
    scores = sorted(
        {k for r in vals for k in r if k.startswith(("bicubic_", "base_", "lora_"))}
    )
    fig, axes = plt.subplots(
        1, 2 if scores else 1, figsize=(11 if scores else 6, 4), squeeze=False
    )
    ax = axes[0][0]
    x = [r["step"] for r in steps]
    y = [r["loss"] for r in steps]
    ax.plot(x, y, alpha=0.3, label="loss")
    ax.plot(x, smoothed(y), label="running mean")
    ax.set_xlabel("step")
    ax.set_ylabel("v-prediction MSE")
    ax.set_yscale("log")
    ax.legend()
    if scores:
        ax2 = axes[0][1]
        for key in scores:
            ax2.plot(
                [r["step"] for r in vals], [r[key] for r in vals], marker="o", label=key
            )
        ax2.set_xlabel("step")
        ax2.set_title("validation")
        ax2.legend(fontsize="small")
    fig.tight_layout()
    path = run_dir / PLOT_FILE
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path, []
