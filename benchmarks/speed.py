"""Speed benchmark: sdx4 against diffusers' StableDiffusionUpscalePipeline, side by side in one run.

    flock /tmp/sdx4-heavy.lock python benchmarks/speed.py               # full-size random model, 64 -> 256 px
    python benchmarks/speed.py --quick --steps 1 --reps 1               # smoke test on a tiny random model
    flock /tmp/sdx4-heavy.lock python benchmarks/speed.py --schedulers  # sdx4 with each scheduler

What it does (speed and memory do not depend on weight values, so random weights are fine):
1. builds a FULL-SIZE random model once (cached in ~/.cache/sdx4, or $SDX4_CACHE) and a 64x64 input
   (examples/cat.png, resized when --size differs);
2. measures this machine's peak per dtype (a 4096^3 matmul, and a UNet-sized 3x3 convolution, in fp32
   and bf16) before, between and after the reps; the best sample is the peak;
3. starts ONE worker process per configuration (so peak resident memory is per configuration); each
   loads its model once, then runs on command. The parent drives them alternately, rep by rep, in a
   rotating order, so drift in machine speed hits every configuration alike;
4. counts FLOPs once per configuration on a 1-step and a 2-step run (torch.utils.flop_counter, with
   formulas for the CPU flash-attention kernel and the packed oneDNN ops it would count as 0): the first
   UNet call's and each later call's, which may do less (kvcache.py); and reports the denoising loop's
   achieved FLOP/s against the measured peak of the UNet's dtype;
5. writes speed.json and speed.md to --out (default bench-out/) and prints the table.

Configurations: sdx4 (default dtype "auto"), sdx4-fp32, diffusers-fp32 (its default) and diffusers-bf16
(`torch_dtype=torch.bfloat16`). Opt-in extras via --configs: sdx4-bf16, sdx4-vae-bf16, sdx4-keep-text-encoder,
sdx4-channels-last, diffusers-fp32-tcmalloc, sdx4-system-allocator, sdx4-no-prepack, and sdx4-baseline: sdx4
as another checkout has it (`--baseline-src DIR`, that checkout's `src`), to measure a change against the code
before it in the same alternating run:

    git worktree add /tmp/before HEAD~1
    python benchmarks/speed.py --configs sdx4,sdx4-baseline --baseline-src /tmp/before/src

Each worker imports sdx4 from its configuration's source folder (this checkout's `src` unless the config says
otherwise), so the baseline's report fields come from its own, possibly older, sdx4 and are read defensively.

The C allocator: sdx4 configurations run on what the `sdx4` command runs on (tcmalloc when the system has it,
see src/sdx4/allocator.py), diffusers configurations on the system's malloc (what a diffusers script gets)
unless the config says otherwise; each config's "allocator" in the JSON says which it ran on.
"""

from __future__ import annotations

from _proc import allocator_env  # benchmarks/_proc.py (the script's folder is on sys.path)

import argparse
import dataclasses
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_INPUT = ROOT / "examples" / "cat.png"

#: name -> how the worker builds it. kind: sdx4 (public API) or diffusers (StableDiffusionUpscalePipeline).
CONFIGS: dict[str, dict[str, Any]] = {
    "sdx4": {"kind": "sdx4", "dtype": "auto"},
    "sdx4-fp32": {"kind": "sdx4", "dtype": "fp32"},
    "diffusers-fp32": {"kind": "diffusers", "dtype": "fp32"},
    "diffusers-bf16": {"kind": "diffusers", "dtype": "bf16"},
    # Opt-in (item 3 of the issue: kept only where they help).
    "sdx4-bf16": {"kind": "sdx4", "dtype": "bf16"},
    "sdx4-vae-bf16": {"kind": "sdx4", "dtype": "auto", "load": {"vae_dtype": "bf16"}},
    "sdx4-keep-text-encoder": {"kind": "sdx4", "dtype": "auto", "load": {"low_memory": False}},
    "sdx4-channels-last": {"kind": "sdx4", "dtype": "auto", "channels_last": True},
    # the C allocator on its own (sdx4.allocator): diffusers on tcmalloc, sdx4 on glibc's malloc
    "diffusers-fp32-tcmalloc": {"kind": "diffusers", "dtype": "fp32", "allocator": "tcmalloc"},
    "sdx4-system-allocator": {"kind": "sdx4", "dtype": "auto", "allocator": "system"},
    # the UNet's weights as eager PyTorch keeps them (sdx4.prepack off)
    "sdx4-no-prepack": {"kind": "sdx4", "dtype": "auto", "env": {"SDX4_PREPACK": "0"}},
    # the sdx4 of another checkout (--baseline-src), run like "sdx4": a change against the code before it
    "sdx4-baseline": {"kind": "sdx4", "dtype": "auto", "src": "baseline"},
    # For --device cuda (benchmarks/gpu_check.sh): fp16 as diffusers users run it on a GPU, and the same with
    # torch.compile on the UNet (in place, default mode, as `sdx4 --compile`). A compiled config takes its FLOP
    # counts from its eager twin (same work; FlopCounterMode does not see inside compiled graphs).
    "sdx4-fp16": {"kind": "sdx4", "dtype": "fp16"},
    "diffusers-fp16": {"kind": "diffusers", "dtype": "fp16"},
    "sdx4-fp16-compile": {"kind": "sdx4", "dtype": "fp16", "load": {"compile": True}, "flops_from": "sdx4-fp16"},
    "diffusers-fp16-compile": {"kind": "diffusers", "dtype": "fp16", "compile": True, "flops_from": "diffusers-fp16"},
}
DEFAULT_CONFIGS = ("sdx4", "sdx4-fp32", "diffusers-fp32", "diffusers-bf16")
CUDA_CONFIGS = ("sdx4-fp16", "diffusers-fp16")  # the default configs with --device cuda
BASELINES = ("diffusers-fp32", "diffusers-bf16", "diffusers-fp16")
#: Where a worker imports sdx4 from unless its config says "src": "baseline" (then --baseline-src).
OWN_SRC = ROOT / "src"

#: Scheduler -> the step count it is usually run at (see docs/speed.md for why).
SCHEDULER_STEPS: dict[str, int] = {"ddim": 50, "dpmpp-2m": 20, "euler": 30, "unipc": 15}

GIB = 1024**3


# ==================================================================================================
# Machine facts
# ==================================================================================================


