"""Converting the x4 upscaler between a diffusers folder and ONE file in the original layout.

folder -> file: the reverse of diffusers' converters (`diffusers.loaders.single_file_utils`), after the
layout of diffusers' `scripts/convert_diffusers_to_original_stable_diffusion.py` but computed from the
configs (any number of blocks and layers, not the hard-coded SD 1.x/2.x counts): `model.diffusion_model.*`
(UNet, `label_emb` the noise-level classes), `first_stage_model.*` (VAE, 1x1-conv attention weights),
`cond_stage_model.model.*` (OpenCLIP text tower: q/k/v fused into `in_proj`). A test checks that diffusers'
own converters give back every tensor exactly. The text tower is written with the layers the diffusers
model has (23 of the original 24 for the published model: the upscaler uses the penultimate layer's
output, and diffusers' converter skips the 24th layer anyway).

file -> folder: the networks read and converted by `single_file` (diffusers' converters), written with
their configs, schedulers and tokenizer in diffusers layout.

Both write to a temporary name beside the destination and rename it at the end: nothing partial is left.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from .errors import ModelConfigError, ModelPathError
from .single_file import (
    CONFIG_KEY,
    PREFIXES,
    TOKENIZER_FILES,
    bundled_configs_dir,
    read_configs_dir,
)

_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
    "class_embedding.": "label_emb.",
}
_UNET_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)


def _unet_prefixes(config: dict[str, Any]) -> dict[str, str]:
    """diffusers prefix -> original prefix for every block of a UNet2DConditionModel with this config."""
    n, per = len(config["block_out_channels"]), config["layers_per_block"]
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    out: dict[str, str] = dict(_UNET_TOP)
    for i in range(n):
        for j in range(per):
            out[f"down_blocks.{i}.resnets.{j}."] = (
                f"input_blocks.{(per + 1) * i + j + 1}.0."
            )
            out[f"down_blocks.{i}.attentions.{j}."] = (
                f"input_blocks.{(per + 1) * i + j + 1}.1."
            )
        if i < n - 1:
            out[f"down_blocks.{i}.downsamplers.0.conv."] = (
                f"input_blocks.{(per + 1) * (i + 1)}.0.op."
            )
        for j in range(per + 1):
            out[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{(per + 1) * i + j}.0."
            out[f"up_blocks.{i}.attentions.{j}."] = (
                f"output_blocks.{(per + 1) * i + j}.1."
            )
        if i < n - 1:
            out[f"up_blocks.{i}.upsamplers.0.conv."] = (
                f"output_blocks.{(per + 1) * i + per}.{2 if up_attn[i] else 1}.conv."
            )
    out["mid_block.resnets.0."] = "middle_block.0."
    out["mid_block.attentions.0."] = "middle_block.1."
    out["mid_block.resnets.1."] = "middle_block.2."
    return out


def _rename(key: str, prefixes: dict[str, str], part: str) -> tuple[str, str]:
    """The matching (diffusers prefix, original prefix) of `key` (the longest one)."""
    best = max((p for p in prefixes if key.startswith(p)), key=len, default=None)
    if best is None:
        raise ModelConfigError(
            f"{part}: tensor {key} has no place in the original layout (an unexpected network)"
        )
    return best, prefixes[best]


def unet_to_original(
    state: dict[str, torch.Tensor], config: dict[str, Any]
) -> dict[str, torch.Tensor]:
    prefixes = _unet_prefixes(config)
    out = {}
    for key, t in state.items():
        hf, sd = _rename(key, prefixes, "unet")
        rest = key[len(hf) :]
        if ".resnets." in hf:
            for a, b in _UNET_RESNET:
                rest = rest.replace(a, b)
        out[sd + rest] = t
    return out


def _vae_prefixes(config: dict[str, Any]) -> dict[str, str]:
    n, per = len(config["block_out_channels"]), config["layers_per_block"]
    out = {
        p: p
        for p in (
            "encoder.conv_in.",
            "encoder.conv_out.",
            "decoder.conv_in.",
            "decoder.conv_out.",
            "quant_conv.",
            "post_quant_conv.",
        )
    }
    out.update(
        {
            "encoder.conv_norm_out.": "encoder.norm_out.",
            "decoder.conv_norm_out.": "decoder.norm_out.",
        }
    )
    for i in range(n):
        for j in range(per):
            out[f"encoder.down_blocks.{i}.resnets.{j}."] = (
                f"encoder.down.{i}.block.{j}."
            )
        out[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = (
            f"encoder.down.{i}.downsample.conv."
        )
        for j in range(per + 1):
            out[f"decoder.up_blocks.{i}.resnets.{j}."] = (
                f"decoder.up.{n - 1 - i}.block.{j}."
            )
        out[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = (
            f"decoder.up.{n - 1 - i}.upsample.conv."
        )
    for side in ("encoder", "decoder"):
        for k in range(2):
            out[f"{side}.mid_block.resnets.{k}."] = f"{side}.mid.block_{k + 1}."
        out[f"{side}.mid_block.attentions.0."] = f"{side}.mid.attn_1."
    return out


_VAE_ATTN = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}


def vae_to_original(
    state: dict[str, torch.Tensor], config: dict[str, Any]
) -> dict[str, torch.Tensor]:
    prefixes = _vae_prefixes(config)
    out = {}
    for key, t in state.items():
        hf, sd = _rename(key, prefixes, "vae")
        rest = key[len(hf) :]
        if ".resnets." in hf:
            rest = rest.replace("conv_shortcut", "nin_shortcut")
        if ".attentions." in hf:
            head = next(h for h in _VAE_ATTN if rest.startswith(h))
            rest = _VAE_ATTN[head] + rest[len(head) :]
            if rest.endswith("weight") and head != "group_norm." and t.ndim == 2:
                t = t.reshape(
                    *t.shape, 1, 1
                )  # linear -> 1x1 convolution, as the original stores it
        out[sd + rest] = t
    return out


_TEXT_PARTS = (
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
    ("self_attn.out_proj", "attn.out_proj"),
)


def text_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' CLIPTextModel -> the OpenCLIP text tower (q, k, v fused into in_proj_weight/bias)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        k = key.removeprefix("text_model.")
        if k.endswith("position_ids"):
            continue
        if k == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = t
        elif k == "embeddings.position_embedding.weight":
            out["positional_embedding"] = t
        elif k.startswith("final_layer_norm."):
            out["ln_final." + k.removeprefix("final_layer_norm.")] = t
        elif k.startswith("encoder.layers."):
            rest = "transformer.resblocks." + k.removeprefix("encoder.layers.")
            for proj in ("q_proj", "k_proj", "v_proj"):
                if f".self_attn.{proj}." in rest:
                    layer, kind = rest.split(f".self_attn.{proj}.")
                    qkv.setdefault(f"{layer}.attn.in_proj_{kind}", {})[proj] = t
                    break
            else:
                for a, b in _TEXT_PARTS:
                    rest = rest.replace(a, b)
                out[rest] = t
        else:
            raise ModelConfigError(
                f"text_encoder: tensor {key} has no place in the OpenCLIP layout"
            )
    for name, parts in qkv.items():
        if set(parts) != {"q_proj", "k_proj", "v_proj"}:
            raise ModelConfigError(
                f"text_encoder: {name} lacks one of q/k/v ({sorted(parts)})"
            )
        out[name] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return out


def to_original(
    states: dict[str, dict[str, torch.Tensor]], configs: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """The three networks' diffusers state dicts -> one original-layout state dict (with the prefixes)."""
    parts = {
        "unet": unet_to_original(states["unet"], configs["unet"]),
        "vae": vae_to_original(states["vae"], configs["vae"]),
        "text_encoder": text_to_original(states["text_encoder"]),
    }
    return {PREFIXES[p] + k: v for p, sd in parts.items() for k, v in sd.items()}


