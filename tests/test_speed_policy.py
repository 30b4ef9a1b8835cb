"""Issue 4 core: precision policy, schedulers, prompt-embedding cache, low-memory policy."""

import numpy as np
import pytest
import torch

import sdx4
from sdx4.engine.schedulers import USUAL_STEPS, make_scheduler
from sdx4.model import loading as models
from sdx4.model import placement
from sdx4.model.loading import load_components
from sdx4.model.placement import cpu_bf16_flags, resolve_placement
from sdx4.options import SCHEDULERS, OptionsError, UpscaleOptions

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
@pytest.mark.parametrize(
    "native, speedup, expected, reason",
    [
        (True, 2.3, torch.bfloat16, "bf16: measured 2.30x the fp32 rate on this CPU (avx512_bf16)"),
        (True, 1.25, torch.bfloat16, "bf16: measured 1.25x"),
        (True, 1.2, torch.float32, "fp32: bf16 measured 1.20x the fp32 rate on this CPU (avx512_bf16), below the 1.25x"),
        (True, 0.65, torch.float32, "fp32: bf16 measured 0.65x"),
        (False, 2.3, torch.float32, "fp32: no native bf16 instructions in /proc/cpuinfo"),
    ],
)
def test_auto_dtype_on_cpu_needs_native_and_measured_faster_bf16(monkeypatch, native, speedup, expected, reason):
    measured = []
    monkeypatch.setattr(placement, "cpu_bf16_flags", lambda: {"avx512_bf16"} if native else set())
    monkeypatch.setattr(placement, "cpu_bf16_speedup", lambda: measured.append(1) or {"speedup": speedup})
    p = resolve_placement("cpu", "auto")
    assert (p.unet_dtype, p.text_dtype, p.vae_dtype) == (expected, expected, torch.float32)
    assert p.dtype_reason.startswith(reason) and p.describe()["dtype_reason"] == p.dtype_reason
    assert len(measured) == (1 if native else 0)  # no flags: nothing to measure
    explicit = resolve_placement("cpu", "fp32")
    assert explicit.unet_dtype == torch.float32 and "dtype_reason" not in explicit.describe()  # the exact-parity path stays
    assert len(measured) == (1 if native else 0)  # an explicit dtype measures nothing