def cpu_family_model() -> str | None:
    """lscpu's "family F, model M": a CPU name such as "Intel Xeon Processor" does not say which generation."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}
    return f"family {fields['CPU family']}, model {fields.get('Model', '?')}" if "CPU family" in fields else None


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """CPU model, cores, and bf16 capability as the CPU and torch report it (detected, not guessed); the GPU
    with --device cuda."""
    import torch

    from sdx4.model.placement import cpu_bf16_flags, cpu_model_name, resolve_placement

    # The CPU's name and its native bf16 instructions as sdx4 reads them (what --dtype auto decides from).
    bf16_flags = cpu_bf16_flags()
    family_model = cpu_family_model()
    info: dict[str, Any] = {
        "cpu": f"{cpu_model_name()} ({family_model})" if family_model else cpu_model_name(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
        "torch_threads": torch.get_num_threads(),
        "cpuinfo_flags": {f: f in bf16_flags for f in ("avx512_bf16", "amx_bf16", "bf16")},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn_available": torch.backends.mkldnn.is_available(),
        "mkldnn_bf16_supported": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    info["native_bf16"] = bool(bf16_flags) and info["mkldnn_bf16_supported"]
    info["sdx4_bf16_flags"] = sorted(bf16_flags)
    # what sdx4's dtype="auto" decides from: the flags, then a measurement kept per machine
    info["sdx4_auto_dtype"] = resolve_placement("cpu", "auto").describe()
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / GIB, 1),
                       "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    return info


def versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    import sdx4

    return {"sdx4": sdx4.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def conv_peak(dtype_name: str, channels: int, size: int, reps: int = 5, device: str = "cpu") -> float:
    """Achieved GFLOP/s of a 3x3 convolution, batch 2 (the UNet's CFG batch), best of `reps`.

    torch's fp32 matmul and its convolutions may run in different libraries (BLAS vs oneDNN); the
    UNet is mostly convolutions, so the practical ceiling is the better of the two kernels.
    """
    import torch
    import torch.nn.functional as F

    dtype = _torch_dtype(dtype_name)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, channels, size, size, generator=g).to(device, dtype)  # 2,C,S,S
    w = torch.randn(channels, channels, 3, 3, generator=g).to(device, dtype) * 0.01  # C,C,3,3
    sync = _synchronizer(device)
    secs = []
    with torch.no_grad():
        F.conv2d(x, w, padding=1)  # warm-up
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            F.conv2d(x, w, padding=1)
            sync()
            secs.append(time.perf_counter() - t0)
    flop = 2 * 2 * size * size * channels * channels * 9
    return round(flop / min(secs) / 1e9, 1)


def peak_sample(n: int, quick: bool, device: str = "cpu") -> dict[str, dict[str, float]]:
    """One measurement of both kernels in each dtype (~10 s at n=4096 on 2 cores): fp32 and bf16 on the CPU,
    also fp16 on CUDA."""
    channels, size = (64, 32) if quick else (512, 64)
    dtypes = ("fp32", "bf16", "fp16") if device == "cuda" else ("fp32", "bf16")
    return {
        d: {"matmul": matmul_peak(n, d, device=device)["gflops"], "conv3x3": conv_peak(d, channels, size, device=device)}
        for d in dtypes
    }


def summarise_peaks(samples: list[dict[str, dict[str, float]]], n: int) -> dict[str, Any]:
    """Peak per dtype = the best of every sample of either kernel (contention only ever lowers a sample)."""
    out: dict[str, Any] = {}
    for d in samples[0]:
        mm = max(smp[d]["matmul"] for smp in samples)
        conv = max(smp[d]["conv3x3"] for smp in samples)
        out[d] = {"gflops": max(mm, conv), "matmul_gflops": mm, "conv3x3_gflops": conv, "matmul_n": n,
                  "samples": [smp[d] for smp in samples]}
    return out


def matmul_peak(n: int, dtype_name: str, reps: int = 5, device: str = "cpu") -> dict[str, Any]:
    """Achieved GFLOP/s of an n^3 matmul (best of `reps`): the practical ceiling for that dtype."""
    import torch

    dtype = _torch_dtype(dtype_name)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    c = torch.empty(n, n, dtype=dtype, device=device)
    sync = _synchronizer(device)
    torch.mm(a, b, out=c)  # warm-up: oneDNN/BLAS kernel selection, page faults
    secs = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        sync()
        secs.append(time.perf_counter() - t0)
    flop = 2 * n**3
    return {"n": n, "gflops": round(flop / min(secs) / 1e9, 1), "gflops_median": round(flop / statistics.median(secs) / 1e9, 1)}


def _torch_dtype(name: str) -> Any:
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _synchronizer(device: str) -> Any:
    """A function that waits for the device's queued work (CUDA runs asynchronously); a no-op on the CPU."""
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


# ==================================================================================================
# Worker: one per configuration, loads once, runs on command. Protocol: JSON lines on stdin/stdout.
# ==================================================================================================


def _sdx4_module(*names: str) -> Any:
    """The first of these sdx4 modules that this worker's sdx4 has (a baseline checkout may predate the
    current layout: sdx4.allocator before sdx4.speed.allocator); None when it has none of them."""
    import importlib

    for name in names:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not name.startswith(e.name):  # a missing dependency, not a missing module
                raise
    return None


def _allocator() -> str:
    module = _sdx4_module("sdx4.speed.allocator", "sdx4.allocator")
    return module.active() if module is not None and hasattr(module, "active") else "unknown"


def _prepacked_layers(unet: Any) -> int | None:
    """UNet layers set to run on packed oneDNN weights; None when this sdx4 cannot say."""
    module = _sdx4_module("sdx4.speed.prepack", "sdx4.prepack")
    return module.installed(unet) if module is not None and hasattr(module, "installed") else None


def _rss_mib() -> dict[str, float]:
    import resource

    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with open("/proc/self/statm") as f:
        now_pages = int(f.read().split()[1])
    out = {"peak_rss_mib": round(peak_kib / 1024, 1), "rss_mib": round(now_pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # the GPU's high-water mark (tensors torch allocated)
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def flop_mapping() -> dict[Any, Any]:
    """FlopCounterMode counts aten._scaled_dot_product_flash_attention_for_cpu and the oneDNN ops on packed
    weights (sdx4.prepack) as 0: give them sdpa's, convolution's and matmul's formulas."""
    import math

    import torch
    from torch.utils import flop_counter

    def cpu_flash_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    def packed_conv_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.conv_flop_count(x_shape, w_shape, out_shape, transposed=False)

    def packed_linear_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(x_shape[:-1]) * w_shape[1] * w_shape[0]  # rows x in x out multiply-adds

    return {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash_sdpa_flop,
        torch.ops.mkldnn._convolution_pointwise: packed_conv_flop,
        torch.ops.mkldnn._linear_pointwise: packed_linear_flop,
    }


class _Timer:
    """Timestamps of the stages of one call, from forward hooks on the models (both kinds alike)."""

    def __init__(self, sync: Any = None) -> None:
        # CUDA runs asynchronously: the hooks wait for the queued work, so the stamps are when it finished.
        self.sync = sync or (lambda: None)
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.text_end: float | None = None
        self.decode_start: float | None = None
        self.decode_end: float | None = None
        self.unet_s = 0.0
        self.unet_calls = 0
        self._unet_t0 = 0.0

    def hook_text_encoder(self, module: Any) -> None:
        def post(*_: Any) -> None:
            self.sync()
            self.text_end = time.perf_counter()

        module.register_forward_hook(post)

    def hook_unet(self, module: Any) -> None:
        def pre(*_: Any) -> None:
            self.sync()
            self._unet_t0 = time.perf_counter()

        def post(*_: Any) -> None:
            self.sync()
            self.unet_s += time.perf_counter() - self._unet_t0
            self.unet_calls += 1

        # Outside any torch.compile graph of the UNet (a compiled config): dynamo runs the hooks eagerly.
        import torch

        module.register_forward_pre_hook(torch.compiler.disable(pre))
        module.register_forward_hook(torch.compiler.disable(post))

    def wrap_decode(self, vae: Any) -> None:
        """vae.decode is a method, not forward: wrap it on the instance."""
        original = vae.decode

        def decode(*a: Any, **k: Any) -> Any:
            self.sync()
            self.decode_start = time.perf_counter()
            out = original(*a, **k)
            self.sync()
            self.decode_end = time.perf_counter()
            return out

        vae.decode = decode


class Worker:
    def __init__(self, name: str, model: str, image_path: str, device: str = "cpu") -> None:
        self.name, self.cfg, self.device = name, CONFIGS[name], device
        t0 = time.perf_counter()
        import torch

        self.timer = _Timer(_synchronizer(device))
        from PIL import Image

        self.torch = torch
        self.image = Image.open(image_path).convert("RGB")
        self.image.load()
        # Import everything the load needs first, so that load_s is loading the model, not importing libraries.
        if self.cfg["kind"] == "sdx4":
            # (imports diffusers' and transformers' model classes; a baseline's sdx4 may have the older names)
            _sdx4_module("sdx4.model.loading", "sdx4.models")
            _sdx4_module("sdx4.engine.loop", "sdx4.pipeline")
            from sdx4.options import UpscaleOptions
        else:
            from diffusers import StableDiffusionUpscalePipeline  # noqa: F401
        self.import_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        if self.cfg["kind"] == "sdx4":
            import sdx4

            self.up = sdx4.load(model, device=device, dtype=self.cfg["dtype"], **self.cfg.get("load", {}))
            self.unet, self.vae = self.up.components.unet, self.up.components.vae
            text_encoder = self.up.components.text_encoder
            self.option_fields = {f.name for f in dataclasses.fields(UpscaleOptions)}
            info = self.up.info
            self.dtypes = {k: info.get(f"{k}_dtype", "?") for k in ("unet", "text_encoder", "vae")}
        else:
            from diffusers import StableDiffusionUpscalePipeline

            torch_dtype = _torch_dtype(self.cfg["dtype"])
            self.pipe = StableDiffusionUpscalePipeline.from_pretrained(model, torch_dtype=torch_dtype).to(device)
            self.pipe.set_progress_bar_config(disable=True)
            if self.cfg.get("compile"):
                self.pipe.unet.compile()  # in place, default mode: what sdx4's compile=True does
            self.unet, self.vae, text_encoder = self.pipe.unet, self.pipe.vae, self.pipe.text_encoder
            name_of = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
            self.dtypes = {"unet": name_of[self.unet.dtype], "text_encoder": name_of[text_encoder.dtype], "vae": name_of[self.vae.dtype]}
        if self.cfg.get("channels_last"):
            self.unet.to(memory_format=torch.channels_last)
        self.load_s = time.perf_counter() - t0
        self.timer.hook_unet(self.unet)
        if self.cfg["kind"] == "diffusers":
            # sdx4 reports its own stage times; for diffusers, hooks mark the stage boundaries.
            self.timer.hook_text_encoder(text_encoder)
            self.timer.wrap_decode(self.vae)
        # (sdx4's low-memory load has dropped its text encoder already: the class it would be)
        self.module_names = {"unet": type(self.unet).__name__, "text_encoder": "CLIPTextModel" if text_encoder is None else type(text_encoder).__name__}

    def ready(self) -> dict[str, Any]:
        import sdx4

        return {
            "ok": True,
            # which sdx4 this worker runs: the configuration's source folder (a baseline's may be older)
            "sdx4_version": getattr(sdx4, "__version__", "?"),
            "sdx4_src": str(Path(sdx4.__file__).resolve().parents[1]),
            "import_s": round(self.import_s, 3),
            "load_s": round(self.load_s, 3),
            "dtypes": self.dtypes,
            "threads": self.torch.get_num_threads(),
            "allocator": _allocator(),
            "rss_after_load_mib": _rss_mib()["rss_mib"],
            "peak_rss_load_mib": _rss_mib()["peak_rss_mib"],  # the high-water mark of loading alone
            # UNet layers set to run on packed oneDNN weights (sdx4.prepack; they pack on their first call)
            "prepacked_layers": _prepacked_layers(self.unet) if self.cfg["kind"] == "sdx4" else 0,
        }

    def _call(self, steps: int, guidance: float, seed: int, scheduler: str | None) -> dict[str, Any]:
        """One upscale; returns wall time and stage times (seconds)."""
        torch = self.torch
        t = self.timer
        cpu0 = os.times()
        t.reset()
        if self.cfg["kind"] == "sdx4":
            kwargs: dict[str, Any] = {"steps": steps, "guidance": guidance, "seed": seed}
            if scheduler is not None:
                kwargs["scheduler"] = scheduler
            result = self.up(self.image, **kwargs)
            image = result.image
            # sdx4's own stage clock: text_encoding (prompt-cache lookups after the first call), denoising
            # (noising the input + the loop), decoding (vae.decode + crop).
            timings = result.metadata.get("timings", {})
            missing = {"text_encoding", "denoising", "decoding"} - set(timings)
            if missing:
                raise RuntimeError(f"{self.name}: sdx4 metadata timings lack {sorted(missing)}: {timings}")
            stages = {f"{k}_s": float(timings[k]) for k in ("text_encoding", "denoising", "decoding")}
            extra = {"scheduler_class": result.metadata.get("scheduler")}
        else:
            gen = torch.Generator("cpu").manual_seed(seed)
            image = self.pipe(prompt="", image=self.image, num_inference_steps=steps, guidance_scale=guidance, generator=gen).images[0]
            if t.text_end is None or t.decode_start is None or t.decode_end is None:
                raise RuntimeError(f"{self.name}: a stage hook did not fire (text {t.text_end}, decode {t.decode_start})")
            # The same stages from hook timestamps: call start -> last text-encoder output -> VAE decode
            # start (noising the input + the loop) -> decode end.
            stages = {
                "text_encoding_s": t.text_end - t.start,
                "denoising_s": t.decode_start - t.text_end,
                "decoding_s": t.decode_end - t.decode_start,
            }
            extra = {"scheduler_class": type(self.pipe.scheduler).__name__}
        end = time.perf_counter()
        cpu1 = os.times()
        cpu_s = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
        return {
            "wall_s": end - t.start,
            **stages,
            "unet_s": t.unet_s,
            "unet_calls": t.unet_calls,
            # CPU seconds this process got / (wall x threads): ~1.0 when it had the cores to itself;
            # lower means other processes took CPU time during the run (then the times are inflated).
            "cpu_s": cpu_s,
            "cpu_share": cpu_s / ((end - t.start) * torch.get_num_threads()),
            "output_size": list(image.size),
            **extra,
        }

    def run(self, msg: dict[str, Any]) -> dict[str, Any]:
        import gc

        scheduler = msg.get("scheduler")
        if scheduler is not None and "scheduler" not in self.option_fields:
            return {"ok": False, "skipped": "UpscaleOptions has no `scheduler` field in this sdx4 version"}
        if not msg.get("flops"):
            out = self._call(msg["steps"], msg["guidance"], msg["seed"], scheduler)
            gc.collect()
            return {"ok": True, **out}
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False, custom_mapping=flop_mapping())
        with counter:
            out = self._call(msg["steps"], msg["guidance"], msg["seed"], scheduler)
        counts = counter.get_flop_counts()
        per_module = {k: sum(v.values()) for k, v in counts.items()}
        attn = sum(n for op, n in counts.get("Global", {}).items() if "flash_attention_for_cpu" in str(op))
        gc.collect()
        return {
            "ok": True,
            "flops": {
                "total": counter.get_total_flops(),
                "unet": per_module.get(self.module_names["unet"], 0),
                "text_encoder": per_module.get(self.module_names["text_encoder"], 0),
                # vae.decode() is not AutoencoderKL.forward: its modules are tracked as top-level ones.
                "vae_decoder": per_module.get("Decoder", 0) + per_module.get("Conv2d", 0),
                "top_level_modules": {k: v for k, v in per_module.items() if "." not in k and k != "Global"},
                "cpu_flash_attention": attn,
                "unet_calls": out["unet_calls"],
                "steps": msg["steps"],
            },
        }


def worker_main(name: str, model: str, image_path: str, device: str = "cpu") -> int:
    # The protocol owns the real stdout; anything libraries print goes to stderr (the worker's log).
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import logging

    for lib in ("diffusers", "transformers"):
        logging.getLogger(lib).setLevel(logging.ERROR)

    def send(obj: dict[str, Any]) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    try:
        worker = Worker(name, model, image_path, device)
    except Exception as e:
        import traceback

        traceback.print_exc()
        send({"ok": False, "error": f"{type(e).__name__}: {e}"})
        return 1
    send(worker.ready())
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "quit":
            send({"ok": True, **_rss_mib()})
            return 0
        try:
            send(worker.run(msg))
        except Exception as e:
            import traceback

            traceback.print_exc()
            send({"ok": False, "error": f"{type(e).__name__}: {e}"})
    return 0


class WorkerProcess:
    """The parent's handle on one worker subprocess."""

    def __init__(self, name: str, model: str, image_path: Path, log_dir: Path, src: Path = OWN_SRC, device: str = "cpu") -> None:
        self.name = name
        self.log_path = log_dir / f"worker-{name}.log"
        self.log = open(self.log_path, "w")
        # The worker imports sdx4 from `src` (first on its path), whatever is installed or on PYTHONPATH.
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": _pythonpath(src)}
        cfg = CONFIGS[name]  # its C allocator: what the sdx4 command runs on for sdx4, the system's for diffusers
        env = allocator_env(env, cfg.get("allocator", "sdx4" if cfg["kind"] == "sdx4" else "system"))
        env.update(cfg.get("env", {}))
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", name, "--model", model, "--image", str(image_path), "--src", str(src),
             "--device", device],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
        )
        self.info: dict[str, Any] = {}

    def wait_ready(self) -> dict[str, Any]:
        """Block until the worker has loaded its model; its reply has import/load times and dtypes."""
        self.info = self._read()
        self.info["start_s"] = round(time.perf_counter() - self.t0, 3)
        return self.info

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=60)
            raise RuntimeError(f"worker {self.name} died (exit {self.proc.returncode}); log {self.log_path}:\n{self._tail()}")
        reply = json.loads(line)
        if not reply.get("ok") and "skipped" not in reply:
            raise RuntimeError(f"worker {self.name}: {reply.get('error')}; log {self.log_path}:\n{self._tail()}")
        return reply

    def _tail(self) -> str:
        self.log.flush()
        return "".join(self.log_path.read_text().splitlines(True)[-20:])

    def ask(self, **msg: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def quit(self) -> dict[str, Any]:
        reply = self.ask(cmd="quit")
        self.proc.wait(timeout=60)
        self.log.close()
        return reply

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# ==================================================================================================
# Parent: drive the workers, summarise, report.
# ==================================================================================================


def startup_times(out_dir: Path, reps: int) -> dict[str, Any]:
    """End-to-end wall time of `sdx4 --help` and `sdx4 upscale --method bicubic` on a 512 px image.

    Also whether either imported torch (the issue wants neither to: fast start). Median of `reps` runs
    after one untimed run (so the files are in the page cache, as on a user's second call).
    """
    from PIL import Image

    src = out_dir / "startup-512.png"
    Image.open(DEFAULT_INPUT).convert("RGB").resize((512, 512), Image.Resampling.BICUBIC).save(src)
    dst = out_dir / "startup-512_x4.png"
    exe = Path(sys.executable).with_name("sdx4")
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "sdx4"]
    env = {**os.environ, "PYTHONPATH": _pythonpath(OWN_SRC)}
    commands = {
        "help": ["--help"],
        "bicubic_512": ["upscale", str(src), "--method", "bicubic", "-o", str(dst), "--overwrite", "-q"],
    }
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['sdx4', *sys.argv[1:]]\n"
        "try:\n    runpy.run_module('sdx4', run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code\n"
        "sys.stderr.write(f'\\nEXIT={code} TORCH_IMPORTED={\"torch\" in sys.modules}\\n')\n"
    )
    out: dict[str, Any] = {"command": " ".join(Path(a).name if i == 0 else a for i, a in enumerate(base))}
    for name, argv in commands.items():
        secs = []
        for i in range(reps + 1):
            t0 = time.perf_counter()
            subprocess.run(base + argv, check=True, capture_output=True, env=env, timeout=120)
            if i:
                secs.append(time.perf_counter() - t0)
        p = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, env=env, timeout=120)
        tail = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
        if "EXIT=0" not in tail:
            raise RuntimeError(f"startup probe {name} failed: {p.stderr[-2000:]}")
        out[name] = {**stats(secs), "imports_torch": tail.endswith("TORCH_IMPORTED=True")}
    with Image.open(dst) as im:
        out["bicubic_512"]["output_size"] = list(im.size)
    return out


