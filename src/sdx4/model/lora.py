"""LoRA files merged into the UNet's weights, through diffusers' and peft's own code.

Reading: `StableDiffusionLoraLoaderMixin.lora_state_dict` (what `pipe.load_lora_weights` reads) takes the
diffusers/peft format (`unet.<module>.lora_A.weight`, alpha in the file's `lora_adapter_metadata`, as
`save_lora_weights` writes it) and converts Kohya files (`lora_unet_<module>.lora_down/lora_up/alpha`) with
`_convert_non_diffusers_lora_to_diffusers`. Merging: `unet.load_lora_adapter` (peft layers), `fuse_lora(scale)`,
`unload_lora()`: W += scale * alpha/r * B @ A, then the peft layers are taken off again, so the UNet left is
diffusers' plain module with merged weights (the speed tricks, installed after, see nothing else; inference
costs what it costs without a LoRA).

Every check runs before any heavy work: the file is safetensors, holds tensors, holds no NaN/inf, is not a
text-encoder LoRA, and every key names a Linear/Conv2d of this UNet with fitting shapes (checked on the
empty (meta) UNet built from the config, before the model's weights are read). Errors are `LoraError`
(a `ModelConfigError`: exit 2 in the CLI), naming the file and the first bad key.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..options import LoraSpec
from .errors import LoraError, ModelConfigError

log = logging.getLogger("sdx4")

#: How many hex digits of a LoRA file's sha256 the metadata records.
SHA256_DIGITS = 12
UNET_PREFIX = "unet."
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.")


@dataclass(frozen=True)
class Lora:
    """A LoRA file read and checked: its UNet tensors in diffusers' format (keys `unet.`-prefixed, as
    `load_lora_weights` hands them to the UNet), Kohya's alphas or the file's peft metadata, and its hash."""

    spec: LoraSpec
    sha256: str
    state_dict: dict[str, Any] = field(repr=False)
    network_alphas: dict[str, float] | None = field(default=None, repr=False)
    metadata: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def scale(self) -> float:
        return self.spec.scale

    def record(self) -> dict[str, Any]:
        """What metadata, `/v1/info` and reports say about it."""
        return {"name": self.name, "sha256": self.sha256, "scale": self.scale}


def read_lora(spec: LoraSpec | str) -> Lora:
    """Read and check one LoRA file (no model needed); raises LoraError naming the file and the problem."""
    import torch
    from diffusers import StableDiffusionUpscalePipeline
    from safetensors import SafetensorError, safe_open

    _require_peft()  # merging needs it: say so before any heavy work
    spec = LoraSpec.of(spec)
    path = Path(spec.path)
    try:
        with safe_open(str(path), "pt") as f:
            count = len(list(f.keys()))
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraError(f"LoRA {path}: not a safetensors file ({e})") from None
    if count == 0:
        raise LoraError(f"LoRA {path}: the file holds no tensors")
    # use_safetensors=True: never unpickle; a file path is read as is (no Hub lookup).
    try:
        state_dict, alphas, metadata = StableDiffusionUpscalePipeline.lora_state_dict(
            str(path), use_safetensors=True, return_lora_metadata=True
        )
    except ValueError as e:  # Kohya keys diffusers' converter does not know
        raise LoraError(
            f"LoRA {path}: diffusers cannot read its keys: {str(e).strip()[:500]}"
        ) from None
    if not state_dict:
        raise LoraError(
            f"LoRA {path}: no LoRA tensors left after reading it (DoRA-only or unknown keys)"
        )
    for key, t in state_dict.items():
        if not torch.is_tensor(t):
            raise LoraError(f"LoRA {path}: {key} is not a tensor")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise LoraError(f"LoRA {path}: {key} holds NaN or inf values")
    prefixes = (UNET_PREFIX, *TEXT_ENCODER_PREFIXES)
    if not any(k.startswith(prefixes) for k in state_dict):
        # peft's own `save_lora_adapter` / `unet.save_lora_adapter` writes the UNet's keys unprefixed
        state_dict = {UNET_PREFIX + k: v for k, v in state_dict.items()}
        if alphas:
            alphas = {UNET_PREFIX + k: v for k, v in alphas.items()}
    text = sorted(k for k in state_dict if k.startswith(TEXT_ENCODER_PREFIXES))
    unet = {k: v for k, v in state_dict.items() if k.startswith(UNET_PREFIX)}
    other = sorted(set(state_dict) - set(text) - set(unet))
    if other:
        raise LoraError(
            f"LoRA {path}: {len(other)} keys are neither UNet nor text-encoder keys, the first {other[0]}"
        )
    if text and not unet:
        raise LoraError(
            f"LoRA {path} is a text-encoder-only LoRA ({len(text)} tensors, the first {text[0]}): sdx4 merges LoRAs "
            "into the UNet only"
        )
    if text:
        raise LoraError(
            f"LoRA {path} also changes the text encoder ({len(text)} tensors, the first {text[0]}): sdx4 merges "
            "LoRAs into the UNet only, and its UNet part alone is not what was trained"
        )
    unet_alphas = (
        {k: v for k, v in alphas.items() if k.startswith(UNET_PREFIX)}
        if alphas
        else None
    )
    return Lora(
        spec, spec.sha256(SHA256_DIGITS), unet, unet_alphas or None, metadata or None
    )


def peft_keys(lora: Lora) -> dict[str, Any]:
    """The UNet tensors with peft's keys (`<module>.lora_A.weight`), as `load_lora_adapter` converts them."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    # Every key, not only when the first is old-style (as load_lora_adapter decides): diffusers'
    # convert_state_dict_to_diffusers renames only the attention keys of a peft state dict (to_q.lora.down)
    # and leaves the others (conv1.lora_A), so files saved the documented way mix both spellings.
    return convert_unet_state_dict_to_peft(
        {k.removeprefix(UNET_PREFIX): v for k, v in lora.state_dict.items()}
    )


