"""Run a list of upscaling methods on the same image: shared by `compare` and `evaluate`.

No torch at import time; the model is only touched when the method is "sd".
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ..api import upscale
from ..imageio import LoadedImage
from ..options import (
    METHODS,
    WEIGHTS_METHOD_PREFIX,
    LoraSpec,
    UpscaleOptions,
    split_method,
)

#: The diffusion model only upscales by exactly 4.
SD_SCALE = 4
#: With --lora: the model with every given LoRA merged (what `sdx4 upscale --lora ...` makes); "sd" is then
#: the base model and "sd+NAME" the model with the LoRA file NAME.safetensors alone.
LORA_METHOD = "sd+lora"


def lora_methods(loras: Sequence[LoraSpec]) -> dict[str, tuple[LoraSpec, ...]]:
    """The model's methods with these LoRAs and the LoRAs each merges: "sd" (none), "sd+lora" (all) and
    "sd+NAME" for each file; {} without LoRAs. Two files with the same name are an error."""
    if not loras:
        return {}
    out: dict[str, tuple[LoraSpec, ...]] = {"sd": (), LORA_METHOD: tuple(loras)}
    for spec in loras:
        name = "sd+" + spec.name.removesuffix(spec.name[-len(".safetensors"):])
        if name == LORA_METHOD and len(loras) == 1:
            continue  # a lone lora.safetensors: sd+lora is that file
        if name in out:
            raise ValueError(f"two LoRAs give the method name {name!r} ({spec.path}); rename one")
        out[name] = (spec,)
    return out


def is_sd_method(name: str) -> bool:
    """The diffusion model, with or without LoRAs ("sd", "sd+lora", "sd+NAME")."""
    return name == "sd" or name.startswith("sd+")


def is_weights_method(name: str) -> bool:
    """A user's own Real-ESRGAN-family weights, spelled realesrgan:PATH (options.split_method)."""
    return name.startswith(WEIGHTS_METHOD_PREFIX)


def parse_methods(text: str, extra: Sequence[str] = ()) -> tuple[str, ...]:
    """'sd,bicubic, lanczos' -> ('sd', 'bicubic', 'lanczos'); unknown or repeated names are errors.
    `extra`: further allowed names (the LoRA methods of `lora_methods`). realesrgan:PATH names a user's
    weights file (checked by api.check_method, not here; a PATH cannot hold a comma)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    choices = (*METHODS, *(e for e in extra if e not in METHODS))
    if not names:
        raise ValueError(f"no methods given; choose from {', '.join(choices)}, or {WEIGHTS_METHOD_PREFIX}PATH")
    unknown = [n for n in names if n not in choices and not is_weights_method(n)]
    if unknown:
        hint = "; sd+lora and sd+NAME need --lora" if is_sd_method(unknown[0]) and not extra else ""
        raise ValueError(f"unknown method {unknown[0]!r}; choose from {', '.join(choices)}{hint}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"method {dupes[0]!r} is listed twice")
    return tuple(names)


@dataclass(frozen=True)
class MethodOutput:
    image: Image.Image  # RGB, exactly scale x the input size
    seconds: float  # wall time of the upscaling call alone
    metadata: dict[str, Any]


@dataclass(frozen=True)
class MethodRunner:
    """Upscales RGB images with any method; `upscaler` (an sdx4.Upscaler) is needed only for "sd".

    `sd_options` must carry a concrete seed, so that every image of a run uses the same, reported seed.
    `lora_variants` (`lora_methods`): the LoRAs each sd method merges; the upscaler is switched to them
    (`Upscaler.set_loras`, one UNet in memory at a time) before the timed call.
    """

    sd_options: UpscaleOptions | None = None
    upscaler: Any = None
    lora_variants: Mapping[str, tuple[LoraSpec, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.sd_options is not None and self.sd_options.seed is None:
            raise ValueError("sd_options needs a concrete seed (use options.with_seed())")

    def run(self, method: str, rgb: Image.Image, scale: int = SD_SCALE) -> MethodOutput:
        """One image (mode RGB) -> its upscaled version by `method`; alpha is not part of comparisons."""
        if rgb.mode != "RGB":
            raise ValueError(f"expected an RGB image; got mode {rgb.mode}")
        if method == "sd" or method in self.lora_variants:
            if self.upscaler is None or self.sd_options is None:
                raise ValueError("method 'sd' needs the model: load it with sdx4.load() and pass upscaler and sd_options")
            if scale != SD_SCALE:
                raise ValueError(f"method 'sd' upscales by exactly {SD_SCALE}; got scale {scale}")
            if self.lora_variants:
                self.upscaler.set_loras(self.lora_variants[method])  # a no-op when already merged
            opts = self.sd_options.replace(method="sd", num_images=1)
            t0 = time.perf_counter()
            result = self.upscaler(rgb, opts)
            seconds = time.perf_counter() - t0
            return MethodOutput(result.image.convert("RGB"), seconds, result.metadata)
        name, weights = split_method(method)
        if name not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}, or {WEIGHTS_METHOD_PREFIX}PATH")
        t0 = time.perf_counter()
        result = upscale(LoadedImage(rgb=rgb, alpha=None), method=name, scale=scale, gan_weights=weights)  # the public API's path
        seconds = time.perf_counter() - t0
        meta: dict[str, Any] = {"method": method, "scale": scale}
        if weights is not None:  # which file made this row
            meta.update({k: result.metadata[k] for k in ("model", "model_file", "weights_sha256")})
        return MethodOutput(result.image, seconds, meta)
