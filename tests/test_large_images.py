"""Tiled denoising through the real pipeline with a tiny random model (CPU, 2 steps)."""

from __future__ import annotations

import pytest
import torch

from sdx4.cli import main
from sdx4.engine import loop as pipeline
from sdx4.options import OptionsError, UpscaleOptions, parse_size


@pytest.fixture(scope="module")
def tiny(tiny_upscaler):
    return tiny_upscaler  # conftest: the tiny random model loaded through the real code


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # 1,3,h,w in [-1,1]


def _run(up, image, seed=1, **opts):
    report: dict = {}
    options = UpscaleOptions(steps=2, seed=seed, **opts)
    out = pipeline.upscale_tensor(up.components, image, options, torch.Generator().manual_seed(seed), report=report)
    return out, report


def test_one_tile_is_the_untiled_path_exactly(tiny, monkeypatch):
    image = _image(24, 32)
    auto, rep_auto = _run(tiny, image)
    big, rep_big = _run(tiny, image, tile_size=64, tile_overlap=8)
    assert torch.equal(auto, big)
    assert rep_auto["tiling"]["tiles"] == rep_big["tiling"]["tiles"] == 1 and not rep_big["tiling"]["tiled"]

    # The untiled path never goes through the tile merge.
    def no_merge(*a, **k):
        raise AssertionError("merge_tiled called for an image that fits in one tile")

    monkeypatch.setattr(pipeline.tiling, "merge_tiled", no_merge)
    assert torch.equal(_run(tiny, image)[0], auto)


def test_tiled_is_close_to_untiled_and_differs_from_another_seed(tiny):
    image = _image(24, 32)
    untiled, _ = _run(tiny, image)
    tiled, rep = _run(tiny, image, tile_size=16, tile_overlap=8)
    assert rep["tiling"]["tiled"] and rep["tiling"]["tiles"] == 6 and rep["tiling"]["tile_overlap"] == 8
    assert tiled.shape == untiled.shape == (1, 3, 96, 128)
    other_seed, _ = _run(tiny, image, seed=2)
    far = (other_seed - untiled).abs().mean()
    near = (tiled - untiled).abs().mean()
    assert near < 0.25 * far, (near, far)
    assert not torch.equal(tiled, untiled)  # the UNet is not pointwise: tiles do change it a little


def test_tiled_is_deterministic_and_batching_does_not_matter(tiny):
    image = _image(24, 32)
    a, _ = _run(tiny, image, tile_size=16, tile_overlap=8, tile_batch=1)
    b, _ = _run(tiny, image, tile_size=16, tile_overlap=8, tile_batch=1)
    c, rep = _run(tiny, image, tile_size=16, tile_overlap=8, tile_batch=4)
    assert torch.equal(a, b)
    assert rep["tiling"]["tile_batch"] == 4
    torch.testing.assert_close(c, a, atol=1e-4, rtol=0)  # batched convs may round differently


def test_oom_in_the_unet_halves_the_tile_and_other_errors_propagate(tiny, monkeypatch):
    image = _image(24, 32)
    reference, _ = _run(tiny, image, tile_size=16, tile_overlap=4)
    unet = tiny.components.unet
    calls = {"n": 0}

    class OomOnce:
        def __init__(self, error):
            self.error = error

        def __getattr__(self, name):
            return getattr(unet, name)

        def __call__(self, x, *a, **k):
            calls["n"] += 1
            if calls["n"] == 1:
                raise self.error
            return unet(x, *a, **k)

    monkeypatch.setattr(tiny.components, "unet", OomOnce(torch.OutOfMemoryError("CUDA out of memory")))
    out, rep = _run(tiny, image, tile_size=32, tile_overlap=4)
    assert rep["tiling"]["oom_retries"] == 1 and rep["tiling"]["tile_size"] == 16
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=0)  # 16 px tiles, as if asked for

    calls["n"] = 0
    monkeypatch.setattr(tiny.components, "unet", OomOnce(RuntimeError("mat1 and mat2 shapes cannot be multiplied")))
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        _run(tiny, image, tile_size=32, tile_overlap=4)
    assert calls["n"] == 1


