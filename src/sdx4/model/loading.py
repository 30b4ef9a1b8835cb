"""Finding and loading the model: a Hub id (through the Hugging Face cache) or a local diffusers folder.

Every component is loaded with diffusers' / transformers' own classes, checked against the others,
and placed on the chosen device in the chosen precision (VAE always fp32: it overflows in fp16).
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .. import speed
from ..options import DEFAULT_MODEL
from .checks import (
    check_fit,
    check_model_folder,
    check_text_encoder_fits_tokenizer,
    damaged_model_errors,
)
from .errors import ModelConfigError
from .hub import resolve_model_dir
from .placement import Placement, resolve_placement
from .random_model import RANDOM_MARKER

log = logging.getLogger("sdx4")

#: The VAE scaling factor of the published upscaler; old configs lack it (diffusers forces it too).
VAE_SCALING_FACTOR = 0.08333



@dataclass
class Components:
    """The loaded model parts. Plain data: the pipeline functions take what they need from it."""

    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    scheduler: Any  # diffusers.DDIMScheduler (v-prediction)
    low_res_scheduler: Any  # diffusers.DDPMScheduler
    placement: Placement
    model: str  # what the user asked for (Hub id or path)
    max_noise_level: int = 350
    random_weights: bool = False
    folder: Path | None = None  # where the weights were read from (to reload the text encoder or UNet)
    compiled: bool = False  # the UNet is wrapped with torch.compile (a reloaded one is too)
    unet_config: Any = None  # kept while the UNet itself is released (low-memory policy, large decodes)
    speed: speed.Installed | None = None  # the speed tricks on the UNet (`speed.install`), renewed by load_unet
    source: Any = None  # a single-file checkpoint (single_file.SingleFileModel) the networks are read from
    weight_cache: bool = False  # weights read through the cache folder's converted copies (weight_cache.py)
    loras: tuple[Any, ...] = ()  # the LoRAs merged into the UNet (model/lora.py `Lora`), merged again by load_unet
    #: The text encoder's empty (meta) module while a lazily loaded one (load_components) was never loaded: built
    #: while checking the folder, filled at its first load.
    text_encoder_empty: Any = None

    @property
    def text_encoder_loaded(self) -> bool:
        """Whether the text encoder was loaded in this process (now held or dropped since)."""
        return self.text_encoder_empty is None

    def load_text_encoder(self) -> Any:
        """Load the text encoder: the first time when the model was loaded without it (`lazy_text_encoder`),
        or again (the low-memory policy drops it between prompts)."""
        if self.source is not None:
            enc = self.source.text_encoder(self.placement)
        elif self.folder is None:
            raise RuntimeError("the text encoder was released and the model folder is unknown")
        else:
            empty, self.text_encoder_empty = self.text_encoder_empty, None
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*scaling_factor.*")
                enc = _load_text_encoder(self.folder, self.placement, empty=empty, cache=self.weight_cache)
        return enc

    def load_unet(self) -> Any:
        """Load the UNet again, placed and prepared as at first (the low-memory policy releases it for
        decodes that would otherwise spill to disk)."""
        if self.source is not None:
            unet, self.speed = _prepare_unet(self.source.unet(self.placement), self.placement, self.compiled, self.loras)
            return unet
        if self.folder is None:
            raise RuntimeError("the UNet was released and the model folder is unknown")
        unet, self.speed = _prepare_unet(_load_unet(self.folder, self.placement, cache=self.weight_cache), self.placement,
                                         self.compiled, self.loras)
        return unet

    @property
    def pad_multiple(self) -> int:
        """The UNet halves the latent (len(blocks) - 1) times: inputs are padded to this multiple."""
        config = self.unet.config if self.unet is not None else self.unet_config
        return 2 ** (len(config.block_out_channels) - 1)


def _load_text_encoder(folder: Path, placement: Placement, empty: Any = None, cache: bool = False) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    from .weights import WeightsMismatch, load_transformers_model

    with damaged_model_errors("text_encoder/model.safetensors"):
        try:
            enc = load_transformers_model(
                CLIPTextModel, CLIPTextConfig, folder / "text_encoder", placement.text_dtype, root=folder, empty=empty,
                cache=cache,
            )
        except WeightsMismatch as e:
            log.debug("text encoder via from_pretrained: %s", e)
            # transformers 5 loads in the dtype written in the config unless told: always pass ours.
            enc, info = CLIPTextModel.from_pretrained(
                folder / "text_encoder", dtype=placement.text_dtype, output_loading_info=True
            )
            _check_loading_info(enc, info, "text_encoder")
    return enc.to(placement.device).eval().requires_grad_(False)


def _place(module: Any, placement: Placement) -> Any:
    module.to(placement.device)
    if placement.channels_last:
        module.to(memory_format=torch.channels_last)  # a no-op for streamed weights (already laid out so)
    return module.eval().requires_grad_(False)


def _load_unet(folder: Path, placement: Placement, empty: Any = None, cache: bool = False) -> Any:
    from diffusers import UNet2DConditionModel

    return _load_diffusers(UNet2DConditionModel, folder, "unet", placement.unet_dtype, placement.channels_last,
                           empty=empty, cache=cache)


def _prepare_unet(unet: Any, placement: Placement, compile: bool, loras: tuple[Any, ...] = ()) -> tuple[Any, speed.Installed]:
    """Place a checked UNet, merge the LoRAs into its weights (model/lora.py: no peft layer is left), then put
    the speed tricks on it (`sdx4.speed.install`, one door): they see the merged weights. Returns the UNet
    and what was installed on it."""
    unet = _place(unet, placement)
    if loras:
        from .lora import merge_loras

        merge_loras(unet, loras)
    return unet, speed.install(unet, placement, compile=compile)


def _load_diffusers(
    cls: Any, folder: Path, subfolder: str, dtype: torch.dtype, channels_last: bool, empty: Any = None,
    cache: bool = False,
) -> Any:
    """Streamed tensor by tensor into `dtype` (weights.py); from_pretrained where that does not fit."""
    from .weights import WeightsMismatch, load_diffusers_model

    with damaged_model_errors(f"{subfolder}/diffusion_pytorch_model.safetensors"):
        try:
            return load_diffusers_model(cls, folder / subfolder, dtype, channels_last, root=folder, empty=empty,
                                        cache=cache)
        except WeightsMismatch as e:
            log.debug("%s via from_pretrained: %s", subfolder, e)
            model, info = cls.from_pretrained(folder, subfolder=subfolder, torch_dtype=dtype, output_loading_info=True)
            return _check_loading_info(model, info, subfolder)


def _check_loading_info(model: Any, info: dict[str, Any], subfolder: str) -> Any:
    """What from_pretrained did not load is an error here, not random or empty (meta) weights; the values
    are checked for NaN/inf as the streamed ones are."""
    from .weights import check_finite

    for kind in ("missing_keys", "mismatched_keys"):
        keys = sorted(map(str, info.get(kind) or ()))
        if keys:
            raise ModelConfigError(
                f"{subfolder}: the weights do not fit {subfolder}/config.json: {len(keys)} {kind.replace('_', ' ')}, "
                f"the first {keys[0]}"
            )
    for name, t in model.state_dict().items():
        if t.is_meta:
            raise ModelConfigError(f"{subfolder}: tensor {name} is missing from the weights")
        check_finite(name, t, subfolder)
    return model


def load_components(
    model: str = DEFAULT_MODEL,
    device: str = "auto",
    dtype: str = "auto",
    vae_dtype: str = "fp32",
    compile: bool = False,
    before_denoiser: Callable[[Components], None] | None = None,
    weight_cache: bool = True,
    loras: tuple[Any, ...] = (),
    lazy_text_encoder: bool = False,
) -> Components:
    """Find, load, check and place every component of the x4 upscaler.

    Weights are read straight into the target dtype, one tensor at a time (weights.py): no fp32 copy
    of a bf16/fp16 model is ever resident, not even as memory-mapped file pages.
    `compile=True` wraps the UNet with torch.compile (opt-in: see README for when it pays off).
    The tokenizer and text encoder are loaded first; `before_denoiser(components)` then runs with
    `unet` and `vae` still None, before those are loaded: the low-memory policy encodes the prompts
    it knows there and drops the text encoder, so that it and the UNet are never in memory together.
    `weight_cache`: read the weights through the converted copies kept in the cache folder (weight_cache.py;
    made at the first start; off also with SDX4_WEIGHT_CACHE=0).
    `loras` (`options.LoraSpec`s) are read and checked against the UNet's config before any weight is read,
    and merged into the UNet's weights before the speed tricks go on (model/lora.py).
    `lazy_text_encoder`: a model folder's text encoder is not loaded here (`text_encoder` None,
    `Components.load_text_encoder()` loads it when a prompt must be encoded: `sdx4.load` reads the prompts it
    is given from the cache folder when it can, engine/prompt_store.py); its config is checked all the same.
    """
    from . import weight_cache as kept

    cache = kept.enabled(weight_cache)
    placement = resolve_placement(device, dtype, vae_dtype)
    from .single_file import single_file_path

    single = single_file_path(model)
    if single is not None:  # x4-upscaler-ema.safetensors / .ckpt: the bundled configs, nothing fetched
        return load_single_file_components(single, model, placement, compile, before_denoiser, loras)
    folder = resolve_model_dir(model)
    # Configs and weight headers, before any heavy work; the networks come back empty (meta), to be filled.
    # Popped as they are used: this function keeps no reference to the text encoder (low-memory policy).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*scaling_factor.*")
        max_noise_level, empty = check_model_folder(folder)
    read_loras = _read_loras(loras, empty["unet"])

    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler
    from transformers import CLIPTokenizer

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*scaling_factor.*")
        with damaged_model_errors("tokenizer"):
            tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        check_tokenizer(tokenizer, folder / "tokenizer")
        empty_text = empty.pop("text_encoder")
        text_encoder = None if lazy_text_encoder else _load_text_encoder(folder, placement, empty=empty_text, cache=cache)
    text_config = empty_text.config if text_encoder is None else text_encoder.config
    check_text_encoder_fits_tokenizer(tokenizer, text_config)
    text_hidden_size = text_config.hidden_size
    index = _read_json(folder / "model_index.json")
    with damaged_model_errors("scheduler/scheduler_config.json"):
        scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    with damaged_model_errors("low_res_scheduler/scheduler_config.json"):
        low_res_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="low_res_scheduler")
    components = Components(
        unet=None,
        vae=None,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        low_res_scheduler=low_res_scheduler,
        placement=placement,
        model=model,
        max_noise_level=max_noise_level,
        random_weights=(folder / RANDOM_MARKER).exists() or bool(index.get("_sdx4_random_weights")),
        folder=folder,
        compiled=compile,
        weight_cache=cache,
        loras=read_loras,
        text_encoder_empty=empty_text if text_encoder is None else None,
    )
    del text_encoder, empty_text  # the caller's hook may drop it: no second reference here
    if before_denoiser is not None:
        before_denoiser(components)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*scaling_factor.*")
        unet = _load_unet(folder, placement, empty=empty.pop("unet"), cache=cache)
        vae = _load_diffusers(AutoencoderKL, folder, "vae", placement.vae_dtype, placement.channels_last,
                              empty=empty.pop("vae"), cache=cache)
    check_components(unet, vae, text_hidden_size, components.max_noise_level)
    components.unet, components.speed = _prepare_unet(unet, placement, compile, read_loras)
    components.vae = _place(vae, placement)
    components.unet_config = unet.config
    return components



def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"{path}: not valid JSON ({e})") from None


def check_tokenizer(tokenizer: Any, where: Path | str) -> None:
    """Refuse the near-empty tokenizer transformers 5 builds, without error, when files are missing."""
    vocab = len(tokenizer)
    ids = tokenizer("a photo of a cat").input_ids
    if vocab < 256 or len(ids) < 3:
        raise ModelConfigError(
            f"tokenizer at {where} is broken: {vocab} tokens in its vocabulary and 'a photo of a cat' encodes "
            f"to {len(ids)} ids. Its files (vocab.json, merges.txt, tokenizer_config.json) are missing or damaged."
        )
    if not 1 <= tokenizer.model_max_length <= 4096:
        raise ModelConfigError(
            f"tokenizer at {where} has model_max_length={tokenizer.model_max_length}; "
            "tokenizer_config.json must set it (77 for CLIP)."
        )


def check_components(unet: Any, vae: Any, text_hidden_size: int, max_noise_level: int) -> None:
    """The components must fit together; the VAE scaling factor is forced to 0.08333 like diffusers."""
    check_fit(unet.config, vae.config, text_hidden_size, max_noise_level)
    if getattr(vae.config, "scaling_factor", None) != VAE_SCALING_FACTOR:
        log.warning(
            "vae scaling_factor is %s; using %s as diffusers does for the x4 upscaler",
            getattr(vae.config, "scaling_factor", None),
            VAE_SCALING_FACTOR,
        )
        vae.register_to_config(scaling_factor=VAE_SCALING_FACTOR)


def _read_loras(loras: tuple[Any, ...], empty_unet: Any) -> tuple[Any, ...]:
    """The LoRA files read and checked against the empty (meta) UNet: before any weight is read."""
    if not loras:
        return ()
    from .lora import check_fits, read_lora

    read = tuple(read_lora(spec) for spec in loras)
    for lora in read:
        check_fits(empty_unet, lora)
    return read


def load_single_file_components(
    path: Path, model: str, placement: Any, compile: bool, before_denoiser: Any = None, loras: tuple[Any, ...] = ()
) -> Any:
    """`load_components` for a single file: the same order (tokenizer and text encoder, the caller's hook,
    then UNet and VAE), the same checks, the same Components."""
    from diffusers import DDIMScheduler, DDPMScheduler

    from .checks import max_noise_level as read_max_noise_level
    from .single_file import build_empty, load_tokenizer, open_single_file

    source = open_single_file(path)
    configs = source.configs
    read_loras = _read_loras(loras, source.empty.get("unet") or build_empty("unet", configs["unet"]))
    with damaged_model_errors(f"{path}: tokenizer"):
        tokenizer = load_tokenizer(configs)
    check_tokenizer(tokenizer, f"{path} ({source.origin})")
    text_encoder = source.text_encoder(placement)
    check_text_encoder_fits_tokenizer(tokenizer, text_encoder.config)
    text_hidden_size = text_encoder.config.hidden_size
    components = Components(
        unet=None,
        vae=None,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=DDIMScheduler.from_config(configs["scheduler"]),
        low_res_scheduler=DDPMScheduler.from_config(configs["low_res_scheduler"]),
        placement=placement,
        model=model,
        max_noise_level=read_max_noise_level(configs["model_index"]),
        random_weights=bool(configs["model_index"].get("_sdx4_random_weights")),
        folder=None,
        compiled=compile,
        source=source,
        loras=read_loras,
    )
    del text_encoder
    if before_denoiser is not None:
        before_denoiser(components)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*scaling_factor.*")
        unet = source.unet(placement)
        vae = source.network("vae", placement.vae_dtype, placement.channels_last)
    check_components(unet, vae, text_hidden_size, components.max_noise_level)
    components.unet, components.speed = _prepare_unet(unet, placement, compile, read_loras)
    components.vae = _place(vae, placement)
    components.unet_config = unet.config
    return components
