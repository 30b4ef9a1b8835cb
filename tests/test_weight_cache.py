"""The fast start: converted weights kept in the cache folder and mapped at later starts (model/weight_cache.py),
`sdx4 cache info|clear` and the opt-outs — on the tiny random model."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading

import numpy as np
import pytest

import sdx4
from sdx4.model import weight_cache, weights


def _load(folder, **kw):
    return sdx4.load(str(folder), device="cpu", dtype="fp32", low_memory=False, **kw)


def _run(up, image):
    return np.asarray(up(image, steps=2, seed=5).image)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDX4_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SDX4_WEIGHT_CACHE", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def model(tiny_model_dir, tmp_path):
    """A copy of the tiny model this test may change."""
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def _entries(cache):
    return (
        sorted((cache / "weights").glob("*.safetensors"))
        if (cache / "weights").is_dir()
        else []
    )


def _no_streaming(monkeypatch):
    """Make reading the model's own files an error: a load must come from the cache."""

    def refuse(*a, **k):
        raise AssertionError(
            "streamed from the model's files, not mapped from the cache"
        )

    monkeypatch.setattr(weights, "read_state_dict", refuse)


def test_cached_load_maps_the_weights_and_gives_bit_identical_images(
    cache, model, rng_image, monkeypatch
):
    image = rng_image(16, 16)
    plain = _load(model, weight_cache=False)
    expected = _run(plain, image)
    assert _entries(cache) == []  # the opt-out writes nothing
    first = _load(model)  # streams and keeps
    assert len(_entries(cache)) == 3  # unet, vae, text encoder
    assert np.array_equal(_run(first, image), expected)
    _no_streaming(monkeypatch)
    second = _load(model)
    assert np.array_equal(_run(second, image), expected)
    # the speed tricks still go on mapped weights; the VAE's kernels are channels-last views of the mapped bytes
    assert second.components.speed.as_dict() == plain.components.speed.as_dict()
    w = second.components.vae.decoder.conv_in.weight
    assert w.is_contiguous(memory_format=__import__("torch").channels_last)
    assert np.array_equal(
        w.detach().numpy(), plain.components.vae.decoder.conv_in.weight.detach().numpy()
    )
    for side in (cache / "weights").glob("*.json"):
        meta = json.loads(side.read_text())
        assert (
            meta["finite_checked"] is True and meta["key"]["sdx4"] == sdx4.__version__
        )
        assert meta["size"] == side.with_suffix(".safetensors").stat().st_size


def test_the_key_changes_when_the_model_file_changes(cache, model):
    unet = model / "unet" / "diffusion_pytorch_model.safetensors"
    import torch

    key = weight_cache.entry_key(unet, torch.float32, True)
    assert weight_cache.entry_key(unet, torch.bfloat16, True) != key
    assert weight_cache.entry_key(unet, torch.float32, False) != key
    _load(model)
    assert len(_entries(cache)) == 3
    st = unet.stat()
    os.utime(
        unet, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9)
    )  # the model was replaced (same size)
    assert weight_cache.entry_key(unet, torch.float32, True) != key
    _load(model)
    assert (
        len(_entries(cache)) == 4
    )  # a new UNet entry; the VAE's and text encoder's are reused


def _read(path, module):
    import torch

    return weight_cache.read(
        path,
        torch.float32,
        True,
        weights.read_header,
        lambda h, where: weights.check_against_module(
            module, h, where, "the module", warn=False
        ),
        weights.map_tensors,
    )


def _vae_entry(model):
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    vae = model / "vae" / "diffusion_pytorch_model.safetensors"
    state = weights.read_state_dict(vae, torch.float32, True)
    weight_cache.write(vae, torch.float32, True, state)
    with init_empty_weights():
        empty = AutoencoderKL.from_config(AutoencoderKL.load_config(model / "vae"))
    return (
        vae,
        empty,
        weight_cache.entry_paths(weight_cache.entry_key(vae, torch.float32, True)),
    )