# --------------------------------------------------------------------------------------------------------


def _check_destination(dst: Path, overwrite: bool) -> None:
    if dst.exists() and not overwrite:
        raise ModelPathError(
            f"{dst} already exists; choose another name or remove it first"
        )
    if not dst.parent.is_dir():
        raise ModelPathError(f"{dst}: the folder {dst.parent} does not exist")


def _folder_state(folder: Path, part: str) -> dict[str, torch.Tensor]:
    """A network's tensors as stored in a diffusers folder (loaded and checked by sdx4's loader)."""
    from .loading import _load_diffusers, _load_text_encoder
    from .placement import resolve_placement

    placement = resolve_placement("cpu", "fp32", "fp32")
    if part == "text_encoder":
        module = _load_text_encoder(folder, placement)
    else:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        cls = UNet2DConditionModel if part == "unet" else AutoencoderKL
        module = _load_diffusers(cls, folder, part, torch.float32, False)
    return {k: v.contiguous() for k, v in module.state_dict().items()}


def folder_to_single_file(
    folder: Path, dst: Path, dtype: torch.dtype | None = None, overwrite: bool = False
) -> Path:
    """A diffusers folder -> one .safetensors in the original layout, its configs in the metadata."""
    from safetensors.torch import save_file

    from .checks import check_model_folder

    if dst.suffix.lower() != ".safetensors":
        raise ModelPathError(f"{dst}: the single file must end in .safetensors")
    _check_destination(dst, overwrite)
    check_model_folder(folder)  # configs and weight headers, before any weight is read
    configs = read_configs_dir(folder)
    if configs["tokenizer"] == read_configs_dir(bundled_configs_dir())["tokenizer"]:
        del configs["tokenizer"]  # the bundled one: not repeated in every file
    states = {part: _folder_state(folder, part) for part in PREFIXES}
    state = to_original(states, configs)
    del states
    if dtype is not None:
        state = {
            k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()
        }
    state = {k: v.contiguous() for k, v in state.items()}
    meta = {CONFIG_KEY: json.dumps(configs), "format": "pt"}
    tmp = dst.with_name(dst.name + ".partial")
    try:
        save_file(state, str(tmp), metadata=meta)
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def single_file_to_folder(
    src: Path, dst: Path, dtype: torch.dtype | None = None, overwrite: bool = False
) -> Path:
    """One single-file checkpoint -> a diffusers folder (the networks in their stored precision)."""
    from safetensors.torch import save_file

    from .single_file import open_single_file

    _check_destination(dst, overwrite)
    model = open_single_file(src)  # recognised and checked before any weight is read
    configs = model.configs
    tmp = dst.with_name(dst.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        for part, weights in (
            ("unet", "diffusion_pytorch_model"),
            ("vae", "diffusion_pytorch_model"),
            ("text_encoder", "model"),
        ):
            module = model.network(part, dtype)
            (tmp / part).mkdir(parents=True)
            state = {k: v.contiguous() for k, v in module.state_dict().items()}
            save_file(
                state,
                str(tmp / part / f"{weights}.safetensors"),
                metadata={"format": "pt"},
            )
            (tmp / part / "config.json").write_text(
                json.dumps(configs[part], indent=2) + "\n"
            )
            del module, state
        for sub in ("scheduler", "low_res_scheduler"):
            (tmp / sub).mkdir()
            (tmp / sub / "scheduler_config.json").write_text(
                json.dumps(configs[sub], indent=2) + "\n"
            )
        (tmp / "tokenizer").mkdir()
        tokenizer = (
            configs.get("tokenizer")
            or read_configs_dir(bundled_configs_dir())["tokenizer"]
        )
        for name, text in tokenizer.items():
            if name in TOKENIZER_FILES:
                (tmp / "tokenizer" / name).write_text(text, encoding="utf-8")
        (tmp / "model_index.json").write_text(
            json.dumps(configs["model_index"], indent=2) + "\n"
        )
        if dst.exists():
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        tmp.rename(dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dst
