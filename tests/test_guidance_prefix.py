"""The UNet's text-free prefix runs once per guidance pair: same prediction, half the batch there."""

import threading

import numpy as np
import pytest
import torch

from sdx4.engine import tiling
from sdx4.options import UpscaleOptions
from sdx4.speed import guidance_prefix


@pytest.fixture
def unet(tiny_upscaler):
    return tiny_upscaler.components.unet


def _batch_sizes(module):
    """Record the batch size of every call of `module` (a hook, removed by the caller)."""
    seen: list[int] = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    return seen, handle


def _pairs(pairs: int, half: int, size: int = 16, seed: int = 0):
    """A guided batch as the pipeline builds it: per pair (tile) [negative x half, positive x half], the same
    latents and noise level in both halves, different text embeddings."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(half, 7, size, size, generator=g).repeat(2, 1, 1, 1) for _ in range(pairs)])
    labels = torch.tensor([20, 30][:half] * 2 * pairs)
    emb = torch.randn(pairs * 2 * half, 77, 32, generator=g)
    return x, labels, emb


def test_the_prefix_is_the_text_free_start_of_the_unet(unet):
    mods = guidance_prefix.prefix_modules(unet)
    assert mods == [unet.down_blocks[0], unet.down_blocks[1].resnets[0]]
    assert not unet.down_blocks[0].__dict__.get("has_cross_attention", False)
    assert unet.down_blocks[1].has_cross_attention
    assert all(getattr(m, "_sdx4_prefix", False) for m in mods)  # installed at load
    assert guidance_prefix.install(unet) == 2  # idempotent: wraps nothing twice


@pytest.mark.parametrize("pairs, half", [(1, 1), (1, 2), (3, 1), (2, 2)])
def test_shared_prefix_gives_the_same_prediction_on_half_the_batch(unet, pairs, half):
    x, labels, emb = _pairs(pairs, half)
    assert emb.shape[-1] == unet.config.cross_attention_dim
    t = torch.tensor(500)
    assert guidance_prefix.pairs_equal(x, labels, half)
    with torch.no_grad():
        full = unet(x, t, encoder_hidden_states=emb, class_labels=labels, return_dict=False)[0]
        seen, handle = _batch_sizes(unet.down_blocks[0].resnets[0])
        try:
            with guidance_prefix.shared(pairs, half):
                shared = unet(x, t, encoder_hidden_states=emb, class_labels=labels, return_dict=False)[0]
            after = unet(x, t, encoder_hidden_states=emb, class_labels=labels, return_dict=False)[0]
        finally:
            handle.remove()
    assert seen == [pairs * half, 2 * pairs * half]  # half the batch inside `shared`, all of it after
    assert shared.shape == full.shape == (2 * pairs * half, 4, 16, 16)
    torch.testing.assert_close(shared, full, rtol=0, atol=1e-5)
    assert torch.equal(after, full)
    # the halves of a pair differ (the text differs): the copy happened before the text came in
    assert (full[:half] - full[half : 2 * half]).abs().max() > 1e-3


def test_pairs_equal_refuses_anything_but_repeated_halves():
    x, labels, _ = _pairs(2, 1)
    assert guidance_prefix.pairs_equal(x, labels, 1)
    assert not guidance_prefix.pairs_equal(x, labels, 2)  # pairs of 2+2 samples: tile 1's halves differ
    y = x.clone()
    y[3, 0, 0, 0] += 1e-6  # the positive half of the second pair differs by one value
    assert not guidance_prefix.pairs_equal(y, labels, 1)
    assert not guidance_prefix.pairs_equal(x, torch.tensor([20, 20, 20, 21]), 1)  # noise levels differ
    assert not guidance_prefix.pairs_equal(x[:3], labels[:3], 1)  # not a whole number of pairs
    assert not guidance_prefix.pairs_equal(x, labels, 0)


def test_shared_is_per_thread_and_restored_on_errors(unet):
    x, labels, emb = _pairs(1, 1)
    t = torch.tensor(10)
    seen, handle = _batch_sizes(unet.down_blocks[0].resnets[0])
    other: list[BaseException] = []

    def elsewhere():
        try:
            with torch.no_grad():
                unet(x, t, encoder_hidden_states=emb, class_labels=labels, return_dict=False)
        except BaseException as e:  # re-raised below, in the test's thread
            other.append(e)

    try:
        with pytest.raises(RuntimeError, match="boom"), guidance_prefix.shared(1, 1):
            th = threading.Thread(target=elsewhere)
            th.start()
            th.join()
            raise RuntimeError("boom")
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=emb, class_labels=labels, return_dict=False)
    finally:
        handle.remove()
    assert not other
    assert seen == [2, 2]  # the other thread and the call after the error both ran the whole batch


@pytest.mark.parametrize("guidance, tiles", [(9.0, None), (9.0, 8), (1.0, None)])
def test_the_pipeline_shares_the_prefix_only_with_guidance(tiny_upscaler, rng_image, monkeypatch, guidance, tiles):
    """Untiled and tiled (tile-major pairs), the guided loop runs the prefix on half its batch, with the
    image unchanged beyond batch-size rounding; without guidance there are no pairs."""
    img = rng_image(16, 16)
    opts = UpscaleOptions(steps=2, seed=5, guidance=guidance, tile_size=tiles, tile_overlap=4 if tiles else None, tile_batch=2 if tiles else None)
    unet = tiny_upscaler.components.unet
    seen, handle = _batch_sizes(unet.down_blocks[0].resnets[0])
    try:
        shared = tiny_upscaler(img, opts)
        n_shared = list(seen)
        seen.clear()
        monkeypatch.setattr(guidance_prefix, "pairs_equal", lambda *a: False)
        plain = tiny_upscaler(img, opts)
    finally:
        handle.remove()
    # tiles per UNet call, each step: all of them untiled; 9 tiles of 8 (overlap 4) in calls of 2 tiled
    per_step = [1] if tiles is None else [2, 2, 2, 2, 1]
    assert tiles is None or len(tiling.plan_tiles(16, 16, 8, 4, tiny_upscaler.components.pad_multiple)) == 9
    if guidance > 1:  # one half of each pair inside the prefix, both without sharing
        assert (n_shared, seen) == (per_step * 2, [2 * k for k in per_step] * 2)
    else:
        assert n_shared == seen == per_step * 2
    a, b = np.asarray(shared.image, dtype=int), np.asarray(plain.image, dtype=int)
    assert np.abs(a - b).max() <= 1


def test_recorded_prefix_replayed_in_the_second_call_gives_the_same_prediction(unet):
    """Split guidance pairs (one UNet call per half): the positive call reuses the negative call's prefix."""
    x, labels, emb = _pairs(1, 1, seed=3)
    t = torch.tensor(250)

    def call(i, ctx):
        with torch.no_grad(), ctx:
            return unet(x[i : i + 1], t, encoder_hidden_states=emb[i : i + 1], class_labels=labels[i : i + 1], return_dict=False)[0]

    import contextlib

    plain = call(1, contextlib.nullcontext())
    prefix: list = []
    seen, handle = _batch_sizes(unet.down_blocks[0].resnets[0])
    try:
        neg = call(0, guidance_prefix.recording(prefix))
        pos = call(1, guidance_prefix.replaying(prefix))
    finally:
        handle.remove()
    assert seen == [1]  # the prefix ran in the first call only
    assert len(prefix) == 2 and isinstance(prefix[0], tuple)  # the down block's (output, skips), the resnet's output
    assert torch.equal(pos, plain)  # same batch size, same inputs: bit for bit
    assert (neg - pos).abs().max() > 1e-3  # and the text still made a difference
    with pytest.raises(RuntimeError, match="replaying more prefix calls than were recorded"):
        call(1, guidance_prefix.replaying(prefix[:1]))
    with pytest.raises(RuntimeError, match="used fewer prefix outputs than were recorded"):
        call(1, guidance_prefix.replaying(prefix + [prefix[1]]))


@pytest.mark.parametrize("tile_size", [None, 8])
def test_split_pairs_run_the_prefix_once_per_pair(tiny_upscaler, rng_image, monkeypatch, tile_size):
    import dataclasses

    from sdx4.engine import loop as pipeline

    real_plan = pipeline.budget.plan_for
    monkeypatch.setattr(pipeline.budget, "plan_for", lambda *a, **k: dataclasses.replace(real_plan(*a, **k), unet_batch=1, tile_batch=1))
    unet = tiny_upscaler.components.unet
    seen, handle = _batch_sizes(unet.down_blocks[0].resnets[0])
    calls: list[int] = []
    hook = unet.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    try:
        r = tiny_upscaler(rng_image(16, 16), steps=2, seed=1, tile_size=tile_size, tile_overlap=4 if tile_size else None)
    finally:
        handle.remove()
        hook.remove()
    tiles = r.metadata["tiling"]["tiles"]
    assert tiles == (9 if tile_size else 1) and r.metadata["tiling"]["unet_batch"] == 1
    assert calls == [1] * (2 * 2 * tiles)  # 2 steps x tiles x (negative, positive)
    assert seen == [1] * (2 * tiles)  # the prefix once per pair
