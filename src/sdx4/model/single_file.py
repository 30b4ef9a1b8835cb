"""Single-file checkpoints of the x4 upscaler (`x4-upscaler-ema.safetensors` / `.ckpt`), read offline.

The original layout holds the three networks under prefixes: `model.diffusion_model.*` (UNet),
`first_stage_model.*` (VAE), `cond_stage_model.model.*` (the OpenCLIP-H text tower). Their diffusers
configs, the schedulers (DDIM v-prediction, DDPM for the low-res image) and the CLIP tokenizer come with
sdx4 (`model/configs/`, the published model's values), so nothing is fetched; a file written by
`sdx4 convert` carries its own configs in its metadata (`sdx4_configs`) and is read with those.

Tensors are renamed with diffusers' own converters (`diffusers.loaders.single_file_utils`). Everything is
checked before a weight is read: the converters run on empty (meta) tensors built from the file's header
and the result is compared, key by key and shape by shape, with the networks built from the configs.
Then each network's tensors are read straight into its target dtype (weights.py for safetensors; a
memory-mapped `torch.load(weights_only=True)` for .ckpt), converted, checked for NaN/inf and assigned.
A file that is not the x4 upscaler is refused with a message saying what it is.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checks import check_fit, check_scheduler_config, max_noise_level
from .errors import ModelConfigError, ModelPathError

log = logging.getLogger("sdx4")

#: Where each network lives in the original layout.
PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.model.",
}
#: The safetensors metadata key (and .ckpt dict key) holding the diffusers configs as JSON (sdx4 convert).
CONFIG_KEY = "sdx4_configs"
#: The parts of a configs set: JSON objects, plus the tokenizer's files (name -> text) when not the bundled ones.
CONFIG_PARTS = (
    "model_index",
    "unet",
    "vae",
    "text_encoder",
    "scheduler",
    "low_res_scheduler",
)
TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
SUFFIXES = (".safetensors", ".ckpt")


def bundled_configs_dir() -> Path:
    """The published x4 upscaler's configs and tokenizer, shipped with sdx4 (diffusers layout, no weights)."""
    return Path(__file__).with_name("configs")


def read_configs_dir(folder: Path) -> dict[str, Any]:
    """A configs set from a folder in diffusers layout (the bundled one or a model folder)."""
    files = {
        "model_index": "model_index.json",
        "unet": "unet/config.json",
        "vae": "vae/config.json",
        "text_encoder": "text_encoder/config.json",
        "scheduler": "scheduler/scheduler_config.json",
        "low_res_scheduler": "low_res_scheduler/scheduler_config.json",
    }
    from .checks import read_config

    configs: dict[str, Any] = {
        k: read_config(folder, rel)
        for k, rel in files.items()
        if (folder / rel).is_file()
    }
    if "model_index" not in configs:
        configs["model_index"] = {}
    configs["tokenizer"] = {
        name: (folder / "tokenizer" / name).read_text(encoding="utf-8")
        for name in TOKENIZER_FILES
        if (folder / "tokenizer" / name).is_file()
    }
    return configs


# --------------------------------------------------------------------------------------------------------
# Reading the file


@dataclass
class Checkpoint:
    """An opened single file: the shapes of its tensors (from the header; nothing read yet) and its configs."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    configs: (
        dict[str, Any] | None
    )  # from the file's metadata, or None (then the bundled ones)
    _state: dict[str, torch.Tensor] | None = field(
        default=None, repr=False
    )  # .ckpt: memory-mapped tensors
    _header: Any = field(
        default=None, repr=False
    )  # .safetensors: (header, data offset)

    @property
    def label(self) -> str:
        return str(self.path)

    def read(
        self, names: set[str], dtype: torch.dtype | None, channels_last: bool = False
    ) -> dict[str, torch.Tensor]:
        """The tensors `names`, floating ones in `dtype` (None: as stored), each checked for NaN/inf."""
        from .weights import check_finite, read_state_dict

        if self._header is not None and dtype is not None:
            return read_state_dict(
                self.path, dtype, channels_last, self.label, names, self._header
            )
        if self._header is not None:  # as stored: safetensors' own reader
            from safetensors import safe_open

            out = {}
            with safe_open(str(self.path), framework="pt") as f:
                for name in names:
                    out[name] = f.get_tensor(name)
                    check_finite(name, out[name], self.label)
            return out
        assert self._state is not None
        out = {}
        for name in names:
            src = self._state[name]
            target = (
                dtype if dtype is not None and src.is_floating_point() else src.dtype
            )
            fmt = (
                torch.channels_last
                if channels_last and src.ndim == 4
                else torch.contiguous_format
            )
            out[name] = src.to(target, memory_format=fmt, copy=True)
            check_finite(name, out[name], self.label, source=src)
        return out


def _sniff(path: Path) -> str | None:
    """What a file that cannot be a checkpoint is, from its first bytes (None: maybe a checkpoint). Text has no
    NUL bytes; a safetensors header's length (8 bytes, little-endian) always has some, a zip or pickle too."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "an empty file"
    if b"\x00" in head:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    printable = sum(c.isprintable() or c in "\r\n\t" for c in text) / len(text)
    return "a text file" if printable > 0.95 else None


