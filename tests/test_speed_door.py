"""The speed door (speed/__init__.py): `install` says what it put on the UNet, `Installed.uninstall()` gives
diffusers' plain module back (weights, forwards, processors as loaded), and no trick holds state after a run."""

from __future__ import annotations

import gc
import inspect

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.transformers.transformer_2d import Transformer2DModel

import sdx4
from sdx4 import speed
from sdx4.model.placement import Placement
from sdx4.speed import channels_last, guidance_prefix, kvcache, prepack

CPU_FP32 = Placement(torch.device("cpu"), torch.float32, torch.float32)


def unet_inputs(unet, seed: int = 0) -> tuple[tuple, dict]:
    """A guided UNet call as the loop makes it: 2,7,16,16 latents + image, 2,77,D prompt embeddings."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, unet.config.in_channels, 16, 16, generator=g)
    emb = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    return (x, torch.tensor(500)), dict(encoder_hidden_states=emb, class_labels=torch.tensor([20, 20]), return_dict=False)


def run(unet, seed: int = 0) -> torch.Tensor:
    args, kwargs = unet_inputs(unet, seed)
    with torch.no_grad():
        return unet(*args, **kwargs)[0]


def tensors_in(obj, seen=None) -> int:
    """How many tensors `obj` holds in its attributes, tuples, lists and dicts (not in submodules)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, torch.nn.Module):
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return 1
    if isinstance(obj, dict):
        return sum(tensors_in(v, seen) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return sum(tensors_in(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type) and not callable(obj):
        return tensors_in(vars(obj), seen)
    return 0


def stray_tensors(unet) -> int:
    """Tensors held by the UNet's submodules or processors outside their parameters and buffers (a cache,
    a kept copy of a weight)."""
    n = 0
    for m in unet.modules():
        own = {k: v for k, v in vars(m).items() if k not in ("_parameters", "_buffers", "_modules")}
        n += tensors_in(own)
        proc = getattr(m, "processor", None)
        if proc is not None and not isinstance(proc, torch.nn.Module):
            n += tensors_in(vars(proc)) if hasattr(proc, "__dict__") else 0
    return n


def assert_plain(unet, fresh) -> None:
    """`unet` is diffusers' module as `fresh` is: the same attributes on every submodule, the same parameters
    (names, order, dtypes, strides, values), processors of the same types, and nothing of ours."""
    mods, fresh_mods = dict(unet.named_modules()), dict(fresh.named_modules())
    assert mods.keys() == fresh_mods.keys()
    for name, m in mods.items():
        f = fresh_mods[name]
        assert type(m) is type(f), name
        assert set(vars(m)) == set(vars(f)), (name, set(vars(m)) ^ set(vars(f)))
        assert not [k for k in vars(m) if k.startswith("_sdx4") or k in ("forward", channels_last.METHOD)], name
        assert list(m._parameters) == list(f._parameters) and list(m._buffers) == list(f._buffers), name
        assert type(getattr(m, "processor", None)) is type(getattr(f, "processor", None)), name
    state, fresh_state = unet.state_dict(), fresh.state_dict()
    assert list(state) == list(fresh_state)
    for k, v in state.items():
        w = fresh_state[k]
        assert (v.dtype, v.shape, v.stride(), v.is_mkldnn) == (w.dtype, w.shape, w.stride(), False), k
        assert torch.equal(v, w), k
    assert all(isinstance(p, torch.nn.Parameter) and not p.requires_grad for p in unet.parameters())


def test_install_says_what_it_put_on_the_unet(tiny_model_dir):
    up = sdx4.load(str(tiny_model_dir), device="cpu", dtype="fp32")
    unet, installed = up.components.unet, up.components.speed
    blocks = [m for m in unet.modules() if isinstance(m, Transformer2DModel)]
    layers = [m for m in unet.modules() if type(m) in (torch.nn.Conv2d, torch.nn.Linear)]
    assert (len(blocks), len(layers), len(kvcache.projections(unet))) == (7, 132, 20)  # the tiny UNet
    assert installed == speed.Installed(
        channels_last_blocks=7,
        compiled=False,
        guidance_prefix_modules=2,
        prepacked_layers=132 if prepack.available() else 0,
        kv_cached_projections=20,
    )
    assert installed.as_dict() == {
        "channels_last_blocks": 7,
        "compiled": False,
        "guidance_prefix_modules": 2,
        "prepacked_layers": prepack.installed(unet),
        "kv_cached_projections": 20,
    }
    assert installed.unet_ref() is unet


def test_uninstall_gives_back_diffusers_module_and_its_output_bit_for_bit(tiny_model_dir):
    """Round trip on diffusers' own load: install, run (weights packed, keys and values remembered),
    uninstall; then the module, its state_dict and its output are those of an untouched load."""
    fresh = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").eval().requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").eval().requires_grad_(False)
    processors = unet.attn_processors  # name -> processor object
    expected = run(fresh)
    installed = speed.install(unet, CPU_FP32)
    assert installed.prepacked_layers == (132 if prepack.available() else 0) and installed.kv_cached_projections == 20
    tricked = run(unet)
    assert kvcache.remembered(unet) > 0
    if prepack.available():
        assert sum(m.weight.is_mkldnn for m in unet.modules() if hasattr(m, "_sdx4_plain")) == 132
        # fp32 linear layers run oneDNN's GEMM instead of MKL's: rounding only
        assert not torch.equal(tricked, expected)
    torch.testing.assert_close(tricked, expected, rtol=1e-4, atol=1e-5)
    installed.uninstall()
    assert_plain(unet, fresh)
    assert all(unet.attn_processors[k] is p for k, p in processors.items())  # the very objects that were there
    assert stray_tensors(unet) == 0
    assert torch.equal(run(unet), expected)
    installed.uninstall()  # idempotent
    assert_plain(unet, fresh)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_uninstall_after_sdx4_load_gives_the_weights_as_loaded(tiny_model_dir, rng_image, dtype):
    """sdx4's own load (channels-last weights, packed on first use): after a run and uninstall the state_dict
    is that of a fresh, untouched load in the same placement (dtypes, strides, values)."""
    from sdx4.model.loading import _load_unet, _place

    up = sdx4.load(str(tiny_model_dir), device="cpu", dtype=dtype)
    unet, placement = up.components.unet, up.components.placement
    up(rng_image(16, 16, seed=3), steps=2, seed=1)
    fresh = _place(_load_unet(tiny_model_dir, placement), placement)
    up.components.speed.uninstall()
    assert_plain(unet, fresh)
    assert torch.equal(run(unet.float()), run(fresh.float()))


def test_packed_weights_are_unpacked_without_a_kept_copy():
    """prepack keeps no second copy of a weight to restore it: while installed the layers hold only their
    (packed) weights, biases and a few numbers; uninstall unpacks the packed weight itself."""
    if not prepack.available():
        pytest.skip("this torch build has no oneDNN")
    g = torch.Generator().manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.Conv2d(16, 8, 1, bias=False))
    for p in layers.parameters():
        p.data = torch.randn(p.shape, generator=g)
    layers = layers.to(memory_format=torch.channels_last).eval().requires_grad_(False)
    plain = [(m.weight.clone(), m.weight.stride()) for m in layers]
    assert prepack.install(layers) == 2
    with torch.no_grad():
        layers(torch.randn(1, 8, 6, 6, generator=g))
    assert all(m.weight.is_mkldnn and "weight" in m._buffers for m in layers)
    assert stray_tensors(layers) == 0  # _sdx4_plain: strides, requires_grad, parameter order
    assert prepack.uninstall(layers) == 2
    for m, (w, strides) in zip(layers, plain):
        assert isinstance(m.weight, torch.nn.Parameter) and not m.weight.requires_grad
        assert m.weight.stride() == strides and torch.equal(m.weight, w)
        assert list(m._parameters) == ["weight", "bias"] and not m._buffers
    assert prepack.installed(layers) == 0 and prepack.uninstall(layers) == 0


