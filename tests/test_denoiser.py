"""The denoiser's parts alone (engine/denoiser.py): guidance, the low-res conditioning, tiles, the UNet calls."""

from __future__ import annotations

import pytest
import torch

from sdx4.engine import tiling
from sdx4.engine.budget import MemoryPlan
from sdx4.engine.denoiser import Guided, LowResConditioned, Tiled, UNetCalls


def _plan(tile_size: int, overlap: int = 0, tile_batch: int = 1, unet_batch: int | None = None) -> MemoryPlan:
    return MemoryPlan(tile_size=tile_size, tile_limit=tile_size, tile_overlap=overlap, tile_batch=tile_batch, tiles=1,
                      vae_tile_size=None, estimate_bytes=0, budget_bytes=0, weights_bytes=0, unet_batch=unet_batch)


class PointwiseUNet:
    """A UNet stand-in whose output pixel depends only on the same input pixel and the sample's label:
    tiles merge back to its untiled prediction exactly (tiling.py). Records what each call got."""

    def __init__(self, oom_above: int | None = None) -> None:
        self.calls: list[tuple[tuple[int, ...], torch.Tensor]] = []
        self.oom_above = oom_above

    def __call__(self, x, t, *, encoder_hidden_states, class_labels, return_dict):
        self.calls.append((tuple(x.shape), encoder_hidden_states))
        if self.oom_above is not None and x.shape[-1] > self.oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        out = x[:, :4] * 3 + class_labels[:, None, None, None] + encoder_hidden_states[:, :1, :1, None]
        return (out,)  # B,4,h,w


