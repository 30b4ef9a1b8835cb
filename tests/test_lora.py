"""LoRAs merged into the UNet (model/lora.py): the same image as diffusers' `load_lora_weights` (unfused), Kohya
files equal to diffusers-format ones, scale 0 == base, a plain UNet with the speed tricks on merged weights,
and every bad file refused before any weight is read, naming the file and the first bad key."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from lora_helpers import make_lora, to_kohya
from PIL import Image
from safetensors.torch import load_file, save_file

import sdx4
from sdx4.model.errors import LoraError, ModelConfigError
from sdx4.options import LoadOptions, LoraSpec, OptionsError

RUN = {
    "prompt": "a photo of a cat",
    "steps": 2,
    "seed": 7,
    "guidance": 9.0,
    "noise_level": 20,
}


@pytest.fixture(scope="module")
def loras(tiny_model_dir, tmp_path_factory):
    """LoRA files on the tiny UNet: "mixed" saved exactly as `sdx4 train` and diffusers' examples save them
    (conv and attention targets: convert_state_dict_to_diffusers renames only the attention keys), "peft" the
    same tensors with peft's spelling throughout, "attn" an attention-only LoRA saved the documented way,
    "kohya" the mixed one with Kohya's names and alpha tensors, "other" a second LoRA."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors import safe_open

    d = tmp_path_factory.mktemp("loras")
    mixed = make_lora(tiny_model_dir, d / "style.safetensors", r=4, alpha=8)
    with safe_open(str(mixed), "pt") as f:
        meta = f.metadata()
    peft = d / "style_peft.safetensors"
    save_file(convert_unet_state_dict_to_peft(load_file(mixed)), peft, metadata=meta)
    return {
        "mixed": mixed,
        "peft": peft,
        "attn": make_lora(
            tiny_model_dir,
            d / "attn.safetensors",
            r=2,
            alpha=1,
            seed=3,
            std=0.6,
            targets=["to_q", "to_k", "to_v", "to_out.0"],
        ),
        "kohya": to_kohya(mixed, d / "style_kohya.safetensors", alpha=8),
        "other": make_lora(
            tiny_model_dir, d / "other.safetensors", r=2, alpha=2, seed=5
        ),
        "dir": d,
    }


@pytest.fixture(scope="module")
def image(rng_image_module):
    return Image.fromarray(rng_image_module)


@pytest.fixture(scope="module")
def rng_image_module():
    return np.random.RandomState(0).randint(0, 256, size=(32, 24, 3), dtype=np.uint8)


def _load(model_dir, loras=(), **kw):
    return sdx4.load(
        str(model_dir), device="cpu", dtype="fp32", low_memory=False, loras=loras, **kw
    )


def _pixels(result) -> np.ndarray:
    return np.asarray(result.image, dtype=np.int16)


@pytest.fixture(scope="module")
def base_pixels(tiny_model_dir, image):
    return _pixels(_load(tiny_model_dir)(image, **RUN))


def _diffusers(model_dir, image, files_and_scales):
    """diffusers' own pipeline with `load_lora_weights` (adapters NOT fused) at the given scales."""
    from diffusers import StableDiffusionUpscalePipeline

    pipe = StableDiffusionUpscalePipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    names = []
    for i, (path, _) in enumerate(files_and_scales):
        pipe.load_lora_weights(str(path), adapter_name=f"a{i}")
        names.append(f"a{i}")
    pipe.set_adapters(names, [s for _, s in files_and_scales])
    out = pipe(
        prompt=RUN["prompt"],
        image=image,
        num_inference_steps=RUN["steps"],
        guidance_scale=RUN["guidance"],
        noise_level=RUN["noise_level"],
        generator=torch.Generator("cpu").manual_seed(RUN["seed"]),
    ).images[0]
    return np.asarray(out, dtype=np.int16)


