"""Single-file checkpoints (x4-upscaler-ema.safetensors / .ckpt): the bundled configs and tokenizer, loading
offline, parity with the folder and with diffusers' from_single_file, `sdx4 convert` both ways, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "sdx4" / "model" / "configs"


@pytest.fixture(scope="module")
def single(tiny_model_dir, tmp_path_factory) -> Path:
    import sdx4

    return Path(
        sdx4.convert(
            str(tiny_model_dir),
            str(tmp_path_factory.mktemp("single") / "tiny.safetensors"),
        )
    )


@pytest.fixture(scope="module")
def image():
    return np.random.RandomState(3).randint(0, 256, (20, 24, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def folder_image(tiny_model_dir, image):
    import sdx4

    return np.asarray(
        sdx4.load(str(tiny_model_dir), device="cpu", dtype="fp32")(
            image, seed=5, steps=2
        ).image
    )


def _run(model, image, **kw):
    import sdx4

    return np.asarray(
        sdx4.load(str(model), device="cpu", dtype="fp32", **kw)(
            image, seed=5, steps=2
        ).image
    )


# ---- the bundled configs and tokenizer ---------------------------------------------------------------


def test_bundled_configs_are_the_published_architecture_and_schedulers():
    from sdx4.model import random_model as rm

    unet = json.loads((CONFIGS / "unet/config.json").read_text())
    for k, v in rm.UNET_CONFIGS["full"].items():
        assert unet[k] == (list(v) if isinstance(v, tuple) else v), k
    assert (
        unet["in_channels"] == 7
        and unet["num_class_embeds"] == 1000
        and unet["norm_num_groups"] == 32
    )
    vae = json.loads((CONFIGS / "vae/config.json").read_text())
    assert (
        vae["block_out_channels"] == [128, 256, 512]
        and vae["scaling_factor"] == 0.08333
    )
    text = json.loads((CONFIGS / "text_encoder/config.json").read_text())
    assert (
        text["hidden_size"],
        text["num_hidden_layers"],
        text["hidden_act"],
        text["vocab_size"],
    ) == (1024, 23, "gelu", 49408)
    sched = json.loads((CONFIGS / "scheduler/scheduler_config.json").read_text())
    assert (
        sched["_class_name"] == "DDIMScheduler"
        and sched["prediction_type"] == "v_prediction"
    )
    assert (
        sched["beta_schedule"],
        sched["beta_start"],
        sched["beta_end"],
        sched["steps_offset"],
    ) == ("scaled_linear", 0.0001, 0.02, 1)
    low = json.loads((CONFIGS / "low_res_scheduler/scheduler_config.json").read_text())
    assert (
        low["_class_name"] == "DDPMScheduler"
        and low["beta_schedule"] == "scaled_linear"
    )
    assert (
        json.loads((CONFIGS / "model_index.json").read_text())["max_noise_level"] == 350
    )


@pytest.mark.parametrize(
    "prompt, ids",
    [  # CLIP's ids, as public tokenizer tests give them
        ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407]),
        ("hello world", [49406, 3306, 1002, 49407]),
        ("a painting of a dog", [49406, 320, 3086, 539, 320, 1929, 49407]),
        ("a spooky scene", [49406, 320, 15369, 3562, 49407]),
        (
            "snow-capped mountains, 4k",
            [49406, 2583, 268, 24659, 5873, 267, 275, 330, 49407],
        ),
        ("grandma's 2 birthday cakes", [49406, 10525, 568, 273, 1166, 5950, 49407]),
    ],
)
def test_bundled_tokenizer_gives_clips_token_ids(prompt, ids):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(CONFIGS / "tokenizer")
    assert len(tok) == 49408
    assert tok(prompt).input_ids == ids
    assert (tok.pad_token, tok.pad_token_id, tok.model_max_length) == ("!", 0, 77)


def test_full_size_original_layout_agrees_with_diffusers_converters_on_meta_tensors():
    """The bundled configs' networks -> our original layout: diffusers recognises it as the upscaler, the
    published file's keys have the published shapes, and diffusers' converters give back every tensor."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    from sdx4.model.convert import to_original
    from sdx4.model.single_file import (
        PREFIXES,
        Checkpoint,
        build_empty,
        check_conversion,
        read_configs_dir,
    )

    configs = read_configs_dir(CONFIGS)
    empty = {p: build_empty(p, configs[p]) for p in PREFIXES}
    original = to_original({p: m.state_dict() for p, m in empty.items()}, configs)
    shapes = {k: tuple(v.shape) for k, v in original.items()}
    assert infer_diffusers_model_type(original) == "upscale"
    assert shapes["model.diffusion_model.input_blocks.0.0.weight"] == (256, 7, 3, 3)
    assert shapes["model.diffusion_model.label_emb.weight"] == (1000, 1024)
    assert shapes["model.diffusion_model.input_blocks.10.0.skip_connection.bias"] == (
        1024,
    )
    assert shapes["first_stage_model.decoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shapes[
        "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"
    ] == (3072, 1024)
    assert (
        "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"
        not in shapes
    )
    n = {p: sum(k.startswith(pre) for k in shapes) for p, pre in PREFIXES.items()}
    want = {
        p: len([k for k in m.state_dict() if not k.endswith("position_ids")])
        for p, m in empty.items()
    }
    # one tensor for one, except in_proj: q, k, v (weights and biases: 6 tensors) fused into 2 in each of the 23 layers
    assert (
        (n["unet"], n["vae"], n["text_encoder"])
        == (want["unet"], want["vae"], want["text_encoder"] - 4 * 23)
        == (687, 204, 280)
    )
    ckpt = Checkpoint(Path("full.safetensors"), shapes, None)
    for p in PREFIXES:  # raises on any missing key or shape
        check_conversion(ckpt, p, configs[p], empty[p], "the bundled configs")