def prepare_input(size: int, out_dir: Path) -> Path:
    from PIL import Image

    img = Image.open(DEFAULT_INPUT).convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    path = out_dir / f"input-{size}.png"
    img.save(path)
    return path


def _pythonpath(src: Path) -> str:
    """PYTHONPATH for a child that imports sdx4 from `src`: that folder first, then the caller's entries."""
    return os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))


def source_for(name: str, baseline_src: Path | None) -> Path:
    """The folder the worker of configuration `name` imports sdx4 from."""
    if CONFIGS[name].get("src") == "baseline":
        assert baseline_src is not None, "parse_args checks that sdx4-baseline comes with --baseline-src"
        return baseline_src
    return OWN_SRC


def stats(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def rotated(names: list[str], rep: int) -> list[str]:
    """Rep r starts at a different configuration, so none always runs first (or after the same one)."""
    k = rep % len(names)
    return names[k:] + names[:k]


def summarise(
    name: str,
    info: dict[str, Any],
    runs: list[dict[str, Any]],
    flops: dict[str, Any],
    peaks: dict[str, float],
    matmul_peaks: dict[str, float],
    steps: int,
    quick: bool,
) -> dict[str, Any]:
    med = {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "text_encoding_s", "denoising_s", "decoding_s", "unet_s")}
    # FLOPs of the denoising loop: the first call's (counted on a 1-step run), then each later call's.
    loop_flops = flops["unet"] + (runs[0]["unet_calls"] - flops["unet_calls"]) * flops["unet_later_call"]
    dtype = info["dtypes"]["unet"]
    peak = peaks.get(dtype)  # GFLOP/s
    achieved = loop_flops / med["denoising_s"] / 1e9
    return {
        **{k: info[k] for k in ("import_s", "load_s", "start_s", "dtypes", "threads", "allocator", "rss_after_load_mib", "peak_rss_load_mib", "prepacked_layers")},
        "sdx4_version": info.get("sdx4_version") if CONFIGS[name]["kind"] == "sdx4" else None,
        "sdx4_src": info.get("sdx4_src") if CONFIGS[name]["kind"] == "sdx4" else None,
        "parallel_start": quick,
        "config": CONFIGS[name],
        "scheduler_class": runs[0].get("scheduler_class"),
        "runs": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in runs],
        "wall_s": stats([r["wall_s"] for r in runs]),
        "cpu_share": stats([r["cpu_share"] for r in runs]),
        "stages_s": {
            "load": round(info["load_s"], 3),
            "text_encoding": round(med["text_encoding_s"], 3),
            "denoising": round(med["denoising_s"], 3),
            "decoding": round(med["decoding_s"], 3),
            "unet_forward_total": round(med["unet_s"], 3),
        },
        "flops": flops,
        "unet_tflop_per_step": round(loop_flops / steps / 1e12, 4),
        "denoising_gflops": round(achieved, 1),
        "unet_forward_gflops": round(loop_flops / med["unet_s"] / 1e9, 1),
        "peak_dtype": dtype,
        "peak_gflops": peak,
        "fraction_of_peak": round(achieved / peak, 3) if peak else None,
        # The measure: the loop against the measured matmul peak of its dtype.
        "fraction_of_matmul_peak": round(achieved / matmul_peaks[dtype], 3) if matmul_peaks.get(dtype) else None,
        "peak_rss_mib": info["final"]["peak_rss_mib"],
        "peak_gpu_mib": info["final"].get("peak_gpu_mib"),  # None on the CPU
        "first_call_s": info.get("first_call_s"),  # the untimed warm-up call (with torch.compile: compiling)
    }


