"""The CUDA path's precision, run where it can be: fp16 UNet and text encoder, fp32 VAE, the device-agnostic
speed tricks (guidance_prefix, kvcache) on and the CPU-only ones (prepack, channels_last) off.

No GPU was lent where sdx4 was built, so on the CPU these tests load the tiny random model as CUDA would:
`sdx4.load(..., dtype="fp16", low_memory=False)` (the GPU default keeps the text encoder), with the
Placement's channels_last turned off and SDX4_PREPACK=0 (both CPU-only, and prepack leaves fp16 alone
anyway). Everything else is the code CUDA runs: the same loading into fp16, the same casts in the loop, the
same speed tricks. On a machine with a GPU the same tests also run on "cuda" (marked `cuda`; run by
benchmarks/gpu_check.sh).

Tolerance of fp16 against fp32 (same seed, same options): measured on the CPU over the four cases below,
mean absolute difference 0.040-0.043 / 255 and max 1 / 255 per image (uint8). The test allows a mean of
0.2 / 255 (~5x the measured) and a max of 2 / 255: wide enough for other kernels' rounding, far below what
a wrong dtype path gives (a different random stream differs by > 10 / 255, see test_pipeline).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import sdx4
from sdx4.model.placement import Placement
from sdx4.speed import kvcache

MEAN_TOL = 0.2  # mean |fp16 - fp32| per image, in 1/255 (measured 0.040-0.043 on the CPU)
MAX_TOL = 2  # max |fp16 - fp32| per pixel, in 1/255 (measured 1 on the CPU)
STEPS = 2
N = 2  # images per input

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
    ),
]


@contextlib.contextmanager
def placed_as_on_cuda(device: str):
    """On the CPU: no channels_last and no prepack, as on CUDA (both are CPU-only). On CUDA: nothing to do."""
    if device != "cpu":
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Placement, "channels_last", property(lambda self: False))
        mp.setenv("SDX4_PREPACK", "0")
        yield


@pytest.fixture(scope="module", params=DEVICES)
def loaded(request, tiny_model_dir):
    """{"fp16": Upscaler, "fp32": Upscaler} on one device, both loaded as on CUDA (the fp32 one is the reference)."""
    device = request.param
    with placed_as_on_cuda(device):
        yield {
            dtype: sdx4.load(str(tiny_model_dir), device=device, dtype=dtype, low_memory=False)
            for dtype in ("fp16", "fp32")
        }


def test_the_model_is_loaded_as_on_cuda(loaded):
    c = loaded["fp16"].components
    assert {p.dtype for p in c.unet.parameters()} == {torch.float16}
    assert {p.dtype for p in c.text_encoder.parameters()} == {torch.float16}
    assert {p.dtype for p in c.vae.parameters()} == {torch.float32}  # fp16 VAE gives NaN
    assert c.unet.conv_in.weight.is_contiguous() and c.vae.decoder.conv_in.weight.is_contiguous()  # not NHWC
    installed = c.speed.as_dict()
    assert installed["guidance_prefix_modules"] > 0 and installed["kv_cached_projections"] > 0, installed
    assert installed["prepacked_layers"] == 0 and installed["channels_last_blocks"] == 0, installed
    assert installed["compiled"] is False
    assert loaded["fp16"].info["memory_format"] == "contiguous"


def _record(up, hooks: list) -> dict:
    """Forward hooks on the parts of `up`'s model: dtypes in and out, UNet batch sizes, to_k calls per layer."""
    c = up.components
    rec: dict = {"text_out": [], "unet_in": [], "decoder": [], "to_k": {}}

    def on_text(m, args, out):
        rec["text_out"].append(out[0].dtype)

    def on_unet(m, args, kwargs):
        sample = args[0]
        ehs = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        rec["unet_in"].append((sample.shape[0], sample.dtype, ehs.dtype))

    def on_decoder(m, args, out):
        rec["decoder"].append((args[0].dtype, out.dtype, bool(torch.isfinite(args[0]).all() and torch.isfinite(out).all())))

    hooks.append(c.text_encoder.register_forward_hook(on_text))
    hooks.append(c.unet.register_forward_pre_hook(on_unet, with_kwargs=True))
    hooks.append(c.vae.decoder.register_forward_hook(on_decoder))
    for i, layer in enumerate(kvcache.cross_attention_layers(c.unet)):
        rec["to_k"][i] = 0

        def on_to_k(m, args, i=i):
            rec["to_k"][i] += 1

        hooks.append(layer.to_k.register_forward_pre_hook(on_to_k))
    return rec


