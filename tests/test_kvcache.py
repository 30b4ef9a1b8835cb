"""Cross-attention keys and values computed once per prompt (kvcache.py): same values, fewer calls."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from sdx4.engine import loop as pipeline
from sdx4.options import UpscaleOptions
from sdx4.speed import kvcache


def attention(cross: bool = True) -> Attention:
    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=12 if cross else None, heads=2, dim_head=4)
    return attn.eval().requires_grad_(False)


def count_calls(monkeypatch, mods) -> dict[int, int]:
    """Count the real computations of each projection (the cache's hits do not call it)."""
    counts = {id(m): 0 for m in mods}
    for m in mods:
        inner = m.forward

        def counted(x, inner=inner, key=id(m)):
            counts[key] += 1
            return inner(x)

        monkeypatch.setattr(m, "forward", counted)
    return counts


def test_only_cross_attention_projections_are_installed_once():
    cross, self_attn = attention(True), attention(False)
    model = torch.nn.ModuleList([cross, self_attn])
    assert kvcache.projections(model) == [cross.to_k, cross.to_v]
    assert kvcache.install(model) == 2
    assert kvcache.install(model) == 2  # idempotent: not wrapped twice
    assert type(cross.processor) is kvcache.RememberingProcessor
    assert type(cross.processor.inner) is AttnProcessor2_0  # diffusers' own: it runs, and uninstall sets it again
    assert type(self_attn.processor) is AttnProcessor2_0
    assert not any("forward" in vars(m) for m in model.modules())  # the projections keep their own forward


def test_a_layer_with_another_processor_is_left_alone_and_uninstall_sets_the_plain_one_back():
    class Custom(AttnProcessor2_0):  # not one of diffusers' plain processors: may call to_k/to_v otherwise
        pass

    plain, custom = attention(), attention()
    custom.set_processor(Custom())
    before = {id(plain): plain.processor, id(custom): custom.processor}
    model = torch.nn.ModuleList([plain, custom])
    assert kvcache.install(model) == 2  # plain's to_k and to_v only
    assert type(plain.processor) is kvcache.RememberingProcessor and custom.processor is before[id(custom)]
    assert kvcache.uninstall(model) == 1
    assert plain.processor is before[id(plain)] and custom.processor is before[id(custom)]
    assert kvcache.install(model) == 2 and kvcache.remembered(model) == 0


def test_the_processor_that_was_there_runs_unchanged_with_a_mask(monkeypatch):
    ref, attn = attention(), attention()
    kvcache.install(attn)
    counts = count_calls(monkeypatch, [attn.to_k, attn.to_v])
    g = torch.Generator().manual_seed(3)
    enc = torch.randn(2, 5, 12, generator=g)  # B,tokens,D
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)  # B,tokens: the padding is masked
    with torch.no_grad():
        for _ in range(2):
            h = torch.randn(2, 6, 8, generator=g)
            out = attn(h, encoder_hidden_states=enc, attention_mask=mask)
            assert torch.equal(out, ref(h, encoder_hidden_states=enc, attention_mask=mask))
    assert list(counts.values()) == [1, 1]


def test_same_input_computed_once_with_the_same_values(monkeypatch):
    ref, attn = attention(), attention()
    kvcache.install(attn)
    counts = count_calls(monkeypatch, [attn.to_k, attn.to_v])
    g = torch.Generator().manual_seed(1)
    enc = torch.randn(4, 5, 12, generator=g)  # B,77-ish,D
    with torch.no_grad():
        for step in range(3):
            h = torch.randn(2, 6, 8, generator=g)
            # a new view of the same memory at every step, as the pipeline's embeds[i:j]
            assert torch.equal(attn(h, encoder_hidden_states=enc[0:2]), ref(h, encoder_hidden_states=enc[0:2]))
    assert list(counts.values()) == [1, 1]
    assert kvcache.remembered(attn) == 2
    kvcache.clear(attn)
    assert kvcache.remembered(attn) == 0
    kvcache.clear(None)  # a released UNet: nothing to do


def test_written_inputs_other_tensors_and_written_results_are_computed_again(monkeypatch):
    attn = attention()
    ref = copy.deepcopy(attn.to_k)
    kvcache.install(attn)
    counts = count_calls(monkeypatch, [attn.to_k])

    def lin(x, attn=attn):  # what the processor's to_k hands the inner processor for x
        return attn.processor.project_key(attn.to_k, x)

    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = lin(x)
        assert lin(x) is y and counts[id(attn.to_k)] == 1
        x[0, 0, 0] += 1.0  # in place: the version counter moves
        assert torch.equal(lin(x), ref(x)) and counts[id(attn.to_k)] == 2
        same_values = x.clone()  # other memory: never taken for the remembered input
        assert torch.equal(lin(same_values), ref(x)) and counts[id(attn.to_k)] == 3
        assert lin(x) is lin(x) and counts[id(attn.to_k)] == 3  # still one of the last ENTRIES = 2 inputs
        lin(x.clone())  # a third input: the entry made first (x's) is dropped, same_values' stays
        lin(same_values)
        assert counts[id(attn.to_k)] == 4
        y = lin(x)
        assert counts[id(attn.to_k)] == 5 and lin(x) is y
        y.mul_(0)  # a caller wrote into a result handed out: not handed out again
        assert torch.equal(lin(x), ref(x)) and counts[id(attn.to_k)] == 6