def add_ratios(configs: dict[str, dict[str, Any]]) -> None:
    for c in configs.values():
        for base in BASELINES:
            b = configs.get(base)
            key = base.replace("diffusers-", "")
            c[f"time_vs_diffusers_{key}"] = round(c["wall_s"]["median"] / b["wall_s"]["median"], 3) if b else None
            c[f"rss_vs_diffusers_{key}"] = round(c["peak_rss_mib"] / b["peak_rss_mib"], 3) if b else None
        b = configs.get("sdx4-baseline")  # only when it ran: the code before a change
        if b:
            c["time_vs_sdx4_baseline"] = round(c["wall_s"]["median"] / b["wall_s"]["median"], 3)
            c["rss_vs_sdx4_baseline"] = round(c["peak_rss_mib"] / b["peak_rss_mib"], 3)


def check_targets(configs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, evaluated on this run's numbers (a report, never an assertion)."""
    out: list[dict[str, Any]] = []

    def target(what: str, value: float | None, limit: float, less: bool = True) -> None:
        if value is None:
            return
        ok = value <= limit if less else value >= limit
        out.append({"target": what, "value": value, "limit": limit, "met": ok})

    s, f = configs.get("sdx4"), configs.get("sdx4-fp32")
    if s:
        target("sdx4 default time / diffusers fp32 <= 0.55", s.get("time_vs_diffusers_fp32"), 0.55)
        target("sdx4 default time / diffusers bf16 <= 1.0", s.get("time_vs_diffusers_bf16"), 1.0)
        target("sdx4 default peak RSS / diffusers fp32 <= 0.6", s.get("rss_vs_diffusers_fp32"), 0.6)
        target("sdx4 default denoising loop >= 85% of the measured matmul peak", s.get("fraction_of_matmul_peak"), 0.85, less=False)
        target("(stricter) sdx4 default denoising loop >= 85% of the best measured peak (matmul or 3x3 conv)",
               s.get("fraction_of_peak"), 0.85, less=False)
    if f:
        target("sdx4 fp32 time / diffusers fp32 <= 1.03", f.get("time_vs_diffusers_fp32"), 1.03)
    return out


def startup_targets(startup: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"target": "sdx4 --help < 0.5 s", "value": startup["help"]["median"], "limit": 0.5, "met": startup["help"]["median"] < 0.5},
        {"target": "sdx4 upscale --method bicubic, 512 px, < 1 s", "value": startup["bicubic_512"]["median"], "limit": 1.0,
         "met": startup["bicubic_512"]["median"] < 1.0},
    ]


