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


def test_low_memory_drops_the_text_encoder_and_gives_the_same_image(tiny_model_dir, rng_image):
    keep = sdx4.load(str(tiny_model_dir), device="cpu", dtype="fp32", low_memory=False)
    low = sdx4.load(str(tiny_model_dir), device="cpu", dtype="fp32", low_memory=True)
    assert low.info["low_memory"] is True and keep.info["low_memory"] is False
    assert low.components.text_encoder is not None  # the encoder loaded with the model serves the first prompts
    img = rng_image(8, 8)
    a = low(img, prompt="a cat", negative_prompt="blur", steps=2, seed=3)
    assert low.components.text_encoder is None  # dropped once both prompts were encoded
    assert (low.prompt_cache.encoder_runs, low.prompt_cache.encoder_loads) == (2, 0)  # no reload in between
    b = keep(img, prompt="a cat", negative_prompt="blur", steps=2, seed=3)
    assert keep.components.text_encoder is not None
    assert np.asarray(a.image).tobytes() == np.asarray(b.image).tobytes()
    low(img, prompt="a cat", negative_prompt="blur", steps=1, seed=3)  # cached: no reload
    assert low.prompt_cache.encoder_loads == 0
    low(img, prompt="another prompt", negative_prompt="blur", steps=1, seed=3)  # reloads once for the new prompt
    assert (low.prompt_cache.encoder_runs, low.prompt_cache.encoder_loads) == (3, 1)
    assert low.components.text_encoder is None


def test_low_memory_default_is_on_for_the_cpu_only(tiny_model_dir):
    from sdx4.api import default_low_memory

    assert sdx4.load(str(tiny_model_dir), device="cpu", dtype="fp32").info["low_memory"] is True  # no option given
    assert (default_low_memory("cpu"), default_low_memory("cuda"), default_low_memory("mps")) == (True, False, False)


@pytest.mark.parametrize("flag, expected", [([], None), (["--low-memory"], True), (["--no-low-memory"], False)])
def test_low_memory_flag(flag, expected):
    import argparse

    from sdx4.cli import add_model_args, low_memory_arg

    p = argparse.ArgumentParser()
    add_model_args(p)
    assert low_memory_arg(p.parse_args(flag)) is expected


def test_encode_prompts_loads_the_text_encoder_once(tiny_model_dir):
    low = sdx4.load(str(tiny_model_dir), device="cpu", dtype="fp32", low_memory=True)
    low.encode_prompts(["a", "b"])
    low.encode_prompts(["c", "d", "a"])  # one reload for both new prompts, "a" is cached
    assert (low.prompt_cache.encoder_runs, low.prompt_cache.encoder_loads) == (4, 1)


def test_freed_memory_is_released_before_the_vae_decode(tiny_upscaler, rng_image, monkeypatch):
    from sdx4 import memory, pipeline

    calls = []
    real_decode = pipeline.decode_latents
    monkeypatch.setattr(memory, "release_memory", lambda: calls.append("release") or True)
    monkeypatch.setattr(pipeline, "decode_latents", lambda *a, **k: calls.append("decode") or real_decode(*a, **k))
    tiny_upscaler(rng_image(8, 8), steps=1, seed=0)
    assert calls[-2:] == ["release", "decode"]


def test_release_memory_gives_heap_back_on_glibc():
    import platform

    from sdx4.memory import release_memory

    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert release_memory() is expected


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


def test_transformer_outputs_stay_channels_last_on_the_fast_path(tiny_model_dir):
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    from sdx4.models import keep_transformer_outputs_channels_last

    ref = sdx4.load(str(tiny_model_dir), device="cpu", dtype="fp32").components.unet
    blocks = [m for m in ref.modules() if isinstance(m, Transformer2DModel)]
    assert blocks and not any("_get_output_for_continuous_inputs" in vars(m) for m in blocks)  # fp32 path: untouched
    fast = sdx4.load(str(tiny_model_dir), device="cpu", dtype="fp32").components.unet
    fast.to(memory_format=torch.channels_last)
    assert keep_transformer_outputs_channels_last(fast) == len(blocks)
    outputs = []
    hook = blocks_of(fast)[0].register_forward_hook(lambda m, i, o: outputs.append(o[0]))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 16, 16, generator=g).contiguous(memory_format=torch.channels_last)
    emb = torch.randn(2, 77, ref.config.cross_attention_dim, generator=g)
    kwargs = dict(encoder_hidden_states=emb, class_labels=torch.tensor([20, 20]), return_dict=False)
    with torch.no_grad():
        a = fast(x, torch.tensor(500), **kwargs)[0]
        b = ref(x.contiguous(), torch.tensor(500), **kwargs)[0]
    hook.remove()
    assert outputs[0].is_contiguous(memory_format=torch.channels_last) and not outputs[0].is_contiguous()
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # same values, another layout
    bf16 = sdx4.load(str(tiny_model_dir), device="cpu", dtype="bf16").components.unet
    assert all("_get_output_for_continuous_inputs" in vars(m) for m in blocks_of(bf16))  # applied at load


def blocks_of(unet):
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    return [m for m in unet.modules() if isinstance(m, Transformer2DModel)]