def _damage(data, sidecar, how):
    size = data.stat().st_size
    if how == "truncate":
        with open(data, "r+b") as f:
            f.truncate(size // 2)
    elif how == "overwrite":  # zeros over one of the sampled blocks, the size unchanged
        at = (size - weight_cache.SAMPLE_BYTES) * 10 // (weight_cache.SAMPLE_BLOCKS - 1)
        with open(data, "r+b") as f:
            f.seek(at)
            f.write(b"\0" * 64)
    elif how == "sidecar":
        sidecar.write_text("{broken")
    else:  # an entry written by another sdx4 version under the same name
        meta = json.loads(sidecar.read_text())
        meta["key"]["sdx4"] = "0.0.0"
        sidecar.write_text(json.dumps(meta))


@pytest.mark.parametrize("how", ["truncate", "overwrite", "sidecar", "other key"])
def test_a_damaged_entry_is_found_and_removed(cache, model, caplog, how):

    vae, empty, (data, sidecar) = _vae_entry(model)
    assert _read(vae, empty) is not None
    _damage(data, sidecar, how)
    with caplog.at_level(logging.WARNING, logger="sdx4"):
        assert _read(vae, empty) is None
    assert any(
        f"weight cache: rebuilding {data.name}" in r.getMessage()
        for r in caplog.records
    )
    assert (
        not data.exists() and not sidecar.exists()
    )  # removed, so the next start writes it again


def test_a_truncated_entry_is_rebuilt_by_the_next_load(cache, model, rng_image):
    import torch

    image = rng_image(16, 16)
    expected = _run(_load(model), image)
    unet = model / "unet" / "diffusion_pytorch_model.safetensors"
    data, sidecar = weight_cache.entry_paths(
        weight_cache.entry_key(unet, torch.float32, True)
    )
    size = data.stat().st_size
    _damage(data, sidecar, "truncate")
    assert np.array_equal(_run(_load(model), image), expected)
    assert (
        data.stat().st_size == size and json.loads(sidecar.read_text())["size"] == size
    )  # rebuilt whole


def test_opt_out_by_environment(cache, model, monkeypatch):
    monkeypatch.setenv("SDX4_WEIGHT_CACHE", "0")
    _load(model)
    assert _entries(cache) == []
    assert weight_cache.enabled() is False and weight_cache.enabled(True) is False
    monkeypatch.setenv("SDX4_WEIGHT_CACHE", "1")
    assert weight_cache.enabled() is True and weight_cache.enabled(False) is False


def test_no_weight_cache_flag_reaches_load_options():
    from sdx4.cli import build_parser
    from sdx4.cli.args import load_options_from_args

    assert (
        load_options_from_args(
            build_parser().parse_args(["upscale", "x.png"])
        ).weight_cache
        is True
    )
    assert (
        load_options_from_args(
            build_parser().parse_args(["upscale", "x.png", "--no-weight-cache"])
        ).weight_cache
        is False
    )
    with pytest.raises(
        sdx4.OptionsError, match="weight_cache must be True or False; got 'no'"
    ):
        sdx4.LoadOptions(weight_cache="no")


def test_concurrent_writers_leave_one_valid_entry(cache, model):
    import torch

    vae = model / "vae" / "diffusion_pytorch_model.safetensors"
    state = weights.read_state_dict(vae, torch.float32, True)
    threads = [
        threading.Thread(
            target=weight_cache.write, args=(vae, torch.float32, True, state)
        )
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(_entries(cache)) == 1 and not list((cache / "weights").glob(".*.tmp"))
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    with init_empty_weights():
        empty = AutoencoderKL.from_config(AutoencoderKL.load_config(model / "vae"))
    kept = _read(vae, empty)
    assert kept is not None and set(kept) == set(state)
    cl = torch.channels_last
    assert all(torch.equal(kept[k], state[k]) for k in state)
    assert all(
        kept[k].is_contiguous(memory_format=cl)
        == state[k].is_contiguous(memory_format=cl)
        for k in state
        if state[k].ndim == 4
    )


def test_cache_info_and_clear(cache, model, capsys):
    from sdx4.cli import main

    _load(model)
    (cache / "estimate-calibration.json").write_text(
        "{}"
    )  # a measurement: clear removes it too
    (
        cache / "random-full-seed0"
    ).mkdir()  # what the benchmarks keep there is not sdx4's to clear
    (cache / "random-full-seed0" / "x").write_text("keep")
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert f"cache folder: {cache}" in out and "converted weights: 3 entries" in out
    assert "measurement: estimate-calibration.json" in out
    assert str(model / "unet" / "diffusion_pytorch_model.safetensors") in out
    assert main(["cache", "info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["weights"]) == 3 and info["weights_bytes"] == sum(
        p.stat().st_size for p in _entries(cache)
    )
    assert main(["cache", "clear", "--weights"]) == 0
    assert _entries(cache) == [] and (cache / "estimate-calibration.json").exists()
    assert "cleared the converted weights" in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0
    assert not (cache / "estimate-calibration.json").exists()
    assert (cache / "random-full-seed0" / "x").read_text() == "keep"


def test_each_mapped_tensor_is_unmapped_when_freed(cache, model, monkeypatch):
    import gc

    import torch

    monkeypatch.setattr(weights, "SMALL_TENSOR_BYTES", 0)  # map every tensor (the tiny model's are all small)

    vae = model / "vae" / "diffusion_pytorch_model.safetensors"
    data = weight_cache.write(
        vae, torch.float32, True, weights.read_state_dict(vae, torch.float32, True)
    )
    header, base = weights.read_header(data)
    state = weights.map_tensors(data, header, base)

    def maps() -> int:
        with open("/proc/self/maps") as f:
            return sum(str(data) in line for line in f)

    n = maps()
    assert (
        n
        >= len(
            [
                k
                for k, v in header.items()
                if v["data_offsets"][0] != v["data_offsets"][1]
            ]
        )
        > 10
    )
    name = next(iter(state))
    del state[name]
    gc.collect()
    assert (
        maps() == n - 1
    )  # freed alone (one map of the whole file would stay while any tensor lives)
    state.clear()
    gc.collect()
    assert maps() == 0


def test_small_tensors_are_read_not_mapped_so_a_start_holds_few_descriptors(cache, model):
    """Each memory map holds a file descriptor while it lives: hundreds of small tensors (biases, norms) mapped
    one by one ran a service under a 256-descriptor limit out of descriptors. Below SMALL_TENSOR_BYTES they are
    read; the values are the same."""
    import os

    import torch

    vae = model / "vae" / "diffusion_pytorch_model.safetensors"
    expected = weights.read_state_dict(vae, torch.float32, True)
    data = weight_cache.write(vae, torch.float32, True, expected)
    header, base = weights.read_header(data)
    before = len(os.listdir("/proc/self/fd"))
    state = weights.map_tensors(data, header, base)
    with open("/proc/self/maps") as f:
        maps = sum(str(data) in line for line in f)
    big = [k for k, v in header.items() if v["data_offsets"][1] - v["data_offsets"][0] >= weights.SMALL_TENSOR_BYTES]
    small = [k for k in header if k not in big]
    assert maps == len(big) < len(small) and len(header) > 10  # the small ones are most of them, and not mapped
    assert len(os.listdir("/proc/self/fd")) - before <= len(big)
    from safetensors.torch import load_file

    stored = load_file(data)  # the cache file as written
    assert set(state) == set(stored)
    assert all(torch.equal(state[name], stored[name]) for name in stored)