def open_checkpoint(path: Path) -> Checkpoint:
    """Open a .safetensors or .ckpt file: its tensors' shapes and its configs, checked, nothing heavy read."""
    label = str(path)
    what = _sniff(path)
    if what is not None:
        raise ModelConfigError(
            f"{label}: {what}, not a single-file checkpoint (.safetensors or .ckpt)"
        )
    if path.suffix.lower() == ".safetensors":
        from .weights import read_header

        header = read_header(path, label)
        with open(path, "rb") as f:
            import struct

            (n,) = struct.unpack("<Q", f.read(8))
            meta = json.loads(f.read(n)).get("__metadata__") or {}
        shapes = {k: tuple(v["shape"]) for k, v in header[0].items()}
        configs = _parse_configs(meta.get(CONFIG_KEY), label)
        return Checkpoint(path, shapes, configs, _header=header)
    import pickle
    import zipfile

    unreadable = (
        RuntimeError,
        ValueError,
        EOFError,
        KeyError,
        TypeError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
    )
    try:
        try:  # memory-mapped: tensors are read when converted, one network at a time
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(
                path, map_location="cpu", weights_only=True
            )  # the legacy (non-zip) format
    except unreadable as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelConfigError(
            f"{label}: not a readable PyTorch checkpoint ({type(e).__name__}: {msg}); it is truncated, damaged, or "
            "holds Python objects that safe loading (weights_only) refuses"
        ) from None
    configs = _parse_configs(
        obj.get(CONFIG_KEY) if isinstance(obj, dict) else None, label
    )
    while isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelConfigError(
            f"{label}: holds a {type(obj).__name__}, not a dictionary of tensors"
        )
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return Checkpoint(
        path, {k: tuple(v.shape) for k, v in state.items()}, configs, _state=state
    )


def _parse_configs(text: Any, label: str) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        configs = json.loads(text)
    except (TypeError, ValueError) as e:
        raise ModelConfigError(
            f"{label}: its {CONFIG_KEY} metadata is not valid JSON ({e})"
        ) from None
    missing = [
        p
        for p in CONFIG_PARTS
        if not isinstance(configs, dict) or not isinstance(configs.get(p), dict)
    ]
    if missing:
        raise ModelConfigError(
            f"{label}: its {CONFIG_KEY} metadata lacks the {', '.join(missing)} config"
        )
    return configs


# --------------------------------------------------------------------------------------------------------
# What is it?


