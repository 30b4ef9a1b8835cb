"""Peak resident memory and time of the VAE decode alone: untiled (diffusers) vs `sdx4.vae_decode` tiled.

Each measurement runs in a fresh subprocess (peak RSS = VmHWM of that process; the baseline after building the
full-size random VAE and the latents is reported separately and subtracted in the "decode" column).

    python benchmarks/vae_decode_memory.py --latent 128 256 --modes untiled tiled spill --tile 64 --budget-gib 1

modes: untiled (diffusers' vae.decode), tiled (whole-image tensors in RAM, exact), spill (max_bytes = budget:
whole-image tensors that do not fit in temporary files, exact), estimate (max_bytes = budget, spill=False: sampled
statistics). --work-factor: how many times the budget counts one tile op's work (the pipeline passes
sdx4.engine.decode_fit.TILED_DECODE_FACTOR; 1 counts the plan's own bytes).
Heavy: run under `flock /tmp/sdx4-heavy.lock`.
"""

from __future__ import annotations

from _proc import proc_status  # benchmarks/_proc.py (the script's folder is on sys.path)

import argparse
import json
import subprocess
import sys




def child(latent: int, mode: str, tile: int, budget: float | None, tokens: int, seed: int, work_factor: int) -> dict:
    import time

    import torch
    from diffusers import AutoencoderKL

    from sdx4.model.random_model import VAE_CONFIGS
    from sdx4.engine.vae import decode_latents

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIGS["full"]).eval()
    g = torch.Generator().manual_seed(seed + 1)
    latents = torch.randn(1, 4, latent, latent, generator=g) / vae.config.scaling_factor
    base = proc_status("VmRSS")
    t0 = time.perf_counter()
    report = None
    with torch.no_grad():
        if mode == "untiled":
            out = vae.decode(latents, return_dict=False)[0]
        else:
            limited = mode in ("spill", "estimate") and budget is not None
            out, report = decode_latents(
                vae, latents, tile_size=tile, max_attention_tokens=tokens,
                max_bytes=int(budget * 2**30) if limited else None, spill=mode != "estimate", work_factor=work_factor,
            )
    wall = time.perf_counter() - t0
    return {
        "latent": latent, "mode": mode, "tile": tile, "budget_gib": budget, "work_factor": work_factor, "wall_s": round(wall, 1),
        "baseline_gib": round(base / 2**30, 3), "peak_gib": round(proc_status("VmHWM") / 2**30, 3),
        "decode_gib": round((proc_status("VmHWM") - base) / 2**30, 3), "out_shape": list(out.shape),
        "report": None if report is None else report.__dict__,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latent", type=int, nargs="+", default=[128, 256])
    p.add_argument("--modes", nargs="+", default=["untiled", "tiled"])
    p.add_argument("--tile", type=int, default=64)
    p.add_argument("--budget-gib", type=float, default=None, help="max_held_bytes for the tiled decode")
    p.add_argument("--tokens", type=int, default=256 * 256, help="max_attention_tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-factor", type=int, default=1, help="see above (the pipeline: 3)")
    p.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        lat, mode, tile, budget, tokens, seed, wf = a.child
        print(json.dumps(child(int(lat), mode, int(tile), None if budget == "none" else float(budget), int(tokens), int(seed), int(wf))))
        return 0
    for lat in a.latent:
        for mode in a.modes:
            cmd = [sys.executable, __file__, "--child", str(lat), mode, str(a.tile),
                   "none" if a.budget_gib is None else str(a.budget_gib), str(a.tokens), str(a.seed), str(a.work_factor)]
            r = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if r.returncode != 0:
                print(json.dumps({"latent": lat, "mode": mode, "failed": r.returncode, "stderr": r.stderr[-2000:]}), flush=True)
            else:
                print(r.stdout.strip(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