def _conditioning(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    embeds = torch.randn(batch, 77, 8, generator=torch.Generator().manual_seed(0))  # B,77,D
    return embeds, torch.arange(batch) * 10  # labels differ per sample: a misaligned repeat shows


def test_guidance_is_uncond_plus_g_times_text_minus_uncond_on_a_doubled_batch():
    seen = []

    def fake(x, t):  # negative half predicts 1, positive half 3, both times (t + 1)
        seen.append(x)
        return torch.cat([torch.full_like(x[:2], 1.0), torch.full_like(x[2:], 3.0)]) * (t + 1)

    latents = torch.randn(2, 4, 8, 8)
    out = Guided(fake, 7.5)(latents, torch.tensor(1))
    assert torch.equal(seen[0], torch.cat([latents, latents]))  # [negative x n, positive x n]
    assert out.shape == (2, 4, 8, 8) and torch.all(out == 2 * (1 + 7.5 * (3 - 1)))


def test_conditioning_scales_the_latents_and_puts_them_before_the_image():
    class HalvingScheduler:
        def scale_model_input(self, x, t):
            return x / 2

    seen = []
    image = torch.randn(2, 3, 8, 8)
    latents = torch.randn(2, 4, 8, 8)
    out = LowResConditioned(lambda x, t: seen.append(x) or x[:, :4], HalvingScheduler(), image)(latents, torch.tensor(5))
    assert torch.equal(seen[0], torch.cat([latents / 2, image], dim=1))  # B,7: latents FIRST
    assert torch.equal(out, latents / 2)


def test_one_tile_is_one_unet_call_on_the_whole_input_bit_for_bit(tiny_upscaler, monkeypatch):
    """guided(conditioned(tiled(unet))) on an image that fits one tile == the hand-written diffusers step."""
    c = tiny_upscaler.components
    unet, scheduler = c.unet, c.scheduler
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)  # [negative, positive]
    labels = torch.tensor([20, 20])
    image, latents = torch.randn(2, 3, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    t = torch.tensor(500)

    def no_merge(*a, **k):
        raise AssertionError("merge_tiled called for an input that fits in one tile")

    monkeypatch.setattr(tiling, "merge_tiled", no_merge)
    tiled = Tiled(UNetCalls(unet, embeds, labels, None, pair_half=None), _plan(16), "feather", c.pad_multiple)
    denoise = Guided(LowResConditioned(tiled, scheduler, image), 9.0)
    with torch.no_grad():
        out = denoise(latents, t)
        x = torch.cat([scheduler.scale_model_input(torch.cat([latents] * 2), t), image], dim=1)  # 2,7,16,16
        uncond, text = unet(x, t, encoder_hidden_states=embeds, class_labels=labels).sample.chunk(2)
    assert torch.equal(out, uncond + 9.0 * (text - uncond))
    assert (tiled.tile_size, tiled.oom_retries) == (16, 0)


def test_tiles_merge_to_the_untiled_prediction_and_reuse_one_conditioning_tensor_per_tile_count():
    embeds, labels = _conditioning()
    fake = PointwiseUNet()
    calls = UNetCalls(fake, embeds, labels, None, pair_half=None)
    x = torch.randn(2, 7, 24, 32, generator=torch.Generator().manual_seed(2))
    untiled = calls(x, torch.tensor(1))
    assert fake.calls[0][1].data_ptr() == embeds.data_ptr()  # one tile: the given tensors themselves (a view)
    fake.calls.clear()
    tiled = Tiled(calls, _plan(16, overlap=8, tile_batch=4), "feather", 8)  # 6 tiles: calls of 4 and 2
    steps = [tiled(x, torch.tensor(1)), tiled(x, torch.tensor(1))]
    assert all(torch.equal(pred, untiled) for pred in steps)  # labels and embeddings line up tile-major
    assert [shape[0] for shape, _ in fake.calls] == [8, 4, 8, 4]  # k tiles x 2 samples per call
    # the same tensors at every step (the calls see views of them): the key/value cache hits
    e4, e2, again4, again2 = (emb.data_ptr() for _, emb in fake.calls)  # fake.calls holds them: no address reused
    assert (again4, again2) == (e4, e2) and len({e4, e2, embeds.data_ptr()}) == 3
    assert torch.equal(fake.calls[0][1], embeds.repeat(4, 1, 1))


def test_out_of_memory_halves_the_tile_and_later_steps_keep_it():
    embeds, labels = _conditioning()
    x = torch.randn(2, 7, 16, 16, generator=torch.Generator().manual_seed(3))
    reference = UNetCalls(PointwiseUNet(), embeds, labels, None, None)(x, torch.tensor(1))
    fake = PointwiseUNet(oom_above=8)
    tiled = Tiled(UNetCalls(fake, embeds, labels, None, None), _plan(16, overlap=4), "feather", 4)
    assert torch.equal(tiled(x, torch.tensor(1)), reference)
    assert (tiled.tile_size, tiled.oom_retries) == (8, 1)
    fake.calls.clear()
    assert torch.equal(tiled(x, torch.tensor(1)), reference)
    assert tiled.oom_retries == 1 and {shape[-1] for shape, _ in fake.calls} == {8}  # no second failure

    class Broken(PointwiseUNet):
        def __call__(self, x, t, **kwargs):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    broken = Tiled(UNetCalls(Broken(), embeds, labels, None, None), _plan(16, overlap=4), "feather", 4)
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        broken(x, torch.tensor(1))
    assert (broken.tile_size, broken.oom_retries) == (16, 0)


def test_unet_calls_refuse_a_batch_that_is_not_a_multiple_of_the_prompt_batch():
    embeds, labels = _conditioning(batch=2)
    calls = UNetCalls(PointwiseUNet(), embeds, labels, None, None)
    with pytest.raises(ValueError, match=r"multiple of 2 \(its prompt batch\); got \(3, 7, 8, 8\)"):
        calls(torch.zeros(3, 7, 8, 8), torch.tensor(1))


def test_a_cancel_from_another_thread_stops_a_tiled_step_within_one_unet_call(tiny_upscaler, rng_image):
    """cancel_check runs before every UNet call: a step of many tiles stops mid-step, not at its end,
    and the key/value cache the tiles filled is emptied on the way out."""
    import threading

    from sdx4.speed import kvcache

    unet = tiny_upscaler.components.unet
    calls: list[int] = []  # the kv-cache entries held at each UNet call
    reached, cancel = threading.Event(), threading.Event()
    at_cancel: list[int] = []

    def count(module, args, kwargs):
        calls.append(kvcache.remembered(unet))
        if len(calls) == 3:
            reached.set()

    def canceller() -> None:
        reached.wait(60)
        at_cancel.append(len(calls))
        cancel.set()

    class Stop(Exception):
        pass

    def check() -> None:
        if cancel.is_set():
            raise Stop

    steps_done: list[int] = []
    hook = unet.register_forward_pre_hook(count, with_kwargs=True)
    thread = threading.Thread(target=canceller)
    thread.start()
    try:
        with pytest.raises(Stop):
            tiny_upscaler(rng_image(64, 64), steps=2, seed=1, tile_size=16, tile_batch=1,
                          progress=lambda i, n: steps_done.append(i), cancel_check=check)
    finally:
        hook.remove()
        thread.join(60)
    tiles = len(tiling.plan_tiles(64, 64, 16, 4, tiny_upscaler.components.pad_multiple))
    assert tiles >= 9 and steps_done == []  # stopped inside the first step of many tile calls
    assert at_cancel and len(calls) - at_cancel[0] <= 1  # at most the call already under way ran after
    assert max(calls) > 0  # the cache was in use ...
    assert kvcache.remembered(unet) == 0  # ... and is empty after the cancel
