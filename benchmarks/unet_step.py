"""One guided UNet step with the cross-attention key/value cache (kvcache.py) and without, alternating.

    flock /tmp/sdx4-heavy.lock python benchmarks/unet_step.py              # full-size random model, 64 px, auto dtype
    python benchmarks/unet_step.py --quick --reps 2                         # tiny random model (smoke test)

Loads the model as `sdx4` does (packed weights on a CPU, the cache installed), then times UNet calls on
one CFG batch (2 samples) with the same prompt embeddings in turn: "kept" leaves the cache as the loop
leaves it between steps, "cleared" empties it before each call (what every step cost before the cache).
Prints and writes (--out) JSON: median seconds per call of each, their ratio (also the median of each
rep's back-to-back pair), the calls' min/max, and the largest difference between the two variants'
outputs (0: the cache changes no value).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def measure(model: str, size: int, dtype: str, reps: int) -> dict[str, Any]:
    import torch

    from sdx4.speed import kvcache
    from sdx4.model.loading import load_components

    c = load_components(model, device="cpu", dtype=dtype)
    unet, dt = c.unet, c.placement.unet_dtype
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, size, size, generator=g).to(dt)  # 2,7,S,S (latents + image)
    x = x.contiguous(memory_format=torch.channels_last) if c.placement.channels_last else x
    embeds = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g).to(dt)  # 2,77,D
    labels, t = torch.tensor([20, 20]), torch.tensor(500)
    variants = {"kept": lambda: None, "cleared": lambda: kvcache.clear(unet)}
    secs: dict[str, list[float]] = {k: [] for k in variants}
    outs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=embeds, class_labels=labels)  # packs the weights, fills the cache
        for _ in range(reps):
            for name, before in variants.items():
                before()
                t0 = time.perf_counter()
                outs[name] = unet(x, t, encoder_hidden_states=embeds, class_labels=labels, return_dict=False)[0]
                secs[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in secs.items()}
    return {
        "model": model,
        "size": size,
        "dtype": str(dt).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "cached_layers": len(kvcache.projections(unet)),
        "reps": reps,
        **{f"{k}_s": {"median": round(med[k], 4), "min": round(min(v), 4), "max": round(max(v), 4)} for k, v in secs.items()},
        "kept_vs_cleared": round(med["kept"] / med["cleared"], 4),
        # each rep's pair (run back to back): drift in machine speed cancels out
        "kept_vs_cleared_paired_median": round(statistics.median(a / b for a, b in zip(secs["kept"], secs["cleared"])), 4),
        "max_abs_diff": float((outs["kept"].float() - outs["cleared"].float()).abs().max()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model folder (default: the cached full-size random model, or tiny with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny random model: a smoke test, not a measurement")
    p.add_argument("--size", type=int, default=64, help="latent side in pixels (= the input image's side)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.reps < 1 or args.size < 8 or args.size % 8:
        p.error("--reps must be >= 1 and --size a multiple of 8, >= 8")
    model = args.model
    if model is None:
        from sdx4.model.random_model import cached_random_model

        model = str(cached_random_model("tiny" if args.quick else "full"))
    report = measure(model, args.size, args.dtype, args.reps)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