def test_odd_sizes_scales_and_metadata(tiny):
    res = tiny(_image(13, 7)[0] * 0.5 + 0.5, steps=2, seed=3, tile_size=8, tile_overlap=4, color_fix="adain")
    assert res.image.size == (28, 52)
    meta = res.metadata
    assert meta["tiling"]["tiled"] and meta["tiling"]["tiles"] > 1 and meta["tiling"]["tile_blend"] == "feather"
    assert meta["vae_decode"]["attention"] in ("global", "tile-local") and meta["color_fix"] == "adain"
    assert meta["scale"] == 4 and meta["passes"] == 1 and meta["output_size"] == [28, 52]
    res3 = tiny(_image(13, 7)[0] * 0.5 + 0.5, steps=2, seed=3, scale=3)
    assert res3.image.size == (21, 39) and res3.metadata["passes"] == 1
    res5 = tiny(_image(5, 3)[0] * 0.5 + 0.5, steps=1, seed=3, scale=5, num_images=2)
    assert [im.size for im in res5.images] == [(15, 25), (15, 25)] and res5.metadata["passes"] == 2


def test_color_fix_pulls_colours_towards_the_input(tiny):
    image = _image(16, 16) * 0.3 + 0.4  # a bright, low-contrast input
    plain, _ = _run(tiny, image)
    fixed, rep = _run(tiny, image, color_fix="adain")
    assert rep["color_fix"] == "adain"
    target = image.mean(dim=(-2, -1))
    assert (fixed.mean(dim=(-2, -1)) - target).abs().max() < 0.02
    assert (plain.mean(dim=(-2, -1)) - target).abs().max() > 0.05  # random weights: far off without the fix


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("tile_size", 4, r"tile_size must be in 8\.\.4096; got 4"),
        ("tile_overlap", 60, r"tile_overlap must be in 0\.\.32; got 60"),
        ("tile_batch", 0, r"tile_batch must be in 1\.\.64; got 0"),
        ("tile_blend", "cosine", "tile_blend must be one of uniform, gaussian, feather"),
        ("color_fix", "hist", "color_fix must be one of none, adain, wavelet"),
        ("max_memory", 1000, r"max_memory must be in 1 GiB\.\.1 PiB .* got 1000 bytes"),
        ("max_memory", 6.5, "max_memory must be a number of bytes"),
        ("vae_attention_window", 8, r"vae_attention_window must be in 16\.\.1024; got 8"),
        ("vae_attention_window", 2048, r"vae_attention_window must be in 16\.\.1024; got 2048"),
        ("vae_attention_window", 64.0, r"vae_attention_window must be an integer in 16\.\.1024; got 64\.0"),
    ],
)
def test_tiling_options_are_checked(field, value, match):
    kwargs = {field: value}
    if field == "tile_overlap":
        kwargs["tile_size"] = 64
    with pytest.raises(OptionsError, match=match):
        UpscaleOptions(**kwargs)


def test_parse_size():
    assert parse_size("6GiB") == 6 * 2**30 == parse_size("6g")
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("2048") == 2048
    with pytest.raises(OptionsError, match="max_memory must be a size such as 6GiB"):
        parse_size("lots")


def test_cli_max_memory_errors_name_the_option(tmp_path, capsys):
    from PIL import Image

    src = tmp_path / "in.png"
    Image.new("RGB", (4, 4)).save(src)
    assert main(["upscale", str(src), "--max-memory", "6 bananas"]) == 2
    assert "--max-memory: max_memory must be a size" in capsys.readouterr().err
    assert main(["upscale", str(src), "--tile-size", "3"]) == 2
    assert "--tile-size: tile_size must be in 8..4096; got 3" in capsys.readouterr().err