@pytest.fixture(scope="module")
def ours(tiny_model_dir, image):
    """The image sdx4 makes with these (file, scale) LoRAs merged, made once per module."""
    made: dict[tuple, np.ndarray] = {}

    def run(spec) -> np.ndarray:
        key = tuple((str(p), float(s)) for p, s in spec)
        if key not in made:
            made[key] = _pixels(_load(tiny_model_dir, spec)(image, **RUN))
        return made[key]

    return run


@pytest.mark.parametrize("which, scale", [("attn", 1.0), ("peft", 0.5)])
def test_merged_lora_gives_diffusers_unfused_image(
    tiny_model_dir, loras, image, base_pixels, ours, which, scale
):
    spec = [(loras[which], scale)]
    ours = ours(spec)
    ref = _diffusers(tiny_model_dir, image, spec)
    assert ours.shape == ref.shape == (128, 96, 3)
    assert np.abs(ours - ref).max() <= 1
    assert (
        np.abs(ours - base_pixels).max() > 20
    )  # the LoRA changes the image: the parity means something


def test_two_loras_at_their_scales_give_diffusers_two_adapters(
    tiny_model_dir, loras, image, ours
):
    spec = [(loras["peft"], 0.5), (loras["attn"], -1.5)]
    assert np.abs(ours(spec) - _diffusers(tiny_model_dir, image, spec)).max() <= 1
    assert np.abs(ours(spec) - ours(spec[:1])).max() > 5  # the second one counts


def test_every_key_of_a_mixed_spelling_file_is_merged(loras, ours):
    """`convert_state_dict_to_diffusers` leaves conv keys as lora_A and renames attention keys to lora.down;
    diffusers' own load_lora_adapter then converts by the first key and drops the others. sdx4 converts
    every key: the mixed file gives exactly what the same tensors spelled one way give."""
    mixed = load_file(loras["mixed"])
    assert any(".lora.down." in k for k in mixed) and any(
        ".lora_A." in k for k in mixed
    )
    assert np.array_equal(ours([(loras["mixed"], 1.0)]), ours([(loras["peft"], 1.0)]))


def test_kohya_file_gives_the_diffusers_format_image(loras, ours):
    keys = list(load_file(loras["kohya"]))
    assert all(k.startswith("lora_unet_") for k in keys) and any(
        k.endswith(".alpha") for k in keys
    )
    assert (
        np.abs(ours([(loras["kohya"], 1.0)]) - ours([(loras["mixed"], 1.0)])).max() <= 1
    )


def test_kohya_alpha_is_honoured(loras, ours):
    """alpha 8 at rank 4 doubles the update: the same file with alpha 4 at scale 2 is the same LoRA."""
    half = to_kohya(
        loras["mixed"], loras["dir"] / "style_kohya_a4.safetensors", alpha=4
    )
    assert np.abs(ours([(half, 2.0)]) - ours([(loras["kohya"], 1.0)])).max() <= 1
    assert np.abs(ours([(half, 1.0)]) - ours([(loras["kohya"], 1.0)])).max() > 5


def test_scale_zero_is_the_base_model(tiny_model_dir, loras, image, base_pixels):
    up = _load(tiny_model_dir, [(loras["mixed"], 0.0)])
    assert np.array_equal(_pixels(up(image, **RUN)), base_pixels)


def test_merged_unet_is_a_plain_diffusers_unet_with_the_speed_tricks_on_merged_weights(
    tiny_model_dir, loras
):
    from diffusers import UNet2DConditionModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    up = _load(tiny_model_dir, [loras["peft"]])
    unet = up.components.unet
    assert type(unet) is UNet2DConditionModel
    assert not any(isinstance(m, BaseTunerLayer) for m in unet.modules())
    assert not hasattr(unet, "peft_config") and not unet._hf_peft_config_loaded
    speed = up.components.speed.as_dict()
    assert (
        speed["prepacked_layers"] > 0
        and speed["kv_cached_projections"] > 0
        and speed["guidance_prefix_modules"] > 0
    )
    # the merged weight: W + alpha/r * B @ A (alpha 8, rank 4), read back after the speed tricks came off
    up.components.speed.uninstall()
    base = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    sd = load_file(loras["peft"])
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    a, b = sd[f"unet.{name}.lora_A.weight"], sd[f"unet.{name}.lora_B.weight"]
    want = base.get_submodule(name).weight + 2.0 * b @ a
    assert torch.allclose(unet.get_submodule(name).weight, want, atol=1e-6)
    assert not torch.allclose(
        unet.get_submodule(name).weight, base.get_submodule(name).weight, atol=1e-3
    )


