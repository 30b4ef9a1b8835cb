"""Where each component runs and in which precision: device choice, the CPU's bf16 facts and the measured
bf16-vs-fp32 choice of `--dtype auto` (kept once per machine in the cache folder)."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..options import check_placement

log = logging.getLogger("sdx4")

Device = Literal["auto", "cpu", "cuda", "mps"]
DType = Literal["auto", "fp32", "fp16", "bf16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

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
    from ..cache import cache_root

    key = f"{cpu_model_name()} | {' '.join(sorted(cpu_bf16_flags()))} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    path = cache_root() / _PRECISION_CACHE
    try:
        known = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable %s (%s); measuring bf16 again", path, e)
        known = {}
    if not isinstance(known, dict):
        log.warning("ignoring %s: it holds a JSON %s, not an object; measuring bf16 again", path, type(known).__name__)
        known = {}
    entry = known.get(key)
    if entry is not None:
        if _valid_measurement(entry):
            return {**entry, "key": key, "cached": True}
        log.warning("ignoring the malformed entry of this machine in %s (%r); measuring bf16 again", path, entry)
    result = {k: round(v, 3) for k, v in measure_bf16_speedup().items()}
    known[key] = result
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, path)
    except OSError as e:  # a read-only home: measure again next time, same decision thanks to the margin
        log.warning("could not keep the bf16 measurement in %s: %s", path, e)
    return {**result, "key": key, "cached": False}


def _valid_measurement(entry: Any) -> bool:
    """A kept measurement: {"speedup", "fp32_gflops", "bf16_gflops"}, each a positive finite number."""
    return isinstance(entry, dict) and all(
        isinstance(entry.get(k), (int, float)) and not isinstance(entry.get(k), bool)
        and math.isfinite(entry[k]) and entry[k] > 0
        for k in ("speedup", "fp32_gflops", "bf16_gflops")
    )


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
    check_placement(device, dtype, vae_dtype)  # the spelling (OptionsError, a ValueError); the machine below
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


