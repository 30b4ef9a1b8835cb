"""Finding and loading the model: a Hub id (through the Hugging Face cache) or a local diffusers folder.

Every component is loaded with diffusers' / transformers' own classes, checked against the others,
and placed on the chosen device in the chosen precision (VAE always fp32: it overflows in fp16).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import types
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from . import guidance_prefix, kvcache, prepack
from .options import DEFAULT_MODEL
from .random_model import RANDOM_MARKER

log = logging.getLogger("sdx4")

#: The VAE scaling factor of the published upscaler; old configs lack it (diffusers forces it too).
VAE_SCALING_FACTOR = 0.08333
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "low_res_scheduler")
#: What to fetch from the Hub: configs, tokenizer files and safetensors weights, nothing else
#: (the repo also holds multi-GB .ckpt / .bin copies we never need).
HUB_ALLOW_PATTERNS = [
    "model_index.json",
    "*/config.json",
    "*/scheduler_config.json",
    "tokenizer/*",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
]

Device = Literal["auto", "cpu", "cuda", "mps"]
DType = Literal["auto", "fp32", "fp16", "bf16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelNotFoundError(RuntimeError):
    """The model could not be found or fetched; the message says which and how to fix it."""


class ModelPathError(ModelNotFoundError):
    """`--model` names a local folder that does not exist or is not in diffusers layout (bad usage)."""


class ModelConfigError(ValueError):
    """The model's components do not fit together (or one is broken); the message says which."""


@dataclass(frozen=True)
class Placement:
    """Where each component runs and in which precision."""

    device: torch.device
    unet_dtype: torch.dtype
    text_dtype: torch.dtype
    vae_dtype: torch.dtype = torch.float32
    #: Why `--dtype auto` chose unet_dtype (empty when the dtype was given explicitly).
    dtype_reason: str = ""

    @property
    def channels_last(self) -> bool:
        """NHWC convolutions for the UNet and VAE on the CPU, in every precision: oneDNN's native layout,
        so no reorder copies around each convolution. Measured (docs/speed.md, benchmarks/calibrate_memory.py):
        UNet bf16 step -5%, VAE fp32 decode -15 to -19% in time; fp32 working memory of a VAE decode -26 to
        -37% (96 px latent: 0.46 instead of 0.73 GB) and of a UNet call -10% (128 px latent, batch 2: 0.68
        instead of 0.76 GB). Values move by float rounding only (fp32: ~3e-6 UNet, ~2e-5 VAE output; the
        diffusers parity tests still hold)."""
        return self.device.type == "cpu"

    def describe(self) -> dict[str, str]:
        name = {v: k for k, v in DTYPES.items()}
        return {
            "device": str(self.device),
            "unet_dtype": name[self.unet_dtype],
            "text_encoder_dtype": name[self.text_dtype],
            "vae_dtype": name[self.vae_dtype],
            "memory_format": "channels_last" if self.channels_last else "contiguous",
            **({"dtype_reason": self.dtype_reason} if self.dtype_reason else {}),
        }


def cpu_bf16_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's native bf16 instruction sets, read from /proc/cpuinfo (x86: avx512_bf16, amx_bf16;
    Arm: bf16). Empty where that file does not exist (then we do not guess: fp32)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return set()
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags & {"avx512_bf16", "amx_bf16", "bf16"}