def test_a_reloaded_unet_is_merged_again(tiny_model_dir, loras):
    """The low-memory policy releases the UNet for large decodes and reloads it: with the LoRA merged."""
    up = _load(tiny_model_dir, [loras["peft"]])
    first = {k: v.clone() for k, v in up.components.unet.state_dict().items()}
    up.components.speed.uninstall()
    again = up.components.load_unet()
    up.components.speed.uninstall()
    assert all(torch.equal(first[k], v) for k, v in again.state_dict().items())


def test_metadata_and_describe_name_each_lora(tiny_model_dir, loras, image):
    up = _load(tiny_model_dir, [f"{loras['mixed']}:0.5", (loras["other"], 1)])
    sha = [
        hashlib.sha256(Path(p).read_bytes()).hexdigest()[:12]
        for p in (loras["mixed"], loras["other"])
    ]
    want = [
        {"name": "style.safetensors", "sha256": sha[0], "scale": 0.5},
        {"name": "other.safetensors", "sha256": sha[1], "scale": 1.0},
    ]
    assert up.info["loras"] == want
    assert up(image, **{**RUN, "steps": 1}).metadata["loras"] == want
    assert up.describe(1.0)[-2:] == [
        f"merged LoRA style.safetensors (sha256 {sha[0]}) at scale 0.5",
        f"merged LoRA other.safetensors (sha256 {sha[1]}) at scale 1",
    ]
    assert (
        "loras" not in _load(tiny_model_dir).info
    )  # records without LoRAs keep their keys


# --- options -------------------------------------------------------------------------------------------


def test_lora_spec_parses_path_and_scale_at_the_last_colon_only_when_a_number_follows(
    tmp_path,
):
    plain = tmp_path / "a.safetensors"
    colon = tmp_path / "b:c.safetensors"
    for p in (plain, colon):
        p.write_bytes(b"x")
    assert LoraSpec.parse(f"{plain}:0.8") == LoraSpec(str(plain), 0.8)
    assert LoraSpec.parse(f"{plain}:-1e-1").scale == -0.1
    assert LoraSpec.parse(str(plain)) == LoraSpec(str(plain), 1.0)
    assert LoraSpec.parse(str(colon)) == LoraSpec(
        str(colon), 1.0
    )  # ":c.safetensors" is no number
    assert LoraSpec.parse(f"{colon}:2") == LoraSpec(str(colon), 2.0)
    # a Windows drive letter: "C" is the part before the colon, "\\x.safetensors" no number: all of it is the path
    with pytest.raises(
        OptionsError, match=re.escape("C:\\loras\\a.safetensors does not exist")
    ) as e:
        LoraSpec.parse("C:\\loras\\a.safetensors")
    assert e.value.option == "loras"


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "{d}/missing.safetensors",
            "missing.safetensors does not exist or is not a file",
        ),
        ("{d}/a.ckpt", "a.ckpt is not a .safetensors file"),
        ("{d}/a.safetensors:nan", "must be a number in -16..16; got nan"),
        ("{d}/a.safetensors:17", "must be in -16..16; got 17"),
        ("", "a LoRA path must be a non-empty string"),
    ],
)
def test_bad_lora_options_are_refused_naming_the_option(tmp_path, text, message):
    (tmp_path / "a.safetensors").write_bytes(b"x")
    (tmp_path / "a.ckpt").write_bytes(b"x")
    with pytest.raises(OptionsError, match=message) as e:
        LoadOptions(loras=[text.format(d=tmp_path)])
    assert e.value.option == "loras"