def _run(up, image, **options):
    hooks: list = []
    rec = _record(up, hooks)
    try:
        result = up(image, steps=STEPS, seed=1234, num_images=N, **options)
    finally:
        for h in hooks:
            h.remove()
    return result, rec


CASES = {
    "guided-untiled": dict(guidance=9.0),
    "unguided-untiled": dict(guidance=1.0),
    # 32x24 input, 16 px tiles overlapping by 8: 6 tiles, in UNet calls of 4 and 2 tiles
    "guided-tiled": dict(guidance=9.0, tile_size=16, tile_overlap=8, tile_batch=4),
    "unguided-tiled": dict(guidance=1.0, tile_size=16, tile_overlap=8, tile_batch=4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fp16_run_is_finite_right_sized_and_close_to_fp32(loaded, rng_image, case):
    options = dict(CASES[case], prompt=f"a photo of a cat ({case})")  # a new prompt: the text encoder runs
    image = rng_image(32, 24, seed=7)
    ours, rec = _run(loaded["fp16"], image, **options)
    ref, _ = _run(loaded["fp32"], image, **options)
    unet = loaded["fp16"].components.unet

    # The dtypes CUDA takes: text encoder and UNet in fp16, the VAE decoding fp32 latents into fp32, finite.
    assert rec["text_out"] and set(rec["text_out"]) == {torch.float16}, rec["text_out"]
    batch = 2 * N if options["guidance"] > 1 else N
    sizes = {b for b, _, _ in rec["unet_in"]}
    tiled = "tile_size" in options
    assert sizes == ({4 * batch, 2 * batch} if tiled else {batch}), rec["unet_in"]
    assert {(s, e) for _, s, e in rec["unet_in"]} == {(torch.float16, torch.float16)}
    assert rec["decoder"] == [(torch.float32, torch.float32, True)], rec["decoder"]
    md = ours.metadata
    assert (md["unet_dtype"], md["text_encoder_dtype"], md["vae_dtype"]) == ("fp16", "fp16", "fp32")
    assert md["tiling"]["tiles"] == (6 if tiled else 1), md["tiling"]

    # The key/value cache hit: each cross-attention layer projected the prompt once per UNet batch size
    # (the repeats for k tiles are made once), not once per UNet call; and it holds nothing afterwards.
    calls = len(rec["unet_in"])
    assert calls == STEPS * len(sizes)
    assert rec["to_k"] and set(rec["to_k"].values()) == {len(sizes)}, (rec["to_k"], calls)
    assert kvcache.remembered(unet) == 0

    # Right size, a real image, close to the fp32 result.
    assert len(ours.images) == len(ref.images) == N
    for a, b in zip(ours.images, ref.images):
        assert a.size == b.size == (96, 128)
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        diff = np.abs(a - b)
        assert diff.mean() < MEAN_TOL and diff.max() <= MAX_TOL, (case, diff.mean(), diff.max())
        assert a.std() > 5  # not a constant (a NaN decode gives black)


def test_the_gpu_check_script_parses_and_its_dry_run_names_every_part(tmp_path):
    """benchmarks/gpu_check.sh (docs/gpu.md) runs only where a GPU is lent: here, its syntax and its plan."""
    import os
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WHEELS": str(tmp_path / "no-wheels")}
    r = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    plan = [line for line in r.stderr.splitlines() if line.startswith("+ [")]
    parts = [line[3:].split(",")[0].split("]")[0] for line in plan]
    assert parts == ["model", "tests", "parity", "speed-64", "speed-128", "speed-256"], plan
    assert "-m cuda" in plan[1] and "tests/test_fp16_path.py" in plan[1] and "--device cuda" in plan[2]
    assert "--size full" in plan[0] and "--steps 20" in plan[3] and "sdx4-fp16-compile,diffusers-fp16-compile" in plan[3]
    assert all("compile" not in line for line in plan[4:])
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    bad = subprocess.run(["bash", str(script), "--device", "tpu"], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "--device must be cpu or cuda; got tpu" in bad.stderr
