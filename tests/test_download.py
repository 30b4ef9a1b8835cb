"""`sdx4 download`: the pure choice of files for each precision variant, a mocked Hub run (what is fetched,
the fp16 files linked under the loader's names) and the quick, clear failure without network."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli

#: The file list of stabilityai/stable-diffusion-x4-upscaler as assumed here (the Hub's listing was not
#: reachable from this machine): diffusers layout with fp32 and fp16 weights in safetensors and .bin, and
#: the original single-file checkpoints at the top.
REPO_FILES = [
    ".gitattributes",
    "README.md",
    "low_res_cat.png",
    "upscaled_white_cat.png",
    "x4-upscaler-ema.ckpt",
    "x4-upscaler-ema.safetensors",
    "x4-upscaling.yaml",
    "model_index.json",
    "low_res_scheduler/scheduler_config.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder/pytorch_model.bin",
    "text_encoder/pytorch_model.fp16.bin",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.bin",
    "vae/diffusion_pytorch_model.fp16.bin",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
]
CONFIGS = [
    "model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
    "scheduler/scheduler_config.json", "low_res_scheduler/scheduler_config.json",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
]  # fmt: skip


def test_fp32_takes_the_plain_safetensors_and_nothing_else():
    from sdx4.model.download import select_files

    got = select_files(REPO_FILES, "fp32")
    assert sorted(got) == sorted(CONFIGS + [
        "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
    ])  # fmt: skip


def test_fp16_takes_the_fp16_safetensors_only():
    from sdx4.model.download import select_files

    got = select_files(REPO_FILES, "fp16")
    weights = sorted(f for f in got if f not in CONFIGS)
    assert weights == [
        "text_encoder/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]
    assert not any(
        f.endswith((".ckpt", ".bin", ".png", ".yaml"))
        or f.startswith("x4-upscaler-ema")
        for f in got
    )


def test_falls_back_to_bin_when_a_repo_has_no_safetensors_and_to_fp32_when_no_fp16():
    from sdx4.model.download import select_files

    files = [
        f
        for f in REPO_FILES
        if not (f.startswith("unet/") and f.endswith(".safetensors"))
    ]
    files = [f for f in files if f != "vae/diffusion_pytorch_model.fp16.safetensors"]
    got = select_files(files, "fp16")
    assert (
        "unet/diffusion_pytorch_model.fp16.bin" in got
        and "vae/diffusion_pytorch_model.safetensors" in got
    )
    assert "unet/diffusion_pytorch_model.bin" in select_files(files, "fp32")


def test_a_repo_without_the_upscalers_files_is_refused_naming_them():
    from sdx4.model.download import select_files
    from sdx4.model.errors import ModelNotFoundError

    files = [f for f in REPO_FILES if not f.startswith(("unet/", "tokenizer/"))]
    with pytest.raises(
        ModelNotFoundError,
        match=r"lacks unet/config.json, tokenizer/\*, unet/diffusion_pytorch_model.safetensors",
    ):
        select_files(files, "fp32")
    with pytest.raises(
        ValueError, match="variant must be one of fp16, fp32; got 'fp8'"
    ):
        select_files(REPO_FILES, "fp8")


def test_download_fetches_the_selection_and_links_fp16_files_under_the_loaders_names(
    tmp_path, monkeypatch
):
    import huggingface_hub

    import sdx4
    from sdx4.model import hub

    fetched: list[str] = []

    def fake_download(repo_id, filename, local_dir):
        fetched.append(filename)
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{repo_id}:{filename}")
        return str(path)

    monkeypatch.setattr(hub, "_hub_offline", lambda: False)
    monkeypatch.setattr(hub, "_hub_reachable", lambda endpoint, timeout=3.0: True)
    monkeypatch.setattr(
        huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id: list(REPO_FILES)
    )
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    out = Path(sdx4.download(variant="fp16", to=str(tmp_path / "m"), progress=False))
    assert out == tmp_path / "m"
    assert sorted(fetched) == sorted(
        __import__("sdx4.model.download", fromlist=["x"]).select_files(
            REPO_FILES, "fp16"
        )
    )
    plain = out / "unet" / "diffusion_pytorch_model.safetensors"
    assert (
        plain.read_text()
        == "stabilityai/stable-diffusion-x4-upscaler:unet/diffusion_pytorch_model.fp16.safetensors"
    )
    assert (out / "text_encoder" / "model.safetensors").is_file() and not (
        out / "x4-upscaler-ema.safetensors"
    ).exists()
    assert hub.missing_parts(out) == []


def test_bad_variant_is_an_options_error():
    import sdx4

    with pytest.raises(sdx4.OptionsError) as e:
        sdx4.download(variant="fp8")
    assert e.value.option == "variant"


def test_cli_download_offline_fails_fast_with_the_clear_message(tmp_path):
    out = run_cli(
        "download",
        "--variant",
        "fp16",
        "--to",
        str(tmp_path / "m"),
        env={"HF_HUB_OFFLINE": "1"},
        timeout=60,
    )
    assert out.returncode == 1, out.stderr
    assert (
        "sdx4: error: cannot download 'stabilityai/stable-diffusion-x4-upscaler': HF_HUB_OFFLINE=1"
        in out.stderr
    )
    assert "--model PATH" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "m").exists()