def test_load_options_with_loras_round_trip_through_asdict(loras):
    """Ray and the batch job ship LoadOptions as `dataclasses.asdict` and rebuild them with LoadOptions(**d)."""
    opts = LoadOptions(
        model="m", loras=[f"{loras['mixed']}:0.5", (str(loras["other"]), 2)]
    )
    d = json.loads(
        json.dumps(dataclasses.asdict(opts))
    )  # through JSON, as a job file holds it
    assert d["loras"] == [
        {"path": str(loras["mixed"]), "scale": 0.5},
        {"path": str(loras["other"]), "scale": 2.0},
    ]
    assert LoadOptions(**d) == opts
    assert opts.replace(loras=()).loras == ()
    with pytest.raises(OptionsError, match="loras must be a list") as e:
        LoadOptions(loras=str(loras["mixed"]))
    assert e.value.option == "loras"


def test_load_takes_loras_as_strings_pairs_or_specs_but_not_beside_load_options(
    tiny_model_dir, loras
):
    up = sdx4.load(
        str(tiny_model_dir),
        device="cpu",
        dtype="fp32",
        low_memory=False,
        loras=[sdx4.LoraSpec(str(loras["other"]), 0.25)],
    )
    assert up.info["loras"][0]["scale"] == 0.25
    with pytest.raises(TypeError, match="takes no loras keyword"):
        sdx4.load(LoadOptions(model=str(tiny_model_dir)), loras=[str(loras["other"])])


# --- files that do not fit -------------------------------------------------------------------------------


def _no_weights_read(monkeypatch):
    """Fail the test if the model's weights start loading: the LoRA must be refused before."""
    from sdx4.model import loading

    def boom(*a, **k):
        raise AssertionError("model weights were read before the LoRA was checked")

    monkeypatch.setattr(loading, "_load_text_encoder", boom)
    monkeypatch.setattr(loading, "_load_unet", boom)


def _refused(tiny_model_dir, path, monkeypatch) -> str:
    _no_weights_read(monkeypatch)
    with pytest.raises(LoraError) as e:
        _load(tiny_model_dir, [path])
    assert isinstance(e.value, ModelConfigError)  # exit 2 in the CLI
    assert str(path) in str(e.value)
    return str(e.value)


def test_lora_with_a_misshapen_tensor_names_file_and_key(
    tiny_model_dir, loras, monkeypatch, tmp_path
):
    sd = load_file(loras["peft"])
    key = "unet.down_blocks.1.attentions.0.proj_in.lora_A.weight"
    sd[key] = torch.zeros(4, sd[key].shape[1] + 3)
    path = tmp_path / "shape.safetensors"
    save_file(sd, path)
    msg = _refused(tiny_model_dir, path, monkeypatch)
    assert "down_blocks.1.attentions.0.proj_in.lora_A.weight has shape (4, 35)" in msg
    assert "down_blocks.1.attentions.0.proj_in needs (r, 32)" in msg


def test_lora_for_another_unet_names_the_first_unknown_layer(
    tiny_model_dir, loras, monkeypatch, tmp_path
):
    sd = load_file(loras["peft"])
    sd["unet.down_blocks.7.resnets.0.conv1.lora_A.weight"] = torch.zeros(4, 8, 3, 3)
    sd["unet.down_blocks.7.resnets.0.conv1.lora_B.weight"] = torch.zeros(8, 4, 1, 1)
    path = tmp_path / "other_unet.safetensors"
    save_file(sd, path)
    msg = _refused(tiny_model_dir, path, monkeypatch)
    assert (
        "does not fit this UNet: down_blocks.7.resnets.0.conv1.lora_A.weight names no layer of it"
        in msg
    )


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not a safetensors file"),
        (b"this is not a safetensors file at all", "not a safetensors file"),
    ],
)
def test_a_file_that_is_not_safetensors_is_refused(
    tiny_model_dir, monkeypatch, tmp_path, content, message
):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    assert message in _refused(tiny_model_dir, path, monkeypatch)


