"""The files of a run folder (names, the JSONL logs) and what a run returns: shared by run.py, loop.py and
validate.py (no torch)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import data as data_mod

RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"
VAL_LOG_FILE = "validation.jsonl"
LORA_FILE = "lora.safetensors"
PLOT_FILE = "curves.png"


@dataclass
class TrainResult:
    run_dir: Path
    lora: Path
    steps: int
    resumed_from: int  # 0 for a fresh run
    final_loss: float | None
    skipped: tuple[tuple[str, str], ...] = ()
    validation: list[dict[str, Any]] = field(default_factory=list)
    plot: Path | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Inputs:
    """The checked inputs of a run (before any heavy work)."""

    train: data_mod.DataSet
    val: data_mod.DataSet | None
    resume_step: int  # the checkpoint to resume from (0: none)


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_log(path: Path, step: int) -> None:
    """Keep the lines of steps <= `step` (a resumed run writes the later ones again)."""
    from .lora_file import write_bytes_atomic

    if path.is_file():
        kept = [r for r in read_log(path) if r.get("step", 0) <= step]
        write_bytes_atomic(path, "".join(json.dumps(r) + "\n" for r in kept).encode())


def smoothed(values: list[float], beta: float = 0.9) -> np.ndarray:
    out, avg = [], None
    for v in values:
        avg = v if avg is None else beta * avg + (1 - beta) * v
        out.append(avg)
    return np.asarray(out)
