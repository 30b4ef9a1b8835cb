"""A damaged or inconsistent model is a clear error: exit 2 with a message naming the file (relative to the
model folder) and the first bad key or value, never a traceback; a non-finite output image is exit 1 and no
file. Each case damages a copy of the tiny random model in one way."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from sdx4 import cli
from sdx4.model.errors import ModelConfigError
from sdx4.model.loading import load_components

UNET = "unet/diffusion_pytorch_model.safetensors"
VAE = "vae/diffusion_pytorch_model.safetensors"
TEXT = "text_encoder/model.safetensors"


@pytest.fixture
def damaged(tmp_path, tiny_model_dir):
    """A fresh copy of the tiny model to damage."""
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def edit_json(path, **changes):
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def edit_weights(path, change):
    state = load_file(path)
    change(state)
    save_file(state, path)


def run_upscale(model, tmp_path, capsys):
    """`sdx4 upscale` in this process: (exit code, stderr, whether an output file was written)."""
    img = tmp_path / "in.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (8, 8, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "out.png"
    code = cli.main(["upscale", str(img), "--model", str(model), "--device", "cpu", "--dtype", "fp32",
                     "--steps", "1", "--seed", "0", "-q", "-o", str(out)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err, out.exists()


def refused(model, tmp_path, capsys, *fragments):
    """Exit 2, one `sdx4: error:` line naming every fragment, nothing written."""
    code, err, written = run_upscale(model, tmp_path, capsys)
    assert (code, written) == (2, False), err
    assert err.startswith("sdx4: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


# -- weight files ------------------------------------------------------------------------------------------


def test_an_empty_unet_file_is_exit_2_naming_it(damaged, tmp_path, capsys):
    (damaged / UNET).write_bytes(b"")
    refused(damaged, tmp_path, capsys, f"{UNET}: 0 bytes, too short for a safetensors file")


def test_a_truncated_vae_file_names_the_first_tensor_beyond_the_end(damaged, tmp_path, capsys):
    data = (damaged / VAE).read_bytes()
    (damaged / VAE).write_bytes(data[: len(data) // 2])
    refused(damaged, tmp_path, capsys, f"{VAE}: truncated: tensor ", "bytes of data")


def test_a_header_longer_than_the_file_is_refused(damaged, tmp_path, capsys):
    (damaged / TEXT).write_bytes((10**6).to_bytes(8, "little") + b"{}")
    refused(damaged, tmp_path, capsys, f"{TEXT}: the safetensors header says it is 1000000 bytes long but the file has 10")


def test_a_header_that_is_not_json_is_refused(damaged, tmp_path, capsys):
    (damaged / TEXT).write_bytes((4).to_bytes(8, "little") + b"\xff{x}")
    refused(damaged, tmp_path, capsys, f"{TEXT}: the safetensors header is not valid JSON")


def test_a_missing_tensor_is_named(damaged, tmp_path, capsys):
    edit_weights(damaged / UNET, lambda s: s.pop("conv_in.weight"))
    refused(damaged, tmp_path, capsys, f"{UNET}: 1 tensors that unet/config.json needs are missing, the first conv_in.weight")


def test_a_tensor_of_the_wrong_shape_is_named_with_both_shapes(damaged, tmp_path, capsys):
    edit_weights(damaged / VAE, lambda s: s.update({"decoder.conv_out.bias": torch.zeros(5)}))
    refused(damaged, tmp_path, capsys, f"{VAE}: tensor decoder.conv_out.bias has shape (5,) but vae/config.json gives (3,)")


def test_a_text_encoder_smaller_than_its_config_is_refused(damaged, tmp_path, capsys):
    edit_json(damaged / "text_encoder" / "config.json", intermediate_size=40)  # the weights' MLPs are 37 wide
    refused(damaged, tmp_path, capsys, f"{TEXT}: tensor encoder.layers.0.mlp.fc1.weight has shape (37, 32) but "
            "text_encoder/config.json gives (40, 32)")


def test_a_text_encoder_narrower_than_the_unet_expects_is_refused(damaged, tmp_path, capsys):
    edit_json(damaged / "text_encoder" / "config.json", hidden_size=64, projection_dim=64)
    refused(damaged, tmp_path, capsys, "unet cross_attention_dim is 32 but the text encoder's hidden size is 64")


def test_renamed_keys_that_from_pretrained_cannot_map_are_refused_not_left_empty(damaged):
    edit_weights(damaged / UNET, lambda s: s.update({"renamed.weight": s.pop("conv_in.weight")}))
    with pytest.raises(ModelConfigError, match="unet: the weights do not fit unet/config.json: 1 missing keys, the first conv_in.weight"):
        load_components(str(damaged), device="cpu", dtype="fp32")


def test_unexpected_extra_tensors_are_skipped_with_a_warning(damaged, caplog):
    edit_weights(damaged / VAE, lambda s: s.update({"leftover.weight": torch.ones(2)}))
    with caplog.at_level(logging.WARNING, logger="sdx4"):
        c = load_components(str(damaged), device="cpu", dtype="fp32")
    assert f"{VAE}: ignoring 1 tensors that vae/config.json does not use, the first leftover.weight" in caplog.text
    assert "leftover.weight" not in c.vae.state_dict()


def test_nan_vae_weights_are_refused_at_load_naming_the_first_tensor(damaged, tmp_path, capsys):
    first = next(iter(load_file(damaged / VAE)))
    edit_weights(damaged / VAE, lambda s: [t.fill_(float("nan")) for t in s.values() if t.is_floating_point()])
    refused(damaged, tmp_path, capsys, f"{VAE}: tensor {first} has ", "non-finite values (NaN or inf)")


def test_one_inf_in_the_text_encoder_is_found(damaged, tmp_path, capsys):
    edit_weights(damaged / TEXT, lambda s: s["final_layer_norm.weight"].__setitem__(3, float("inf")))
    refused(damaged, tmp_path, capsys, f"{TEXT}: tensor final_layer_norm.weight has 1 non-finite values")


def test_weights_beyond_fp16_are_refused_in_fp16_with_the_fix(damaged):
    from diffusers import AutoencoderKL

    from sdx4.model.loading import _load_diffusers

    edit_weights(damaged / VAE, lambda s: s["decoder.conv_out.bias"].fill_(1e6))
    with pytest.raises(ModelConfigError, match=f"{VAE}: tensor decoder.conv_out.bias has 3 values beyond the range of float16 .*--dtype fp32"):
        _load_diffusers(AutoencoderKL, damaged, "vae", torch.float16, False)


# -- configs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, shown", [(0, "0"), (-5, "-5"), ("1000", "'1000'"), (1000.5, "1000.5")]
)
def test_num_train_timesteps_must_be_a_positive_integer(damaged, tmp_path, capsys, value, shown):
    edit_json(damaged / "scheduler" / "scheduler_config.json", num_train_timesteps=value)
    refused(damaged, tmp_path, capsys, f"scheduler/scheduler_config.json: num_train_timesteps is {shown}; expected a positive integer")


def test_an_unknown_prediction_type_is_refused(damaged, tmp_path, capsys):
    edit_json(damaged / "scheduler" / "scheduler_config.json", prediction_type="velocity")
    refused(damaged, tmp_path, capsys, "scheduler/scheduler_config.json: prediction_type is 'velocity'; expected one of epsilon, v_prediction, sample")


def test_an_unknown_beta_schedule_is_refused(damaged, tmp_path, capsys):
    edit_json(damaged / "low_res_scheduler" / "scheduler_config.json", beta_schedule="cosine")
    refused(damaged, tmp_path, capsys, "low_res_scheduler/scheduler_config.json: beta_schedule is 'cosine'")


def test_a_noise_level_beyond_the_low_res_schedule_is_refused(damaged, tmp_path, capsys):
    edit_json(damaged / "low_res_scheduler" / "scheduler_config.json", num_train_timesteps=300)
    refused(damaged, tmp_path, capsys, "model_index.json: max_noise_level is 350 but low_res_scheduler/scheduler_config.json has num_train_timesteps 300")


def test_a_vae_latent_channels_mismatch_is_refused_before_loading(damaged, tmp_path, capsys):
    edit_json(damaged / "vae" / "config.json", latent_channels=8)
    refused(damaged, tmp_path, capsys, "unet in_channels is 7 but the x4 upscaler needs latent channels (8) + 3 RGB channels = 11")


def test_a_config_that_is_not_an_object_is_refused(damaged, tmp_path, capsys):
    (damaged / "unet" / "config.json").write_text("[1, 2]")
    refused(damaged, tmp_path, capsys, "unet/config.json: holds a JSON list, expected an object")


def test_a_config_diffusers_cannot_build_is_named(damaged, tmp_path, capsys):
    edit_json(damaged / "vae" / "config.json", block_out_channels=[16, 16])  # 3 block types, 2 widths
    refused(damaged, tmp_path, capsys, "vae/config.json: could not be loaded (")


def test_a_tokenizer_larger_than_the_text_encoder_vocabulary_is_refused(damaged, tmp_path, capsys):
    edit_json(damaged / "text_encoder" / "config.json", vocab_size=300)
    edit_weights(damaged / TEXT, lambda s: s.update({"embeddings.token_embedding.weight": s["embeddings.token_embedding.weight"][:300].clone()}))
    refused(damaged, tmp_path, capsys, "text_encoder/config.json: vocab_size is 300 but the tokenizer has")


# -- the output ---------------------------------------------------------------------------------------------


def test_a_non_finite_output_is_exit_1_and_no_file(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from sdx4.engine import loop

    real = loop.decode_latents

    def nan_decode(*a, **k):
        decoded, report = real(*a, **k)
        decoded[:, :, :2, :3] = float("nan")  # n,3,H,W: 6 pixels x 3 channels
        return decoded, report

    monkeypatch.setattr(loop, "decode_latents", nan_decode)
    code, err, written = run_upscale(tiny_model_dir, tmp_path, capsys)
    assert (code, written) == (1, False), err
    assert "sdx4: error: the decoded image has 18 non-finite values (NaN or inf)" in err


def test_model_errors_raised_after_loading_are_exit_2_too(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """The mapping is by class wherever the error comes from (folder runs re-raise it to `main`)."""
    from sdx4 import api

    def broken(*a, **k):
        raise ModelConfigError("unet/diffusion_pytorch_model.safetensors: damaged")

    monkeypatch.setattr(api.Upscaler, "_upscale_sd", broken)
    code, err, written = run_upscale(tiny_model_dir, tmp_path, capsys)
    assert (code, written) == (2, False) and "unet/diffusion_pytorch_model.safetensors: damaged" in err


def test_a_damaged_model_in_a_folder_run_is_exit_2_too(damaged, tmp_path, capsys):
    """Folder runs re-raise the model's error to `main`: the same exit code as for one file."""
    (damaged / UNET).write_bytes(b"")
    folder = tmp_path / "inputs"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(folder / "a.png")
    code = cli.main(["upscale", str(folder), "--model", str(damaged), "--device", "cpu", "--dtype", "fp32",
                     "--steps", "1", "-q", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and f"sdx4: error: {UNET}: 0 bytes" in err and "Traceback" not in err, err


# -- caches --------------------------------------------------------------------------------------------------


def test_a_damaged_cached_random_model_is_rebuilt_with_a_warning(tmp_path, caplog):
    from sdx4.model.random_model import RANDOM_MARKER, cached_random_model

    path = cached_random_model("tiny", cache_dir=tmp_path)
    (path / UNET).write_bytes(b"")  # marker still there, weights gone
    with caplog.at_level(logging.WARNING, logger="sdx4"):
        again = cached_random_model("tiny", cache_dir=tmp_path)
    assert again == path and f"rebuilding the cached random model {path}: {UNET}: 0 bytes" in caplog.text
    assert (path / UNET).stat().st_size > 1000 and (path / RANDOM_MARKER).is_file()
    caplog.clear()
    (path / RANDOM_MARKER).unlink()  # a folder without its marker (an interrupted copy) is rebuilt, not renamed over
    with caplog.at_level(logging.WARNING, logger="sdx4"):
        assert cached_random_model("tiny", cache_dir=tmp_path) == path
    assert f"no {RANDOM_MARKER} marker file" in caplog.text and (path / RANDOM_MARKER).is_file()
