"""Helpers shared by the batch tests (test_batch.py, test_batch_ray.py)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import sdx4

STEPS = 2
#: Fields of a manifest record that legitimately differ between two runs of the same job.
VOLATILE = ("timings",)


def tiny_model(tmp_path_factory: Any) -> Path:
    """One tiny random model per test session (shared by the batch test modules)."""
    from sdx4.model.random_model import build_random_model

    path = tmp_path_factory.getbasetemp() / "sdx4-batch-tiny-model"
    if not (path / "model_index.json").exists():
        build_random_model(path.with_name(path.name + ".partial"), "tiny", seed=0).rename(path)
    return path


def write_image(path: Path, seed: int, size: tuple[int, int] = (20, 16), mode: str = "RGB") -> Path:
    """A random image (w x h) with a given seed; JPEG for .jpg paths."""
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = len(mode)
    a = (np.random.RandomState(seed).rand(size[1], size[0], channels) * 255).astype(np.uint8)
    Image.fromarray(a if channels > 1 else a[:, :, 0], mode).save(path)
    return path


def make_folder(root: Path, good: list[str], corrupt: list[str] = (), text: list[str] = ()) -> Path:
    for i, rel in enumerate(good):
        write_image(root / rel, seed=100 + i)
    for rel in corrupt:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"\x89PNG\r\n\x1a\n this is not really a PNG")
    for rel in text:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("just some notes\n")
    return root


def records(out: Path) -> list[dict[str, Any]]:
    path = out / "sdx4-manifest.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stable(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in VOLATILE}


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGBA")).copy()


def temp_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".partial"))


def child_env() -> dict[str, str]:
    """Environment for `python -m sdx4` children: this checkout's code, offline, few threads."""
    src = str(Path(sdx4.__file__).resolve().parents[1])
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


PYTHON = sys.executable
