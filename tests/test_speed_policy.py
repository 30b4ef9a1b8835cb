"""Issue 4 core: precision policy, schedulers, prompt-embedding cache, low-memory policy."""

import numpy as np
import pytest
import torch

import sdx4
from sdx4 import models
from sdx4.models import cpu_bf16_flags, resolve_placement
from sdx4.options import SCHEDULERS, OptionsError, UpscaleOptions
from sdx4.schedulers import USUAL_STEPS, make_scheduler

X86_BF16 = "processor : 0\nflags : fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n"
X86_AMX = "flags : fpu avx512f amx_bf16 amx_tile\n"
X86_PLAIN = "flags : fpu sse avx2 avx512f\n"
ARM_BF16 = "Features : fp asimd bf16 i8mm\n"


@pytest.mark.parametrize(
    "cpuinfo, flags",
    [(X86_BF16, {"avx512_bf16"}), (X86_AMX, {"amx_bf16"}), (X86_PLAIN, set()), (ARM_BF16, {"bf16"}), ("", set())],
)
def test_bf16_detection_reads_cpu_flags(cpuinfo, flags):
    assert cpu_bf16_flags(cpuinfo) == flags


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU policy is what auto picks without CUDA")
@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_on_cpu_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(models, "cpu_bf16_flags", lambda: {"avx512_bf16"} if native else set())
    p = resolve_placement("cpu", "auto")
    assert (p.unet_dtype, p.text_dtype, p.vae_dtype) == (expected, expected, torch.float32)
    assert resolve_placement("cpu", "fp32").unet_dtype == torch.float32  # the exact-parity path stays


def test_vae_dtype_option():
    assert resolve_placement("cpu", "fp32", "bf16").vae_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="vae_dtype must be fp32 or bf16 \\(fp16 decodes to NaN\\); got 'fp16'"):
        resolve_placement("cpu", "fp32", "fp16")


def test_each_component_gets_its_dtype(tiny_model_dir):
    up = sdx4.load(str(tiny_model_dir), device="cpu", dtype="bf16", vae_dtype="bf16")
    c = up.components
    assert (c.unet.dtype, c.text_encoder.dtype, c.vae.dtype) == (torch.bfloat16,) * 3
    r = up(np.zeros((8, 8, 3), np.uint8) + 100, steps=1, seed=0)
    assert r.image.size == (32, 32)
    assert (r.metadata["unet_dtype"], r.metadata["vae_dtype"]) == ("bf16", "bf16")


def test_scheduler_option_is_validated():
    with pytest.raises(OptionsError, match="scheduler must be one of ddim, dpmpp-2m, euler, unipc; got 'plms'"):
        UpscaleOptions(scheduler="plms")
    assert set(USUAL_STEPS) == set(SCHEDULERS)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_scheduler_keeps_v_prediction_and_runs(tiny_upscaler, rng_image, name):
    s = make_scheduler(name, tiny_upscaler.components.scheduler.config)
    assert s.config.prediction_type == "v_prediction"
    img = rng_image(16, 16)
    a = tiny_upscaler(img, steps=3, seed=4, scheduler=name)
    b = tiny_upscaler(img, steps=3, seed=4, scheduler=name)
    assert a.image.size == (64, 64) and a.metadata["scheduler"] == name
    assert np.asarray(a.image).tobytes() == np.asarray(b.image).tobytes()  # no state left between images
    assert np.isfinite(np.asarray(a.image, dtype=float)).all() and np.asarray(a.image).std() > 1


def test_schedulers_differ_from_ddim(tiny_upscaler, rng_image):
    img = rng_image(16, 16)
    ddim = np.asarray(tiny_upscaler(img, steps=3, seed=4).image, dtype=int)
    dpm = np.asarray(tiny_upscaler(img, steps=3, seed=4, scheduler="dpmpp-2m").image, dtype=int)
    assert np.abs(ddim - dpm).mean() > 0.5


def test_prompt_embeddings_are_cached(tiny_model_dir, rng_image):
    up = sdx4.load(str(tiny_model_dir), device="cpu", dtype="fp32")
    img = rng_image(8, 8)
    first = up(img, prompt="a cat", negative_prompt="blur", steps=1, seed=1)
    assert up.prompt_cache.encoder_runs == 2  # prompt and negative prompt
    second = up(img, prompt="a cat", negative_prompt="blur", steps=1, seed=1)
    assert up.prompt_cache.encoder_runs == 2  # both came from the cache
    assert np.asarray(first.image).tobytes() == np.asarray(second.image).tobytes()
    up(img, prompt="a dog", negative_prompt="blur", steps=1, seed=1)
    assert up.prompt_cache.encoder_runs == 3  # only the new prompt is encoded


def test_low_memory_drops_the_text_encoder_and_gives_the_same_image(tiny_model_dir, tiny_upscaler, rng_image):
    low = sdx4.load(str(tiny_model_dir), device="cpu", dtype="fp32", low_memory=True)
    assert low.components.text_encoder is None and low.info["low_memory"] is True
    img = rng_image(8, 8)
    a = low(img, prompt="a cat", steps=2, seed=3)
    assert low.components.text_encoder is None  # dropped again after encoding
    b = tiny_upscaler(img, prompt="a cat", steps=2, seed=3)
    assert np.asarray(a.image).tobytes() == np.asarray(b.image).tobytes()
    low(img, prompt="another prompt", steps=1, seed=3)  # reloads the encoder for a new prompt
    assert low.prompt_cache.encoder_runs == 3 and low.components.text_encoder is None


def test_channels_last_only_on_the_cpu_fast_path(tiny_model_dir, tiny_upscaler):
    assert not resolve_placement("cpu", "fp32").channels_last  # the reference path keeps diffusers' layout
    assert resolve_placement("cpu", "bf16").channels_last
    assert tiny_upscaler.info["memory_format"] == "contiguous"
    conv = tiny_upscaler.components.unet.conv_in.weight
    assert conv.is_contiguous()
    fast = sdx4.load(str(tiny_model_dir), device="cpu", dtype="bf16")
    assert fast.info["memory_format"] == "channels_last"
    for w in (fast.components.unet.conv_in.weight, fast.components.vae.decoder.conv_in.weight):
        assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    r = fast(np.full((8, 8, 3), 90, np.uint8), steps=2, seed=0)
    ref = sdx4.load(str(tiny_model_dir), device="cpu", dtype="bf16")
    for m in (ref.components.unet, ref.components.vae):
        m.to(memory_format=torch.contiguous_format)
    r2 = ref(np.full((8, 8, 3), 90, np.uint8), steps=2, seed=0)
    diff = np.abs(np.asarray(r.image, dtype=int) - np.asarray(r2.image, dtype=int))
    assert diff.mean() < 1.0  # same model, another memory layout: rounding-level differences only
