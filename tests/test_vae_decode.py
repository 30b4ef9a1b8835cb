"""Tiled VAE decoding (sdx4.vae_decode) against diffusers' untiled AutoencoderKL.decode."""

from __future__ import annotations

import dataclasses
import errno
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

import sdx4.engine.vae as vd
from sdx4.engine.vae import (
    DecodeReport,
    decode_latents,
    estimate_decode_bytes,
    plan_decode,
)
from sdx4.engine.vae import decode as vd_decode
from sdx4.engine.vae import ops as vd_ops
from sdx4.engine.vae import plan as vd_plan
from sdx4.engine.vae import run as vd_run
from sdx4.model.random_model import VAE_CONFIGS

TOL = 1e-3  # issue 3: tiled vs untiled, in [-1, 1] units


def _vae(size: str, seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**VAE_CONFIGS[size]).eval()


def _latents(vae: AutoencoderKL, b: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, h, w, generator=g) / vae.config.scaling_factor * 0.25  # B,4,h,w (already unscaled)


@pytest.fixture(scope="module")
def tiny() -> AutoencoderKL:
    return _vae("tiny")


@pytest.fixture(scope="module")
def full() -> AutoencoderKL:
    return _vae("full")


@pytest.fixture(scope="module")
def tiny_case(tiny):
    lat = _latents(tiny, 2, 37, 23)
    with torch.no_grad():
        ref = tiny.decode(lat).sample  # 2,3,148,92
    return lat, ref


def _n_norms(vae: AutoencoderKL) -> int:
    return sum(isinstance(m, torch.nn.GroupNorm) for m in vae.decoder.modules())


# -- untiled passthrough --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tile_size", [None, 37, 100])
def test_untiled_passthrough_is_bit_identical(tiny, tiny_case, tile_size):
    lat, ref = tiny_case
    out, report = decode_latents(tiny, lat, tile_size=tile_size)
    assert torch.equal(out, ref)
    assert report == DecodeReport(False, None, 0, "global", 1, "exact", _n_norms(tiny), _n_norms(tiny), 0, 0)


# -- exactness ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tile_size", [5, 8, 16, 30])
def test_tiny_tiled_matches_untiled(tiny, tiny_case, tile_size):
    lat, ref = tiny_case
    out, report = decode_latents(tiny, lat, tile_size=tile_size)
    assert out.shape == ref.shape == (2, 3, 148, 92)
    diff = (out - ref).abs().max().item()
    assert diff <= TOL, f"tile {tile_size}: max abs diff {diff}"
    assert report.tiled and report.tile_size == tile_size
    assert report.tiles == math.ceil(37 / tile_size) * math.ceil(23 / tile_size)
    assert report.attention == "global" and report.norm_stats == "exact"
    assert report.exact_norms == report.norms == _n_norms(tiny) == 18
    assert report.sample_tiles == 0 and report.planned_bytes > 0


@pytest.mark.parametrize("hw,tile_size", [((32, 32), 16), ((19, 13), 7)])
def test_full_size_vae_tiled_matches_untiled(full, hw, tile_size):
    lat = _latents(full, 2, *hw, seed=3)
    with torch.no_grad():
        ref = full.decode(lat).sample
    out, report = decode_latents(full, lat, tile_size=tile_size)
    diff = (out - ref).abs().max().item()
    assert diff <= TOL, f"{hw} tile {tile_size}: max abs diff {diff} (output range {ref.abs().max().item():.2f})"
    assert report.attention == "global" and report.norm_stats == "exact"
    assert report.exact_norms == report.norms == _n_norms(full) == 24


def test_tile_mode_is_exact_when_the_sample_is_every_tile(tiny, tiny_case, monkeypatch):
    """The bounded-memory path (ops run one tile window at a time) pooled over all tiles = exact statistics."""
    lat, ref = tiny_case
    real_plan = vd_plan.build_plan

    def every_tile_from(split: int):
        def plan(shapes, *args, **kwargs):
            p = real_plan(shapes, *args, **kwargs)
            halo = max(vd_plan.receptive_radius(shapes, split), p.overlap * vd_plan.scale_at(shapes, split))
            return dataclasses.replace(p, split=split, sample=tuple(range(p.tiles)), halo=halo)

        return plan

    for split in (4, 9, 15):  # after the attention, inside the up blocks, at the 4x resolution
        monkeypatch.setattr(vd_decode, "build_plan", every_tile_from(split))
        out, _ = decode_latents(tiny, lat, tile_size=8)
        diff = (out - ref).abs().max().item()
        assert diff <= TOL, f"split {split}: {diff}"