#: `--dtype auto` runs the UNet in bf16 on a CPU only where bf16 measured at least this much faster than
#: fp32 (`cpu_bf16_speedup`). Native bf16 instructions alone do not make it faster: measured on two 2-core
#: machines with `avx512_bf16`, an AMD EPYC (Zen 5) ran a UNet-sized convolution 2.3x faster in bf16, an
#: Intel Xeon (family 6 model 207, no AMX exposed) 0.7x as fast (bf16 matmul 0.54x).
BF16_MIN_SPEEDUP = 1.25
_PRECISION_CACHE = "cpu-precision.json"


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Arm: its part number), else what `platform` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model name", "CPU part"):
                    return value.strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def measure_bf16_speedup(reps: int = 3) -> dict[str, float]:
    """fp32 time / bf16 time of a UNet-shaped 3x3 convolution (channels-last) plus a linear layer on this
    CPU, best of `reps` interleaved samples after a warm-up (~0.5 s in all). Also returns both rates."""
    import time

    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 320, 48, 48, generator=g).contiguous(memory_format=torch.channels_last)  # 1,320,48,48
    w = (torch.randn(320, 320, 3, 3, generator=g) * 0.02).contiguous(memory_format=torch.channels_last)
    a, b = torch.randn(1024, 1280, generator=g), torch.randn(1280, 1280, generator=g) * 0.02
    flop = 2 * 320 * 320 * 9 * 48 * 48 + 2 * 1024 * 1280 * 1280
    inputs = {dt: [t.to(dt) for t in (x, w, a, b)] for dt in (torch.float32, torch.bfloat16)}

    def once(dt: torch.dtype) -> float:
        x_, w_, a_, b_ = inputs[dt]
        start = time.perf_counter()
        F.conv2d(x_, w_, padding=1)
        F.linear(a_, b_)
        return time.perf_counter() - start

    best = {dt: math.inf for dt in inputs}
    with torch.no_grad():
        for dt in inputs:
            once(dt)  # warm-up: oneDNN builds its kernels on the first call
        for _ in range(reps):
            for dt in inputs:
                best[dt] = min(best[dt], once(dt))
    return {
        "speedup": best[torch.float32] / best[torch.bfloat16],
        "fp32_gflops": flop / best[torch.float32] / 1e9,
        "bf16_gflops": flop / best[torch.bfloat16] / 1e9,
    }


def cpu_bf16_speedup() -> dict[str, Any]:
    """bf16 vs fp32 on this CPU (`measure_bf16_speedup`), measured once per CPU model, torch version and
    thread count and kept in `<cache>/cpu-precision.json` ($SDX4_CACHE or ~/.cache/sdx4), so that `auto`
    picks the same precision (and so the same image for a seed) on every run of a machine."""
    from .cache import cache_root

    key = f"{cpu_model_name()} | {' '.join(sorted(cpu_bf16_flags()))} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    path = cache_root() / _PRECISION_CACHE
    try:
        known = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable %s (%s); measuring bf16 again", path, e)
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), dict) and "speedup" in known[key]:
        return {**known[key], "key": key, "cached": True}
    result = {k: round(v, 3) for k, v in measure_bf16_speedup().items()}
    known = known if isinstance(known, dict) else {}
    known[key] = result
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, path)
    except OSError as e:  # a read-only home: measure again next time, same decision thanks to the margin
        log.warning("could not keep the bf16 measurement in %s: %s", path, e)
    return {**result, "key": key, "cached": False}


def _auto_cpu_dtype() -> tuple[torch.dtype, str]:
    flags = cpu_bf16_flags()
    if not flags:
        return torch.float32, "fp32: no native bf16 instructions in /proc/cpuinfo"
    m = cpu_bf16_speedup()
    if m["speedup"] >= BF16_MIN_SPEEDUP:
        return torch.bfloat16, f"bf16: measured {m['speedup']:.2f}x the fp32 rate on this CPU ({', '.join(sorted(flags))})"
    return torch.float32, (
        f"fp32: bf16 measured {m['speedup']:.2f}x the fp32 rate on this CPU ({', '.join(sorted(flags))}), "
        f"below the {BF16_MIN_SPEEDUP}x that makes it worth its rounding"
    )


def resolve_placement(device: str = "auto", dtype: str = "auto", vae_dtype: str = "fp32") -> Placement:
    """Where each component runs and in which precision.

    device `auto`: CUDA > Apple MPS > CPU. dtype `auto` (UNet and text encoder): fp16 on CUDA; bf16 on
    a CPU with native bf16 instructions where bf16 also MEASURED at least BF16_MIN_SPEEDUP x faster than
    fp32 (`cpu_bf16_speedup`, once per machine); fp32 otherwise (and on MPS). The VAE decodes in fp32
    unless `vae_dtype` says otherwise: it gives NaN in fp16, so fp16 is refused for it; bf16 is allowed
    (measured in the README).
    """
    if device not in ("auto", "cpu", "cuda", "mps") and not re.fullmatch(r"cuda:\d+", device):
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps; got {device!r}")
    if dtype not in ("auto", *DTYPES):
        raise ValueError(f"dtype must be auto, fp32, fp16 or bf16; got {dtype!r}")
    if vae_dtype not in ("fp32", "bf16"):
        raise ValueError(f"vae_dtype must be fp32 or bf16 (fp16 decodes to NaN); got {vae_dtype!r}")
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this torch build sees no CUDA GPU")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' asked for, but Apple MPS is not available here")
    dev = torch.device(device)
    reason = ""
    if dtype == "auto":
        if dev.type == "cuda":
            chosen, reason = torch.float16, "fp16: CUDA"
        elif dev.type == "cpu":
            chosen, reason = _auto_cpu_dtype()
        else:
            chosen, reason = torch.float32, f"fp32: {dev.type}"
    else:
        chosen = DTYPES[dtype]
    return Placement(device=dev, unet_dtype=chosen, text_dtype=chosen, vae_dtype=DTYPES[vae_dtype], dtype_reason=reason)


