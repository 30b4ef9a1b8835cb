"""Making LoRA files for tests: peft on the tiny UNet, saved as diffusers saves them (and as Kohya names them)."""

from __future__ import annotations

from pathlib import Path

#: Attention, convolution and feed-forward layers (what OSEDiff targets on this mostly-convolutional UNet).
TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "conv1",
    "conv2",
    "proj_in",
    "proj_out",
    "ff.net.2",
]


def make_lora(
    model_dir: Path,
    path: Path,
    *,
    r: int = 4,
    alpha: int = 8,
    seed: int = 0,
    std: float = 0.3,
    targets: list[str] | None = None,
) -> Path:
    """A LoRA on the tiny UNet with random (non-zero) up weights, saved like `sdx4 train` and diffusers'
    examples: `convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))` through
    `save_lora_weights(unet_lora_layers=..., unet_lora_adapter_metadata=...)` (alpha kept in the metadata)."""
    import torch
    from diffusers import StableDiffusionUpscalePipeline, UNet2DConditionModel
    from diffusers.training_utils import _collate_lora_metadata
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    torch.manual_seed(seed)
    unet.add_adapter(
        LoraConfig(
            r=r,
            lora_alpha=alpha,
            init_lora_weights="gaussian",
            target_modules=targets or TARGETS,
        )
    )
    g = torch.Generator().manual_seed(seed)
    for name, p in unet.named_parameters():
        if (
            "lora_B" in name
        ):  # peft starts B at zero (no effect): give the LoRA an effect to see
            p.data = torch.randn(p.shape, generator=g) * std
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionUpscalePipeline.save_lora_weights(
        path.parent,
        unet_lora_layers=layers,
        weight_name=path.name,
        **_collate_lora_metadata({"unet": unet}),
    )
    return path


def to_kohya(src: Path, dst: Path, alpha: float) -> Path:
    """The same LoRA with Kohya's names: `lora_unet_<module with _>.lora_down/lora_up.weight` and `.alpha`."""
    import torch
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors.torch import load_file, save_file

    out = {}
    for key, t in convert_unet_state_dict_to_peft(load_file(src)).items():
        module, _, part = key.removeprefix("unet.").rpartition(".lora_")
        kohya = "lora_unet_" + module.replace(".", "_")
        out[f"{kohya}.{'lora_down' if part == 'A.weight' else 'lora_up'}.weight"] = t
        out[f"{kohya}.alpha"] = torch.tensor(float(alpha))
    save_file(out, dst)
    return dst
