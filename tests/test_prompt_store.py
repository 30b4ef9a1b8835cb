"""The prompts given to `sdx4.load` kept as embeddings in the cache folder (engine/prompt_store.py): a later start
reads them instead of loading and running the text encoder, with the same images — on the tiny random model."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

import sdx4
from sdx4.model import loading


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDX4_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SDX4_WEIGHT_CACHE", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def model(tiny_model_dir, tmp_path):
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def _load(folder, **kw):
    return sdx4.load(str(folder), device="cpu", dtype="fp32", low_memory=True, **kw)


def _kept(cache):
    return sorted((cache / "prompts").glob("*.safetensors")) if (cache / "prompts").is_dir() else []


def _run(up, image, **kw):
    return np.asarray(up(image, steps=2, seed=5, **kw).image)


def _count_encoder_loads(monkeypatch):
    loads = []
    real = loading._load_text_encoder

    def counted(*a, **k):
        loads.append(1)
        return real(*a, **k)

    monkeypatch.setattr(loading, "_load_text_encoder", counted)
    return loads


def test_a_second_start_reads_the_prompts_and_never_loads_the_text_encoder(cache, model, rng_image, monkeypatch):
    image = rng_image(8, 8)
    first = _load(model, prompts=["a cat", "blur"])
    assert (first.prompt_cache.encoder_runs, first.prompt_cache.kept_reads) == (2, 0)
    assert len(_kept(cache)) == 2
    a = _run(first, image, prompt="a cat", negative_prompt="blur")

    loads = _count_encoder_loads(monkeypatch)
    second = _load(model, prompts=["a cat", "blur"])
    assert (second.prompt_cache.encoder_runs, second.prompt_cache.kept_reads) == (0, 2)
    assert loads == [] and second.components.text_encoder is None
    assert second.components.text_encoder_loaded is False
    b = _run(second, image, prompt="a cat", negative_prompt="blur")
    assert a.tobytes() == b.tobytes()  # bit for bit the image of the start that encoded them
    assert loads == []  # the run used the kept embeddings

    monkeypatch.setenv("SDX4_WEIGHT_CACHE", "0")  # the same switch turns the prompt store off
    plain = _load(model, prompts=["a cat", "blur"])
    assert (plain.prompt_cache.encoder_runs, plain.prompt_cache.kept_reads) == (2, 0)
    assert _run(plain, image, prompt="a cat", negative_prompt="blur").tobytes() == a.tobytes()


def test_a_new_prompt_after_a_kept_start_loads_the_encoder_once_and_is_not_written(cache, model, rng_image, monkeypatch):
    image = rng_image(8, 8)
    _load(model)  # the default prompts: kept
    kept = _kept(cache)
    assert len(kept) == 1  # prompt and negative prompt are both "" by default
    up = _load(model)
    assert up.prompt_cache.kept_reads == 1 and up.components.text_encoder is None
    loads = _count_encoder_loads(monkeypatch)
    got = _run(up, image, prompt="a secret prompt")
    assert len(loads) == 1 and up.prompt_cache.encoder_runs == 1
    assert up.prompt_cache.encoder_loads == 0  # the first load of this process is not a reload
    assert up.components.text_encoder is None  # dropped again (low-memory policy)
    assert _kept(cache) == kept  # prompts of later calls never reach the disk
    monkeypatch.setenv("SDX4_WEIGHT_CACHE", "0")
    assert got.tobytes() == _run(_load(model), image, prompt="a secret prompt").tobytes()
    for path in _kept(cache):
        assert b"secret" not in path.read_bytes() and b"a cat" not in path.read_bytes()


def test_the_file_holds_a_hash_of_the_prompt_not_its_text(cache, model):
    _load(model, prompts=["a photo of my passport"])
    (path,) = _kept(cache)
    data = path.read_bytes()
    assert b"passport" not in data
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    key = json.loads(header["__metadata__"]["key"])
    assert len(key["prompt_sha256"]) == 64 and key["device"] == "cpu" and key["stored_dtype"] == "float32"
    assert key["source"].endswith("text_encoder/model.safetensors")


def test_a_changed_tokenizer_or_dtype_is_a_new_entry(cache, model):
    _load(model, prompts=["a cat"])
    assert len(_kept(cache)) == 1
    vocab = model / "tokenizer" / "vocab.json"
    vocab.write_text(json.dumps(json.loads(vocab.read_text()), indent=2))  # the same vocabulary, other bytes
    up = _load(model, prompts=["a cat"])
    assert up.prompt_cache.kept_reads == 0 and up.prompt_cache.encoder_runs == 1
    bf16 = sdx4.load(str(model), device="cpu", dtype="bf16", low_memory=True, prompts=["a cat"])
    assert bf16.prompt_cache.kept_reads == 0
    assert len(_kept(cache)) == 3


@pytest.mark.parametrize("damage", ["garbage", "other key", "nan"])
def test_a_damaged_entry_is_ignored_replaced_and_warned_about(cache, model, rng_image, damage, caplog):
    import torch
    from safetensors.torch import load_file, save_file

    image = rng_image(8, 8)
    good = _run(_load(model, prompts=["a cat"]), image, prompt="a cat")
    (path,) = _kept(cache)
    if damage == "garbage":
        path.write_bytes(b"\x00" * 100)
    else:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
        if damage == "nan":
            tensors["embeds"][0, 0, 0] = float("nan")
        else:
            key = json.loads(meta["key"])
            meta = {"key": json.dumps({**key, "prompt_sha256": "0" * 64})}
        save_file(tensors, str(path), metadata=meta)
    with caplog.at_level(logging.WARNING, logger="sdx4"):
        up = _load(model, prompts=["a cat"])
    assert "prompt cache: ignoring" in caplog.text
    assert (up.prompt_cache.kept_reads, up.prompt_cache.encoder_runs) == (0, 1)
    assert _run(up, image, prompt="a cat").tobytes() == good.tobytes()
    (again,) = _kept(cache)
    assert torch.isfinite(load_file(str(again))["embeds"]).all()


def test_the_keep_policy_loads_the_encoder_at_load_as_before(cache, model):
    loads = []
    real = loading._load_text_encoder
    loading._load_text_encoder = lambda *a, **k: loads.append(1) or real(*a, **k)
    try:
        up = sdx4.load(str(model), device="cpu", dtype="fp32", low_memory=False)
    finally:
        loading._load_text_encoder = real
    assert loads == [1] and up.components.text_encoder is not None and up.text_load_seconds is not None
    assert _kept(cache) == []  # nothing encoded at load under this policy, nothing kept


def test_cache_info_counts_the_kept_prompts_and_clear_weights_removes_them(cache, model, capsys):
    from sdx4.cli import main

    _load(model, prompts=["a cat", "blur"])
    assert main(["cache", "info"]) == 0
    assert "prompt embeddings: 2 entries" in capsys.readouterr().out
    assert main(["cache", "info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["prompts"] == 2 and info["prompts_bytes"] == sum(p.stat().st_size for p in _kept(cache))
    assert main(["cache", "clear", "--weights"]) == 0
    assert "cleared the converted weights and prompt embeddings" in capsys.readouterr().out
    assert _kept(cache) == [] and not (cache / "prompts").exists()


def test_a_kept_start_knows_what_a_new_prompt_will_cost(cache, model, rng_image):
    first = _load(model, prompts=["a cat"])
    assert first.text_load_seconds > 0 and first.text_encode_seconds > 0
    second = _load(model, prompts=["a cat"])
    assert second.prompt_cache.kept_reads == 1 and second.components.text_encoder is None
    # the timings measured by the start that wrote the entry, kept with it, so the estimate of a new prompt
    # still counts loading and running the encoder
    assert (second.text_load_seconds, second.text_encode_seconds) == (first.text_load_seconds, first.text_encode_seconds)
    est = second.estimate(rng_image(8, 8), prompt="a new prompt", steps=2)
    assert est.parts["text_encoding"] >= second.text_load_seconds + second.text_encode_seconds * 0.99


def test_a_prompt_that_is_not_text_is_refused_naming_it_before_loading(cache, model, tmp_path, capsys, monkeypatch):
    from sdx4.cli import main
    from sdx4.options import OptionsError, UpscaleOptions

    bad = b"caf\xff".decode("utf-8", "surrogateescape")  # how Python hands over a command-line byte that is not UTF-8
    with pytest.raises(OptionsError, match=r"negative_prompt is not valid text: character '\\udcff' at position 3"):
        UpscaleOptions(negative_prompt=bad)
    loads = _count_encoder_loads(monkeypatch)
    with pytest.raises(OptionsError, match="prompts is not valid text"):
        _load(model, prompts=[bad])
    assert loads == [] and not cache.exists()  # refused before any loading or writing
    img = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(img)
    code = main(["upscale", str(img), "--model", str(model), "--prompt", bad, "-o", str(tmp_path / "out.png")])
    err = capsys.readouterr().err
    assert code == 2 and "prompt is not valid text" in err and "Traceback" not in err
    assert not (tmp_path / "out.png").exists()


def test_a_damaged_entry_in_a_cache_that_cannot_be_written_is_ignored(cache, model, rng_image, monkeypatch, caplog):
    import pathlib

    image = rng_image(8, 8)
    good = _run(_load(model, prompts=["a cat"]), image, prompt="a cat")
    (path,) = _kept(cache)
    path.write_bytes(b"\x00" * 64)
    real = pathlib.Path.unlink

    def read_only(self, *a, **k):
        if self.parent.name == "prompts":
            raise PermissionError(13, "Read-only file system", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "unlink", read_only)
    with caplog.at_level(logging.WARNING, logger="sdx4"):
        up = _load(model, prompts=["a cat"])  # was: the PermissionError escaped and the load failed
    assert "prompt cache: could not remove" in caplog.text
    assert up.prompt_cache.encoder_runs == 1 and _run(up, image, prompt="a cat").tobytes() == good.tobytes()


def test_kept_timings_that_are_not_finite_are_dropped(cache, model):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    _load(model, prompts=["a cat"])
    (path,) = _kept(cache)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    meta["timing"] = '{"encoder_load_s": Infinity, "encode_s": 0.25}'
    save_file(load_file(str(path)), str(path), metadata=meta)
    up = _load(model, prompts=["a cat"])
    assert up.prompt_cache.kept_timing == {"encode_s": 0.25} and up.text_load_seconds is None
