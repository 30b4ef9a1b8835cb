"""`sdx4 train` killed with SIGKILL mid-run, then `--resume`d: the same LoRA as an uninterrupted run, bit for bit
(CPU, fp32), and nothing half-written left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import SRC, run_cli
from PIL import Image
from safetensors.torch import load_file

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def hr_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hr")
    for i in range(2):
        arr = np.random.RandomState(i).randint(0, 256, (36, 44, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"im{i}.png")
    return folder


def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_weights(
    tiny_model_dir, hr_dir, tmp_path
):
    common = [
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--crop",
        "32",
        "--steps",
        "4",
        "--precision",
        "fp32",
        "--checkpoint-every",
        "1",
        "--keep-checkpoints",
        "10",
        "--val-every",
        "0",
        "--lr",
        "1e-3",
        "-q",
    ]
    straight = run_cli(
        "train", str(hr_dir), "-o", str(tmp_path / "straight"), *common, env=ONE_THREAD
    )
    assert straight.returncode == 0, straight.stderr

    run = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SRC), **ONE_THREAD}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdx4", "train", str(hr_dir), "-o", str(run), *common],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoints" / "step-0000002").exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "lora.safetensors").exists()

    resumed = run_cli(
        "train", str(hr_dir), "-o", str(run), *common, "--resume", env=ONE_THREAD
    )
    assert resumed.returncode == 0, resumed.stderr
    a, b = (
        load_file(tmp_path / "straight" / "lora.safetensors"),
        load_file(run / "lora.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    leftovers = [p.name for p in run.rglob(".*.tmp")]
    assert leftovers == []
