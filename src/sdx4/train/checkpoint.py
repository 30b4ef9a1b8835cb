"""Checkpoints that survive a kill -9 or a full disk: each is a folder `checkpoints/step-NNNNNNN` written
under a temporary name and renamed when complete, so only whole checkpoints ever carry a step name.

A checkpoint holds the LoRA weights exactly (lora.safetensors, fp32), and state.pt: the optimizer, the
learning-rate schedule, the AMP grad scaler, the global RNG states (torch, CUDA, numpy, python) and the
position in the data (the number of samples seen: every later draw derives from it, see data.py).
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError
from .lora_file import load_trainable_state, save_tensors, trainable_state

CHECKPOINTS = "checkpoints"
PREFIX = "step-"


@dataclass(frozen=True)
class Resumed:
    step: int
    samples: int
    path: Path


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"{PREFIX}{step:07d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (a half-written one has a temporary name and is not listed)."""
    root = run_dir / CHECKPOINTS
    found = []
    if root.is_dir():
        for p in root.iterdir():
            if (
                p.is_dir()
                and p.name.startswith(PREFIX)
                and p.name[len(PREFIX) :].isdigit()
            ):
                found.append((int(p.name[len(PREFIX) :]), p))
    return sorted(found)


def remove_partial(run_dir: Path) -> list[Path]:
    """Remove what a killed run left half-written: temporary checkpoint folders and temporary files (their
    names start with "." and end with ".tmp"). Returns what was removed."""
    removed = []
    for folder in (run_dir, run_dir / CHECKPOINTS):
        if folder.is_dir():
            for p in folder.iterdir():
                if p.name.startswith(".") and p.name.endswith(".tmp"):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                    removed.append(p)
    return removed


def rng_states() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            *np_state[2:],
        ),
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(states["python"])


def save_checkpoint(
    run_dir: Path,
    step: int,
    samples: int,
    unet: torch.nn.Module,
    optimizer: Any,
    lr_scheduler: Any,
    scaler: Any,
    keep: int,
) -> Path:
    """Write checkpoint `step` atomically and keep the newest `keep`. Out of disk (or any OSError): the
    partial folder is removed, the last good checkpoint stays, and CheckpointError says so."""
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        return final
    tmp = Path(
        tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    )
    try:
        save_tensors(tmp / "lora.safetensors", trainable_state(unet))
        state = {
            "step": step,
            "samples": samples,
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_states(),
        }
        with open(tmp / "state.pt", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        last = list_checkpoints(run_dir)
        kept = (
            f"the last good checkpoint ({last[-1][1].name}) is kept"
            if last
            else "no earlier checkpoint exists"
        )
        why = "out of disk space" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise CheckpointError(
            e.errno,
            f"cannot write checkpoint step {step} in {final.parent}: {why}; {kept}",
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: Path, unet: torch.nn.Module, optimizer: Any, lr_scheduler: Any, scaler: Any
) -> Resumed:
    """Restore everything `save_checkpoint` wrote (weights_only: a checkpoint cannot run code)."""
    from safetensors.torch import load_file

    load_trainable_state(unet, load_file(path / "lora.safetensors"))
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    set_rng_states(state["rng"])
    return Resumed(int(state["step"]), int(state["samples"]), path)