# --------------------------------------------------------------------------------------------------
# Finding the model folder
# --------------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _missing_parts(folder: Path) -> list[str]:
    missing = [c for c in COMPONENTS if not (folder / c).is_dir()]
    for comp, files in (
        ("unet", ("config.json",)),
        ("vae", ("config.json",)),
        ("text_encoder", ("config.json",)),
        ("scheduler", ("scheduler_config.json",)),
        ("low_res_scheduler", ("scheduler_config.json",)),
    ):
        if comp not in missing:
            missing += [f"{comp}/{f}" for f in files if not (folder / comp / f).is_file()]
    for comp in ("unet", "vae", "text_encoder"):
        d = folder / comp
        if d.is_dir() and not any(p.suffix in (".safetensors", ".bin") for p in d.iterdir()):
            missing.append(f"{comp}/<weights>.safetensors")
    return missing


def _looks_like_path(model: str) -> bool:
    """`./x`, `/x`, `~/x`, `a/b/c`, `C:\\x` are paths; `org/name` is a Hub id unless such a folder exists."""
    return model.startswith((".", "/", "~")) or "\\" in model or model.count("/") != 1


def resolve_model_dir(model: str = DEFAULT_MODEL) -> Path:
    """A local folder in diffusers layout for `model` (a path, or a Hub id fetched via the HF cache)."""
    if not isinstance(model, str) or not model.strip():
        raise ModelNotFoundError(f"model must be a Hub id like {DEFAULT_MODEL!r} or a folder path; got {model!r}")
    local = Path(model).expanduser()
    if local.exists() or _looks_like_path(model) or not _HUB_ID.match(model):
        if not local.exists():
            raise ModelPathError(
                f"model folder {model!r} does not exist. Pass --model PATH to a folder in diffusers layout "
                f"(with {', '.join(COMPONENTS)}), or a Hub id such as {DEFAULT_MODEL!r}."
            )
        if not local.is_dir():
            raise ModelPathError(f"model {model!r} is a file; --model needs a folder in diffusers layout")
        missing = _missing_parts(local)
        if missing:
            raise ModelPathError(
                f"model folder {model!r} is not in diffusers layout: missing {', '.join(missing)}"
            )
        return local
    return _hub_snapshot(model)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """A quick TCP connect to the Hub endpoint, so a machine without network fails in seconds."""
    url = urllib.parse.urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download

    cache = constants.HF_HUB_CACHE
    fix = (
        "Fix: connect this machine to the Hub once so the model is cached, or download it elsewhere and "
        "pass --model PATH to the local folder (diffusers layout)."
    )
    # 1. The cache first: no network needed when the model is already there.
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS, local_files_only=True))
        if not _missing_parts(folder):
            return folder
    except Exception as e:  # LocalEntryNotFoundError and friends: not (fully) cached
        log.debug("not in the cache: %s", e)
    if _hub_offline():
        raise ModelNotFoundError(
            f"model {repo_id!r} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE=1 forbids "
            f"downloading it. {fix} Or unset HF_HUB_OFFLINE to download it."
        )
    endpoint = constants.ENDPOINT
    if not _hub_reachable(endpoint):
        raise ModelNotFoundError(
            f"model {repo_id!r} is not in the Hugging Face cache ({cache}) and the Hub ({endpoint}) cannot be "
            f"reached from this machine. {fix} Set HF_HUB_OFFLINE=1 to skip network look-ups."
        )
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS))
    except Exception as e:
        raise ModelNotFoundError(f"could not download model {repo_id!r} from {endpoint}: {e}. {fix}") from e
    missing = _missing_parts(folder)
    if missing:
        raise ModelNotFoundError(f"Hub repo {repo_id!r} is not a diffusers x4 upscaler: missing {', '.join(missing)}")
    return folder