def test_two_inputs_in_turn_both_stay_remembered(monkeypatch):
    attn = attention()
    kvcache.install(attn)
    counts = count_calls(monkeypatch, [attn.to_k])
    enc = torch.randn(4, 5, 12)
    with torch.no_grad():
        for _ in range(3):  # the two halves of a guidance pair run as separate calls
            attn.processor.project_key(attn.to_k, enc[0:2])
            attn.processor.project_key(attn.to_k, enc[2:4])
    assert counts[id(attn.to_k)] == 2 == kvcache.ENTRIES


def test_autograd_and_inference_mode_always_compute(monkeypatch):
    attn = attention()
    kvcache.install(attn)
    counts = count_calls(monkeypatch, [attn.to_k])
    enc, to_k = torch.randn(2, 5, 12), attn.processor.project_key
    to_k(attn.to_k, enc)
    to_k(attn.to_k, enc)  # grad mode: never remembered
    with torch.inference_mode():
        t = torch.randn(2, 5, 12)
        to_k(attn.to_k, t)
        to_k(attn.to_k, t)  # inference tensors keep no version counter
    assert counts[id(attn.to_k)] == 4
    assert kvcache.remembered(attn) == 0


@pytest.fixture(scope="module")
def tiny(tiny_upscaler):
    return tiny_upscaler


def _bypass(monkeypatch, unet) -> None:
    """diffusers' own AttnProcessor2_0 on every cross-attention layer again."""
    for m in unet.modules():
        if isinstance(getattr(m, "processor", None), kvcache.RememberingProcessor):
            monkeypatch.setattr(m, "processor", m.processor.inner)


@pytest.mark.parametrize("tiles", [{}, {"tile_size": 16, "tile_overlap": 8, "tile_batch": 4}])
def test_pipeline_computes_keys_and_values_once_per_image_and_keeps_its_values(tiny, monkeypatch, tiles):
    unet = tiny.components.unet
    mods = kvcache.projections(unet)
    assert len(mods) >= 2 and kvcache.install(unet) == len(mods)  # every cross-attention layer has the cache
    image = torch.rand(1, 3, 24, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    options = UpscaleOptions(steps=3, seed=1, **tiles)

    def run() -> tuple[torch.Tensor, dict]:
        report: dict = {}
        out = pipeline.upscale_tensor(tiny.components, image, options, torch.Generator().manual_seed(1), report=report)
        return out, report

    with monkeypatch.context() as m:
        counts = count_calls(m, mods)
        cached, report = run()
        # once per input: the whole image, or once per number of tiles in a call (6 tiles by 4: 4 and 2)
        assert set(counts.values()) == {2 if tiles else 1}
        assert report["tiling"]["tiles"] == (6 if tiles else 1)
    assert kvcache.remembered(unet) == 0  # nothing held after the loop
    with monkeypatch.context() as m:
        _bypass(m, unet)
        plain, _ = run()
    assert torch.equal(cached, plain)


def test_the_memory_plan_counts_what_the_cache_holds(tiny, monkeypatch):
    unet, options = tiny.components.unet, UpscaleOptions(steps=1)
    assert tiny.components.tokenizer.model_max_length == 77
    per_sample = kvcache.bytes_per_sample(unet, 77, 4)  # fp32
    assert per_sample == sum(m.out_features for m in kvcache.projections(unet)) * 77 * 4 * kvcache.ENTRIES > 0
    with_kv = pipeline.budget.plan_for(tiny.components, options, 32, 32)
    monkeypatch.setattr(kvcache, "bytes_per_sample", lambda *a: 0)
    without = pipeline.budget.plan_for(tiny.components, options, 32, 32)
    assert with_kv.estimate_bytes - without.estimate_bytes == 2 * per_sample  # one call on the guidance pair


def test_unet_step_benchmark_reports_both_variants(tiny_model_dir, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("unet_step_bench", Path(__file__).parents[1] / "benchmarks" / "unet_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r" / "step.json"
    assert bench.main(["--model", str(tiny_model_dir), "--size", "16", "--dtype", "fp32", "--reps", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert report["cached_layers"] == 20 and report["reps"] == 2 and report["dtype"] == "float32"
    for k in ("kept_s", "cleared_s"):
        assert 0 < report[k]["min"] <= report[k]["median"] <= report[k]["max"], report
    # the ratio of the unrounded medians; the medians are rounded to 0.1 ms in the report
    assert report["kept_vs_cleared"] == pytest.approx(report["kept_s"]["median"] / report["cleared_s"]["median"], abs=0.01)
    assert report["kept_vs_cleared_paired_median"] > 0
    assert report["max_abs_diff"] == 0.0  # the cache changes no value
    with pytest.raises(SystemExit):
        bench.main(["--model", str(tiny_model_dir), "--size", "12"])
    assert "--size a multiple of 8" in capsys.readouterr().err