def test_bf16_speedup_is_measured_once_per_machine_and_kept(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("SDX4_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(placement, "cpu_bf16_flags", lambda: {"avx512_bf16"})
    runs = []
    monkeypatch.setattr(placement, "measure_bf16_speedup", lambda: runs.append(1) or {"speedup": 0.6491, "fp32_gflops": 236.0, "bf16_gflops": 153.2})
    first = placement.cpu_bf16_speedup()
    assert (first["speedup"], first["cached"], len(runs)) == (0.649, False, 1)
    assert "avx512_bf16" in first["key"] and torch.__version__ in first["key"]
    second = placement.cpu_bf16_speedup()
    assert (second["speedup"], second["cached"], len(runs)) == (0.649, True, 1)  # read back, not measured again
    import json

    kept = json.loads((tmp_path / "cache" / "cpu-precision.json").read_text())
    assert kept == {first["key"]: {"speedup": 0.649, "fp32_gflops": 236.0, "bf16_gflops": 153.2}}
    # A damaged file is reported and measured over, not trusted.
    (tmp_path / "cache" / "cpu-precision.json").write_text("{not json")
    with caplog.at_level("WARNING", logger="sdx4"):
        third = placement.cpu_bf16_speedup()
    assert (third["cached"], len(runs)) == (False, 2) and "ignoring unreadable" in caplog.text
    # Nowhere to keep it: still answers, and says why it could not keep it.
    monkeypatch.setenv("SDX4_CACHE", str(tmp_path / "file-not-dir" / "x"))
    (tmp_path / "file-not-dir").write_text("")
    with caplog.at_level("WARNING", logger="sdx4"):
        fourth = placement.cpu_bf16_speedup()
    assert fourth["speedup"] == 0.649 and "could not keep the bf16 measurement" in caplog.text


@pytest.mark.parametrize(
    "kept, why",
    [
        ("[1, 2]", "it holds a JSON list, not an object"),
        ('{"KEY": {"speedup": "fast", "fp32_gflops": 236.0, "bf16_gflops": 153.2}}', "malformed entry"),
        ('{"KEY": {"speedup": null}}', "malformed entry"),
        ('{"KEY": {"speedup": -1.0, "fp32_gflops": 236.0, "bf16_gflops": 153.2}}', "malformed entry"),
        ('{"KEY": [0.649]}', "malformed entry"),
        ('{"KEY": {"speedup": true, "fp32_gflops": 1, "bf16_gflops": 1}}', "malformed entry"),
    ],
)
def test_a_malformed_precision_cache_is_measured_over_and_rewritten(monkeypatch, tmp_path, caplog, kept, why):
    """Wrong types in cpu-precision.json are a warning and a new measurement, never a traceback or a
    decision read from garbage; the file is rewritten with the good entry and keeps other machines'."""
    import json

    monkeypatch.setenv("SDX4_CACHE", str(tmp_path))
    monkeypatch.setattr(placement, "cpu_bf16_flags", lambda: {"avx512_bf16"})
    runs = []
    monkeypatch.setattr(placement, "measure_bf16_speedup", lambda: runs.append(1) or {"speedup": 1.5, "fp32_gflops": 100.0, "bf16_gflops": 150.0})
    key = placement.cpu_bf16_speedup()["key"]  # measured once, to learn this machine's key
    path = tmp_path / "cpu-precision.json"
    other = {"other machine": {"speedup": 0.7, "fp32_gflops": 1.0, "bf16_gflops": 0.7}}
    damaged = json.loads(kept.replace('"KEY"', json.dumps(key)))
    path.write_text(json.dumps({**damaged, **other} if isinstance(damaged, dict) else damaged))
    with caplog.at_level("WARNING", logger="sdx4"):
        got = placement.cpu_bf16_speedup()
        dtype, reason = placement._auto_cpu_dtype()
    assert (got["speedup"], got["cached"], len(runs)) == (1.5, False, 2) and why in caplog.text
    assert (dtype, reason.split(":")[0]) == (torch.bfloat16, "bf16")  # the next read is the new measurement
    rewritten = json.loads(path.read_text())
    assert rewritten[key] == {"speedup": 1.5, "fp32_gflops": 100.0, "bf16_gflops": 150.0}
    assert (rewritten.get("other machine") == other["other machine"]) is isinstance(damaged, dict)


def test_bf16_speedup_measurement_runs_both_precisions():
    m = placement.measure_bf16_speedup(reps=1)
    assert set(m) == {"speedup", "fp32_gflops", "bf16_gflops"}
    assert m["fp32_gflops"] > 0 and m["bf16_gflops"] > 0
    assert m["speedup"] == pytest.approx(m["bf16_gflops"] / m["fp32_gflops"])


def test_vae_dtype_option():
    assert resolve_placement("cpu", "fp32", "bf16").vae_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="vae_dtype must be fp32 or bf16 \\(fp16 decodes to NaN\\); got 'fp16'"):
        resolve_placement("cpu", "fp32", "fp16")


def test_each_component_gets_its_dtype(tiny_model_dir):
    up = sdx4.load(str(tiny_model_dir), device="cpu", dtype="bf16", vae_dtype="bf16", low_memory=False)
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
    up = sdx4.load(str(tiny_model_dir), device="cpu", dtype="fp32", prompts=[])  # none encoded at load
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
    low = sdx4.load(str(tiny_model_dir), device="cpu", dtype="fp32", low_memory=True, prompts=["a cat", "blur"])
    assert low.info["low_memory"] is True and keep.info["low_memory"] is False
    assert low.components.text_encoder is None  # the given prompts were encoded at load, then it was dropped
    assert keep.components.text_encoder is not None and keep.prompt_cache.encoder_runs == 0  # encodes when called
    assert (low.prompt_cache.encoder_runs, low.prompt_cache.encoder_loads) == (2, 0)
    img = rng_image(8, 8)
    a = low(img, prompt="a cat", negative_prompt="blur", steps=2, seed=3)
    assert (low.prompt_cache.encoder_runs, low.prompt_cache.encoder_loads) == (2, 0)  # both came from the cache
    b = keep(img, prompt="a cat", negative_prompt="blur", steps=2, seed=3)
    # the keep policy encoded both prompts in the call and still holds the encoder afterwards
    assert (keep.prompt_cache.encoder_runs, keep.prompt_cache.encoder_loads) == (2, 0)
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

    from sdx4.cli.args import add_model_args, low_memory_arg

    p = argparse.ArgumentParser()
    add_model_args(p)
    assert low_memory_arg(p.parse_args(flag)) is expected


def test_encode_prompts_loads_the_text_encoder_once(tiny_model_dir):
    low = sdx4.load(str(tiny_model_dir), device="cpu", dtype="fp32", low_memory=True, prompts=["a", "b"])
    low.encode_prompts(["c", "d", "a"])  # one reload for both new prompts, "a" is cached
    assert (low.prompt_cache.encoder_runs, low.prompt_cache.encoder_loads) == (4, 1)
    low.encode_prompts(["a", "d"])  # all cached: no reload
    assert (low.prompt_cache.encoder_runs, low.prompt_cache.encoder_loads) == (4, 1)


@pytest.mark.parametrize("prompts", ["a cat", ["a cat", 3]])
def test_load_prompts_must_be_a_list_of_strings(tiny_model_dir, prompts):
    with pytest.raises(TypeError, match="prompts must be a list of strings"):
        sdx4.load(str(tiny_model_dir), device="cpu", dtype="fp32", prompts=prompts)
    up = sdx4.load(str(tiny_model_dir), device="cpu", dtype="fp32", prompts=[])
    with pytest.raises(TypeError, match="prompts must be a list of strings"):
        up.encode_prompts(prompts)  # was: list("a cat") encoded five one-letter prompts
    assert up.prompt_cache.encoder_runs == 0


def test_low_memory_load_drops_the_text_encoder_before_the_unet_is_loaded(tiny_model_dir, rng_image, monkeypatch, tmp_path):
    """The peak of a low-memory load is max(text encoder, UNet + VAE), not their sum: the text encoder
    encodes the default prompts and is gone (no reference left) before the UNet's weights are read."""
    import gc
    import weakref

    monkeypatch.setenv("SDX4_CACHE", str(tmp_path / "cache"))  # a first start: the prompts are encoded, not read


    encoders: list[weakref.ref] = []
    alive_at_unet_load: list[bool] = []
    load_text, load_diffusers = models._load_text_encoder, models._load_diffusers

    def text(*a, **k):
        enc = load_text(*a, **k)
        encoders.append(weakref.ref(enc))
        return enc

    def diffusers(cls, folder, subfolder, *a, **k):
        if subfolder == "unet":
            gc.collect()
            alive_at_unet_load.append(any(r() is not None for r in encoders))
        return load_diffusers(cls, folder, subfolder, *a, **k)

    monkeypatch.setattr(models, "_load_text_encoder", text)
    monkeypatch.setattr(models, "_load_diffusers", diffusers)
    low = sdx4.load(str(tiny_model_dir), device="cpu", dtype="fp32")  # the CPU default: low memory
    assert (len(encoders), alive_at_unet_load) == (1, [False])
    assert list(low.prompt_cache._entries) == [""]  # the default prompt (and negative prompt)
    low(rng_image(8, 8), steps=1, seed=0)  # default prompts: from the cache, no reload
    assert (low.prompt_cache.encoder_runs, low.prompt_cache.encoder_loads, len(encoders)) == (1, 0, 1)
    keep = sdx4.load(str(tiny_model_dir), device="cpu", dtype="fp32", low_memory=False)
    assert alive_at_unet_load == [False, True] and keep.components.text_encoder is not None


def test_freed_memory_is_released_before_the_vae_decode(tiny_upscaler, rng_image, monkeypatch):
    from sdx4.engine import budget as memory
    from sdx4.engine import loop as pipeline

    calls = []
    real_decode = pipeline.decode_latents
    monkeypatch.setattr(memory, "release_memory", lambda: calls.append("release") or True)
    monkeypatch.setattr(pipeline, "decode_latents", lambda *a, **k: calls.append("decode") or real_decode(*a, **k))
    tiny_upscaler(rng_image(8, 8), steps=1, seed=0)
    assert calls[-2:] == ["release", "decode"]


def test_release_memory_gives_heap_back_on_glibc():
    import platform

    from sdx4.engine.budget import release_memory

    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert release_memory() is expected


def test_channels_last_on_the_cpu_in_every_precision(tiny_model_dir, tiny_upscaler):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from sdx4.model.placement import Placement

    assert resolve_placement("cpu", "fp32").channels_last and resolve_placement("cpu", "bf16").channels_last
    assert not Placement(torch.device("cuda"), torch.float16, torch.float16).channels_last  # GPUs keep diffusers' layout
    assert tiny_upscaler.info["memory_format"] == "channels_last"
    c = load_components(str(tiny_model_dir), device="cpu", dtype="fp32")  # as loaded: the UNet's weights not yet packed
    for w in (c.unet.conv_in.weight, c.vae.decoder.conv_in.weight):
        assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    image = np.random.RandomState(3).randint(0, 256, (12, 12, 3), dtype=np.uint8)
    r = tiny_upscaler(image, steps=2, seed=0)
    # The same weights in diffusers' own layout (contiguous, transformer blocks untouched): rounding only.
    ref = sdx4.load(str(tiny_model_dir), device="cpu", dtype="fp32", low_memory=False)
    ref.components.unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").eval()
    ref.components.vae = AutoencoderKL.from_pretrained(tiny_model_dir / "vae").eval()
    assert ref.components.unet.conv_in.weight.is_contiguous()
    r2 = ref(image, steps=2, seed=0)
    diff = np.abs(np.asarray(r.image, dtype=int) - np.asarray(r2.image, dtype=int))
    assert diff.max() <= 1 and diff.mean() < 0.05


def test_transformer_outputs_stay_channels_last_on_the_cpu(tiny_model_dir):
    from diffusers import UNet2DConditionModel

    from sdx4.speed.channels_last import keep_transformer_outputs_channels_last

    ref = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").eval()  # diffusers' own, untouched
    blocks = blocks_of(ref)
    assert blocks and not any("_get_output_for_continuous_inputs" in vars(m) for m in blocks)
    fast = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").eval()
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
    for dtype in ("fp32", "bf16"):  # applied at load on the CPU
        unet = sdx4.load(str(tiny_model_dir), device="cpu", dtype=dtype).components.unet
        assert all("_get_output_for_continuous_inputs" in vars(m) for m in blocks_of(unet))


def blocks_of(unet):
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    return [m for m in unet.modules() if isinstance(m, Transformer2DModel)]