def test_our_reverse_conversion_is_exactly_undone_by_diffusers(tiny_model_dir):
    from sdx4.model.convert import _folder_state, to_original
    from sdx4.model.single_file import (
        PREFIXES,
        build_empty,
        read_configs_dir,
        to_diffusers,
    )

    configs = read_configs_dir(tiny_model_dir)
    states = {p: _folder_state(tiny_model_dir, p) for p in PREFIXES}
    original = to_original(states, configs)
    for p, pre in PREFIXES.items():
        part = {k: v for k, v in original.items() if k.startswith(pre)}
        back = to_diffusers(p, part, configs[p], build_empty(p, configs[p]))
        want = {k: v for k, v in states[p].items() if not k.endswith("position_ids")}
        assert set(back) == set(want), p
        for k, v in want.items():
            assert torch.equal(back[k], v), k


# ---- loading ------------------------------------------------------------------------------------------


def test_single_file_loads_offline_and_gives_the_folders_image(
    single, image, folder_image
):
    import sdx4

    up = sdx4.load(str(single), device="cpu", dtype="fp32")
    c = up.components
    assert c.scheduler.config.prediction_type == "v_prediction"
    assert (
        type(c.scheduler).__name__ == "DDIMScheduler"
        and type(c.low_res_scheduler).__name__ == "DDPMScheduler"
    )
    assert c.max_noise_level == 350 and c.random_weights is True
    out = np.asarray(up(image, seed=5, steps=2).image)
    assert np.array_equal(out, folder_image)


def test_single_file_with_low_memory_reloads_the_text_encoder_from_the_file(
    single, image
):
    """The low-memory policy drops the text encoder after the first prompts; a new prompt reads it again
    from the single file (Components.source), and gives what a model that kept it gives."""
    import sdx4

    up = sdx4.load(str(single), device="cpu", dtype="fp32", low_memory=True)
    assert up.components.text_encoder is None and up.components.folder is None
    a = np.asarray(up(image, seed=5, steps=2, prompt="a photo of a cat").image)
    kept = sdx4.load(str(single), device="cpu", dtype="fp32", low_memory=False)
    assert np.array_equal(
        a, np.asarray(kept(image, seed=5, steps=2, prompt="a photo of a cat").image)
    )


def test_diffusers_from_single_file_on_our_file_matches_the_folder_and_sdx4(
    single, tiny_model_dir, image, folder_image
):
    from diffusers import StableDiffusionUpscalePipeline
    from PIL import Image

    def run(pipe):
        g = torch.Generator().manual_seed(5)
        return pipe(
            prompt="",
            image=Image.fromarray(image),
            num_inference_steps=2,
            generator=g,
            output_type="np",
        ).images[0]

    ours = StableDiffusionUpscalePipeline.from_single_file(
        str(single), config=str(tiny_model_dir), local_files_only=True
    )
    ref = StableDiffusionUpscalePipeline.from_pretrained(
        str(tiny_model_dir), local_files_only=True
    )
    a, b = run(ours), run(ref)
    assert np.array_equal(a, b)  # diffusers reads every tensor of our file back exactly
    assert (
        np.abs(a * 255 - folder_image.astype(np.float64)).max() <= 1.0
    )  # and sdx4 agrees within 1/255


def test_ckpt_with_state_dict_loads(single, tmp_path, image, folder_image):
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        meta = f.metadata()
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": state, "sdx4_configs": meta["sdx4_configs"]}, path)
    assert np.array_equal(_run(path, image), folder_image)


def test_single_file_to_folder_round_trip(
    single, tmp_path, image, folder_image, tiny_model_dir
):
    import sdx4
    from sdx4.model.errors import ModelPathError

    back = sdx4.convert(str(single), str(tmp_path / "back"))
    assert back == str(tmp_path / "back")
    from safetensors.torch import load_file

    for rel in (
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ):
        a, b = load_file(tmp_path / "back" / rel), load_file(tiny_model_dir / rel)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), rel
    assert np.array_equal(_run(tmp_path / "back", image), folder_image)
    with pytest.raises(ModelPathError, match="already exists"):
        sdx4.convert(str(single), str(tmp_path / "back"))


