"""`sdx4 train` end to end on the tiny random model: exit codes, the files of a run, the JSONL logs, validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

#: On a shared, loaded 2-core machine two spinning torch threads make each tiny op ~50x slower.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def hr_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hr")
    for i in range(3):
        arr = np.random.RandomState(i).randint(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"im{i}.png")
    return folder


def test_the_command_trains_validates_and_writes_its_files(
    tiny_model_dir, hr_dir, tmp_path
):
    run = tmp_path / "run"
    args = [
        "train",
        str(hr_dir),
        "-o",
        str(run),
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--crop",
        "32",
        "--steps",
        "2",
        "--precision",
        "fp32",
        "--checkpoint-every",
        "1",
        "--val-every",
        "2",
        "--val-count",
        "1",
        "--val-steps",
        "2",
        "--rank",
        "4",
    ]
    r = run_cli(*args, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stderr and "lora.safetensors" in r.stderr
    assert (
        "loss=" in r.stderr and "step" in r.stderr
    )  # the progress bar (tqdm: loss, rate, ETA)
    names = {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()}
    assert {
        "lora.safetensors",
        "log.jsonl",
        "run.json",
        "validation.jsonl",
        "validation/step-0000002.png",
        "checkpoints/step-0000001/lora.safetensors",
        "checkpoints/step-0000002/state.pt",
    } <= names
    assert "curves.png" in names
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(
        np.isfinite(r["loss"]) for r in log
    )
    (val,) = [
        json.loads(x) for x in (run / "validation.jsonl").read_text().splitlines()
    ]
    assert {"bicubic_psnr_y", "base_psnr_y", "lora_psnr_y", "lora_ssim_y"} <= set(
        val
    ) and val["images"] == 1
    grid = Image.open(run / "validation/step-0000002.png")
    assert grid.size == (
        4 * 32,
        14 + 32,
    )  # bicubic | base | LoRA | high-res, one held-out image
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "done" and meta["options"]["rank"] == 4

    again = run_cli(*args, env=ONE_THREAD)
    assert again.returncode == 2
    assert (
        "holds another training run" in again.stderr
        and "--resume" in again.stderr
        and "Traceback" not in again.stderr
    )
    bad = run_cli("train", str(hr_dir), "-o", str(tmp_path / "x"), "--lr", "-1")
    assert (
        bad.returncode == 2
        and "sdx4: error: --lr: learning_rate must be in" in bad.stderr
    )
    assert not (tmp_path / "x").exists()