def test_cli_refuses_a_budget_too_small_before_any_work(tmp_path, capsys, tiny_model_dir):
    from PIL import Image

    src = tmp_path / "big.png"
    Image.new("RGB", (2000, 1500)).save(src)
    # 1 GiB cannot hold the whole-image tensors of a 2000x1500 input (~3.6 GB at 1.2 kB per pixel).
    code = main(["upscale", str(src), "--model", str(tiny_model_dir), "--max-memory", "1GiB", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "big.png: --max-memory: max_memory 1.00 GiB is too small" in err
    assert list(tmp_path.iterdir()) == [src]


def test_pipeline_decodes_on_tiles_when_the_plan_says_so(tiny_upscaler, monkeypatch):
    """The memory plan's VAE tile reaches the tiled decoder, and the image matches the untiled one."""
    import dataclasses

    import numpy as np

    from sdx4.engine import loop as pipeline

    image = np.random.RandomState(3).randint(0, 256, (40, 24, 3), dtype=np.uint8)
    untiled = tiny_upscaler(image, steps=2, seed=5)
    assert untiled.metadata["vae_decode"]["tiled"] is False
    real_plan = pipeline.budget.plan_for

    def small_vae_tiles(*args, **kwargs):
        return dataclasses.replace(real_plan(*args, **kwargs), vae_tile_size=8)

    monkeypatch.setattr(pipeline.budget, "plan_for", small_vae_tiles)
    tiled = tiny_upscaler(image, steps=2, seed=5)
    report = tiled.metadata["vae_decode"]
    assert report["tiled"] is True and report["tiles"] > 1 and report["attention"] == "global"
    diff = np.abs(np.asarray(tiled.image, dtype=int) - np.asarray(untiled.image, dtype=int))
    assert diff.max() <= 1  # exact whole-image GroupNorm statistics: rounding-level differences only


@pytest.mark.parametrize("tile_size", [None, 16])
def test_split_guidance_batch_gives_the_same_image(tiny_upscaler, monkeypatch, tile_size):
    """unet_batch=1 (the plan's memory saver) runs the CFG pair as two UNet calls: same image."""
    import dataclasses

    import numpy as np

    image = np.random.RandomState(6).randint(0, 256, (24, 32, 3), dtype=np.uint8)
    opts = {"tile_size": tile_size, "tile_overlap": 8} if tile_size else {}
    whole = tiny_upscaler(image, steps=2, seed=5, **opts)
    real_plan, batches = pipeline.budget.plan_for, []

    def split(*args, **kwargs):
        return dataclasses.replace(real_plan(*args, **kwargs), unet_batch=1, tile_batch=1)

    monkeypatch.setattr(pipeline.budget, "plan_for", split)
    unet = tiny_upscaler.components.unet
    hook = unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        halves = tiny_upscaler(image, steps=2, seed=5, **opts)
    finally:
        hook.remove()
    assert set(batches) == {1} and len(batches) == 2 * 2 * halves.metadata["tiling"]["tiles"]  # 2 steps x CFG pair
    assert halves.metadata["tiling"]["unet_batch"] == 1
    diff = np.abs(np.asarray(halves.image, dtype=int) - np.asarray(whole.image, dtype=int))
    assert diff.max() <= 1


def test_vae_attention_is_global_up_to_the_window_and_windowed_beyond(tiny_upscaler, tmp_path, capsys, tiny_model_dir):
    import numpy as np
    from PIL import Image

    from sdx4.imageio import read_metadata

    image = np.random.RandomState(4).randint(0, 256, (40, 24, 3), dtype=np.uint8)  # 960 latent pixels
    default = tiny_upscaler(image, steps=2, seed=5)
    assert default.metadata["vae_decode"]["attention"] == "global"
    assert default.metadata["tiling_options"]["vae_attention_window"] == 128
    windowed = tiny_upscaler(image, steps=2, seed=5, vae_attention_window=16)  # windows <= 16x16, overlap 1: cores <= 11
    report = windowed.metadata["vae_decode"]
    assert (report["attention"], report["attention_windows"], report["tiled"]) == ("tile-local", 4 * 3, False)
    assert not np.array_equal(np.asarray(windowed.image), np.asarray(default.image))
    # the CLI flag reaches the decoder and the PNG's metadata
    src = tmp_path / "in.png"
    Image.fromarray(image).save(src)
    out = tmp_path / "out.png"
    code = main(["upscale", str(src), "--model", str(tiny_model_dir), "--steps", "2", "--seed", "5", "-q",
                 "--vae-attention-window", "16", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    meta = read_metadata(out)
    assert meta["vae_decode"]["attention"] == "tile-local" and meta["tiling_options"]["vae_attention_window"] == 16
    assert main(["upscale", str(src), "--vae-attention-window", "4"]) == 2
    assert "--vae-attention-window: vae_attention_window must be in 16..1024; got 4" in capsys.readouterr().err


def test_tiled_vae_decode_fits_its_measured_cost_into_what_is_left(tiny_upscaler, rng_image, monkeypatch):
    from sdx4.engine import budget as memory
    from sdx4.engine import decode_fit
    from sdx4.engine import loop as pipeline
    from sdx4.engine.vae import plan_decode

    seen = {}

    class Stop(Exception):
        pass

    def fake_decode(vae, latents, tile_size=None, max_attention_tokens=None, max_bytes=None, work_factor=1):
        seen.update(tile_size=tile_size, max_bytes=max_bytes, hw=tuple(latents.shape[-2:]), tokens=max_attention_tokens,
                    work_factor=work_factor)
        raise Stop

    monkeypatch.setattr(pipeline, "decode_latents", fake_decode)
    budget = 2**31 + 2**29  # small enough that the VAE decode of a 160 px input is tiled
    with pytest.raises(Stop):
        tiny_upscaler(rng_image(160, 160), steps=1, seed=0, max_memory=budget, tile_size=160)
    plan = pipeline.budget.plan_for(tiny_upscaler.components, UpscaleOptions(max_memory=budget, tile_size=160), 160, 160)
    free = budget - plan.weights_bytes - memory.global_bytes(*seen["hw"], 1)
    assert seen["max_bytes"] == free - decode_fit.TILED_DECODE_FIXED
    assert seen["work_factor"] == decode_fit.TILED_DECODE_FACTOR == 3
    assert plan.vae_tile_size is not None and seen["tile_size"] <= plan.vae_tile_size
    assert seen["tokens"] == 128 * 128  # the default vae_attention_window, squared
    vae = tiny_upscaler.components.vae
    planned = plan_decode(vae, seen["hw"], seen["tile_size"], max_bytes=seen["max_bytes"], work_factor=3).memory
    assert decode_fit.tiled_decode_bytes(planned.total) <= free
    assert planned.total >= 3 * planned.work + planned.output  # the work counted with the measured factor


def test_fit_vae_tile_shrinks_the_tile_until_the_measured_cost_fits():
    from sdx4.engine import decode_fit

    gib = 2**30
    ram = lambda t: t * t * 30_000  # planned bytes grow with the tile's area  # noqa: E731
    cost = lambda t, max_bytes: (ram(t), 0)  # nothing spilled  # noqa: E731
    t, max_bytes = decode_fit.fit_vae_tile(cost, 256, 2 * gib)
    assert max_bytes == 2 * gib - decode_fit.TILED_DECODE_FIXED
    assert t % 8 == 0 and decode_fit.tiled_decode_bytes(ram(t)) <= 2 * gib < decode_fit.tiled_decode_bytes(ram(t + 8))
    assert decode_fit.fit_vae_tile(cost, 64, 100 * gib)[0] == 64  # fits: the planner's tile stays
    assert decode_fit.fit_vae_tile(cost, 64, gib // 2)[0] == 8  # never below the grid step


def test_fit_vae_tile_takes_a_smaller_tile_when_that_spills_less():
    from sdx4.engine import decode_fit

    gib = 2**30
    # spilled bytes fall as the tile (its work) shrinks, down to nothing at 96; RAM use stays within budget
    spills = lambda t: max(0, t - 96) * 2**20  # noqa: E731
    t, _ = decode_fit.fit_vae_tile(lambda t, b: (gib, spills(t)), 136, 3 * gib)
    assert t == 96  # the largest of the tiles that spill least (all of 96 and below spill nothing)
    # never below MIN_SPILL_TILE for this, and never a tile whose decode does not fit
    t, _ = decode_fit.fit_vae_tile(lambda t, b: (gib, t * 2**20), 136, 3 * gib)
    assert t == decode_fit.MIN_SPILL_TILE == 64
    too_big = lambda t, b: (gib if t >= 120 else 3 * gib, spills(t))  # noqa: E731  smaller tiles here cost more RAM
    assert decode_fit.fit_vae_tile(too_big, 136, 3 * gib)[0] == 120
    # the planner's tile already below the floor stays
    assert decode_fit.fit_vae_tile(lambda t, b: (gib, t), 48, 3 * gib)[0] == 48


def test_low_memory_gives_the_unets_memory_to_a_decode_that_would_spill(tiny_model_dir, tiny_upscaler, rng_image, monkeypatch):
    """The low-memory policy releases the UNet after the loop when the decode would spill to disk; the
    next call loads it again; the image is the same as with the UNet kept."""
    import weakref

    import numpy as np

    import sdx4
    from sdx4.engine import budget as memory
    from sdx4.engine import decode_fit

    up = sdx4.load(str(tiny_model_dir), device="cpu", dtype="fp32", low_memory=True)
    image = rng_image(160, 160)
    c = up.components
    weights = pipeline.budget.weights_bytes(c.unet, c.vae)
    # room for the weights, the whole-image tensors and the decode's fixed part, and next to nothing else
    budget = weights + memory.global_bytes(160, 160, 1) + decode_fit.TILED_DECODE_FIXED + 2**20
    seen = {}
    real_decode = pipeline.decode_latents

    def decode(vae, latents, **kwargs):
        seen["unet_alive"] = unet_ref() is not None
        seen["max_bytes"] = kwargs["max_bytes"]
        return real_decode(vae, latents, **kwargs)

    monkeypatch.setattr(pipeline, "decode_latents", decode)
    unet_ref = weakref.ref(c.unet)
    first = up(image, steps=1, seed=3, max_memory=budget, tile_size=160)
    assert first.metadata["vae_decode"]["unet_released"] is True and c.unet is None
    assert seen["unet_alive"] is False  # gone before the decode started, not just unreferenced here
    unet_bytes = pipeline.budget.weights_bytes(tiny_upscaler.components.unet)  # packed or not (prepack.py)
    assert seen["max_bytes"] == 2**20 + unet_bytes  # its memory went to the decode
    assert first.metadata["vae_decode"]["tiled"]

    # the keep policy (and any budget where the decode does not spill) keeps the UNet: same image
    kept = tiny_upscaler(image, steps=1, seed=3, max_memory=budget, tile_size=160)
    assert kept.metadata["vae_decode"]["unet_released"] is False and tiny_upscaler.components.unet is not None
    # (the tiny UNet's 5 MB hold no more of this decode's planes; test_vae_decode shows budgets that do)
    assert kept.metadata["vae_decode"]["spilled_bytes"] >= first.metadata["vae_decode"]["spilled_bytes"] > 0
    assert np.array_equal(np.asarray(first.image), np.asarray(kept.image))

    # a compiled UNet is kept (reloading it would compile it again)
    c.unet = c.load_unet()
    c.compiled = True
    try:
        compiled = up(image, steps=1, seed=3, max_memory=budget, tile_size=160)
    finally:
        c.compiled = False
    assert compiled.metadata["vae_decode"]["unet_released"] is False and c.unet is not None
    up.components.unet = None

    # the next call loads the UNet again, and it gives the same image
    again = up(image, steps=1, seed=3)
    assert up.unet_loads == 1 and c.unet is not None
    assert again.metadata["vae_decode"]["unet_released"] is False  # the default budget: no spill
    roomy = tiny_upscaler(image, steps=1, seed=3)
    assert np.array_equal(np.asarray(again.image), np.asarray(roomy.image))