def test_cli_convert_folder_to_single_file_in_fp16(tiny_model_dir, tmp_path):
    from safetensors import safe_open

    out = run_cli(
        "convert",
        str(tiny_model_dir),
        str(tmp_path / "t16.safetensors"),
        "--dtype",
        "fp16",
    )
    assert out.returncode == 0, out.stderr
    assert f"use it with --model {tmp_path / 't16.safetensors'}" in out.stderr
    again = run_cli("convert", str(tiny_model_dir), str(tmp_path / "t16.safetensors"))
    assert again.returncode == 2 and "already exists" in again.stderr
    with safe_open(str(tmp_path / "t16.safetensors"), framework="pt") as f:
        t = f.get_tensor("model.diffusion_model.input_blocks.0.0.weight")
        assert t.dtype == torch.float16 and t.shape[1] == 7
        assert (
            json.loads(f.metadata()["sdx4_configs"])["scheduler"]["prediction_type"]
            == "v_prediction"
        )
    assert not list(tmp_path.glob("*.partial"))


# ---- refusals -----------------------------------------------------------------------------------------


def _save(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    from safetensors.torch import save_file

    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path))
    return path


def _refusal(model: Path) -> str:
    import sdx4
    from sdx4.model.errors import ModelConfigError

    with pytest.raises(ModelConfigError) as e:
        sdx4.load(str(model), device="cpu", dtype="fp32")
    return str(e.value)


def test_refuses_a_stable_diffusion_1_checkpoint(tmp_path):
    path = _save(
        tmp_path / "v1-5.safetensors",
        {
            "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
            "model.diffusion_model.out.2.weight": (4, 8, 3, 3),
            "first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3),
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (
                10,
                8,
            ),
        },
    )
    msg = _refusal(path)
    assert (
        "Stable Diffusion 1.x" in msg
        and "4 input channels" in msg
        and "takes 7" in msg
        and str(path) in msg
    )
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    out = run_cli(
        "upscale", str(tmp_path / "x.png"), "--model", str(path), "--device", "cpu"
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert f"sdx4: error: {path} is a Stable Diffusion 1.x" in out.stderr


def test_refuses_a_vae_alone(tmp_path):
    path = _save(
        tmp_path / "vae.safetensors",
        {
            "encoder.conv_in.weight": (8, 3, 3, 3),
            "decoder.conv_out.weight": (3, 8, 3, 3),
        },
    )
    assert "is a VAE alone" in _refusal(path)


def test_refuses_a_truncated_file(single, tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(single.read_bytes()[: single.stat().st_size // 2])
    msg = _refusal(path)
    assert "truncated" in msg and str(path) in msg
    ckpt = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1000)}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:500])
    assert "not a readable PyTorch checkpoint" in _refusal(ckpt)


def test_refuses_a_text_file_renamed(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("these are my notes, not a model\n" * 20)
    assert "a text file, not a single-file checkpoint" in _refusal(path)
    import sdx4
    from sdx4.model.errors import ModelConfigError

    with pytest.raises(ModelConfigError, match="a text file"):
        sdx4.convert(str(path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("*.partial"))


def test_refuses_a_tiny_file_without_configs_against_the_published_shapes(
    single, tmp_path
):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(single), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    save_file(
        state, str(tmp_path / "bare.safetensors")
    )  # no sdx4_configs: the bundled full-size ones apply
    msg = _refusal(tmp_path / "bare.safetensors")
    assert "the x4 upscaler's configs (bundled with sdx4)" in msg and "shape" in msg


def test_refuses_nan_weights_naming_the_file_and_key(single, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(single), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        meta = f.metadata()
    key = "model.diffusion_model.input_blocks.0.0.weight"
    state[key][0, 0, 0, 0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"), metadata=meta)
    msg = _refusal(tmp_path / "nan.safetensors")
    assert key in msg and "nan.safetensors" in msg and "NaN" in msg


def test_missing_single_file_is_a_path_error():
    import sdx4
    from sdx4.model.errors import ModelPathError

    with pytest.raises(ModelPathError, match="does not exist"):
        sdx4.load("no-such-x4-upscaler-ema.safetensors", device="cpu")


def test_extra_tensors_of_the_original_file_are_ignored_with_a_warning(
    single, tmp_path, image, folder_image, caplog
):
    """The published file also holds a 24th text layer, text_projection and the diffusion schedule's buffers:
    the model still loads (and gives the same image); unused converted tensors are named in a warning."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(single), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        meta = f.metadata()
    pre = "cond_stage_model.model.transformer.resblocks."
    for k in [k for k in state if k.startswith(pre + "1.")]:
        state[k.replace(pre + "1.", pre + "2.")] = state[
            k
        ].clone()  # one layer more than the config's 2
    state["cond_stage_model.model.text_projection"] = torch.zeros(32, 32)
    state["betas"] = torch.linspace(0.0001, 0.02, 1000)
    save_file(state, str(tmp_path / "extra.safetensors"), metadata=meta)
    with caplog.at_level("WARNING", logger="sdx4"):
        out = _run(tmp_path / "extra.safetensors", image)
    assert np.array_equal(out, folder_image)
    assert (
        "ignoring 16 text_encoder tensors" in caplog.text
        and "encoder.layers.2." in caplog.text
    )
