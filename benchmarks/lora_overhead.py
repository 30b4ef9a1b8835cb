"""What a merged LoRA costs at inference: the same upscale with and without a LoRA, alternated on one model.

    python benchmarks/lora_overhead.py --quick --steps 1 --reps 1    # smoke test on a tiny random model
    python benchmarks/lora_overhead.py                               # full-size random model, 64 px, 20 steps

A LoRA is merged into the UNet's weights before the speed tricks go on (model/lora.py), so the target is no
overhead at all (<= 2%, within noise). The LoRA made here is random, of rank --rank on every Linear and
Conv2d that OSEDiff adapts (attention, feed-forward, resnet convolutions, proj_in/out); speed does not depend
on weight values. One model is in memory at a time: `Upscaler.set_loras` switches between base and LoRA
(a fresh UNet load, not timed) and the runs alternate base, LoRA, base, LoRA... so drift hits both alike.
Besides the times, the script checks what makes the claim structural: no peft layer is left on the UNet and
the speed tricks installed are the same with and without the LoRA. Results: OUT/lora_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

#: The layers a LoRA adapts here (names end with these), as OSEDiff does on this mostly-convolutional UNet.
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2",
           "conv_shortcut")  # fmt: skip


def make_lora(model_dir: Path, path: Path, rank: int, seed: int = 0) -> int:
    """A random LoRA (peft key names, alpha = rank) on every TARGETS layer of the model's UNet, written as
    safetensors; shapes come from the UNet built empty from its config (no weights read). Returns its layers."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(model_dir / "unet")
        )
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, m in unet.named_modules():
        if not name.endswith(TARGETS):
            continue
        if isinstance(m, torch.nn.Linear):
            a, b = (rank, m.in_features), (m.out_features, rank)
        elif isinstance(m, torch.nn.Conv2d):
            a, b = (rank, m.in_channels, *m.kernel_size), (m.out_channels, rank, 1, 1)
        else:
            continue
        tensors[f"unet.{name}.lora_A.weight"] = torch.randn(a, generator=g) * 0.01
        tensors[f"unet.{name}.lora_B.weight"] = torch.randn(b, generator=g) * 0.01
    save_file(tensors, path)
    return len(tensors) // 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: tiny random model")
    p.add_argument(
        "--model",
        default=None,
        help="model folder (default: the cached random full-size model)",
    )
    p.add_argument("--size", type=int, default=64, help="input size in px (square)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--reps", type=int, default=3, help="timed runs of each, alternated")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", default="bench-out")
    args = p.parse_args(argv)

    import numpy as np
    from PIL import Image

    import sdx4
    from sdx4.model.random_model import build_random_model, cached_random_model

    tmp = Path(tempfile.mkdtemp(prefix="sdx4-lora-bench-"))
    if args.model:
        model = Path(args.model)
    elif args.quick:
        model = build_random_model(tmp / "tiny", size="tiny", seed=0)
    else:
        model = cached_random_model("full")
    lora = tmp / "bench_lora.safetensors"
    layers = make_lora(model, lora, args.rank)
    image = Image.fromarray(
        np.random.RandomState(0).randint(
            0, 256, (args.size, args.size, 3), dtype=np.uint8
        )
    )
    sdx4.api.quiet_libraries()
    up = sdx4.load(str(model), device=args.device, dtype=args.dtype)
    options = sdx4.UpscaleOptions(steps=args.steps, seed=1)
    up(
        image, options
    )  # warm-up (first-call costs: prompt encoding, allocator, oneDNN packing)
    speed: dict[str, dict] = {}
    times: dict[str, list[float]] = {"base": [], "lora": []}
    for _ in range(args.reps):
        for which, loras in (("base", []), ("lora", [lora])):
            up.set_loras(loras)
            if not times[which]:
                up(
                    image, options
                )  # the first run of a fresh UNet packs its weights: not timed
            t0 = time.perf_counter()
            up(image, options)
            times[which].append(time.perf_counter() - t0)
            speed[which] = up.components.speed.as_dict()
    from peft.tuners.tuners_utils import BaseTunerLayer

    peft_layers = sum(
        isinstance(m, BaseTunerLayer) for m in up.components.unet.modules()
    )
    base, with_lora = statistics.median(times["base"]), statistics.median(times["lora"])
    result = {
        "model": str(model),
        "info": {k: v for k, v in up.info.items() if k != "loras"},
        "size": args.size,
        "steps": args.steps,
        "reps": args.reps,
        "lora_rank": args.rank,
        "lora_layers": layers,
        "seconds": times,
        "median_base_s": round(base, 4),
        "median_lora_s": round(with_lora, 4),
        "overhead_percent": round((with_lora / base - 1) * 100, 2),
        "peft_layers_left": peft_layers,
        "speed_tricks_base": speed["base"],
        "speed_tricks_lora": speed["lora"],
        "same_speed_tricks": speed["base"] == speed["lora"],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lora_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"base {base:.3f} s, with a rank-{args.rank} LoRA on {layers} layers {with_lora:.3f} s: "
        f"{result['overhead_percent']:+.2f}% (median of {args.reps}); peft layers left {peft_layers}; "
        f"speed tricks the same: {result['same_speed_tricks']}"
    )
    return 0 if peft_layers == 0 and result["same_speed_tricks"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
