"""The memory planner: pure sizes in, tile plan out."""

from __future__ import annotations

import pytest

from sdx4.engine import budget as memory
from sdx4.engine.budget import MemoryBudgetError, plan_memory

GiB = 2**30
WEIGHTS = int(3.6 * GiB)  # the full-size model in fp32


def _plan(size: int, budget: float = 5.0, **kw):
    return plan_memory(size, size, budget_bytes=int(budget * GiB), weights_bytes=WEIGHTS, samples_per_tile=2, multiple=8, **kw)


def test_small_image_fits_in_one_tile():
    p = _plan(64)
    assert p.tiles == 1 and not p.tiled and p.tile_size == 64 and p.tile_overlap == 0
    assert p.vae_tile_size is None
    assert p.estimate_bytes <= p.budget_bytes


def test_budget_picks_smaller_tiles_for_larger_images():
    plans = [_plan(s, budget=6.0) for s in (64, 128, 256, 384, 512, 768, 1024)]
    assert not plans[0].tiled and plans[0].tile_size == 64
    tiled = [p for p in plans if p.tiled]
    assert len(tiled) >= 3, "a 6 GiB budget must tile 512, 768 and 1024 px images"
    # The budget's tile limit shrinks as whole-image tensors grow (for the same samples per UNet call); the
    # tile used is at most the limit (it may be smaller: the smallest tile that needs as few windows).
    for per_call in {p.unet_batch for p in tiled}:
        same = [p for p in tiled if p.unet_batch == per_call]
        assert all(a.tile_limit >= b.tile_limit for a, b in zip(same, same[1:]))
    split = [p for p in tiled if p.unet_batch == 1]
    assert split[-1].tile_limit < split[0].tile_limit, "whole-image tensors grow, so tiles must shrink"
    assert all(a.tiles <= b.tiles for a, b in zip(plans, plans[1:]))
    for p in plans:
        assert p.estimate_bytes <= p.budget_bytes
        assert p.tile_size % 8 == 0 and p.tile_size <= p.tile_limit


def test_smaller_budget_gives_smaller_tiles():
    assert _plan(1024, budget=5.5).tile_limit < _plan(1024, budget=6.0).tile_limit < _plan(1024, budget=12.0).tile_limit
    assert _plan(1024, budget=5.5).tiles > _plan(1024, budget=6.0).tiles > _plan(1024, budget=12.0).tiles


def test_tiles_just_big_enough_for_their_count():
    p = _plan(256, budget=5.5)
    # The budget allows 176 px tiles; two per side need only ceil((256 + 32) / 2) = 144 on the grid.
    assert (p.tile_limit, p.tile_size, p.tile_overlap, p.tiles, p.unet_batch) == (176, 144, 32, 4, None)


def test_guidance_pair_runs_one_sample_per_call_when_that_saves_tiles():
    # 256 px at 6 GiB: both CFG samples in one call need 4 tiles; one per call fits the whole latent.
    one = plan_memory(256, 256, budget_bytes=6 * GiB, weights_bytes=WEIGHTS, samples_per_tile=1, multiple=8)
    assert one.tiles == 1  # (what one sample needs)
    p = _plan(256, budget=6.0)
    assert (p.tiles, p.unet_batch, p.tile_batch) == (1, 1, 1) and p.estimate_bytes <= p.budget_bytes
    assert p.estimate_bytes - memory.unet_work_bytes(256, 256, 1) + memory.unet_work_bytes(256, 256, 2) > p.budget_bytes
    # No split when it would not save a tile (384 px at 7 GiB: 2 x 2 tiles either way), nor when untiled
    # at the full batch fits, nor when the tiles are given.
    assert _plan(384, budget=7.0).unet_batch is None and _plan(384, budget=7.0).tiles == 4
    assert _plan(128, budget=6.0).unet_batch is None
    assert _plan(512, budget=6.0, tile_size=128).unet_batch is None
    assert memory.main(["--size", "512", "512", "--max-memory", "5GiB"]) == 0


def test_tile_batch_grows_with_budget():
    assert _plan(1024, budget=5.5, tile_size=64).tile_batch < _plan(1024, budget=6.0, tile_size=64).tile_batch
    assert _plan(1024, budget=64.0, tile_size=64).tile_batch == memory.MAX_AUTO_TILE_BATCH


def test_explicit_options_win():
    p = _plan(1024, budget=64.0, tile_size=100, tile_overlap=12, tile_batch=3)
    assert (p.tile_size, p.tile_overlap, p.tile_batch) == (96, 12, 3)  # tile rounded down to the grid
    assert _plan(64, tile_size=128).tiles == 1