# --------------------------------------------------------------------------------------------------
# Loading and checking the components
# --------------------------------------------------------------------------------------------------


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

    def load_text_encoder(self) -> Any:
        """Load the text encoder again (the low-memory policy drops it between prompts)."""
        if self.folder is None:
            raise RuntimeError("the text encoder was released and the model folder is unknown")
        return _load_text_encoder(self.folder, self.placement)

    def load_unet(self) -> Any:
        """Load the UNet again, placed and prepared as at first (the low-memory policy releases it for
        decodes that would otherwise spill to disk)."""
        if self.folder is None:
            raise RuntimeError("the UNet was released and the model folder is unknown")
        return _prepare_unet(_load_unet(self.folder, self.placement), self.placement, self.compiled)

    @property
    def pad_multiple(self) -> int:
        """The UNet halves the latent (len(blocks) - 1) times: inputs are padded to this multiple."""
        config = self.unet.config if self.unet is not None else self.unet_config
        return 2 ** (len(config.block_out_channels) - 1)


def _load_text_encoder(folder: Path, placement: Placement) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    from .weights import WeightsMismatch, load_transformers_model

    try:
        enc = load_transformers_model(CLIPTextModel, CLIPTextConfig, folder / "text_encoder", placement.text_dtype)
    except WeightsMismatch as e:
        log.debug("text encoder via from_pretrained: %s", e)
        # transformers 5 loads in the dtype written in the config unless told: always pass ours.
        enc = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=placement.text_dtype)
    return enc.to(placement.device).eval().requires_grad_(False)


def _place(module: Any, placement: Placement) -> Any:
    module.to(placement.device)
    if placement.channels_last:
        module.to(memory_format=torch.channels_last)  # a no-op for streamed weights (already laid out so)
    return module.eval().requires_grad_(False)


def _load_unet(folder: Path, placement: Placement) -> Any:
    from diffusers import UNet2DConditionModel

    return _load_diffusers(UNet2DConditionModel, folder, "unet", placement.unet_dtype, placement.channels_last)


def _prepare_unet(unet: Any, placement: Placement, compile: bool) -> Any:
    """Place a checked UNet; keep its attention outputs channels-last; compile it or install the shared
    guidance prefix, (on a CPU) the packed weights and the cross-attention key/value cache."""
    unet = _place(unet, placement)
    if placement.channels_last:
        keep_transformer_outputs_channels_last(unet)
    if compile:
        unet.compile()  # in place: the module keeps its type and config (no prefix wrappers in its graph)
    else:
        guidance_prefix.install(unet)  # inert until a guided call enters one of guidance_prefix's contexts
        if placement.device.type == "cpu":
            prepack.install(unet)  # each conv/linear packs its weight on first use
        kvcache.install(unet)  # after prepack: wraps the forward it installed
    return unet


def _load_diffusers(cls: Any, folder: Path, subfolder: str, dtype: torch.dtype, channels_last: bool) -> Any:
    """Streamed tensor by tensor into `dtype` (weights.py); from_pretrained where that does not fit."""
    from .weights import WeightsMismatch, load_diffusers_model

    try:
        return load_diffusers_model(cls, folder / subfolder, dtype, channels_last)
    except WeightsMismatch as e:
        log.debug("%s via from_pretrained: %s", subfolder, e)
        return cls.from_pretrained(folder, subfolder=subfolder, torch_dtype=dtype)