# -- attention mode -------------------------------------------------------------------------------------------


def test_attention_switches_to_tile_local_above_the_token_limit(tiny):
    lat = _latents(tiny, 1, 20, 18)
    with torch.no_grad():
        ref = tiny.decode(lat).sample
    out, report = decode_latents(tiny, lat, tile_size=8, max_attention_tokens=20 * 18)
    assert report.attention == "global"
    assert (out - ref).abs().max().item() <= TOL

    out, report = decode_latents(tiny, lat, tile_size=8, overlap=2, max_attention_tokens=20 * 18 - 1)
    assert report.attention == "tile-local" and report.overlap == 2
    assert (out - ref).abs().max().item() > 10 * TOL  # each tile attends to its own 12x12 window only

    # the same with the whole-image tensors spilled to temporary files
    spilled, report = decode_latents(tiny, lat, tile_size=8, overlap=2, max_attention_tokens=20 * 18 - 1, max_bytes=1)
    assert report.attention == "tile-local" and report.spilled_bytes > 0
    assert (spilled - out).abs().max().item() <= 1e-5

    # tile-local windows that cover the whole latent attend to everything: the global result again
    out, report = decode_latents(tiny, lat, tile_size=8, overlap=20, max_attention_tokens=1)
    assert report.attention == "tile-local"
    assert (out - ref).abs().max().item() <= TOL


def test_beyond_the_limit_the_untiled_decode_attends_in_the_same_windows_as_the_tiled_one(tiny, tmp_path):
    lat = _latents(tiny, 2, 20, 18)
    with torch.no_grad():
        ref = tiny.decode(lat).sample  # global attention
    attn = tiny.decoder.mid_block.attentions[0]
    processor = attn.processor
    # 12x12-pixel windows: cores of 8 (12 - 2 x overlap 2) -> 3 x 3 windows
    untiled, report = decode_latents(tiny, lat, max_attention_tokens=12 * 12, overlap=2)
    assert (report.tiled, report.attention, report.attention_windows, report.overlap) == (False, "tile-local", 9, 2)
    assert attn.processor is processor  # diffusers' processor is back after the decode
    assert (untiled - ref).abs().max().item() > 10 * TOL  # windows are not the global attention...
    for kwargs in ({}, {"max_bytes": 1, "spill_dir": tmp_path}):  # ...but the tiled decode's (RAM or spilled planes)
        tiled, report = decode_latents(tiny, lat, tile_size=6, max_attention_tokens=12 * 12, overlap=2, **kwargs)
        assert (report.tiled, report.attention, report.attention_windows) == (True, "tile-local", 9)
        assert (tiled - untiled).abs().max().item() <= TOL
    # within the limit: diffusers' own decode, bit for bit
    same, report = decode_latents(tiny, lat, max_attention_tokens=20 * 18)
    assert torch.equal(same, ref) and (report.attention, report.attention_windows) == ("global", 1)


@pytest.mark.parametrize("max_bytes", [None, 1])
def test_channels_last_vae_decodes_on_channels_last_planes(max_bytes, tmp_path):
    """sdx4 lays the VAE out channels-last on the CPU: planes and crops follow, the result does not change."""
    vae = _vae("tiny").to(memory_format=torch.channels_last)
    lat = _latents(vae, 2, 37, 23)
    with torch.no_grad():
        ref = vae.decode(lat).sample
    crops = []
    real_crop = vd_run.Plane.crop

    def crop(self, *args):
        t = real_crop(self, *args)
        crops.append(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous())
        return t

    vd_run.Plane.crop = crop
    try:
        out, report = decode_latents(vae, lat, tile_size=8, max_bytes=max_bytes, spill_dir=tmp_path)
    finally:
        vd_run.Plane.crop = real_crop
    assert report.tiled and (report.spilled_bytes > 0) == (max_bytes is not None)
    assert crops and all(crops)  # every tile crop is channels-last, as the convolutions want it
    assert (out - ref).abs().max().item() <= TOL and out.is_contiguous()