def test_a_cancelled_run_leaves_the_key_value_cache_empty(tiny_model_dir, rng_image):
    up = sdx4.load(str(tiny_model_dir), device="cpu", dtype="fp32")
    unet = up.components.unet
    held_at_step: list[int] = []

    class Cancelled(Exception):
        pass

    def progress(i: int, n: int) -> None:
        held_at_step.append(kvcache.remembered(unet))
        if i >= 1:
            raise Cancelled

    with pytest.raises(Cancelled):
        up(rng_image(16, 16, seed=2), steps=3, seed=0, progress=progress)
    assert held_at_step == [20]  # step 1 ran with the cache full (one result of each of the 20 projections)
    assert kvcache.remembered(unet) == 0  # ...and it is empty after the cancelled loop
    assert stray_tensors(unet) == 0


def test_the_record_of_what_was_installed_does_not_keep_the_unet_alive(tiny_model_dir):
    up = sdx4.load(str(tiny_model_dir), device="cpu", dtype="fp32")
    c = up.components
    first = c.speed
    c.unet = None  # what the low-memory policy does before a large decode
    gc.collect()
    assert first.unet_ref() is None
    first.uninstall()  # nothing left to undo: no error
    c.unet = c.load_unet()
    assert c.speed is not first and c.speed.unet_ref() is c.unet
    assert c.speed == first  # the reloaded UNet got the same tricks