def test_default_overlap_is_a_quarter_of_the_tile_limit_on_the_grid_at_most_32():
    p = _plan(2048, budget=12.0)
    assert p.tiled and p.tile_limit // 4 > memory.MAX_AUTO_OVERLAP and p.tile_overlap == memory.MAX_AUTO_OVERLAP == 32
    p = _plan(512, budget=4.5)
    assert p.tiled and p.tile_limit // 4 < 32 and p.tile_overlap == max(8, p.tile_limit // 4 // 8 * 8)


def test_large_image_tiles_the_vae_too():
    p = _plan(1024, budget=6.0)
    assert p.vae_tile_size is not None and p.vae_tile_size < 1024


def test_too_small_budget_names_the_numbers():
    with pytest.raises(MemoryBudgetError, match=r"max_memory 3\.00 GiB is too small: the weights \(3\.60 GiB\)"):
        _plan(256, budget=3.0)


def test_rejects_off_grid_sizes():
    with pytest.raises(ValueError, match="multiples of 8"):
        plan_memory(30, 32, budget_bytes=8 * GiB, weights_bytes=0, samples_per_tile=2, multiple=8)


def test_fp16_halves_unet_working_memory():
    assert memory.unet_work_bytes(64, 64, 2, dtype_bytes=2) * 2 == memory.unet_work_bytes(64, 64, 2, dtype_bytes=4)


def test_memory_cli_prints_the_plan_for_1024px(capsys):
    import json

    assert memory.main(["--size", "1024", "1024", "--max-memory", "6GiB"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["output"] == [4096, 4096] and out["memory_budget_gib"] == 6.0
    assert out["tiles"] > 1 and out["memory_estimate_gib"] <= 6.0 and out["vae_tile_size"] < 1024


def test_memory_cli_counts_the_text_encoder_only_when_kept(capsys):
    import json

    assert memory.main(["--size", "1024", "1024", "--max-memory", "5GiB"]) == 0
    dropped = json.loads(capsys.readouterr().out)
    assert memory.main(["--size", "1024", "1024", "--max-memory", "5GiB", "--keep-text-encoder"]) == 0
    kept = json.loads(capsys.readouterr().out)
    text_gib = memory.FULL_MODEL_PARAMS["text_encoder"] * 4 / 2**30
    assert abs(kept["weights_gib"] - dropped["weights_gib"] - text_gib) < 0.01
    assert dropped["tile_size"] > kept["tile_size"] and dropped["tiles"] < kept["tiles"]  # the room goes to tiles


def test_the_key_value_cache_is_counted_with_each_call():
    kv = memory.FULL_MODEL_KV_BYTES_PER_SAMPLE
    plain, with_kv = _plan(64), _plan(64, kv_bytes_per_sample=kv)
    fixed = WEIGHTS + memory.global_bytes(64, 64, 1)
    unet, vae = memory.unet_work_bytes(64, 64, 2), memory.vae_work_bytes(64, 64, 1)
    assert plain.estimate_bytes == fixed + max(unet, vae)
    assert with_kv.estimate_bytes == fixed + max(unet + 2 * kv, vae) > plain.estimate_bytes  # the guidance pair, one call
    # 512 px at 6 GiB: 4 tiles of 272 fit without it, 9 of 192 with it (19 MiB per sample of a call)
    plain, with_kv = _plan(512, budget=6.0), _plan(512, budget=6.0, kv_bytes_per_sample=kv)
    assert (plain.tiles, plain.tile_size, with_kv.tiles, with_kv.tile_size) == (4, 272, 9, 192)
    assert plain.unet_batch == with_kv.unet_batch == 1 and with_kv.estimate_bytes <= with_kv.budget_bytes


def test_the_full_model_constant_is_what_the_cache_holds():
    import torch
    from diffusers import UNet2DConditionModel

    from sdx4.model.random_model import UNET_CONFIGS
    from sdx4.speed import kvcache

    with torch.device("meta"):  # the published architecture, no memory
        unet = UNet2DConditionModel.from_config(UNET_CONFIGS["full"])
    assert kvcache.install(unet) == 52
    assert kvcache.bytes_per_sample(unet, 77, 4) == memory.FULL_MODEL_KV_BYTES_PER_SAMPLE
    assert kvcache.bytes_per_sample(None, 77, 4) == 0
