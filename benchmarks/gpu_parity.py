"""sdx4 against diffusers' StableDiffusionUpscalePipeline on one device, fp32 and fp16: the same weights, seed and
parameters must give the same image (benchmarks/gpu_check.sh runs it on CUDA; docs/gpu.md).

    python benchmarks/gpu_parity.py --model DIR --device cuda --out gpu-out     # full-size model, 64 px, 10 steps
    python benchmarks/gpu_parity.py --device cpu --quick --out /tmp/parity     # tiny random model (a smoke test)

Both draw from one CPU generator in the same order (sdx4's loop follows diffusers'), so only kernel rounding
differs. Tolerances, in 1/255 of the uint8 output:
- fp32: max |difference| <= 1 (what tests/test_pipeline.py holds on the CPU);
- fp16: mean |difference| <= 1 and max <= 16. Measured on the CPU with the tiny model (`--device cpu --quick`):
  mean 0.243, max 2. Most of it is the VAE: diffusers' fp16 pipeline loads the VAE in fp16 and upcasts it to
  fp32 for the decode (its weights rounded to fp16 on the way), sdx4 reads the VAE's weights in fp32 (sdx4's fp16
  against its own fp32 run differs by a mean of 0.04, tests/test_fp16_path.py). No CUDA number exists yet: the
  first GPU run tells whether the bound is right there.
Writes parity.json to --out and prints a table; exit status 1 when a tolerance is not met.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TOLERANCES = {"fp32": {"max": 1.0, "mean": 1.0}, "fp16": {"max": 16.0, "mean": 1.0}}  # in 1/255


def compare(model: str, device: str, dtype: str, size: int, steps: int, seed: int = 1234) -> dict[str, Any]:
    import numpy as np
    import torch
    from diffusers import StableDiffusionUpscalePipeline
    from PIL import Image

    import sdx4

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (size, size, 3), dtype=np.uint8))
    kwargs = dict(prompt="a photo of a cat", negative_prompt="blurry", guidance=9.0, noise_level=20)

    t0 = time.perf_counter()
    up = sdx4.load(model, device=device, dtype=dtype, low_memory=False)
    ours = up(image, steps=steps, seed=seed, **kwargs)
    ours_s = time.perf_counter() - t0
    vae_dtype = str(up.components.vae.dtype).replace("torch.", "")
    del up
    if device == "cuda":
        torch.cuda.empty_cache()

    t0 = time.perf_counter()
    pipe = StableDiffusionUpscalePipeline.from_pretrained(model, torch_dtype=torch_dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        prompt=kwargs["prompt"], negative_prompt=kwargs["negative_prompt"], image=image,
        guidance_scale=kwargs["guidance"], noise_level=kwargs["noise_level"], num_inference_steps=steps,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
    ref_s = time.perf_counter() - t0
    del pipe

    a = np.asarray(ours.image, dtype=np.float64)
    b = np.asarray(ref, dtype=np.float64)
    if a.shape != b.shape:
        raise SystemExit(f"{dtype}: sdx4 gave {a.shape}, diffusers {b.shape}")
    diff = np.abs(a - b)
    tol = TOLERANCES[dtype]
    out = {
        "dtype": dtype, "output_size": list(ours.image.size), "steps": steps,
        "max_abs": float(diff.max()), "mean_abs": round(float(diff.mean()), 4),
        "p999_abs": float(np.percentile(diff, 99.9)), "std_sdx4": round(float(a.std()), 2),
        "finite_and_not_constant": bool(a.std() > 1),  # NaN decodes become black (constant)
        "tolerance": tol, "sdx4_vae_dtype": vae_dtype, "sdx4_s": round(ours_s, 2), "diffusers_s": round(ref_s, 2),
    }
    out["ok"] = out["finite_and_not_constant"] and out["max_abs"] <= tol["max"] and out["mean_abs"] <= tol["mean"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (diffusers layout); default: a cached random model")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--dtypes", default="fp32,fp16", help="comma-separated: fp32, fp16")
    p.add_argument("--size", type=int, default=None, help="input px, square (default 64; 32 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 10; 2 with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny random model, small input, 2 steps")
    p.add_argument("--out", default="gpu-out", help="folder for parity.json")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in TOLERANCES for d in dtypes):
        p.error(f"--dtypes: choose from {', '.join(TOLERANCES)}; got {a.dtypes!r}")
    size = a.size or (32 if a.quick else 64)
    steps = a.steps or (2 if a.quick else 10)
    model = a.model
    if model is None:
        from sdx4.model.random_model import cached_random_model

        model = str(cached_random_model("tiny" if a.quick else "full"))
    results = [compare(model, a.device, d, size, steps) for d in dtypes]
    report = {"device": a.device, "model": model, "input_size": [size, size], "steps": steps, "results": results}
    if a.device == "cuda":
        import torch

        report["gpu"] = torch.cuda.get_device_name(0)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "parity.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"parity sdx4 vs diffusers on {a.device}, {size} px -> {4 * size} px, {steps} steps ({model})")
    print("| dtype | max abs /255 | mean abs /255 | 99.9% /255 | tolerance (max, mean) | sdx4 VAE | ok |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['dtype']} | {r['max_abs']:.0f} | {r['mean_abs']:.3f} | {r['p999_abs']:.0f} "
              f"| {r['tolerance']['max']:.0f}, {r['tolerance']['mean']:.1f} | {r['sdx4_vae_dtype']} | {'yes' if r['ok'] else 'NO'} |")
    print(f"wrote {out / 'parity.json'}", file=sys.stderr)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