def test_switched_off_prepack_and_compile_are_recorded_and_undone(tiny_model_dir, monkeypatch):
    fresh = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").eval().requires_grad_(False)
    monkeypatch.setenv("SDX4_PREPACK", "0")
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").eval().requires_grad_(False)
    installed = speed.install(unet, CPU_FP32)
    assert (installed.prepacked_layers, installed.kv_cached_projections, installed.guidance_prefix_modules) == (0, 20, 2)
    installed.uninstall()
    assert_plain(unet, fresh)
    # torch.compile is lazy (it compiles on the first call): installing and uninstalling it costs nothing
    compiled = speed.install(unet, CPU_FP32, compile=True)
    assert compiled == speed.Installed(channels_last_blocks=7, compiled=True)
    assert "_compiled_call_impl" in vars(unet) and kvcache.remembered(unet) == 0
    compiled.uninstall()
    assert_plain(unet, fresh)


def test_guidance_prefix_uninstall_gives_back_a_forward_set_before_it(tiny_model_dir):
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").eval()
    first = unet.down_blocks[0]
    theirs = first.forward  # someone else's instance forward, set before ours
    first.forward = lambda *a, **k: theirs(*a, **k)
    own = first.forward
    assert guidance_prefix.install(unet) == 2 and first.forward is not own
    assert guidance_prefix.uninstall(unet) == 2
    assert first.forward is own and "forward" not in vars(unet.down_blocks[1].resnets[0])
    assert not any("_sdx4_prefix" in vars(m) for m in unet.modules())


def test_the_channels_last_copy_is_of_the_installed_diffusers_body():
    """channels_last.py replaces diffusers' private method with a copy of its body without `.contiguous()`.
    This fails the day diffusers changes that method: then compare the new body with `_channels_last_output`,
    port the change, and store the new body in DIFFUSERS_BODY (docs/speed.md, "A newer diffusers")."""
    source = inspect.getsource(getattr(Transformer2DModel, channels_last.METHOD))
    assert channels_last.normalised(source) == channels_last.normalised(channels_last.DIFFUSERS_BODY)
    # what the copy leaves out is only the layout copy: the two bodies differ by `.contiguous()` calls
    copy = inspect.getsource(channels_last._channels_last_output)
    assert ".contiguous()" not in copy and channels_last.normalised(source).count(".contiguous()") == 2