def markdown(report: dict[str, Any]) -> str:
    m, s, p = report["machine"], report["settings"], report["peak"]
    gpu = bool(m.get("gpu"))  # --device cuda: three more columns
    lines = [
        f"Run {report['date']} on {m['cpu']}, {m['usable_cpus']} cores ({m['torch_threads']} torch threads), "
        f"{m['memory_gib']} GiB; torch {report['versions']['torch']}, diffusers {report['versions']['diffusers']}.",
        f"CPU bf16: avx512_bf16={m['cpuinfo_flags']['avx512_bf16']}, amx_bf16={m['cpuinfo_flags']['amx_bf16']}, "
        f"torch capability {m['torch_cpu_capability']}, mkldnn bf16 {m['mkldnn_bf16_supported']} -> native bf16: {m['native_bf16']}."
        + (f" sdx4 --dtype auto: {m['sdx4_auto_dtype']['dtype_reason']}." if m.get("sdx4_auto_dtype") else ""),
        f"Peak (best of {len(p['fp32']['samples'])} samples spread over the run): fp32 {p['fp32']['gflops']} GFLOP/s "
        f"(matmul {p['fp32']['matmul_n']}^3 {p['fp32']['matmul_gflops']}, 3x3 conv {p['fp32']['conv3x3_gflops']}); "
        f"bf16 {p['bf16']['gflops']} GFLOP/s (matmul {p['bf16']['matmul_gflops']}, 3x3 conv {p['bf16']['conv3x3_gflops']})"
        + (f"; fp16 {p['fp16']['gflops']} GFLOP/s (matmul {p['fp16']['matmul_gflops']}, 3x3 conv {p['fp16']['conv3x3_gflops']})."
           if "fp16" in p else "."),
        *([f"Device: {m['gpu']['name']} ({m['gpu']['memory_gib']} GiB, compute capability {m['gpu']['capability']}, "
           f"CUDA {m['gpu']['cuda']}); the peaks above are the GPU's. GPU memory: peak allocated by torch, per config."]
          if m.get("gpu") else []),
        f"Model: {s['model_kind']} random weights; input {s['input_size']} -> {s['output_size']} px, {s['steps']} steps, "
        f"guidance {s['guidance']}, {s['reps']} reps (alternating).",
        "",
        "| config | dtypes unet/text/vae | allocator | wall s median (min-max) | vs diffusers fp32 | vs diffusers bf16 "
        "| peak RSS GiB | RSS vs diffusers fp32 | load s | text enc s | denoise s | VAE decode s "
        "| UNet TFLOP/step | denoise GFLOP/s | % of peak | % of matmul peak | CPU share |"
        + (" vs diffusers fp16 | peak GPU GiB | warm-up call s |" if gpu else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if gpu else ""),
    ]
    for name, c in report["configs"].items():
        d, w, st = c["dtypes"], c["wall_s"], c["stages_s"]
        frac = c["fraction_of_peak"]
        of_peak = "-" if frac is None else f"{100 * frac:.0f}% of {c['peak_dtype']}"
        mm = c.get("fraction_of_matmul_peak")
        of_mm = "-" if mm is None else f"{100 * mm:.0f}%"
        fmt = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
        lines.append(
            f"| {name} | {d['unet']}/{d['text_encoder']}/{d['vae']} | {c.get('allocator', '?')} | {w['median']:.2f} ({w['min']:.2f}-{w['max']:.2f}) "
            f"| {fmt(c['time_vs_diffusers_fp32'])} | {fmt(c['time_vs_diffusers_bf16'])} | {c['peak_rss_mib'] / 1024:.2f} "
            f"| {fmt(c['rss_vs_diffusers_fp32'])} | {st['load']:.1f} | {st['text_encoding']:.2f} | {st['denoising']:.2f} "
            f"| {st['decoding']:.2f} | {c['unet_tflop_per_step']:.3f} | {c['denoising_gflops']:.0f} "
            f"| {of_peak} | {of_mm} | {c['cpu_share']['median']:.2f} |"
            + (f" {fmt(c.get('time_vs_diffusers_fp16'))} | {(c.get('peak_gpu_mib') or 0) / 1024:.2f} | {c.get('first_call_s') or 0:.1f} |"
               if gpu else "")
        )
    b = report["configs"].get("sdx4-baseline")
    if b:
        lines += ["", f"sdx4-baseline: sdx4 {b['sdx4_version']} from {b['sdx4_src']}; against it: "
                  + ", ".join(f"{name} time {c['time_vs_sdx4_baseline']:.3f}x, peak RSS {c['rss_vs_sdx4_baseline']:.3f}x"
                              for name, c in report["configs"].items() if name != "sdx4-baseline") + "."]
    st = report.get("startup")
    if st:
        lines += [
            "",
            f"Start-up (`{st['command']} ...`, median of runs, end to end): `--help` {st['help']['median']:.2f} s "
            f"(imports torch: {st['help']['imports_torch']}); `upscale --method bicubic` 512 -> 2048 px "
            f"{st['bicubic_512']['median']:.2f} s (imports torch: {st['bicubic_512']['imports_torch']}).",
        ]
    lines += [
        "",
        "CPU share = CPU seconds the run got / (wall seconds x torch threads): near 1.00 the configuration had the "
        "cores to itself; lower values mean other processes ran at the same time and inflated its times.",
    ]
    if report.get("targets"):
        lines += ["", "| target (issue 4) | value | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['value']} | {'yes' if t['met'] else 'NO'} |" for t in report["targets"]]
    return "\n".join(lines) + "\n"