def test_the_attention_processor_is_restored_when_the_decode_fails(tiny, monkeypatch):
    attn = tiny.decoder.mid_block.attentions[0]
    processor = attn.processor

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(vd_run, "attend", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        decode_latents(tiny, _latents(tiny, 1, 20, 18), max_attention_tokens=100)
    assert attn.processor is processor


@pytest.mark.parametrize("h,w,tokens,overlap", [(20, 18, 144, 2), (512, 384, 128 * 128, 8), (130, 7, 128 * 128, 8), (5, 5, 1, 0)])
def test_attention_windows_hold_at_most_the_token_limit(h, w, tokens, overlap):
    rows, cols = vd.attention_bounds(h, w, tokens, overlap)
    side = max(1, math.isqrt(tokens))
    for n, bounds in ((h, rows), (w, cols)):
        assert bounds[0] == 0 and bounds[-1] == n and all(b > a for a, b in zip(bounds, bounds[1:]))
        for start, end, _, _ in vd_run.window_spans(n, bounds, overlap):
            assert end - start <= max(side, 1 + 2 * overlap)  # core + overlap on both sides


@pytest.mark.parametrize("side,overlap", [(128, 8), (16, 1), (64, 4), (12, 1), (200, 5)])
def test_windowed_attention_costs_no_more_per_pixel_than_global_attention_at_the_limit(side, overlap):
    """Sum over windows of tokens x keys, per latent pixel, at most the largest global attention's (side^2),
    at every image size beyond the limit: the decode's time per pixel does not grow with the image."""
    tokens = side * side
    core = vd.attention_core(tokens, overlap)
    assert (core + 2 * overlap) ** 2 <= side * core < (core + 1 + 2 * overlap) ** 2 * core / (core + 1)  # the largest
    costs = []
    for h, w in [(2 * side, 2 * side), (4 * side, 4 * side), (8 * side, 8 * side), (side + 1, side + 1), (3 * side + 7, side // 2), (10 * side, 9)]:
        rows, cols = vd.attention_bounds(h, w, tokens, overlap)
        work = sum(((y1 - y0) * (x1 - x0)) ** 2 for y0, y1, _, _ in vd_run.window_spans(h, rows, overlap)
                   for x0, x1, _, _ in vd_run.window_spans(w, cols, overlap))
        costs.append(work / (h * w))
    assert max(costs) <= tokens
    if side == 128:  # 256, 512, 1024 latent px: cores of ~85 at each, 1.18x from the clipped edge windows
        assert max(costs[:3]) / min(costs[:3]) < 1.2  # (windows of 128, cores of 112: 11.7k / 16.8k / 17.8k, 1.52x)


def test_attention_core_falls_back_to_the_window_side_when_the_overlap_is_too_wide():
    assert vd.attention_core(12 * 12, 2) == 8  # 12 < 8 x 2: no core is as cheap; cores of 12 - 2 x 2
    assert vd.attention_core(1, 0) == 1


@pytest.mark.parametrize("n,tile,overlap", [(20, 8, 2), (36, 6, 3), (64, 16, 8), (9, 4, 0), (1, 1, 3)])
def test_tile_local_blend_weights_sum_to_one(n, tile, overlap):
    """Cores >= 2*overlap: the ramps are a partition of unity (smaller cores: the code divides by the sum)."""
    total = torch.zeros(n, dtype=torch.float64)
    for start, end, _, _ in vd_run.window_spans(n, vd_plan.even_bounds(n, tile), overlap):
        w = vd_run.blend_ramp(start, end, n, overlap)
        assert (w > 0).all() and (w <= 1).all()
        total[start:end] += w
    assert torch.allclose(total, torch.ones(n, dtype=torch.float64))


# -- memory budget --------------------------------------------------------------------------------------------


def _spilled_planes(monkeypatch) -> list[tuple[int, ...]]:
    """Record the shape of every plane created in a temporary file."""
    made = []
    real = vd_run.Plane.empty.__func__

    def empty(cls, shape, dtype, spill_dir, fmt=torch.contiguous_format):
        if spill_dir is not None:
            made.append(tuple(shape))
        return real(cls, shape, dtype, spill_dir, fmt)

    monkeypatch.setattr(vd_run.Plane, "empty", classmethod(empty))
    return made


def test_budget_spills_whole_image_tensors_to_disk_and_stays_exact(tiny, tiny_case, tmp_path, monkeypatch):
    lat, ref = tiny_case
    in_ram = plan_decode(tiny, (37, 23), 8, batch_size=2)
    assert not in_ram.spill and in_ram.memory.spilled == 0
    made = _spilled_planes(monkeypatch)
    # a budget of 1 byte: every whole-image tensor goes to a temporary file
    plan = plan_decode(tiny, (37, 23), 8, batch_size=2, max_bytes=1)
    assert plan.spill and plan.ram_planes == frozenset() and plan.memory.spilled == in_ram.memory.planes
    assert plan.memory.planes == 0
    out, report = decode_latents(tiny, lat, tile_size=8, max_bytes=1, spill_dir=tmp_path)
    assert (out - ref).abs().max().item() <= TOL
    assert report.norm_stats == "exact" and report.exact_norms == report.norms == 18
    assert report.spilled_bytes == plan.memory.spilled and report.planned_bytes == plan.memory.total
    assert out.is_contiguous() and list(tmp_path.iterdir()) == []  # temporary files are gone
    assert len(made) == len(vd_ops.program(tiny)) - 1  # every plane but the decoded image
    assert report.spill_traffic_bytes == sum(4 * math.prod(s) for s in made)

    with pytest.raises(ValueError, match="spill_dir .*nowhere' is not a directory"):
        decode_latents(tiny, lat, tile_size=8, max_bytes=1, spill_dir=tmp_path / "nowhere")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_a_spilled_plane_is_written_with_pwrite_and_reads_back_what_was_written(dtype, fmt, tmp_path, monkeypatch):
    """Writes go to the file (pwrite: row runs, or one block per image for full-width rows), even when the
    kernel writes less than asked; crops read them back through the mapping."""
    calls = []
    real_pwrite = vd_run.os.pwrite

    def short_pwrite(fd, data, offset):  # at most 40 bytes per call
        calls.append(len(data))
        return real_pwrite(fd, bytes(data[:40]), offset)

    monkeypatch.setattr(vd_run.os, "pwrite", short_pwrite)
    plane = vd_run.Plane.empty((2, 3, 7, 5), dtype, str(tmp_path), fmt)
    ref = torch.zeros(2, 3, 7, 5, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    for y0, x0, h, w in [(1, 2, 4, 3), (0, 0, 2, 5), (5, 0, 2, 5), (3, 4, 4, 1)]:
        t = torch.randn(2, 3, h, w, generator=g).to(dtype)
        # channels-last: each row is one run as it is; otherwise a column-major tile, which write() repacks
        t = t.contiguous(memory_format=fmt) if fmt == torch.channels_last else t.transpose(2, 3).contiguous().transpose(2, 3)
        plane.write(y0, x0, t)
        ref[:, :, y0 : y0 + h, x0 : x0 + w] = t
        plane.release()
    assert torch.equal(plane.crop(0, 7, 0, 5, torch.device("cpu")), ref)
    assert torch.equal(plane.crop(2, 6, 1, 4, torch.device("cpu")), ref[:, :, 2:6, 1:4])
    assert calls and max(calls) > 40 and list(tmp_path.iterdir()) == []  # short writes were resumed; file unlinked


def test_a_full_disk_is_an_error_naming_the_spill_directory(tiny, tiny_case, tmp_path, monkeypatch):
    lat, _ = tiny_case

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(vd_run.os, "pwrite", full)
    with pytest.raises(OSError, match=f"temporary file in '{tmp_path}' failed: No space left on device.*TMPDIR") as err:
        decode_latents(tiny, lat, tile_size=8, max_bytes=1, spill_dir=tmp_path)
    assert err.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_a_budget_between_holds_what_fits_in_ram_and_spills_the_rest(tiny, tiny_case, tmp_path, monkeypatch):
    lat, ref = tiny_case
    in_ram = plan_decode(tiny, (37, 23), 8, batch_size=2)
    everything_spilled = plan_decode(tiny, (37, 23), 8, batch_size=2, max_bytes=1)
    budget = everything_spilled.memory.total + in_ram.memory.planes // 20
    plan = plan_decode(tiny, (37, 23), 8, batch_size=2, max_bytes=budget)
    n = len(vd_ops.program(tiny))
    assert plan.spill and 0 < len(plan.ram_planes) < n - 1
    assert plan.memory.total <= budget and 0 < plan.memory.planes < in_ram.memory.planes
    assert 0 < plan.memory.spilled < in_ram.memory.planes

    made = _spilled_planes(monkeypatch)
    out, report = decode_latents(tiny, lat, tile_size=8, max_bytes=budget, spill_dir=tmp_path)
    assert (out - ref).abs().max().item() <= TOL and report.norm_stats == "exact"
    assert report.spilled_bytes == plan.memory.spilled and report.planned_bytes == plan.memory.total
    assert len(made) == n - 1 - len(plan.ram_planes) and list(tmp_path.iterdir()) == []
    assert report.spill_traffic_bytes == plan.memory.spill_traffic == sum(4 * math.prod(s) for s in made) > 0
    # the work counted three times (the pipeline's measured factor) leaves less room for planes
    tripled = plan_decode(tiny, (37, 23), 8, batch_size=2, max_bytes=budget, work_factor=3)
    assert tripled.ram_planes < plan.ram_planes and tripled.memory.total >= 3 * tripled.memory.work
    with pytest.raises(ValueError, match="work_factor must be an integer >= 1; got 0"):
        plan_decode(tiny, (37, 23), 8, max_bytes=budget, work_factor=0)
    # below the all-in-RAM plan's (conservative) total but above the per-op peak: nothing spills after all
    roomy = plan_decode(tiny, (37, 23), 8, batch_size=2, max_bytes=int(in_ram.memory.total * 0.9))
    assert not roomy.spill and roomy.ram_planes == frozenset(range(n - 1))
    assert roomy.memory.spilled == roomy.memory.spill_traffic == 0 and roomy.memory.total < in_ram.memory.total


def test_plane_lives_cover_what_the_ops_read(tiny):
    """A resnet's input plane lives until its second conv adds it back; others until the next op reads them."""
    ops = vd_ops.program(tiny)
    shapes = vd_plan.op_shapes(ops)
    lives = vd_plan.plane_lives(shapes)
    assert len(lives) == len(ops) - 1 and all(first == p for p, (first, _) in enumerate(lives))
    for p, (first, last) in enumerate(lives):
        nxt = shapes[p + 1]
        assert last == (p + 2 if nxt.save else p + 1), (p, nxt)
        if nxt.save:
            assert shapes[p + 2].skip
    # the planes live at each op, all in RAM, are exactly what the in-RAM plan holds at its peak
    plan = vd_plan.build_plan(shapes, (37, 23), 2, 8, None, 10**9, None, 4)
    px = lambda i: 37 * 23 * vd_plan.scale_at(shapes, i) ** 2  # noqa: E731
    sizes = [2 * 4 * px(p + 1) * shapes[p].out_channels for p in range(len(lives))]
    held = [sum(sizes[p] for p, (a, b) in enumerate(lives) if a <= i <= b) for i in range(len(ops))]
    held[0] += 2 * 4 * px(0) * shapes[0].in_channels  # the latents (op 0's input)
    held[-1] += 2 * 4 * px(len(ops)) * shapes[-1].out_channels  # the decoded image
    assert max(held) == plan.memory.planes


def test_place_planes_takes_the_largest_that_fit_over_their_whole_life():
    lives = [(0, 1), (1, 3), (2, 3), (3, 4)]
    sizes = [5, 6, 3, 2]
    other = [1, 1, 1, 1, 1]
    assert vd_plan.place_planes(sizes, lives, other, 7) == {1}  # 6 first; then 5 (op 1: 1+6+5), 3 (op 3), 2 (op 3) do not fit
    assert vd_plan.place_planes(sizes, lives, other, 11) == {1, 2}  # 5 needs 12 at op 1; 2 needs 12 at op 3
    assert vd_plan.place_planes(sizes, lives, other, 12) == {0, 1, 2, 3}
    assert vd_plan.place_planes(sizes, lives, [9] * 5, 9) == frozenset()  # no room next to the work


def test_budget_without_spill_estimates_statistics_and_says_so(tiny):
    lat = _latents(tiny, 1, 64, 48)
    with torch.no_grad():
        ref = tiny.decode(lat).sample
    in_ram = plan_decode(tiny, (64, 48), 8)
    budget = int(in_ram.memory.total * 0.8)
    plan = plan_decode(tiny, (64, 48), 8, max_bytes=budget, spill=False)
    assert plan.memory.total <= budget and plan.split < 21 and 1 <= len(plan.sample) < plan.tiles
    assert not plan.spill and plan.exact_norms < plan.norms

    out, report = decode_latents(tiny, lat, tile_size=8, max_bytes=budget, spill=False)
    assert report.norm_stats == "estimated" and report.spilled_bytes == 0
    assert report.sample_tiles == len(plan.sample) and report.exact_norms == plan.exact_norms < report.norms
    assert out.shape == ref.shape and torch.isfinite(out).all()
    # an estimate: near the exact decode on average, but not within the exactness tolerance
    err = (out - ref).abs()
    assert TOL < err.max().item() and err.mean().item() < 0.5 * ref.abs().mean().item()


def test_estimate_decode_bytes_for_the_published_vae():
    gib = 2**30
    in_ram = [estimate_decode_bytes((n, n), 64) for n in (128, 256, 512)]
    assert in_ram[0].total < in_ram[1].total < in_ram[2].total
    assert [m.spilled for m in in_ram] == [0, 0, 0]
    assert estimate_decode_bytes((256, 256), None).total > in_ram[1].total  # untiled (rough)
    spilled = estimate_decode_bytes((512, 512), 64, max_bytes=int(1.5 * gib))
    assert spilled.total <= 1.5 * gib < in_ram[2].total and spilled.spilled == in_ram[2].planes
    assert spilled.output == 3 * 2048 * 2048 * 4
    sampled = estimate_decode_bytes((512, 512), 64, max_bytes=int(1.5 * gib), spill=False)
    assert sampled.total <= 1.5 * gib and sampled.sample > 0 and sampled.spilled == 0


# -- pooled statistics ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_pooled_moments_give_torch_group_norm(fmt):
    torch.manual_seed(0)
    x = (torch.randn(2, 12, 30, 17) * torch.linspace(0.1, 5, 12)[None, :, None, None] + 3.0).contiguous(memory_format=fmt)
    norm = torch.nn.GroupNorm(4, 12, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    m = vd_ops.Moments()
    for y0, y1 in ((0, 7), (7, 20), (20, 30)):  # unequal tiles: an average of per-tile variances would be wrong
        for x0, x1 in ((0, 5), (5, 17)):
            m.add(x[:, :, y0:y1, x0:x1])
    scale, shift = vd_ops.group_norm_affine(norm, m, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        expected = F.group_norm(x, 4, norm.weight, norm.bias, 1e-6)
    assert (x * scale + shift - expected).abs().max().item() < 1e-5


# -- bad arguments --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"tile_size": 0}, "tile_size must be None .* >= 1.* got 0"),
        ({"tile_size": -4}, "tile_size .* got -4"),
        ({"tile_size": 8.0}, "tile_size .* got 8.0"),
        ({"tile_size": True}, "tile_size .* got True"),
        ({"tile_size": 8, "overlap": -1}, "overlap must be None .* >= 0; got -1"),
        ({"tile_size": 8, "max_attention_tokens": 0}, "max_attention_tokens must be an integer >= 1; got 0"),
        ({"tile_size": 8, "max_bytes": 0}, "max_bytes must be None .* got 0"),
    ],
)
def test_bad_arguments_are_rejected(tiny, tiny_case, kwargs, match):
    lat, _ = tiny_case
    with pytest.raises(ValueError, match=match):
        decode_latents(tiny, lat, **kwargs)


def test_bad_latents_are_rejected(tiny):
    with pytest.raises(ValueError, match=r"latents must be B,4,h,w; got shape \(1, 3, 8, 8\)"):
        decode_latents(tiny, torch.zeros(1, 3, 8, 8), tile_size=4)
    with pytest.raises(ValueError, match=r"latents must be B,4,h,w; got shape \(4, 8, 8\)"):
        decode_latents(tiny, torch.zeros(4, 8, 8), tile_size=4)
    with pytest.raises(ValueError, match="latents dtype torch.float64 differs from the VAE's torch.float32"):
        decode_latents(tiny, torch.zeros(1, 4, 8, 8, dtype=torch.float64), tile_size=4)


def test_freed_memory_goes_back_to_the_os_after_every_op(tiny, tiny_case, monkeypatch):
    """An allocator that keeps freed memory (tcmalloc) must not carry each op's tile temporaries forward: the
    decode hands freed memory back after every whole-image op (without the gc pass), and the image is unchanged."""
    from sdx4.engine import budget as memory

    lat, ref = tiny_case
    ops_run, released = [], []
    real_op = vd_run.Runner.plane_op
    monkeypatch.setattr(vd_run.Runner, "plane_op", lambda self, i, cur, res: ops_run.append(i) or real_op(self, i, cur, res))
    monkeypatch.setattr(memory, "release_memory", lambda collect=True: released.append((len(ops_run), collect)) or True)
    out, report = decode_latents(tiny, lat, tile_size=16)
    assert (out - ref).abs().max().item() <= TOL and report.norm_stats == "exact"
    assert ops_run == list(range(len(ops_run))) and len(ops_run) > 10  # every op over whole-image planes
    assert released == [(i + 1, False) for i in range(len(ops_run))]  # once after each op, no gc pass