def check_fits(unet: Any, lora: Lora) -> None:
    """Every tensor of `lora` must name a Linear or Conv2d of `unet` (which may be the empty, meta, UNet)
    with fitting shapes; raises LoraError naming the file and the first key that does not."""
    import torch

    path = lora.spec.path
    for key, t in sorted(peft_keys(lora).items()):
        module_name, sep, part = key.rpartition(".lora_")
        if not sep or part not in ("A.weight", "B.weight", "B.bias"):
            raise LoraError(
                f"LoRA {path}: {key} is not a LoRA tensor sdx4 can merge (expected lora_A/lora_B weights)"
            )
        try:
            if not module_name:
                raise AttributeError(module_name)  # get_submodule("") is the UNet itself
            module = unet.get_submodule(module_name)
        except AttributeError:
            raise LoraError(
                f"LoRA {path} does not fit this UNet: {key} names no layer of it ({module_name})"
            ) from None
        if isinstance(module, torch.nn.Linear):
            n_in, n_out, kernel = module.in_features, module.out_features, ()
        elif isinstance(module, torch.nn.Conv2d):
            n_in, n_out, kernel = (
                module.in_channels // module.groups,
                module.out_channels,
                tuple(module.kernel_size),
            )
        else:
            raise LoraError(
                f"LoRA {path}: {key} adapts {module_name}, a {type(module).__name__}; sdx4 merges LoRAs into Linear "
                "and Conv2d layers only"
            )
        shape = tuple(t.shape)
        if part == "A.weight":
            fits = (
                len(shape) == 2 + len(kernel)
                and shape[1] == n_in
                and shape[2:] == kernel
            )
            want = f"(r, {n_in}{''.join(f', {k}' for k in kernel)})"
        elif part == "B.weight":
            fits = (
                len(shape) == 2 + len(kernel)
                and shape[0] == n_out
                and all(s == 1 for s in shape[2:])
            )
            want = f"({n_out}, r{', 1, 1' if kernel else ''})"
        else:
            fits, want = shape == (n_out,), f"({n_out},)"
        if not fits:
            raise LoraError(
                f"LoRA {path} does not fit this UNet: {key} has shape {shape}, {module_name} needs {want}"
            )


def _require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ModelConfigError(
            'LoRAs need peft: pip install -e ".[train]" (in the sdx4 checkout) or pip install peft'
        ) from None


def merge_loras(unet: Any, loras: tuple[Lora, ...] | list[Lora]) -> None:
    """Merge each LoRA into `unet`'s weights at its scale, in order, with diffusers' `load_lora_adapter`,
    `fuse_lora` and `unload_lora`: afterwards no peft layer is left, only the merged weights. A scale of 0
    changes nothing (skipped)."""
    if not loras:
        return
    _require_peft()
    for i, lora in enumerate(loras):
        check_fits(unet, lora)
        if lora.scale == 0:
            continue
        name = f"sdx4_lora_{i}"
        kwargs: dict[str, Any] = {}
        if lora.network_alphas:
            kwargs["network_alphas"] = dict(lora.network_alphas)
        elif lora.metadata:
            kwargs["metadata"] = dict(lora.metadata)
        try:
            tensors = {UNET_PREFIX + k: v for k, v in peft_keys(lora).items()}
            unet.load_lora_adapter(tensors, prefix="unet", adapter_name=name, **kwargs)
            unet.fuse_lora(
                lora_scale=lora.scale, safe_fusing=True, adapter_names=[name]
            )
        except ValueError as e:  # safe_fusing: NaN in the merged weights
            raise LoraError(
                f"LoRA {lora.spec.path}: merging it at scale {lora.scale:g} failed: {e}"
            ) from None
        finally:
            unet.unload_lora()  # takes the peft layers off (fused weights stay), also after a failure
