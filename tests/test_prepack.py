"""Packed oneDNN weights (prepack.py): same values as eager PyTorch, packed once, repacked for a new size."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sdx4
from sdx4.engine import loop as pipeline
from sdx4.speed import prepack

pytestmark = pytest.mark.skipif(not prepack.available(), reason="this torch build has no oneDNN")


def layers(dtype: torch.dtype) -> torch.nn.ModuleList:
    g = torch.Generator().manual_seed(0)
    mods = torch.nn.ModuleList([
        torch.nn.Conv2d(8, 16, 3, padding=1),
        torch.nn.Conv2d(16, 16, 3, stride=2, padding=1),  # a downsampler
        torch.nn.Conv2d(16, 8, 1, bias=False),
        torch.nn.Linear(8, 24),
        torch.nn.Linear(24, 8, bias=False),
    ])
    for p in mods.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.2
    return mods.to(dtype).eval().requires_grad_(False)


def run(mods: torch.nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    h = mods[2](mods[1](mods[0](x)))  # B,8,h,w
    t = h.flatten(2).transpose(1, 2)  # B,hw,8 (a strided view)
    return mods[4](mods[3](t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_layers_give_eager_values(dtype):
    eager, packed = layers(dtype), layers(dtype)
    assert prepack.install(packed) == 5
    x = torch.randn(2, 8, 12, 10, generator=torch.Generator().manual_seed(1)).to(dtype)
    tol = {"rtol": 0.016, "atol": 0.04} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    with torch.no_grad():
        for xin in (x, x.contiguous(memory_format=torch.channels_last)):
            a, b = run(eager, xin), run(packed, xin)
            assert a.shape == b.shape == (2, 30, 8)
            # linear layers: fp32 runs oneDNN's GEMM instead of MKL's, and eager runs small bf16 ones
            # through another kernel: rounding differences
            torch.testing.assert_close(b, a, **tol)
            assert torch.equal(packed[0](xin), eager[0](xin))  # convolutions: the same oneDNN kernel, bit for bit
    assert all(m.weight.is_mkldnn and "weight" not in m._parameters for m in packed)
    assert run(packed, x).dtype == dtype


def test_packed_weights_replace_the_plain_ones_and_count_the_same():
    mods = layers(torch.float32)
    before = pipeline.budget.weights_bytes(mods)
    prepack.install(mods)
    assert not any(m.weight.is_mkldnn for m in mods)  # packed on first use, not at install
    with torch.no_grad():
        run(mods, torch.randn(1, 8, 8, 8))
    assert all(m.weight.is_mkldnn for m in mods)
    assert len(list(mods.parameters())) == 3  # the two conv biases and one linear bias remain parameters
    assert pipeline.budget.weights_bytes(mods) == before  # nothing held twice, nothing lost from the count


def test_a_new_shape_on_two_calls_in_a_row_repacks_alternating_shapes_do_not():
    conv = layers(torch.float32)[0]
    prepack.install(conv)
    a, b = torch.randn(1, 8, 6, 6), torch.randn(2, 8, 20, 14)
    ref = torch.nn.functional.conv2d
    with torch.no_grad():
        for x, packed_for in [(a, a), (b, a), (a, a), (b, a), (b, b), (b, b), (a, b), (b, b)]:
            y = conv(x)
            assert conv._sdx4_packed_for == tuple(packed_for.shape)
            # (eager PyTorch runs tiny convolutions outside oneDNN: rounding differences)
            torch.testing.assert_close(y, ref(x, conv.weight.to_dense(), conv.bias, padding=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_do_not_depend_on_the_shapes_run_before(dtype):
    """An image must not depend on what ran before it: a layer called first with shape A and then with B
    gives, for B, exactly what a fresh layer called with B gives (one row vs many: the time embedding's
    linear layers run with one row at batch 1 and two at batch 2)."""
    g = torch.Generator().manual_seed(2)
    cases = [
        (lambda: torch.nn.Linear(128, 512), [(2, 128), (1, 128), (1, 128), (7, 128)]),
        (lambda: torch.nn.Linear(32, 64, bias=False), [(154, 32), (1, 32), (3, 77, 32)]),
        (lambda: torch.nn.Conv2d(32, 32, 3, padding=1), [(2, 32, 16, 12), (1, 32, 24, 16), (1, 32, 24, 16), (2, 32, 16, 12)]),
        (lambda: torch.nn.Conv2d(7, 32, 3, padding=1), [(2, 7, 32, 24), (2, 7, 24, 16), (1, 7, 8, 8)]),
    ]
    with torch.no_grad():
        for make, shapes in cases:
            torch.manual_seed(0)
            layer = make().to(dtype).eval()
            prepack.install(layer)
            xs = [torch.randn(s, generator=g).to(dtype) for s in shapes]
            xs = [x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 and i % 2 else x for i, x in enumerate(xs)]
            for x in xs:
                y = layer(x)
                torch.manual_seed(0)
                fresh = make().to(dtype).eval()
                prepack.install(fresh)
                assert torch.equal(y, fresh(x)), (layer, x.shape)


def test_inputs_it_cannot_run_go_to_eager_pytorch():
    conv, lin = layers(torch.float32)[0], layers(torch.float32)[3]
    prepack.install(conv), prepack.install(lin)
    with torch.no_grad():
        conv(torch.randn(1, 8, 5, 5)), lin(torch.randn(3, 8))
    assert conv.weight.is_mkldnn and lin.weight.is_mkldnn
    with pytest.raises(RuntimeError, match="Input type .* should be the same"):
        conv(torch.randn(1, 8, 5, 5, dtype=torch.bfloat16))
    x = torch.randn(3, 8, requires_grad=True)  # autograd: the packed ops have no backward
    lin(x).sum().backward()
    torch.testing.assert_close(x.grad, lin.weight.to_dense().sum(0).expand(3, 8))
    y = lin(torch.randn(8))  # 1-d input
    assert y.shape == (24,)


def test_what_is_left_alone():
    g = torch.nn.Conv2d(4, 4, 3, padding="same")
    r = torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
    h = torch.nn.Linear(4, 4).half()
    t = torch.nn.ConvTranspose2d(4, 4, 3)
    assert prepack.install(torch.nn.ModuleList([g, r, h, t])) == 0
    assert not any("forward" in vars(m) for m in (g, r, h, t))


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("SDX4_PREPACK", "0")
    assert prepack.install(layers(torch.float32)) == 0
    monkeypatch.setenv("SDX4_PREPACK", "1")
    assert prepack.install(layers(torch.float32)) == 5


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_cpu_unet_is_packed_and_gives_the_same_image(tiny_model_dir, rng_image, monkeypatch, dtype):
    image = rng_image(20, 16, seed=4)
    up = sdx4.load(str(tiny_model_dir), device="cpu", dtype=dtype)
    convs = [m for m in up.components.unet.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert convs and all("forward" in vars(m) for m in convs)
    assert prepack.installed(up.components.unet) == len(convs)
    a = up(image, steps=2, seed=7, guidance=5.0)
    assert all(m.weight.is_mkldnn for m in convs)
    monkeypatch.setenv("SDX4_PREPACK", "0")
    plain = sdx4.load(str(tiny_model_dir), device="cpu", dtype=dtype)
    assert not any("forward" in vars(m) for m in plain.components.unet.modules() if isinstance(m, torch.nn.Conv2d))
    assert prepack.installed(plain.components.unet) == 0  # (its key/value projections are wrapped by kvcache only)
    b = plain(image, steps=2, seed=7, guidance=5.0)
    diff = np.abs(np.asarray(a.image, dtype=int) - np.asarray(b.image, dtype=int))
    assert diff.max() == 0 if dtype == "bf16" else diff.max() <= 1
    assert np.asarray(a.image).std() > 5


def test_an_image_is_the_same_whatever_ran_before(tiny_model_dir, rng_image):
    """The UNet's predictions for an image, bit for bit, from a fresh load and after other sizes and
    batch sizes ran (guidance 1: batch 1 through the UNet; with guidance: batch 2)."""
    image, other = rng_image(24, 16, seed=1), rng_image(32, 24, seed=2)

    def predictions(up, guidance):
        seen = []
        hook = up.components.unet.register_forward_hook(lambda m, i, o: seen.append(o[0].clone()))
        try:
            out = up(image, steps=2, seed=5, guidance=guidance)
        finally:
            hook.remove()
        return seen, np.asarray(out.image)

    for guidance in (1.0, 6.0):
        fresh, fresh_image = predictions(sdx4.load(str(tiny_model_dir), device="cpu", dtype="fp32"), guidance)
        used = sdx4.load(str(tiny_model_dir), device="cpu", dtype="fp32")
        used(other, steps=2, seed=5, guidance=7.0 - guidance)
        for _ in range(2):
            again, again_image = predictions(used, guidance)
            assert len(again) == len(fresh) == 2
            assert all(torch.equal(a, b) for a, b in zip(again, fresh))
            assert again_image.tobytes() == fresh_image.tobytes()


def test_same_image_as_diffusers_own_pipeline(tiny_model_dir, rng_image):
    """sdx4's default CPU load (channels-last, shared guidance prefix, packed weights) against diffusers'
    StableDiffusionUpscalePipeline loaded by diffusers from the same folder, untouched."""
    from diffusers import StableDiffusionUpscalePipeline
    from PIL import Image

    image = Image.fromarray(rng_image(24, 20, seed=9))
    ours = sdx4.load(str(tiny_model_dir), device="cpu", dtype="fp32")(image, prompt="a cat", steps=3, seed=11)
    pipe = StableDiffusionUpscalePipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt="a cat", image=image, num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(11)).images[0]
    diff = np.abs(np.asarray(ours.image, dtype=int) - np.asarray(ref, dtype=int))
    assert diff.shape == (96, 80, 3) and diff.max() <= 1
    assert np.asarray(ref).std() > 5


def test_the_benchmark_counts_the_packed_ops(monkeypatch):
    bench = Path(__file__).parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))  # speed.py imports its neighbour _proc.py
    spec = importlib.util.spec_from_file_location("speed_bench", bench / "speed.py")
    speed = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "speed_bench", speed)
    spec.loader.exec_module(speed)
    from torch.utils.flop_counter import FlopCounterMode

    mods, x = layers(torch.float32), torch.randn(2, 8, 10, 10)
    counts = []
    with torch.no_grad():
        for install in (False, True):
            if install:
                prepack.install(mods)
                run(mods, x)
            counter = FlopCounterMode(display=False, custom_mapping=speed.flop_mapping())
            with counter:
                run(mods, x)
            counts.append(counter.get_total_flops())
    # conv 8->16 3x3 on 10x10, 16->16 3x3 stride 2 -> 5x5, 16->8 1x1, linear 8->24 and 24->8 on 2x25 rows
    expected = 2 * 2 * (8 * 16 * 9 * 100 + 16 * 16 * 9 * 25 + 16 * 8 * 25 + 25 * 8 * 24 + 25 * 24 * 8)
    assert counts == [expected, expected]
