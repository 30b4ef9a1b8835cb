"""Build RANDOM-WEIGHT x4 upscalers in diffusers layout: tiny ones for tests, full-size ones for benchmarks.

Model weights cannot be downloaded on the project's machines, and speed and memory do not depend on
weight values, so tests and benchmarks use models made here and loaded through the real loading code.
Everything written is marked: a RANDOM_WEIGHTS.txt file and `_sdx4_random_weights` in model_index.json;
sdx4 reports `random_weights: true` in the metadata of anything such a model makes.

    python -m sdx4.random_model PATH [--size tiny|full] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Literal

Size = Literal["tiny", "full"]

#: The published model's architecture (see shared/DESIGN.md); the tiny one keeps its structure.
UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "full": dict(
        sample_size=128,
        in_channels=7,
        out_channels=4,
        block_out_channels=(256, 512, 512, 1024),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
        cross_attention_dim=1024,
        only_cross_attention=(True, True, True, False),
        use_linear_projection=True,
        num_class_embeds=1000,
    ),
    "tiny": dict(
        sample_size=32,
        in_channels=7,
        out_channels=4,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
        cross_attention_dim=32,
        only_cross_attention=(True, True, False),
        use_linear_projection=True,
        num_class_embeds=400,
        norm_num_groups=8,
    ),
}
VAE_CONFIGS: dict[str, dict[str, Any]] = {
    "full": dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 512),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=2,
        latent_channels=4,
        sample_size=256,
        scaling_factor=0.08333,
    ),
    "tiny": dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 16, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=0.08333,
    ),
}
TEXT_CONFIGS: dict[str, dict[str, Any]] = {
    "full": dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_attention_heads=16,
        num_hidden_layers=23,
        hidden_act="gelu",
        max_position_embeddings=77,
        vocab_size=49408,
        projection_dim=512,
        layer_norm_eps=1e-5,
        bos_token_id=0,  # as in the published text_encoder/config.json
        eos_token_id=2,
        pad_token_id=1,
    ),
    "tiny": dict(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        hidden_act="gelu",
        max_position_embeddings=77,
        vocab_size=1000,
        projection_dim=32,
        layer_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    ),
}
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="v_prediction",
)
LOW_RES_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear"
)
MAX_NOISE_LEVEL = 350
RANDOM_MARKER = "RANDOM_WEIGHTS.txt"  # models.py looks for this file to report random_weights


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's byte -> printable-unicode table (the BPE alphabet); '!' comes first, so it gets id 0."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


#: A few merges so that common words become single tokens, as in the real vocabulary.
_MERGES = ["t h", "th e</w>", "o f</w>", "c a", "ca t</w>", "p h", "ph o", "pho t", "phot o</w>"]


def write_tokenizer(folder: Path) -> None:
    """A small CLIP BPE tokenizer built the way CLIP builds its vocabulary; pads with '!' (id 0)."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in _MERGES]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "!",
                "do_lower_case": True,
            }
        )
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "!"})
    )


def build_random_model(path: str | Path, size: Size = "tiny", seed: int = 0) -> Path:
    """Write a random-weight x4 upscaler in diffusers layout to `path` and return it."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    if size not in UNET_CONFIGS:
        raise ValueError(f"size must be tiny or full; got {size!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    UNet2DConditionModel(**UNET_CONFIGS[size]).save_pretrained(path / "unet")
    AutoencoderKL(**VAE_CONFIGS[size]).save_pretrained(path / "vae")
    CLIPTextModel(CLIPTextConfig(**TEXT_CONFIGS[size])).save_pretrained(path / "text_encoder")
    write_tokenizer(path / "tokenizer")
    DDIMScheduler(**SCHEDULER_CONFIG).save_pretrained(path / "scheduler")
    DDPMScheduler(**LOW_RES_SCHEDULER_CONFIG).save_pretrained(path / "low_res_scheduler")
    index = {
        "_class_name": "StableDiffusionUpscalePipeline",
        "_sdx4_random_weights": True,
        "max_noise_level": MAX_NOISE_LEVEL,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "low_res_scheduler": ["diffusers", "DDPMScheduler"],
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    (path / RANDOM_MARKER).write_text(
        f"RANDOM WEIGHTS ({size}, seed {seed}) made by sdx4.random_model for tests and benchmarks.\n"
        "Outputs of this model are noise. The real model: stabilityai/stable-diffusion-x4-upscaler.\n"
    )
    return path


def cached_random_model(size: Size = "full", cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    """A random model built once and reused (full-size ones take ~3.6 GB and a minute to write).

    Safe when several processes ask at once: one builds under a file lock, the others wait for it.
    """
    import fcntl
    import shutil

    from ..cache import cache_root

    root = Path(cache_dir) if cache_dir else cache_root()
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"random-{size}-seed{seed}"
    with open(root / f".random-{size}-seed{seed}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        damage = cached_model_damage(path) if path.exists() else "absent"
        if damage is None:
            return path
        if damage != "absent":
            logging.getLogger("sdx4").warning("rebuilding the cached random model %s: %s", path, damage)
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        tmp = path.with_name(path.name + ".partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        build_random_model(tmp, size, seed)
        tmp.rename(path)
    return path


def cached_model_damage(path: Path) -> str | None:
    """Why a cached random model cannot be used (None when it can): its marker, its layout and its weight
    files' headers are checked (cheap: no tensor is read)."""
    from .errors import ModelConfigError
    from .hub import missing_parts
    from .weights import read_header

    marker = path / RANDOM_MARKER
    if not path.is_dir() or not marker.is_file():
        return f"no {RANDOM_MARKER} marker file"
    try:
        if not marker.read_text().startswith("RANDOM WEIGHTS ("):
            return f"{RANDOM_MARKER} is not sdx4's marker"
        missing = missing_parts(path)
        if missing:
            return f"missing {', '.join(missing)}"
        for rel in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                    "text_encoder/model.safetensors"):
            if not (path / rel).is_file():
                return f"missing {rel}"
            read_header(path / rel, rel)
    except (OSError, UnicodeDecodeError, ModelConfigError) as e:
        return str(e)
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdx4.random_model", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="folder to write (diffusers layout)")
    p.add_argument("--size", choices=("tiny", "full"), default="tiny", help="tiny (tests) or full (benchmarks)")
    p.add_argument("--seed", type=int, default=0, help="torch seed for the random weights")
    a = p.parse_args(argv)
    print(build_random_model(a.path, a.size, a.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