def load_components(
    model: str = DEFAULT_MODEL,
    device: str = "auto",
    dtype: str = "auto",
    vae_dtype: str = "fp32",
    compile: bool = False,
    before_denoiser: Callable[[Components], None] | None = None,
) -> Components:
    """Find, load, check and place every component of the x4 upscaler.

    Weights are read straight into the target dtype, one tensor at a time (weights.py): no fp32 copy
    of a bf16/fp16 model is ever resident, not even as memory-mapped file pages.
    `compile=True` wraps the UNet with torch.compile (opt-in: see README for when it pays off).
    The tokenizer and text encoder are loaded first; `before_denoiser(components)` then runs with
    `unet` and `vae` still None, before those are loaded: the low-memory policy encodes the prompts
    it knows there and drops the text encoder, so that it and the UNet are never in memory together.
    """
    placement = resolve_placement(device, dtype, vae_dtype)
    folder = resolve_model_dir(model)

    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler
    from transformers import CLIPTokenizer

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*scaling_factor.*")
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        check_tokenizer(tokenizer, folder / "tokenizer")
        text_encoder = _load_text_encoder(folder, placement)
    text_hidden_size = text_encoder.config.hidden_size
    index = _read_json(folder / "model_index.json")
    components = Components(
        unet=None,
        vae=None,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=DDIMScheduler.from_pretrained(folder, subfolder="scheduler"),
        low_res_scheduler=DDPMScheduler.from_pretrained(folder, subfolder="low_res_scheduler"),
        placement=placement,
        model=model,
        max_noise_level=int(index.get("max_noise_level", 350)),
        random_weights=(folder / RANDOM_MARKER).exists() or bool(index.get("_sdx4_random_weights")),
        folder=folder,
        compiled=compile,
    )
    del text_encoder  # the caller's hook may drop it: no second reference here
    if before_denoiser is not None:
        before_denoiser(components)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*scaling_factor.*")
        unet = _load_unet(folder, placement)
        vae = _load_diffusers(AutoencoderKL, folder, "vae", placement.vae_dtype, placement.channels_last)
    check_components(unet, vae, text_hidden_size, components.max_noise_level)
    components.unet, components.vae = _prepare_unet(unet, placement, compile), _place(vae, placement)
    components.unet_config = unet.config
    return components


def keep_transformer_outputs_channels_last(unet: Any) -> int:
    """Let the UNet's transformer blocks hand back channels-last tensors; returns how many were changed.

    diffusers' Transformer2DModel ends with `.permute(0, 3, 1, 2).contiguous()`, which copies its
    tokens (already laid out as channels-last) into NCHW; with channels-last convolutions the next conv
    then copies them back. Skipping both copies saves ~6% of a bf16 UNet step on a CPU (measured,
    docs/speed.md). Same values, another memory layout; used with channels-last convolutions (the CPU).
    A diffusers without this method is left alone.
    """
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    def output(self: Any, hidden_states: Any, residual: Any, batch_size: int, height: int, width: int, inner_dim: int) -> Any:
        if not self.use_linear_projection:
            hidden_states = self.proj_out(hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2))
        else:
            hidden_states = self.proj_out(hidden_states).reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
        return hidden_states + residual

    if not callable(getattr(Transformer2DModel, "_get_output_for_continuous_inputs", None)):
        return 0
    blocks = [m for m in unet.modules() if isinstance(m, Transformer2DModel) and m.is_input_continuous]
    for m in blocks:
        m._get_output_for_continuous_inputs = types.MethodType(output, m)
    return len(blocks)


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
    latent = vae.config.latent_channels
    if unet.config.in_channels != latent + 3:
        raise ModelConfigError(
            f"unet in_channels is {unet.config.in_channels} but the x4 upscaler needs latent channels ({latent}) "
            f"+ 3 RGB channels = {latent + 3}: unet/config.json and vae/config.json do not match"
        )
    if unet.config.out_channels != latent:
        raise ModelConfigError(f"unet out_channels is {unet.config.out_channels}, expected vae latent channels {latent}")
    if unet.config.cross_attention_dim != text_hidden_size:
        raise ModelConfigError(
            f"unet cross_attention_dim is {unet.config.cross_attention_dim} but the text encoder's hidden size is "
            f"{text_hidden_size}: unet/config.json and text_encoder/config.json do not match"
        )
    classes = unet.config.num_class_embeds
    if classes is None or classes <= max_noise_level:
        raise ModelConfigError(
            f"unet num_class_embeds is {classes}; it must exceed max_noise_level ({max_noise_level}), "
            "since the noise level is the UNet's class label"
        )
    if getattr(vae.config, "scaling_factor", None) != VAE_SCALING_FACTOR:
        log.warning(
            "vae scaling_factor is %s; using %s as diffusers does for the x4 upscaler",
            getattr(vae.config, "scaling_factor", None),
            VAE_SCALING_FACTOR,
        )
        vae.register_to_config(scaling_factor=VAE_SCALING_FACTOR)
