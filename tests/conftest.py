"""Shared fixtures: a tiny RANDOM-weight x4 upscaler in diffusers layout, loaded through the real code."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

# Never touch the network: without this every Hub lookup retries for ~30 s on an offline machine.
os.environ["HF_HUB_OFFLINE"] = "1"
# What sdx4 measures once per machine (cpu-precision.json) goes to a folder of this test run, not ~/.cache.
os.environ["SDX4_CACHE"] = tempfile.mkdtemp(prefix="sdx4-test-cache-")

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from sdx4.model.random_model import build_random_model

    return build_random_model(tmp_path_factory.mktemp("models") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_upscaler(tiny_model_dir):
    import sdx4

    # Tests reach into its components (text encoder included): keep the text encoder loaded.
    return sdx4.load(str(tiny_model_dir), device="cpu", dtype="fp32", low_memory=False)


@pytest.fixture
def rng_image():
    """A random RGB uint8 image of a given (h, w), from a fixed seed."""

    def make(h: int = 32, w: int = 24, seed: int = 0, channels: int = 3) -> np.ndarray:
        return np.random.RandomState(seed).randint(0, 256, size=(h, w, channels), dtype=np.uint8)

    return make


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: str | None = None, timeout: float = 300):
    """Run `python -m sdx4 ...` in a subprocess with this checkout's src first on the path."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    full_env["PYTHONPATH"] = str(SRC) + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "sdx4", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )
