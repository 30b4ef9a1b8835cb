"""The LoRA adapter on the UNet (peft) and the file it is saved as: ONE .safetensors that diffusers'
`StableDiffusionUpscalePipeline.load_lora_weights(path)` accepts.

The file is what diffusers' own `save_lora_weights` writes (as in its train_text_to_image_lora.py example):
`convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))` with every key prefixed `unet.` (and the
convolutions' keys spelled `lora.down`/`lora.up` like the attention ones: see `diffusers_state`), and the
adapter's LoraConfig as JSON under the `lora_adapter_metadata` header key (keys prefixed `unet.`): diffusers
reads r and lora_alpha from there, so an alpha that is not the rank scales right. sdx4 adds its own keys
(`sdx4_*`: base model, recipe, steps, data fingerprint, version) beside them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..options import OptionsError
from .options import TrainOptions

ADAPTER = "default"
UNET_PREFIX = "unet"


def add_lora(
    unet: torch.nn.Module, options: TrainOptions, seed: int
) -> list[torch.nn.Parameter]:
    """Put a LoRA adapter on `unet` (frozen) and return its trainable parameters (fp32)."""
    try:
        from peft import LoraConfig
    except ImportError:  # pragma: no cover - the extra is missing
        raise ImportError('sdx4 train needs peft: pip install -e ".[train]"') from None
    targets = options.target_modules
    names = [name for name, _ in unet.named_modules()]
    unmatched = [
        t for t in targets if not any(n == t or n.endswith("." + t) for n in names)
    ]
    if unmatched:
        raise OptionsError(
            f"targets: no module of the UNet is named {', '.join(unmatched)}",
            option="targets",
        )
    unet.requires_grad_(False)
    config = LoraConfig(
        r=options.rank,
        lora_alpha=options.lora_alpha,
        init_lora_weights="gaussian",
        target_modules=list(targets),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(
            seed
        )  # the Gaussian init of lora_A: the same for the same seed
        unet.add_adapter(config, adapter_name=ADAPTER)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = (
            p.data.float()
        )  # the LoRA weights train in fp32 whatever the frozen weights' dtype
    return params


def trainable_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA parameters by their module names (what a checkpoint keeps, exactly)."""
    return {
        n: p.detach().cpu().contiguous()
        for n, p in unet.named_parameters()
        if p.requires_grad
    }


def load_trainable_state(unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        extra, missing = (
            sorted(set(state) - set(params)),
            sorted(set(params) - set(state)),
        )
        raise ValueError(
            f"the checkpoint's LoRA does not fit this run: {len(missing)} missing, {len(extra)} unexpected tensors"
        )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])


def diffusers_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter in diffusers' naming with the `unet.` prefix, as `save_lora_weights` writes it."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    sd = convert_state_dict_to_diffusers(
        get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    )
    # diffusers' mapping renames only the attention projections (to_q.lora_A -> to_q.lora.down); the loader
    # converts the whole file back only when its FIRST key lacks "lora_A" (loaders/peft.py). Mixed names
    # would drop one kind silently: every key gets the diffusers spelling.
    sd = {
        k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v
        for k, v in sd.items()
    }
    return {
        f"{UNET_PREFIX}.{k}": v.detach().float().cpu().contiguous()
        for k, v in sd.items()
    }


def adapter_metadata(unet: torch.nn.Module) -> str:
    """The LoraConfig as diffusers' `save_lora_weights(unet_lora_adapter_metadata=...)` stores it."""
    config = unet.peft_config[ADAPTER].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    return json.dumps(
        {f"{UNET_PREFIX}.{k}": v for k, v in config.items()}, indent=2, sort_keys=True
    )


def save_lora(path: Path, unet: torch.nn.Module, info: dict[str, Any]) -> Path:
    """Write the adapter to `path` atomically; `info` goes in the header as `sdx4_<key>` strings."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    metadata = {"format": "pt", LORA_ADAPTER_METADATA_KEY: adapter_metadata(unet)}
    metadata.update(
        {
            f"sdx4_{k}": v if isinstance(v, str) else json.dumps(v, sort_keys=True)
            for k, v in info.items()
        }
    )
    return save_tensors(path, diffusers_state(unet), metadata)


def save_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """safetensors to a temp file in the same folder, fsync, rename: a failed write leaves the old file."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    write_bytes_atomic(path, data)
    return path


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """`data` into `path` through imageio's one atomic writer (temp file, fsync, rename; an OSError comes back
    as an OSError naming `path`, errno kept)."""
    from ..imageio.write import write_atomic

    write_atomic(path, lambda f: f.write(data))