def test_a_file_without_tensors_is_refused(tiny_model_dir, monkeypatch, tmp_path):
    path = tmp_path / "empty.safetensors"
    save_file({}, path)
    assert "the file holds no tensors" in _refused(tiny_model_dir, path, monkeypatch)


def test_nan_weights_are_refused_naming_the_key(
    tiny_model_dir, loras, monkeypatch, tmp_path
):
    sd = load_file(loras["peft"])
    key = "unet.up_blocks.1.resnets.0.conv2.lora_B.weight"
    sd[key] = sd[key].clone()
    sd[key][0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(sd, path)
    assert f"{key} holds NaN or inf values" in _refused(
        tiny_model_dir, path, monkeypatch
    )


def test_text_encoder_loras_are_refused_saying_so(
    tiny_model_dir, loras, monkeypatch, tmp_path
):
    te = {
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(
            2, 32
        ),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(
            32, 2
        ),
    }
    only = tmp_path / "te.safetensors"
    save_file(te, only)
    assert "is a text-encoder-only LoRA (2 tensors" in _refused(
        tiny_model_dir, only, monkeypatch
    )
    both = tmp_path / "both.safetensors"
    save_file({**load_file(loras["peft"]), **te}, both)
    assert "also changes the text encoder (2 tensors" in _refused(
        tiny_model_dir, both, monkeypatch
    )


def test_kohya_keys_diffusers_cannot_convert_are_a_lora_error(
    tiny_model_dir, monkeypatch, tmp_path
):
    up, down = torch.zeros(4, 2), torch.zeros(2, 4)
    path = tmp_path / "strange.safetensors"
    # a lora_up without its lora_down: diffusers' converter leaves it unrenamed and raises
    save_file({"lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": up}, path)
    assert "diffusers cannot read its keys" in _refused(
        tiny_model_dir, path, monkeypatch
    )
    # an empty module name: converted, to a key that names no layer
    nameless = tmp_path / "nameless.safetensors"
    save_file(
        {"lora_unet_.lora_up.weight": up, "lora_unet_.lora_down.weight": down}, nameless
    )
    assert ".lora_A.weight names no layer of it" in _refused(
        tiny_model_dir, nameless, monkeypatch
    )


# --- the command line, folders and Ray ---------------------------------------------------------------------


def _cli(*args: str) -> list[str]:
    return [*args, "--device", "cpu", "--dtype", "fp32", "--steps", "1", "--seed", "3"]


def test_cli_upscale_with_lora_records_it_in_the_png(
    tiny_model_dir, loras, tmp_path, capsys
):
    from sdx4.cli import main

    src = tmp_path / "in.png"
    Image.fromarray(
        np.random.RandomState(1).randint(0, 256, (16, 20, 3), dtype=np.uint8)
    ).save(src)
    out = tmp_path / "out.png"
    argv = _cli("upscale", str(src), "--model", str(tiny_model_dir), "-o", str(out),
                "--lora", f"{loras['mixed']}:0.5", "--lora", str(loras["kohya"]))  # fmt: skip
    assert main(argv) == 0
    meta = sdx4.read_metadata(out)
    assert [(r["name"], r["scale"]) for r in meta["loras"]] == [
        ("style.safetensors", 0.5),
        ("style_kohya.safetensors", 1.0),
    ]
    assert (
        meta["loras"][0]["sha256"]
        == hashlib.sha256(loras["mixed"].read_bytes()).hexdigest()[:12]
    )
    assert "merged LoRA style.safetensors" in capsys.readouterr().err


def test_cli_refuses_a_lora_that_does_not_fit_with_exit_2_and_no_output(
    tiny_model_dir, loras, tmp_path, capsys
):
    from sdx4.cli import main

    src = tmp_path / "in.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(src)
    sd = load_file(loras["peft"])
    sd["unet.mid_block.resnets.9.conv1.lora_A.weight"] = torch.zeros(4, 8, 3, 3)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, bad)
    out = tmp_path / "out.png"
    assert (
        main(
            _cli(
                "upscale",
                str(src),
                "--model",
                str(tiny_model_dir),
                "-o",
                str(out),
                "--lora",
                str(bad),
            )
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("sdx4: error: LoRA ") and str(bad) in err
    assert (
        "mid_block.resnets.9.conv1.lora_A.weight names no layer" in err
        and "Traceback" not in err
    )
    assert not out.exists()
    missing = tmp_path / "nope.safetensors"
    assert (
        main(
            _cli(
                "upscale",
                str(src),
                "--model",
                str(tiny_model_dir),
                "-o",
                str(out),
                "--lora",
                f"{missing}:2",
            )
        )
        == 2
    )
    assert (
        f"sdx4: error: loras: {missing} does not exist or is not a file"
        in capsys.readouterr().err
    )


def test_folder_run_records_loras_and_redoes_images_when_they_change(
    tiny_model_dir, loras, tmp_path, capsys
):
    from _batch_util import make_folder, records

    from sdx4.cli import main

    src = make_folder(tmp_path / "in", ["a.png"])
    out = tmp_path / "out"
    argv = _cli(
        "upscale", str(src), "-o", str(out), "--model", str(tiny_model_dir), "-q"
    )
    assert main([*argv, "--lora", f"{loras['other']}:0.5"]) == 0
    [rec] = records(out)
    assert (
        rec["status"] == "ok"
        and rec["loras"][0]["name"] == "other.safetensors"
        and rec["loras"][0]["scale"] == 0.5
    )
    assert rec["params"]["loras"] == [{"path": str(loras["other"]), "scale": 0.5}]
    assert sdx4.read_metadata(out / "a_x4.png")["loras"] == rec["loras"]
    assert main([*argv, "--lora", f"{loras['other']}:0.5"]) == 0
    assert len(records(out)) == 1  # same LoRAs: done
    assert main([*argv, "--lora", f"{loras['other']}:0.25"]) == 0
    assert [r["params"]["loras"][0]["scale"] for r in records(out)] == [
        0.5,
        0.25,
    ]  # another scale: redone


def test_ray_job_and_items_carry_the_loras(tmp_path, loras):
    from sdx4.batch.job import BatchItem, BatchJob
    from sdx4.batch.ray import item_from_json, item_to_json, job_from_dict, job_to_dict
    from sdx4.options import UpscaleOptions

    load = LoadOptions(model="m", loras=[f"{loras['mixed']}:0.5", str(loras["other"])])
    job = BatchJob(tmp_path / "in", tmp_path / "out", load=load)
    assert job_from_dict(json.loads(json.dumps(job_to_dict(job)))).load == load
    item = BatchItem(
        "a.png", ("a_x4.png",), UpscaleOptions(seed=1), "option", 1, "m", load.loras
    )
    again = item_from_json(item_to_json(item))
    assert again == item and again.params["loras"][0] == {
        "path": str(loras["mixed"]),
        "scale": 0.5,
    }
    plain = BatchItem("a.png", ("a_x4.png",), UpscaleOptions(seed=1), "option", 1, "m")
    assert "loras" not in plain.params and item_from_json(item_to_json(plain)) == plain


# --- switching LoRAs on a loaded model; compare and evaluate ------------------------------------------------


def test_set_loras_switches_exactly_and_a_bad_file_leaves_the_model_as_it_was(
    tiny_model_dir, loras, image, ours, tmp_path
):
    up = _load(tiny_model_dir)
    base = _pixels(up(image, **RUN))
    up.set_loras([(loras["peft"], 0.5)])
    assert up.loras == (LoraSpec(str(loras["peft"]), 0.5),)
    assert np.array_equal(
        _pixels(up(image, **RUN)), ours([(loras["peft"], 0.5)])
    )  # == loaded with it
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nope")
    unet = up.components.unet
    with pytest.raises(LoraError, match="not a safetensors file"):
        up.set_loras([bad])
    assert up.components.unet is unet and up.loras == (
        LoraSpec(str(loras["peft"]), 0.5),
    )
    up.set_loras([])
    assert up.loras == () and "loras" not in up.info
    assert np.array_equal(
        _pixels(up(image, **RUN)), base
    )  # the base model again, bit for bit
    assert (
        up.components.speed.prepacked_layers > 0
    )  # the speed tricks are back on the fresh UNet


def test_compare_runs_sd_and_sd_plus_lora_side_by_side(
    tiny_model_dir, loras, tmp_path, capsys
):
    from sdx4.cli import main

    src = tmp_path / "in.png"
    Image.fromarray(
        np.random.RandomState(2).randint(0, 256, (16, 16, 3), dtype=np.uint8)
    ).save(src)
    out = tmp_path / "grid.png"
    argv = _cli("compare", str(src), "-o", str(out), "--model", str(tiny_model_dir), "--lora", f"{loras['other']}:0.5",
                "--methods", "sd,sd+lora,bicubic", "-q")  # fmt: skip
    assert main(argv) == 0
    meta = sdx4.read_metadata(out)
    assert meta["methods"] == ["sd", "sd+lora", "bicubic"]
    assert meta["labels"][1:3] == ["sd (seed 3)", "sd+lora (seed 3)"]
    assert "loras" not in meta["per_method"]["sd"]
    assert meta["per_method"]["sd+lora"]["loras"] == [
        {
            "name": "other.safetensors",
            "sha256": LoraSpec(str(loras["other"])).sha256(),
            "scale": 0.5,
        }
    ]
    no_lora = _cli(
        "compare",
        str(src),
        "-o",
        str(tmp_path / "g2.png"),
        "--model",
        str(tiny_model_dir),
        "--methods",
        "sd+lora",
    )
    assert main(no_lora) == 2
    assert (
        "unknown method 'sd+lora'" in capsys.readouterr().err
        and not (tmp_path / "g2.png").exists()
    )


def test_evaluate_gives_a_row_per_lora(tiny_model_dir, loras, tmp_path):
    from sdx4.cli import main

    hr = tmp_path / "hr"
    hr.mkdir()
    Image.fromarray(
        np.random.RandomState(4).randint(0, 256, (32, 32, 3), dtype=np.uint8)
    ).save(hr / "a.png")
    out = tmp_path / "report"
    argv = _cli("evaluate", str(hr), "-o", str(out), "--model", str(tiny_model_dir), "--no-plot", "--no-perceptual",
                "--lora", str(loras["other"]), "--lora", f"{loras['attn']}:2", "-q")  # fmt: skip
    assert main(argv) == 0
    import csv

    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    assert [r["method"] for r in rows] == [
        "bicubic",
        "lanczos",
        "sd",
        "sd+other",
        "sd+attn",
    ]
    psnr = {r["method"]: r["psnr_y"] for r in rows}
    assert (
        len({psnr["sd"], psnr["sd+other"], psnr["sd+attn"]}) == 3
    )  # three different models
    report = (out / "report.md").read_text()
    assert (
        f"sd+attn: attn.safetensors (sha256 {LoraSpec(str(loras['attn'])).sha256()}) x2"
        in report
    )
    assert "sd: no LoRA" in report


# --- the service ----------------------------------------------------------------------------------------


def test_served_loras_are_listed_in_info_and_recorded_in_every_result(
    tiny_model_dir, loras
):
    from fastapi.testclient import TestClient
    from server_helpers import png_bytes

    from sdx4.service.app import create_app
    from sdx4.service.requests import ServerSettings

    up = _load(tiny_model_dir, [f"{loras['other']}:0.75"])
    want = [
        {
            "name": "other.safetensors",
            "sha256": LoraSpec(str(loras["other"])).sha256(),
            "scale": 0.75,
        }
    ]
    with TestClient(
        create_app(up, ServerSettings()), base_url="http://localhost"
    ) as client:
        info = client.get("/v1/info").json()
        assert info["loras"] == want and info["model"]["loras"] == want
        r = client.post(
            "/v1/upscale",
            files={"image": ("a.png", png_bytes(), "image/png")},
            data={"steps": "1", "seed": "1"},
        )
        assert r.status_code == 200, r.text
        meta = sdx4.read_metadata(io.BytesIO(r.content))
        assert meta["loras"] == want
    with TestClient(
        create_app(_load(tiny_model_dir), ServerSettings()), base_url="http://localhost"
    ) as client:
        assert client.get("/v1/info").json()["loras"] == []


def test_every_model_command_takes_repeatable_lora_flags(tmp_path):
    from sdx4.cli import build_parser

    parser = build_parser()
    a, b = str(tmp_path / "a.safetensors"), f"{tmp_path / 'b.safetensors'}:0.5"
    for argv in (
        ["upscale", "x.png"],
        ["serve"],
        ["compare", "x.png"],
        ["evaluate", "hr", "-o", "r"],
    ):
        args = parser.parse_args([*argv, "--lora", a, "--lora", b])
        assert args.lora == [a, b], argv
        assert parser.parse_args(argv).lora == []


def test_speed_tricks_go_on_after_the_merge(tiny_model_dir, loras, monkeypatch):
    """speed.install must see merged weights (its packing may read them at once on other builds)."""
    from sdx4.model import loading

    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    seen = []
    install = loading.speed.install

    def spy(unet, *a, **k):
        seen.append(unet.get_submodule(name).weight.detach().clone())
        return install(unet, *a, **k)

    monkeypatch.setattr(loading.speed, "install", spy)
    up = _load(tiny_model_dir, [loras["peft"]])
    up.components.speed.uninstall()
    assert len(seen) == 1 and torch.equal(
        seen[0], up.components.unet.get_submodule(name).weight
    )
    base = _load(tiny_model_dir).components.unet
    assert not torch.allclose(seen[0], base.get_submodule(name).weight, atol=1e-3)


def test_evaluate_pairs_gives_a_row_per_lora_and_keeps_sd_the_base_model(tiny_model_dir, loras, tmp_path):
    """`evaluate --pairs` with --lora: the same rows as the synthetic mode; `sd` is the base model (equal to a
    run without --lora), each sd+NAME its own LoRA."""
    import csv

    from sdx4.cli import main

    lr, hr = tmp_path / "lr", tmp_path / "hr"
    lr.mkdir()
    hr.mkdir()
    Image.fromarray(np.random.RandomState(6).randint(0, 256, (32, 32, 3), dtype=np.uint8)).save(hr / "a.png")
    Image.open(hr / "a.png").resize((8, 8), Image.Resampling.BICUBIC).save(lr / "a.png")

    def rows(*extra):
        out = tmp_path / f"report{len(extra)}"
        argv = _cli("evaluate", "--pairs", str(lr), str(hr), "-o", str(out), "--model", str(tiny_model_dir),
                    "--no-plot", *extra, "-q")  # fmt: skip
        assert main(argv) == 0
        return {r["method"]: r["psnr_y"] for r in csv.DictReader((out / "results.csv").read_text().splitlines())}

    base = rows()
    with_loras = rows("--lora", str(loras["other"]), "--lora", f"{loras['attn']}:2")
    assert set(with_loras) == set(base) | {"sd+other", "sd+attn"} and "sd" in base
    assert with_loras["sd"] == base["sd"]  # no LoRA merged into the base row
    assert len({with_loras["sd"], with_loras["sd+other"], with_loras["sd+attn"]}) == 3
