"""Finding, checking and placing the model: Hub cache, local folders, broken parts, device/precision."""

import json
import shutil

import pytest
import torch
from conftest import run_cli

import sdx4
from sdx4.model import placement
from sdx4.model.errors import ModelConfigError, ModelNotFoundError, ModelPathError
from sdx4.model.hub import resolve_model_dir
from sdx4.model.loading import load_components
from sdx4.model.placement import resolve_placement
from sdx4.options import DEFAULT_MODEL


def fake_hub_cache(root, model_dir, repo_id="someorg/x4-upscaler", commit="0123456789abcdef"):
    """The Hugging Face cache layout (models--org--name/snapshots/<commit>, refs/main)."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo_id


def test_hub_id_offline_not_cached_fails_fast_with_the_fix(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model_dir(DEFAULT_MODEL)
    msg = str(e.value)
    assert DEFAULT_MODEL in msg and "not in the Hugging Face cache" in msg
    assert "HF_HUB_OFFLINE=1" in msg and "--model PATH" in msg


def test_hub_unreachable_is_detected_by_a_quick_probe(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model_dir(DEFAULT_MODEL)
    msg = str(e.value)
    assert "cannot be reached" in msg and "http://127.0.0.1:9" in msg and "--model PATH" in msg


def test_hub_id_loads_from_the_cache_offline(tmp_path, tiny_model_dir, rng_image):
    """The Hub path up to the network boundary: a cached repo id loads with HF_HUB_OFFLINE=1."""
    from PIL import Image

    repo_id = fake_hub_cache(tmp_path / "hub", tiny_model_dir)
    Image.fromarray(rng_image(8, 8)).save(tmp_path / "in.png")
    r = run_cli(
        "upscale", str(tmp_path / "in.png"), "--model", repo_id, "--steps", "1", "--seed", "1", "-o",
        str(tmp_path / "out.png"), env={"HF_HUB_CACHE": str(tmp_path / "hub")},
    )
    assert r.returncode == 0, r.stderr
    assert sdx4.read_metadata(tmp_path / "out.png")["model"] == repo_id


def test_cli_hub_failure_is_exit_1_with_message(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "in.png")
    r = run_cli("upscale", str(tmp_path / "in.png"), env={"HF_HUB_CACHE": str(tmp_path / "empty")})
    assert r.returncode == 1
    assert "not in the Hugging Face cache" in r.stderr and "--model PATH" in r.stderr
    assert not (tmp_path / "in_x4.png").exists()


@pytest.mark.parametrize(
    "model, message",
    [
        ("/definitely/not/here", "model folder '/definitely/not/here' does not exist"),
        ("./nope", "does not exist. Pass --model PATH"),
    ],
)
def test_wrong_local_path(model, message):
    with pytest.raises(ModelPathError, match=message):
        resolve_model_dir(model)


def test_folder_not_in_diffusers_layout(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelPathError, match="not in diffusers layout: missing vae, text_encoder"):
        resolve_model_dir(str(tmp_path))


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_broken_tokenizer_is_refused(tmp_path, tiny_model_dir):
    model = copy_model(tiny_model_dir, tmp_path / "m")
    (model / "tokenizer" / "vocab.json").unlink()
    (model / "tokenizer" / "merges.txt").unlink()
    with pytest.raises(ModelConfigError, match="tokenizer at .* is broken: .* tokens in its vocabulary"):
        load_components(str(model), device="cpu", dtype="fp32")


def test_unet_that_does_not_take_latents_plus_rgb_is_refused(tmp_path, tiny_model_dir):
    from diffusers import UNet2DConditionModel

    from sdx4.model.random_model import UNET_CONFIGS

    model = copy_model(tiny_model_dir, tmp_path / "m")
    shutil.rmtree(model / "unet")
    UNet2DConditionModel(**{**UNET_CONFIGS["tiny"], "in_channels": 8}).save_pretrained(model / "unet")
    with pytest.raises(ModelConfigError, match=r"unet in_channels is 8 but .* latent channels \(4\) \+ 3 RGB channels = 7"):
        load_components(str(model), device="cpu", dtype="fp32")


def test_missing_vae_scaling_factor_becomes_0_08333(tmp_path, tiny_model_dir):
    model = copy_model(tiny_model_dir, tmp_path / "m")
    cfg_path = model / "vae" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["scaling_factor"]
    cfg_path.write_text(json.dumps(cfg))
    c = load_components(str(model), device="cpu", dtype="fp32")
    assert c.vae.config.scaling_factor == 0.08333


def test_placement_policy():
    p = resolve_placement("cpu", "fp32")
    assert (p.device.type, p.unet_dtype, p.text_dtype, p.vae_dtype) == ("cpu", torch.float32, torch.float32, torch.float32)
    p = resolve_placement("cpu", "bf16")
    assert (p.unet_dtype, p.text_dtype, p.vae_dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    p = resolve_placement("cpu", "fp16")
    assert p.vae_dtype == torch.float32  # the VAE overflows to NaN in fp16
    with pytest.raises(ValueError, match="dtype must be auto, fp32, fp16 or bf16; got 'fp8'"):
        resolve_placement("cpu", "fp8")
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda, cuda:N or mps; got 'tpu'"):
        resolve_placement("tpu", "auto")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_asked_for_without_cuda():
    with pytest.raises(ValueError, match="sees no CUDA GPU"):
        resolve_placement("cuda", "auto")


def test_components_are_loaded_in_the_asked_dtype(tiny_model_dir):
    c = load_components(str(tiny_model_dir), device="cpu", dtype="bf16")
    assert c.unet.dtype == torch.bfloat16 and c.text_encoder.dtype == torch.bfloat16 and c.vae.dtype == torch.float32
    up = sdx4.Upscaler(c)
    r = up(torch.rand(3, 8, 8), steps=1, seed=0)
    assert r.image.size == (32, 32) and r.metadata["unet_dtype"] == "bf16"


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.cuda
def test_cuda_auto_is_fp16_unet_fp32_vae_and_finite(tiny_model_dir):
    p = resolve_placement("auto", "auto")
    assert p.device.type == "cuda" and p.unet_dtype == torch.float16 and p.vae_dtype == torch.float32
    up = sdx4.load(str(tiny_model_dir), device="cuda", dtype="auto")
    assert up.components.vae.dtype == torch.float32
    r = up(torch.rand(3, 16, 16), steps=2, seed=0)
    import numpy as np

    assert r.image.size == (64, 64) and np.asarray(r.image).std() > 1


@cuda
@pytest.mark.cuda
def test_cuda_fp32_matches_cpu_fp32_closely(tiny_model_dir, tiny_upscaler):
    import numpy as np

    gpu = sdx4.load(str(tiny_model_dir), device="cuda", dtype="fp32")
    img = torch.rand(3, 16, 16)
    a = np.asarray(gpu(img, steps=2, seed=0).image, dtype=np.int16)
    b = np.asarray(tiny_upscaler(img, steps=2, seed=0).image, dtype=np.int16)
    assert np.abs(a - b).max() <= 2  # same CPU generator stream; only kernel rounding differs


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_streamed_weights_equal_from_pretrained(tiny_model_dir, dtype):
    """weights.py reads tensor by tensor into the target dtype: bit-identical to from_pretrained."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch_dtype = placement.DTYPES[dtype]
    c = load_components(str(tiny_model_dir), device="cpu", dtype=dtype)
    refs = {
        "unet": (c.unet, UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet", torch_dtype=torch_dtype)),
        "vae": (c.vae, AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae", torch_dtype=torch.float32)),
        "text": (c.text_encoder, CLIPTextModel.from_pretrained(tiny_model_dir / "text_encoder", dtype=torch_dtype)),
    }
    for name, (ours, ref) in refs.items():
        a, b = ours.state_dict(), ref.state_dict()
        assert a.keys() == b.keys(), name
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{name}.{k}"


def test_weights_that_do_not_fit_fall_back_to_from_pretrained(tmp_path, tiny_model_dir):
    """A renamed key (as in legacy checkpoints that diffusers converts on load) is not streamed."""
    from safetensors.torch import load_file, save_file

    from sdx4.model.weights import WeightsMismatch, load_diffusers_model

    model = copy_model(tiny_model_dir, tmp_path / "m")
    path = model / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state["renamed.weight"] = state.pop("conv_in.weight")
    save_file(state, path)
    from diffusers import UNet2DConditionModel

    with pytest.raises(WeightsMismatch, match="keys differ: missing \\['conv_in.weight'\\]"):
        load_diffusers_model(UNet2DConditionModel, model / "unet", torch.float32)
    (model / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsMismatch, match="no single safetensors file"):
        load_diffusers_model(UNet2DConditionModel, model / "unet", torch.float32)