def describe(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """What a checkpoint is when it is NOT the x4 upscaler (None when it looks like it): from its keys."""
    unet_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight")
    has = {name: any(k.startswith(p) for k in shapes) for name, p in PREFIXES.items()}
    if not shapes:
        return "holds no tensors"
    if any(k.startswith("conditioner.embedders.") for k in shapes):
        return "is a Stable Diffusion XL checkpoint (conditioner.embedders.*), not the x4 upscaler"
    if unet_in is not None and len(unet_in) == 4 and unet_in[1] != 7:
        family = (
            "Stable Diffusion 1.x (CLIP ViT-L text encoder, cond_stage_model.transformer.*)"
            if any(k.startswith("cond_stage_model.transformer.") for k in shapes)
            else "Stable Diffusion 2.x (OpenCLIP text encoder)"
            if has["text_encoder"]
            else "a diffusion model"
        )
        kind = {4: "", 9: " inpainting", 5: " depth-to-image"}.get(unet_in[1], "")
        return (
            f"is a {family}{kind} checkpoint: its UNet takes {unet_in[1]} input channels "
            "(model.diffusion_model.input_blocks.0.0.weight), the x4 upscaler's takes 7 (4 latent + 3 RGB)"
        )
    if has["unet"] and "model.diffusion_model.label_emb.weight" not in shapes:
        return "is a diffusion model without the noise-level embedding (model.diffusion_model.label_emb.weight)"
    if not has["unet"]:
        vae_like = [
            k
            for k in shapes
            if k.startswith(
                (
                    "encoder.",
                    "decoder.",
                    "first_stage_model.",
                    "quant_conv",
                    "post_quant_conv",
                )
            )
        ]
        if vae_like and len(vae_like) == len(shapes):
            return "is a VAE alone (encoder/decoder weights only), not the whole x4 upscaler"
        if has["text_encoder"] and all(
            k.startswith("cond_stage_model.") for k in shapes
        ):
            return "is a text encoder alone (cond_stage_model.*), not the whole x4 upscaler"
        return f"holds no UNet (no model.diffusion_model.* tensors; the first key is {next(iter(shapes))})"
    missing = [p for name, p in PREFIXES.items() if not has[name]]
    if missing:
        return f"has no {' and no '.join(m + '*' for m in missing)} tensors: an incomplete checkpoint"
    return None


# --------------------------------------------------------------------------------------------------------
# Converting with diffusers' converters


def to_diffusers(
    part: str, state: dict[str, Any], config: dict[str, Any], module: Any
) -> dict[str, Any]:
    """Original-layout tensors (with their prefix) -> the diffusers network's state dict (diffusers' converters)."""
    from diffusers.loaders import single_file_utils as sfu

    if part == "unet":
        out = sfu.convert_ldm_unet_checkpoint(state, config)
    elif part == "vae":
        out = sfu.convert_ldm_vae_checkpoint(state, config)
    else:
        out = sfu.convert_open_clip_checkpoint(
            module, state, prefix=PREFIXES["text_encoder"]
        )
        if not hasattr(
            module, "text_model"
        ):  # transformers >= 5.6 flattened CLIPTextModel
            out = {k.removeprefix("text_model."): v for k, v in out.items()}
    return {k: v for k, v in out.items() if v is not None}


def _meta_state(ckpt: Checkpoint, prefix: str) -> dict[str, torch.Tensor]:
    return {
        k: torch.empty(s, device="meta")
        for k, s in ckpt.shapes.items()
        if k.startswith(prefix)
    }


def check_conversion(
    ckpt: Checkpoint, part: str, config: dict[str, Any], module: Any, origin: str
) -> None:
    """The converted file must give every tensor of `module` in its shape (checked on meta tensors)."""
    converted = to_diffusers(part, _meta_state(ckpt, PREFIXES[part]), config, module)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    for name, shape in expected.items():
        if name in converted and tuple(converted[name].shape) != shape:
            raise ModelConfigError(
                f"{ckpt.label}: the {part} tensor {name} has shape {tuple(converted[name].shape)} where {origin} "
                f"gives {shape}: not the x4 upscaler's architecture"
            )
    missing = [
        k for k in expected if k not in converted and not k.endswith("position_ids")
    ]
    if missing:
        raise ModelConfigError(
            f"{ckpt.label}: {len(missing)} {part} tensors that {origin} needs are missing (under {PREFIXES[part]}), "
            f"the first {missing[0]}; the file is incomplete or another model"
        )
    unused = sorted(k for k in converted if k not in expected)
    if unused:  # e.g. text layers beyond the config's count: read by nothing
        log.warning(
            "%s: ignoring %d %s tensors that %s does not use, the first %s",
            ckpt.label,
            len(unused),
            part,
            origin,
            unused[0],
        )


@dataclass
class SingleFileModel:
    """A single-file checkpoint, checked and ready to give its networks (and give them again: low-memory policy)."""

    ckpt: Checkpoint
    configs: dict[str, Any]
    origin: str  # where the configs came from, for messages
    empty: dict[
        str, Any
    ]  # the networks built from the configs with meta weights, popped as they are filled

    def network(
        self, part: str, dtype: torch.dtype, channels_last: bool = False
    ) -> Any:
        """The UNet, VAE or text encoder with its weights read, converted and assigned."""
        from diffusers.loaders import single_file_utils as sfu

        from .weights import assign_weights

        module = self.empty.pop(part, None)
        if module is None:  # a second time (low-memory policy) or another conversion
            module = build_empty(part, self.configs[part])
        # The original text tower's 24th layer and text_projection: diffusers' converter drops them, not read.
        names = {k for k in self.ckpt.shapes if k.startswith(PREFIXES[part])} - set(
            sfu.SD_2_TEXT_ENCODER_KEYS_TO_IGNORE
        )
        state = self.ckpt.read(
            names, dtype, channels_last if part != "text_encoder" else False
        )
        converted = to_diffusers(part, state, self.configs[part], module)
        del state
        expected = module.state_dict()
        converted = {
            k: v.contiguous() if v.ndim != 4 else v
            for k, v in converted.items()
            if k in expected
        }
        for (
            name,
            buf,
        ) in expected.items():  # buffers built at construction (position ids)
            if name not in converted:
                converted[name] = (
                    buf if not buf.is_meta else _rebuild_buffer(module, name)
                )
        return assign_weights(module, converted).eval()

    def text_encoder(self, placement: Any) -> Any:
        """The text encoder, placed (also to load it again: Components.load_text_encoder)."""
        enc = self.network("text_encoder", placement.text_dtype)
        return enc.to(placement.device).eval().requires_grad_(False)

    def unet(self, placement: Any) -> Any:
        """The UNet, not yet placed (Components.load_unet places it and installs the speed tricks)."""
        return self.network("unet", placement.unet_dtype, placement.channels_last)


def _rebuild_buffer(module: Any, name: str) -> torch.Tensor:
    if name.endswith("position_ids"):
        n = module.config.max_position_embeddings
        return torch.arange(n).expand((1, -1))
    raise ModelConfigError(f"tensor {name} is missing from the checkpoint")


def build_empty(part: str, config: dict[str, Any]) -> Any:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .checks import damaged_model_errors

    with damaged_model_errors(f"{part} config"), init_empty_weights():
        if part == "unet":
            return UNet2DConditionModel.from_config(config)
        if part == "vae":
            return AutoencoderKL.from_config(config)
        return CLIPTextModel(
            CLIPTextConfig.from_dict(
                {k: v for k, v in config.items() if not k.startswith("_")}
            )
        )


def open_single_file(path: Path) -> SingleFileModel:
    """Open, recognise and check a single-file x4 upscaler; nothing heavy is read."""
    ckpt = open_checkpoint(path)
    what = describe(ckpt.shapes)
    if what is not None:
        raise ModelConfigError(f"{ckpt.label} {what}")
    if ckpt.configs is not None:
        configs, origin = ckpt.configs, f"the configs in {path.name}'s metadata"
    else:
        configs, origin = (
            read_configs_dir(bundled_configs_dir()),
            "the x4 upscaler's configs (bundled with sdx4)",
        )
    for sub in ("scheduler", "low_res_scheduler"):
        check_scheduler_config(configs[sub], f"{origin}: {sub}")
    empty = {part: build_empty(part, configs[part]) for part in PREFIXES}
    check_fit(
        empty["unet"].config,
        empty["vae"].config,
        empty["text_encoder"].config.hidden_size,
        max_noise_level(configs["model_index"]),
    )
    for part in PREFIXES:
        check_conversion(ckpt, part, configs[part], empty[part], origin)
    return SingleFileModel(ckpt, configs, origin, empty)


def load_tokenizer(configs: dict[str, Any]) -> Any:
    """The CLIP tokenizer: the file's own (written to a temporary folder) or the bundled one."""
    from transformers import CLIPTokenizer

    files = configs.get("tokenizer") or {}
    if not files:
        return CLIPTokenizer.from_pretrained(bundled_configs_dir() / "tokenizer")
    with tempfile.TemporaryDirectory(prefix="sdx4-tokenizer-") as tmp:
        for name, text in files.items():
            if name in TOKENIZER_FILES:
                (Path(tmp) / name).write_text(text, encoding="utf-8")
        return CLIPTokenizer.from_pretrained(tmp)


def single_file_path(model: str) -> Path | None:
    """The checkpoint file `model` names (.safetensors / .ckpt), or None when it names something else."""
    p = Path(model).expanduser()
    if p.suffix.lower() not in SUFFIXES:
        return None
    if not p.exists():
        raise ModelPathError(f"model file {model!r} does not exist")
    if not p.is_file():
        raise ModelPathError(
            f"model {model!r} is a folder, not a single-file checkpoint"
        )
    return p
