"""How the model is loaded through the public API: `sdx4.load(LoadOptions)` is `sdx4.load(keywords)`,
`Upscaler.describe` says what was loaded, `Upscaler.check` refuses a budget before any work, and the
front ends (cli/, batch/, service/, quality/) reach only the public API."""

from __future__ import annotations

from pathlib import Path

import pytest

import sdx4
from sdx4.api import MemoryBudgetError
from sdx4.options import LoadOptions, UpscaleOptions

SRC = Path(sdx4.__file__).resolve().parent


def test_load_with_load_options_gives_the_same_upscaler_as_keywords(tiny_model_dir):
    by_keywords = sdx4.load(str(tiny_model_dir), device="cpu", dtype="fp32", vae_dtype="bf16", low_memory=False)
    by_options = sdx4.load(LoadOptions(model=str(tiny_model_dir), device="cpu", dtype="fp32", vae_dtype="bf16", low_memory=False))
    assert by_options.info == by_keywords.info
    assert (by_options.info["vae_dtype"], by_options.info["low_memory"], by_options.info["model"]) == ("bf16", False, str(tiny_model_dir))


def test_load_refuses_load_options_together_with_load_keywords(tiny_model_dir):
    with pytest.raises(TypeError, match=r"takes no device, compile keyword; use LoadOptions\(...\)\.replace\(device=...\)"):
        sdx4.load(LoadOptions(model=str(tiny_model_dir)), device="cpu", compile=True)


def test_load_keywords_are_checked_as_load_options_before_loading():
    with pytest.raises(sdx4.OptionsError) as e:
        sdx4.load("./no/such/model", device="tpu")  # the spelling fails before the (missing) folder is looked at
    assert (e.value.option, str(e.value)) == ("device", "device must be auto, cpu, cuda, cuda:N or mps; got 'tpu'")


def test_describe_says_what_was_loaded_and_warns_of_random_weights(tiny_upscaler, tiny_model_dir):
    assert tiny_upscaler.describe(1.26) == [
        f"loaded {tiny_model_dir} on cpu (fp32) in 1.3 s",
        "warning: this model has RANDOM WEIGHTS (made for tests/benchmarks); its output is noise",
    ]


def test_check_refuses_a_pass_the_budget_cannot_hold_before_any_work(tiny_upscaler, monkeypatch):
    from sdx4.engine import loop

    def no_work(*a, **k):
        raise AssertionError("check must not run the model")

    monkeypatch.setattr(loop, "upscale_tensor", no_work)
    budget = UpscaleOptions(max_memory=2**30)
    # 1 GiB cannot hold the whole-image tensors of a 2000x1500 input (~3.6 GB at 1.2 kB per pixel).
    with pytest.raises(MemoryBudgetError, match=r"^max_memory 1\.00 GiB is too small"):
        tiny_upscaler.check(budget, (2000, 1500))
    tiny_upscaler.check(budget, (16, 16))  # a small input fits
    tiny_upscaler.check(budget.replace(method="bicubic"), (2000, 1500))  # no model, nothing to hold
    with pytest.raises(MemoryBudgetError):  # scale 8 = two x4 passes: the second pass's input is 4x larger
        tiny_upscaler.check(budget.replace(scale=8), (500, 400))
    tiny_upscaler.check(budget, (500, 400))
