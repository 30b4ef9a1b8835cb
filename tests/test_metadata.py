"""sdx4.metadata, the one owner of what sdx4 writes about its work: the keys, their order and their values."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import sdx4
from sdx4.imageio import from_array
from sdx4.metadata import (
    classical_metadata,
    compare_metadata,
    evaluate_settings,
    image_metadata,
    manifest_record,
    saved_metadata,
    sd_metadata,
    service_info,
)
from sdx4.options import UpscaleOptions

RGB = from_array(np.zeros((3, 5, 3), dtype=np.uint8))  # 5 wide, 3 high
RGBA = from_array(np.full((3, 5, 4), 128, dtype=np.uint8))  # a real alpha plane
INFO = {  # the keys of Upscaler.info, in its order
    "model": "tiny",
    "random_weights": True,
    "max_noise_level": 350,
    "device": "cpu",
    "unet_dtype": "fp32",
    "text_encoder_dtype": "fp32",
    "vae_dtype": "fp32",
    "low_memory": True,
    "sdx4_version": sdx4.__version__,
}
REPORT = {"tiling": {"tiles": 1}, "vae_decode": {"mode": "full"}, "other": "not recorded"}


def test_image_metadata_records_sizes_scale_and_alpha():
    assert image_metadata(UpscaleOptions(scale=3), RGB) == {
        "sdx4_version": sdx4.__version__,
        "method": "sd",
        "scale": 3,
        "input_size": [5, 3],
        "output_size": [15, 9],
        "alpha": False,
    }
    meta = image_metadata(UpscaleOptions(method="lanczos"), RGBA)
    assert list(meta) == ["sdx4_version", "method", "scale", "input_size", "output_size", "alpha", "alpha_method"]
    assert meta["alpha"] is True and meta["alpha_method"] == "lanczos" and meta["output_size"] == [20, 12]


def test_classical_metadata_is_the_public_api_s():
    meta = classical_metadata(UpscaleOptions(method="bicubic"), RGB, 0.123456)
    assert meta["seconds"] == 0.1235 and list(meta)[-1] == "seconds"
    result = sdx4.upscale(Image.new("RGB", (5, 3)), method="bicubic")
    assert list(result.metadata) == list(meta)
    assert {**result.metadata, "seconds": 0.1235} == meta


def test_sd_metadata_keys_in_order_with_rounded_times():
    options = UpscaleOptions(prompt="a cat", seed=7, steps=2)
    kwargs = {"passes": 1, "report": REPORT, "alpha_filter": "bicubic", "allocator": "system", "seconds": 1.23456,
                  "timings": {"denoising": 0.123456, "decoding": 2.0}}
    meta = sd_metadata(options, RGB, INFO, **kwargs)
    assert list(meta) == [
        "sdx4_version", "method", "scale", "input_size", "output_size", "alpha",
        "prompt", "negative_prompt", "seed", "steps", "guidance", "noise_level", "eta", "num_images", "scheduler",
        "preset",
        "model", "random_weights", "max_noise_level", "device", "unet_dtype", "text_encoder_dtype", "vae_dtype",
        "low_memory",
        "passes", "color_fix", "tiling", "vae_decode", "tiling_options", "allocator", "seconds", "timings",
    ]  # fmt: skip
    assert (meta["prompt"], meta["seed"], meta["steps"], meta["scheduler"]) == ("a cat", 7, 2, options.scheduler)
    assert meta["tiling"] == {"tiles": 1} and meta["vae_decode"] == {"mode": "full"}
    assert meta["tiling_options"] == {"tile_size": None, "tile_overlap": None, "tile_batch": None,
                                      "tile_blend": options.tile_blend, "max_memory": None,
                                      "vae_attention_window": options.vae_attention_window}
    assert meta["seconds"] == 1.235 and meta["timings"] == {"denoising": 0.1235, "decoding": 2.0}
    with_alpha = sd_metadata(options, RGBA, INFO, **kwargs)
    assert list(with_alpha)[-4:] == ["alpha_method", "allocator", "seconds", "timings"]
    assert with_alpha["alpha"] is True and with_alpha["alpha_method"] == "bicubic"


def test_saved_metadata_adds_the_input_and_the_job():
    assert saved_metadata({"seed": 1}, "a.png") == {"seed": 1, "input": "a.png"}
    saved = saved_metadata({"seed": 1}, "a.png", "j1")
    assert list(saved) == ["seed", "input", "job_id"] and saved["job_id"] == "j1"


def test_manifest_record_repeats_only_the_image_fields_it_names():
    result = {"input_size": [5, 3], "output_size": [20, 12], "device": "cpu", "unet_dtype": "bf16",
              "random_weights": False, "prompt": "not repeated", "seconds": 9.0}
    record = manifest_record(input="a.png", outputs=("a_x4.png",), status="ok", error=None, seed=3, base_seed=1,
                             prompt_source="option", params={"steps": 2}, result_metadata=result,
                             timings={"read": 0.1})
    assert list(record) == ["input", "outputs", "status", "error", "seed", "base_seed", "prompt_source", "params",
                            "sdx4_version", "input_size", "output_size", "device", "unet_dtype", "random_weights",
                            "timings"]
    assert record["outputs"] == ["a_x4.png"] and record["unet_dtype"] == "bf16" and record["timings"] == {"read": 0.1}
    failed = manifest_record(input="b.png", outputs=(), status="failed", error="b.png: bad", seed=4, base_seed=1,
                             prompt_source="sidecar", params={}, result_metadata={}, timings={})
    assert list(failed)[-2:] == ["sdx4_version", "timings"] and failed["outputs"] == []


def test_compare_service_and_evaluate_records():
    grid = compare_metadata(input_name="a.png", input_size=(5, 3), alpha_ignored=False, scale=4,
                            methods=("sd", "bicubic"), labels=("input", "sd", "bicubic"), crop=(0, 0, 2, 2),
                            crop_source="auto", zoom=2, sd_options=None, per_method={"sd": {}}, layout={"w": 1})
    assert list(grid) == ["sdx4_version", "command", "input", "input_size", "alpha_ignored", "scale", "methods",
                          "labels", "crop", "crop_source", "zoom", "sd_options", "per_method", "layout"]
    assert grid["command"] == "compare" and grid["input_size"] == [5, 3] and grid["crop"] == [0, 0, 2, 2]
    assert compare_metadata(**{**_grid_args(), "sd_options": UpscaleOptions(seed=5)})["sd_options"]["seed"] == 5
    info = service_info(model=INFO, limits={"max_queue": 1}, methods=("sd",), choices={"tile_blend": ("cosine",)},
                        defaults={"steps": 20}, api_key_required=False, queue={"queued": 0})
    assert list(info) == ["sdx4_version", "model", "limits", "methods", "choices", "defaults", "api_key_required", "queue",
                          "loras"]
    assert info["methods"] == ["sd"] and info["choices"] == {"tile_blend": ["cosine"]} and info["loras"] == []
    assert evaluate_settings("bicubic") == {"sdx4_version": sdx4.__version__, "lr": "bicubic"}


def _grid_args() -> dict[str, object]:
    return {"input_name": "a.png", "input_size": (5, 3), "alpha_ignored": False, "scale": 4, "methods": ("sd",), "labels": (),
                "crop": (0, 0, 1, 1), "crop_source": "user", "zoom": 1, "sd_options": None, "per_method": {}, "layout": {}}


def test_metadata_imports_no_torch():
    src = str(Path(__file__).resolve().parents[1] / "src")  # this checkout's sdx4
    code = f"import sys; sys.path.insert(0, {src!r}); import sdx4.metadata; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