def markdown_schedulers(report: dict[str, Any]) -> str:
    lines = [
        f"Run {report['date']} on {report['machine']['cpu']}; sdx4 default dtype; input {report['settings']['input_size']}, "
        f"guidance {report['settings']['guidance']}, {report['settings']['reps']} reps.",
        "",
    ]
    if report.get("skipped"):
        return "\n".join(lines + [f"Skipped: {report['skipped']}"]) + "\n"
    lines += ["| scheduler | reported | steps | wall s median (min-max) | denoise s | s/step | vs ddim wall |", "|---|---|---|---|---|---|---|"]
    base = report["schedulers"].get("ddim", {}).get("wall_s", {}).get("median")
    for name, r in report["schedulers"].items():
        w = r["wall_s"]
        rel = f"{w['median'] / base:.2f}x" if base else "-"
        lines.append(
            f"| {name} | {r['scheduler_class']} | {r['steps']} | {w['median']:.2f} ({w['min']:.2f}-{w['max']:.2f}) "
            f"| {r['denoising_s']:.2f} | {r['s_per_step']:.3f} | {rel} |"
        )
    return "\n".join(lines) + "\n"


def model_for(args: argparse.Namespace) -> tuple[str, str]:
    if args.model:
        return args.model, "custom"
    from sdx4.model.random_model import cached_random_model

    kind = "tiny" if args.quick else "full"
    t0 = time.perf_counter()
    path = cached_random_model(kind)
    print(f"model: {path} ({kind}, ready in {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return str(path), kind


def write_text_atomic(path: Path, text: str) -> None:
    """The report files are written as sdx4 writes its images (imageio.write_atomic): never half a file."""
    from sdx4.imageio import write_atomic

    write_atomic(path, lambda f: f.write(text.encode()))


def run_speed(args: argparse.Namespace, out_dir: Path, model: str, model_kind: str, image: Path) -> dict[str, Any]:
    names = args.configs
    say = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    machine = machine_info(args.device)
    n = args.matmul_n
    say(f"peak (matmul {n}^3, 3x3 conv)...")
    peak_samples = [peak_sample(n, args.quick, args.device)]
    workers: dict[str, WorkerProcess] = {}
    try:
        # One at a time, so load times are measured without contention; --quick starts all at once.
        for name in names:
            say(f"starting worker {name}...")
            workers[name] = WorkerProcess(name, model, image, out_dir, source_for(name, args.baseline_src), args.device)
            if not args.quick:
                workers[name].wait_ready()
        for name, w in workers.items():
            info = w.info or w.wait_ready()
            say(f"  {name}: import {info['import_s']:.1f} s, load {info['load_s']:.1f} s, dtypes {info['dtypes']}")
        common = {"guidance": args.guidance, "seed": 0}
        flops: dict[str, Any] = {}
        # (a compiled config after its eager twin: it takes the twin's FLOP counts)
        for name, w in sorted(workers.items(), key=lambda item: "flops_from" in CONFIGS[item[0]]):
            twin = CONFIGS[name].get("flops_from")
            if twin:
                flops[name] = f1 = {**flops[twin], "counted_on": twin}
            else:
                # FLOPs first: the first call is the one that runs the text encoder (sdx4 caches embeddings; with
                # its low-memory load, the default prompts were encoded at load, before the UNet was loaded).
                flops[name] = f1 = w.ask(cmd="run", steps=1, flops=True, **common)["flops"]
                # A later call of the same loop may do less (sdx4 computes cross-attention keys and values once per
                # image, kvcache.py): a 2-step run gives the FLOPs of a call after the first.
                f2 = w.ask(cmd="run", steps=2, flops=True, **common)["flops"]
                f1["unet_later_call"] = (f2["unet"] - f1["unet"]) / max(f2["unet_calls"] - f1["unet_calls"], 1)
            # untimed warm-up (kernel selection, allocations; torch.compile compiles here: its time is reported)
            w.info["first_call_s"] = round(w.ask(cmd="run", steps=3 if twin else 1, **common)["wall_s"], 3)
            say(f"  {name}: UNet {f1['unet'] / max(f1['unet_calls'], 1) / 1e12:.3f} TFLOP in the first call, "
                f"{f1['unet_later_call'] / 1e12:.3f} in each later one; warm-up call {w.info['first_call_s']:.1f} s")
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for rep in range(args.reps):
            if rep:
                peak_samples.append(peak_sample(n, args.quick, args.device))  # workers are idle now
            for name in rotated(list(names), rep):
                time.sleep(args.pause)  # let the previous worker's OpenMP threads go idle
                r = workers[name].ask(cmd="run", steps=args.steps, **common)
                r["loadavg_1min"] = os.getloadavg()[0]
                runs[name].append(r)
                say(f"rep {rep + 1}/{args.reps} {name}: {r['wall_s']:.2f} s")
        for name, w in workers.items():
            w.info["final"] = w.quit()
    finally:
        for w in workers.values():
            w.kill()
    peak_samples.append(peak_sample(n, args.quick, args.device))
    startup = None  # the command's start-up is a CPU matter: not measured again on a GPU run
    if args.device == "cpu":
        say("startup times (sdx4 --help, bicubic 512 px)...")
        startup = startup_times(out_dir, reps=1 if args.quick else 5)
    peak_tbl = summarise_peaks(peak_samples, n)
    peaks = {d: v["gflops"] for d, v in peak_tbl.items()}
    matmul_peaks = {d: v["matmul_gflops"] for d, v in peak_tbl.items()}
    configs = {
        name: summarise(name, workers[name].info, runs[name], flops[name], peaks, matmul_peaks, args.steps, args.quick)
        for name in names
    }
    add_ratios(configs)
    report = {
        "schema": 1,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine,
        "versions": versions(),
        "settings": {
            "model": model, "model_kind": model_kind, "input_size": [args.size, args.size],
            "output_size": [4 * args.size, 4 * args.size], "steps": args.steps, "guidance": args.guidance,
            "reps": args.reps, "seed": 0, "quick": args.quick, "device": args.device,
            "baseline_src": str(args.baseline_src) if args.baseline_src else None,
        },
        "peak": peak_tbl,
        "configs": configs,
        "startup": startup,
        "targets": check_targets(configs) + (startup_targets(startup) if startup else []),
    }
    return report


def run_schedulers(args: argparse.Namespace, out_dir: Path, model: str, model_kind: str, image: Path) -> dict[str, Any]:
    say = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    steps = dict(SCHEDULER_STEPS)
    for item in args.scheduler_steps or []:
        name, _, k = item.partition("=")
        if name not in steps or not k.isdigit() or int(k) < 1:
            raise SystemExit(f"--scheduler-steps: expected NAME=STEPS with NAME in {', '.join(steps)}; got {item!r}")
        steps[name] = int(k)
    if args.quick:
        steps = {k: min(v, args.steps) for k, v in steps.items()}
    report: dict[str, Any] = {
        "schema": 1,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(args.device),
        "versions": versions(),
        "settings": {"model": model, "model_kind": model_kind, "input_size": [args.size, args.size],
                     "guidance": args.guidance, "reps": args.reps, "steps": steps, "quick": args.quick},
    }
    from sdx4.options import UpscaleOptions

    if "scheduler" not in {f.name for f in dataclasses.fields(UpscaleOptions)}:
        report["skipped"] = "UpscaleOptions has no `scheduler` field in this sdx4 version"
        say(f"schedulers: skipped ({report['skipped']})")
        return report
    w = WorkerProcess("sdx4", model, image, out_dir, device=args.device)
    try:
        w.wait_ready()
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in steps}
        for name in steps:
            w.ask(cmd="run", steps=1, guidance=args.guidance, seed=0, scheduler=name)  # warm-up
        for rep in range(args.reps):
            for name in rotated(list(steps), rep):
                r = w.ask(cmd="run", steps=steps[name], guidance=args.guidance, seed=0, scheduler=name)
                runs[name].append(r)
                say(f"rep {rep + 1}/{args.reps} {name} ({steps[name]} steps): {r['wall_s']:.2f} s")
        final = w.quit()
    finally:
        w.kill()
    report["load_s"] = w.info["load_s"]
    report["dtypes"] = w.info["dtypes"]
    report["peak_rss_mib"] = final["peak_rss_mib"]
    report["schedulers"] = {
        name: {
            "steps": steps[name],
            "scheduler_class": rs[0]["scheduler_class"],
            "unet_calls": rs[0]["unet_calls"],
            "wall_s": stats([r["wall_s"] for r in rs]),
            "denoising_s": round(statistics.median(r["denoising_s"] for r in rs), 3),
            "s_per_step": round(statistics.median(r["denoising_s"] for r in rs) / steps[name], 4),
            "runs": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rs],
        }
        for name, rs in runs.items()
    }
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per configuration")
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    p.add_argument("--size", type=int, default=64, help="input size in px (square); output is 4x")
    p.add_argument("--guidance", type=float, default=9.0, help="guidance scale")
    p.add_argument("--configs", default=None, help=f"comma-separated, from: {', '.join(CONFIGS)} (default: {','.join(DEFAULT_CONFIGS)})")
    p.add_argument("--out", default="bench-out", help="folder for speed.json / speed.md (schedulers.*)")
    p.add_argument("--model", default=None, help="model folder (diffusers layout); default: the cached random full-size model")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny random model, small matmul")
    p.add_argument("--schedulers", action="store_true", help="time sdx4 with each scheduler at its usual step count")
    p.add_argument("--scheduler-steps", nargs="*", metavar="NAME=STEPS", help="override step counts for --schedulers")
    p.add_argument("--matmul-n", type=int, default=None, help="matmul size for the peak (default 4096; 512 with --quick)")
    p.add_argument("--pause", type=float, default=1.0, help="seconds of idle between runs")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help=f"where every configuration runs; with cuda the default --configs are {','.join(CUDA_CONFIGS)} "
        "(add sdx4-fp16-compile,diffusers-fp16-compile for torch.compile)",
    )
    p.add_argument(
        "--baseline-src",
        type=Path,
        default=None,
        metavar="DIR",
        help="the `src` folder of another checkout (e.g. a git worktree of the code before a change): "
        "the sdx4-baseline configuration imports sdx4 from it",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--src", type=Path, default=OWN_SRC, help=argparse.SUPPRESS)  # a worker's sdx4
    p.add_argument("--image", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return a
    if a.configs is None:
        a.configs = ",".join(CUDA_CONFIGS if a.device == "cuda" else DEFAULT_CONFIGS)
    a.configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    bad = [c for c in a.configs if c not in CONFIGS]
    if bad or not a.configs:
        p.error(f"--configs: unknown {bad}; choose from {', '.join(CONFIGS)}")
    for c in a.configs:
        twin = CONFIGS[c].get("flops_from")
        if twin and twin not in a.configs:
            p.error(f"--configs: {c} takes its FLOP counts from {twin}; add {twin}")
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: this torch build sees no CUDA GPU")
    wants_baseline = any(CONFIGS[c].get("src") == "baseline" for c in a.configs)
    if wants_baseline and a.baseline_src is None:
        p.error("--configs: sdx4-baseline needs --baseline-src DIR (another checkout's src folder)")
    if a.baseline_src is not None:
        if not wants_baseline:
            p.error(f"--baseline-src {a.baseline_src}: add sdx4-baseline to --configs to run it")
        if not (a.baseline_src / "sdx4" / "__init__.py").is_file():
            p.error(f"--baseline-src {a.baseline_src}: no sdx4 package there (expected {a.baseline_src}/sdx4/__init__.py)")
        a.baseline_src = a.baseline_src.resolve()
    if a.schedulers and wants_baseline:
        p.error("--schedulers times this checkout's sdx4 only; leave sdx4-baseline out")
    for name, v, lo in (("--reps", a.reps, 1), ("--steps", a.steps, 1), ("--size", a.size, 8)):
        if v < lo:
            p.error(f"{name} must be >= {lo}; got {v}")
    if a.matmul_n is None:
        a.matmul_n = 512 if a.quick else (8192 if a.device == "cuda" else 4096)
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(args.src))  # before any sdx4 import: a baseline worker imports its own checkout's
    if args.worker:
        return worker_main(args.worker, args.model, args.image, args.device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model, model_kind = model_for(args)
    image = prepare_input(args.size, out_dir)
    if args.schedulers:
        report = run_schedulers(args, out_dir, model, model_kind, image)
        stem, table = "schedulers", markdown_schedulers(report)
    else:
        report = run_speed(args, out_dir, model, model_kind, image)
        stem, table = "speed", markdown(report)
    write_text_atomic(out_dir / f"{stem}.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out_dir / f"{stem}.md", table)
    print(table)
    print(f"wrote {out_dir / (stem + '.json')} and {out_dir / (stem + '.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
