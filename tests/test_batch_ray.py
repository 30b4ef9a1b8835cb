"""The Ray engine gives the same outputs, seeds and manifest as the local engine (Ray started here, 2 CPUs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray  # the `test` extra installs ray[data]; the batch module itself imports it lazily
from _batch_util import (
    STEPS,
    make_folder,
    pixels,
    records,
    stable,
    temp_files,
    tiny_model,
)

import sdx4
from sdx4.batch import run_batch
from sdx4.batch.job import BatchJob, image_seed
from sdx4.batch.ray import RayConfig, item_from_json, item_to_json
from sdx4.cli import main
from sdx4.options import LoadOptions, UpscaleOptions


@pytest.fixture(scope="module")
def ray_session() -> Any:
    """One local Ray instance for the whole module (starting one takes seconds)."""
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Any:
    """The local engine with as many torch threads as a Ray actor has CPUs (1 here).

    On CPU the intra-op thread count changes float rounding at the last bit, which moves about one
    pixel in 15000 by one level (measured on the tiny model); with equal thread counts the engines
    agree bit for bit. Seeds, parameters and records agree regardless.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory)


def test_item_round_trips_through_json() -> None:
    from sdx4.batch.job import BatchItem

    item = BatchItem(
        "sub/a.png", ("sub/a_x4.png",), UpscaleOptions(prompt='a "cat"', seed=9, steps=3), "mapping", 4, "m"
    )
    assert item_from_json(item_to_json(item)) == item


def test_local_and_ray_engines_give_identical_outputs_and_records(
    tmp_path: Path, model: Path, ray_session: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    good = ["a.png", "b.jpg", "sub/c.png", "sub/deep/d.png", "e.png"]
    src = make_folder(tmp_path / "in", good, corrupt=["sub/broken.png"], text=["notes.md"])
    (src / "a.txt").write_text("a sidecar prompt")
    common = [
        "--model",
        str(model),
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--steps",
        str(STEPS),
        "--seed",
        "13",
        "--recursive",
    ]
    out_local, out_ray = tmp_path / "local", tmp_path / "ray"
    assert main(["upscale", str(src), "-o", str(out_local), *common]) == 1  # broken.png fails
    capsys.readouterr()
    assert main(["upscale", str(src), "-o", str(out_ray), *common, "--engine", "ray", "--workers", "2"]) == 1
    err = capsys.readouterr().err
    assert "ray: 2 worker(s), 0 GPU and 1 CPU each" in err
    assert "failed: sub/broken.png: not an image Pillow can read" in err

    local = {r["input"]: stable(r) for r in records(out_local)}
    remote = {r["input"]: stable(r) for r in records(out_ray)}
    assert len(records(out_ray)) == len(good) + 2
    assert remote == local
    assert remote["a.png"]["params"]["prompt"] == "a sidecar prompt"
    assert remote["sub/deep/d.png"]["seed"] == image_seed(13, "sub/deep/d.png")
    assert remote["sub/broken.png"]["status"] == "failed" and remote["notes.md"]["status"] == "skipped"
    for rel in good:
        name = rel.rsplit(".", 1)[0] + "_x4.png"
        assert np.array_equal(pixels(out_local / name), pixels(out_ray / name)), rel
        meta_local, meta_ray = sdx4.read_metadata(out_local / name), sdx4.read_metadata(out_ray / name)
        for meta in (meta_local, meta_ray):
            meta.pop("seconds"), meta.pop("timings")
        assert meta_ray == meta_local
    assert not np.array_equal(pixels(out_ray / "a_x4.png"), pixels(out_ray / "e_x4.png"))
    assert temp_files(out_ray) == []

    # Resume on Ray: nothing is redone (only the broken file is tried again).
    n = len(records(out_ray))
    assert main(["upscale", str(src), "-o", str(out_ray), *common, "--engine", "ray", "-q"]) == 1
    assert [(r["input"], r["status"]) for r in records(out_ray)[n:]] == [("sub/broken.png", "failed")]


def test_ray_engine_shards_match_a_local_run_through_the_api(tmp_path: Path, model: Path, ray_session: Any) -> None:
    """Half the images done locally, the rest on Ray, into one folder: same as all-local."""
    good = ["a.png", "b.png", "c.png", "d.png"]
    src = make_folder(tmp_path / "in", good)
    options = UpscaleOptions(steps=STEPS, seed=2, method="sd")
    upscaler = sdx4.load(str(model), device="cpu", dtype="fp32")

    def job(out: Path) -> BatchJob:
        return BatchJob(src, out, options, load=LoadOptions(model=str(model), device="cpu", dtype="fp32"))

    run_batch(job(tmp_path / "all"), upscaler=upscaler)
    mixed = tmp_path / "mixed"
    run_batch(job(mixed), upscaler=upscaler, order=lambda items: items[:2])  # only the first two
    summary = run_batch(job(mixed), engine="ray", ray_config=RayConfig(workers=1))
    assert sorted(summary.ok) == ["c.png", "d.png"] and summary.already_done == 2
    for rel in good:
        name = rel.replace(".png", "_x4.png")
        assert np.array_equal(pixels(tmp_path / "all" / name), pixels(mixed / name)), rel
    assert {r["input"]: stable(r) for r in records(mixed)} == {r["input"]: stable(r) for r in records(tmp_path / "all")}


def test_asking_for_gpus_the_cluster_lacks_is_an_error_not_a_hang(
    tmp_path: Path, ray_session: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    src = make_folder(tmp_path / "in", ["a.png"])
    args = ["upscale", str(src), "-o", str(tmp_path / "out"), "--method", "bicubic", "--engine", "ray"]
    assert main([*args, "--gpus-per-worker", "1"]) == 1
    assert "--gpus-per-worker 1: the Ray cluster has 0 GPU(s)" in capsys.readouterr().err
    assert not (tmp_path / "out" / "a_x4_bicubic.png").exists()
