"""`train()`: check everything, load the model once without the speed tricks, put a LoRA adapter on its
UNet, and run the recipe's steps (step.py) with checkpoints, a JSONL log, validation and a final
`lora.safetensors` that diffusers loads.

A run folder holds: run.json (what was asked: options, data fingerprint, model), log.jsonl (one line per
step), validation.jsonl and validation/step-N.png (when validating), checkpoints/step-N/, lora.safetensors
and curves.png at the end.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._version import __version__
from ..options import LoadOptions, OptionsError
from . import data as data_mod
from .errors import TrainInputError
from .files import RUN_FILE, Inputs, TrainResult
from .options import TrainOptions

log = logging.getLogger("sdx4")

#: reference image, test image -> score (the CLI passes sdx4.quality's PSNR-Y and SSIM-Y: a layer above).
Metric = Callable[[Any, Any], float]


def check_run_dir(run_dir: Path, resume: bool, record: dict[str, Any]) -> int:
    """Whether `run_dir` can take this run; returns the step of the checkpoint to resume from (0 = none)."""
    from .checkpoint import list_checkpoints

    if run_dir.exists() and not run_dir.is_dir():
        raise TrainInputError(f"{run_dir}: is a file, not a run folder", path=run_dir)
    run_file = run_dir / RUN_FILE
    if not resume:
        if run_file.exists():
            raise TrainInputError(
                f"{run_dir}: holds another training run ({RUN_FILE}): resume it with --resume or choose another folder",
                path=run_dir,
            )
        if run_dir.exists() and any(run_dir.iterdir()):
            raise TrainInputError(
                f"{run_dir}: is not empty and holds no training run: choose an empty or new folder",
                path=run_dir,
            )
        return 0
    if not run_file.is_file():
        raise TrainInputError(
            f"{run_dir}: nothing to resume (no {RUN_FILE}); start the run without --resume",
            path=run_dir,
        )
    try:
        old = json.loads(run_file.read_text())
    except (OSError, ValueError) as e:
        raise TrainInputError(
            f"{run_file}: cannot read it ({e})", path=run_file
        ) from None
    old_recipe = TrainOptions(**old["options"]).recipe()
    new_recipe = TrainOptions(**record["options"]).recipe()
    changed = [
        f"{k} ({old_recipe[k]!r} -> {new_recipe[k]!r})"
        for k in old_recipe
        if old_recipe[k] != new_recipe[k]
    ]
    if changed:
        raise TrainInputError(
            f"{run_dir}: the run was started with other settings; a resumed run must keep them: {', '.join(changed)}",
            path=run_dir,
        )
    for key, what in (
        ("model", "base model"),
        ("fingerprint", "training images (names, sizes, times)"),
    ):
        if old.get(key) != record[key]:
            raise TrainInputError(
                f"{run_dir}: the {what} changed since the run started; choose another folder",
                path=run_dir,
            )
    found = list_checkpoints(run_dir)
    return found[-1][0] if found else 0


def check_inputs(
    hr_dir: Path,
    run_dir: Path,
    options: TrainOptions,
    load: LoadOptions,
    *,
    pairs: Path | None,
    captions: Path | None,
    val_dir: Path | None,
    resume: bool,
) -> tuple[Inputs, dict[str, Any]]:
    """Every check a run needs, before the model is loaded."""
    if not isinstance(options, TrainOptions):
        raise TypeError(f"options must be a TrainOptions; got {type(options).__name__}")
    if load.compile:
        raise OptionsError(
            "compile: training runs the plain diffusers UNet (torch.compile is not used)",
            option="compile",
        )
    if load.dtype != "auto":
        raise OptionsError(
            "dtype: training sets the precision with TrainOptions.precision (--precision)",
            option="dtype",
        )
    dataset = data_mod.scan(hr_dir, options, pairs=pairs, captions=captions)
    val = None
    if val_dir is not None:
        val = data_mod.scan(
            val_dir,
            options.replace(pad_small=True),
            captions=None,
            what="validation images",
        )
    else:
        count = (
            options.val_count
            if options.val_count is not None
            else (1 if len(dataset.examples) >= 8 else 0)
        )
        if count and options.val_every:
            dataset, val = data_mod.split(dataset, count)
    record = {
        "sdx4_version": __version__,
        "model": load.model,
        "options": options.to_dict(),
        "fingerprint": dataset.fingerprint,
        "hr_dir": str(hr_dir),
        "pairs": None if pairs is None else str(pairs),
        "captions": None if captions is None else str(captions),
        "val_dir": None if val_dir is None else str(val_dir),
    }
    start = check_run_dir(run_dir, resume, record)
    return Inputs(dataset, val, start), record


def train(
    hr_dir: str | Path,
    run_dir: str | Path,
    options: TrainOptions | None = None,
    *,
    load: LoadOptions | None = None,
    pairs: str | Path | None = None,
    captions: str | Path | None = None,
    val_dir: str | Path | None = None,
    resume: bool = False,
    metrics: dict[str, Metric] | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    say: Callable[[str], None] | None = None,
) -> TrainResult:
    """Fine-tune a LoRA on the UNet of the x4 upscaler with the images of `hr_dir`; writes `run_dir`.

    `load` says which model and device (LoadOptions; its dtype stays "auto": `options.precision` decides).
    `pairs`: a folder of real low-res images matched to `hr_dir` by name (instead of synthetic degradation).
    `captions`: a CSV (path,prompt) or JSONL file of prompts; else NAME.txt beside each image, else "".
    `val_dir`: held-out high-res images for validation (else `options.val_count` images of `hr_dir`).
    `resume`: continue the run in `run_dir` from its last checkpoint (the result equals an uninterrupted run).
    `metrics`: name -> fn(reference, test) scored at each validation (e.g. sdx4.quality.metrics.psnr_y).
    `progress(event)` gets {"step", "steps", "loss", "lr", "seconds"} after each step; `say(line)` the messages.
    """
    options = options or TrainOptions()
    load = load or LoadOptions()
    say = say or (lambda line: log.info("%s", line))
    hr_dir, run_dir = Path(hr_dir), Path(run_dir)
    inputs, record = check_inputs(
        hr_dir,
        run_dir,
        options,
        load,
        pairs=None if pairs is None else Path(pairs),
        captions=None if captions is None else Path(captions),
        val_dir=None if val_dir is None else Path(val_dir),
        resume=resume,
    )
    for name, why in inputs.train.skipped:
        say(f"skipped {name}: {why}")
    from .loop import run_training

    return run_training(
        inputs, record, run_dir, options, load, resume, metrics or {}, progress, say
    )
