"""Is the model folder whole and consistent? Checked from its configs and the weight files' headers
before any weight is read (a second at most for the full-size model), so a damaged or mismatched model
is one ModelConfigError naming the file, the first bad key or value and what was expected.

What the libraries would only find later (or never: a scheduler with 0 training steps, a noise level
beyond the low-res scheduler's table, a text encoder smaller than its config) is found here.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import ModelConfigError, ModelNotFoundError

#: What `prediction_type` may say (diffusers' schedulers know these three).
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
#: The beta schedules every sampler of options.SCHEDULER_SPECS builds.
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
DEFAULT_MAX_NOISE_LEVEL = 350


@contextlib.contextmanager
def damaged_model_errors(what: str) -> Iterator[None]:
    """Whatever a library raises while reading a model file becomes a ModelConfigError naming it (exit 2):
    the user's model is wrong. Our own errors, out of memory, OS errors and interrupts pass unchanged."""
    try:
        yield
    except (ModelConfigError, ModelNotFoundError, OSError, MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as e:
        raise ModelConfigError(f"{what}: could not be loaded ({type(e).__name__}: {e}); the model is damaged") from e


def read_config(folder: Path, rel: str) -> dict[str, Any]:
    """A JSON object from `folder/rel`, or a ModelConfigError naming `rel`."""
    try:
        value = json.loads((folder / rel).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelConfigError(f"{rel}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ModelConfigError(f"{rel}: holds a JSON {type(value).__name__}, expected an object of settings")
    return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_scheduler_config(cfg: dict[str, Any], rel: str) -> None:
    steps = cfg.get("num_train_timesteps", 1000)
    if not _is_int(steps) or steps <= 0:
        raise ModelConfigError(f"{rel}: num_train_timesteps is {steps!r}; expected a positive integer (1000 in the published model)")
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ModelConfigError(f"{rel}: prediction_type is {prediction!r}; expected one of {', '.join(PREDICTION_TYPES)}")
    schedule = cfg.get("beta_schedule", "linear")
    if cfg.get("trained_betas") is None and schedule not in BETA_SCHEDULES:
        raise ModelConfigError(f"{rel}: beta_schedule is {schedule!r}; expected one of {', '.join(BETA_SCHEDULES)}")
    for key in ("beta_start", "beta_end"):
        v = cfg.get(key, 0.0001 if key == "beta_start" else 0.02)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < 1 and math.isfinite(v)):
            raise ModelConfigError(f"{rel}: {key} is {v!r}; expected a number between 0 and 1")


def max_noise_level(index: dict[str, Any]) -> int:
    level = index.get("max_noise_level", DEFAULT_MAX_NOISE_LEVEL)
    if not _is_int(level) or level < 0:
        raise ModelConfigError(f"model_index.json: max_noise_level is {level!r}; expected a non-negative integer (350)")
    return level


def check_fit(unet: Any, vae: Any, text_hidden_size: int, max_noise: int) -> None:
    """The UNet's, VAE's and text encoder's configs must describe parts that fit together."""
    latent = vae.latent_channels
    if unet.in_channels != latent + 3:
        raise ModelConfigError(
            f"unet in_channels is {unet.in_channels} but the x4 upscaler needs latent channels ({latent}) "
            f"+ 3 RGB channels = {latent + 3}: unet/config.json and vae/config.json do not match"
        )
    if unet.out_channels != latent:
        raise ModelConfigError(
            f"unet out_channels is {unet.out_channels}, expected vae latent channels {latent}: "
            "unet/config.json and vae/config.json do not match"
        )
    if unet.cross_attention_dim != text_hidden_size:
        raise ModelConfigError(
            f"unet cross_attention_dim is {unet.cross_attention_dim} but the text encoder's hidden size is "
            f"{text_hidden_size}: unet/config.json and text_encoder/config.json do not match"
        )
    classes = unet.num_class_embeds
    if classes is None or classes <= max_noise:
        raise ModelConfigError(
            f"unet num_class_embeds is {classes}; it must exceed max_noise_level ({max_noise}), "
            "since the noise level is the UNet's class label"
        )


def check_model_folder(folder: Path) -> tuple[int, dict[str, Any]]:
    """Every config read and checked, the three networks built without weights (meta tensors) and the
    weight files' headers compared with them. Nothing heavy is read. Returns max_noise_level and the
    empty networks ("unet", "vae", "text_encoder"), for the loader to fill (built once: 0.16 s in all
    for the full-size model)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .weights import WeightsMismatch, check_against_module, read_header

    index = read_config(folder, "model_index.json") if (folder / "model_index.json").is_file() else {}
    max_noise = max_noise_level(index)
    for sub in ("scheduler", "low_res_scheduler"):
        check_scheduler_config(read_config(folder, f"{sub}/scheduler_config.json"), f"{sub}/scheduler_config.json")
    low_res_steps = read_config(folder, "low_res_scheduler/scheduler_config.json").get("num_train_timesteps", 1000)
    if max_noise >= low_res_steps:
        raise ModelConfigError(
            f"model_index.json: max_noise_level is {max_noise} but low_res_scheduler/scheduler_config.json has "
            f"num_train_timesteps {low_res_steps}; the noise level must be below it"
        )
    modules: dict[str, Any] = {}
    for sub, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        cfg = read_config(folder, f"{sub}/config.json")
        with damaged_model_errors(f"{sub}/config.json"), init_empty_weights():
            modules[sub] = cls.from_config(cfg)
    read_config(folder, "text_encoder/config.json")
    with damaged_model_errors("text_encoder/config.json"), init_empty_weights():
        modules["text_encoder"] = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    check_fit(modules["unet"].config, modules["vae"].config, modules["text_encoder"].config.hidden_size, max_noise)
    for sub, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")):
        rel = f"{sub}/{name}.safetensors"
        if (folder / rel).is_file():  # else sharded or .bin: from_pretrained reads it (and is checked after)
            try:
                check_against_module(modules[sub], read_header(folder / rel, rel)[0], rel, f"{sub}/config.json", warn=False)
            except WeightsMismatch:
                pass  # renamed (legacy) keys: from_pretrained converts them, checked after loading
    return max_noise, modules


def check_text_encoder_fits_tokenizer(tokenizer: Any, text_config: Any) -> None:
    """Token ids must index the text encoder's embedding table, and a full prompt its position table."""
    if len(tokenizer) > text_config.vocab_size:
        raise ModelConfigError(
            f"text_encoder/config.json: vocab_size is {text_config.vocab_size} but the tokenizer has "
            f"{len(tokenizer)} tokens; the tokenizer and text encoder are from different models"
        )
    if tokenizer.model_max_length > text_config.max_position_embeddings:
        raise ModelConfigError(
            f"text_encoder/config.json: max_position_embeddings is {text_config.max_position_embeddings} but the "
            f"tokenizer pads prompts to {tokenizer.model_max_length} tokens (tokenizer/tokenizer_config.json)"
        )
