"""Large images: sdx4 (tiled, memory budget) side by side with diffusers' StableDiffusionUpscalePipeline.

FULL-SIZE random weights (`cached_random_model("full")`, ~4 GB, built once), fp32, CPU, guidance 9
(UNet batch 2), 1 step by default. Every run is its own subprocess so peak RSS (VmHWM, weights included)
does not mix; a watchdog kills a run whose RSS passes --mem-limit and reports it as failed instead of
letting it swap the machine. Runs alternate ours / diffusers per size.

    flock /tmp/sdx4-heavy.lock python benchmarks/large_images.py --sizes 128 256 --max-memory 5GiB

Writes JSON and markdown (default benchmarks/results/large_images.{json,md}). Also prints the planner's
memory estimate for a 1024 px input (4096 px out) and, with --blends, the seam score of each blend.
"""

from __future__ import annotations

from _proc import allocator_env, proc_status  # benchmarks/_proc.py (the script's folder is on sys.path)

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GiB = 2**30


# ------------------------------------------------------------------------------------------------
# child side: one run, prints one JSON line
# ------------------------------------------------------------------------------------------------




def test_image(size: int, seed: int = 0) -> Any:
    """A deterministic size x size RGB image with smooth shapes and some texture (uint8 PIL)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([0.5 + 0.4 * np.sin(6 * xx + 2 * c + 3 * yy * (c + 1)) for c in range(3)], axis=-1)
    texture = rng.normal(0, 0.04, (size, size, 3))
    return Image.fromarray((np.clip(base + texture, 0, 1) * 255).astype(np.uint8), "RGB")


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_grad_enabled(False)
    image = test_image(args.size)
    out_path = Path(args.out_png) if args.out_png else None
    row: dict[str, Any] = {"impl": args.impl, "size": args.size, "steps": args.steps}
    if args.impl == "diffusers":
        from diffusers import StableDiffusionUpscalePipeline

        pipe = StableDiffusionUpscalePipeline.from_pretrained(args.model, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        row["rss_after_load_gib"] = proc_status("VmRSS") / GiB
        t0, cpu0 = time.perf_counter(), os.times()
        out = pipe(
            prompt="",
            image=image,
            num_inference_steps=args.steps,
            guidance_scale=9.0,
            noise_level=20,
            generator=torch.Generator("cpu").manual_seed(0),
        ).images[0]
        row["seconds"] = time.perf_counter() - t0
        row["cpu_share"] = cpu_share(cpu0, row["seconds"], torch.get_num_threads())
    else:
        import sdx4
        from sdx4.options import parse_size

        up = sdx4.load(args.model, device="cpu", dtype="fp32")
        row["rss_after_load_gib"] = proc_status("VmRSS") / GiB
        peak_denoise = {}

        def progress(i: int, n: int) -> None:
            if i == n:
                peak_denoise["gib"] = proc_status("VmHWM") / GiB

        overrides: dict[str, Any] = dict(steps=args.steps, guidance=9.0, noise_level=20, seed=0)
        if args.blend:
            overrides["tile_blend"] = args.blend
        if args.max_memory:
            overrides["max_memory"] = parse_size(args.max_memory)
        if args.tile_size:
            overrides["tile_size"] = args.tile_size
        if args.tile_overlap is not None:
            overrides["tile_overlap"] = args.tile_overlap
        t0, cpu0 = time.perf_counter(), os.times()
        result = up(image, progress=progress, **overrides)
        row["seconds"] = time.perf_counter() - t0
        row["cpu_share"] = cpu_share(cpu0, row["seconds"], torch.get_num_threads())
        out = result.image
        row["peak_rss_denoise_gib"] = peak_denoise.get("gib")
        row["tiling"] = result.metadata["tiling"]
        row["vae_decode"] = result.metadata["vae_decode"]
        row["timings"] = result.metadata["timings"]
        row["seam_score"] = seam_score_of(out, result.metadata["tiling"], args.size)
        row["attention_seam_score"] = attention_seam_score_of(
            out, result.metadata["vae_decode"], result.metadata["tiling"], result.metadata["tiling_options"]["vae_attention_window"]
        )
    from sdx4.speed.allocator import active

    row["allocator"] = active()  # the C allocator this run used (sdx4.allocator)
    row["peak_rss_gib"] = proc_status("VmHWM") / GiB
    row["output_size"] = list(out.size)
    row["seconds_per_output_mp"] = row["seconds"] / (out.size[0] * out.size[1] / 1e6)
    if out_path is not None:
        out.save(out_path)
    print(json.dumps(row), flush=True)


def blend_study(args: argparse.Namespace) -> None:
    """One UNet pass over tiles, merged with every blend: the same tile predictions, only the weights differ.

    Scores the merged (CFG-combined) latent prediction: seam score on the tile boundaries and the mean
    absolute difference from the untiled prediction (relative to the untiled prediction's mean magnitude).
    """
    import torch

    import sdx4
    from sdx4.engine import tiling
    from sdx4.options import UpscaleOptions
    from sdx4.engine.prompts import prompt_embeddings
    from sdx4.engine.loop import to_model_range
    import numpy as np

    torch.set_grad_enabled(False)
    up = sdx4.load(args.model, device="cpu", dtype="fp32")
    c = up.components
    opts = UpscaleOptions(steps=args.steps, guidance=9.0, seed=0)
    embeds = prompt_embeddings(c, opts)  # 2,77,D
    g = torch.Generator().manual_seed(0)
    image = to_model_range(torch.from_numpy(np.array(test_image(args.size))))  # 1,3,H,W
    image = image + 0.02 * torch.randn(image.shape, generator=g)
    latents = torch.randn(1, 4, args.size, args.size, generator=g)
    t = torch.tensor(999)
    model_in = torch.cat([torch.cat([latents] * 2), image.repeat(2, 1, 1, 1)], dim=1)  # 2,7,H,W
    labels = torch.tensor([20, 20])

    def unet(x: torch.Tensor) -> torch.Tensor:
        k = x.shape[0] // 2
        return c.unet(x, t, encoder_hidden_states=embeds.repeat(k, 1, 1), class_labels=labels.repeat(k), return_dict=False)[0]

    def cfg(p: torch.Tensor) -> torch.Tensor:
        u, te = p.chunk(2)
        return u + 9.0 * (te - u)  # 1,4,H,W

    full = cfg(unet(model_in))
    tile, overlap = args.blend_tile_size, args.blend_tile_overlap
    tiles = tiling.plan_tiles(args.size, args.size, tile, overlap, c.pad_multiple)
    recorded: list[torch.Tensor] = []
    tiling.merge_tiled(lambda x: recorded.append(unet(x)) or recorded[-1], [model_in], tiles, tile_batch=1, blend="uniform", overlap=overlap)
    rows, cols = tiling.tile_boundaries(tiles, args.size, args.size)
    out = []
    for blend in tiling.BLENDS:
        it = iter(recorded)
        merged = cfg(tiling.merge_tiled(lambda x: next(it), [model_in], tiles, tile_batch=1, blend=blend, overlap=overlap))
        out.append({
            "blend": blend,
            "tiles": len(tiles),
            "latent_seam_score": tiling.seam_score(merged[0], rows, cols),
            "untiled_latent_seam_score": tiling.seam_score(full[0], rows, cols),
            "relative_error_vs_untiled": float((merged - full).abs().mean() / full.abs().mean()),
        })
    print(json.dumps({"blend_study": out, "size": args.size, "tile": tile, "overlap": overlap}), flush=True)


def seam_score_of(image: Any, tiling_meta: dict[str, Any], size: int) -> float | None:
    """Seam score of an output on the boundary lines of the tiles it was made with (None if untiled)."""
    import numpy as np
    import torch

    from sdx4.engine import tiling

    if not tiling_meta["tiled"]:
        return None
    lh, lw = tiling_meta["latent_size"]
    m = tiling_meta["pad_multiple"]
    tiles = tiling.plan_tiles(lh, lw, tiling_meta["tile_size"], tiling_meta["tile_overlap"], m)
    rows, cols = tiling.tile_boundaries(tiles, lh, lw)
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)  # 3,H,W
    return tiling.seam_score(x, [4 * r for r in rows], [4 * c for c in cols], period=4)


def attention_seam_score_of(image: Any, vae_meta: dict[str, Any], tiling_meta: dict[str, Any], window: int) -> float | None:
    """Seam score on the core boundaries of the VAE's attention windows (None when attention was global)."""
    import numpy as np
    import torch

    from sdx4.engine import tiling
    from sdx4.engine.vae import attention_bounds

    if vae_meta["attention"] == "global":
        return None
    lh, lw = tiling_meta["latent_size"]
    rows, cols = attention_bounds(lh, lw, window * window, vae_meta["overlap"])
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)  # 3,H,W
    inner = lambda b: [4 * v for v in b[1:-1]]  # noqa: E731  (the image edges are not seams)
    return tiling.seam_score(x, inner(rows), inner(cols), period=4)


def cpu_share(cpu0: os.times_result, seconds: float, threads: int) -> float:
    """CPU seconds since `cpu0` / (wall x threads): near 1.0 the run had the cores to itself."""
    cpu1 = os.times()
    return (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / (seconds * threads)


def per_mp_spread(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Issue 3's linearity target: sdx4's seconds per output MP, max / min over the sizes run. A size run
    more than once (e.g. `--sizes 128 256 512 128`) counts with its fastest run: on a shared machine other
    load only ever slows a run down."""
    ours = [r for r in runs if r.get("impl") == "ours" and "failed" not in r]
    per_mp: dict[int, float] = {}
    for r in ours:
        per_mp[r["size"]] = min(per_mp.get(r["size"], float("inf")), r["seconds_per_output_mp"])
    if len(per_mp) < 2:
        return None
    spread = max(per_mp.values()) / min(per_mp.values())
    return {"seconds_per_output_mp": per_mp, "max_over_min": round(spread, 3), "target": 1.15, "met": spread <= 1.15}


# ------------------------------------------------------------------------------------------------
# parent side
# ------------------------------------------------------------------------------------------------


def run_child(cmd: list[str], mem_limit: int, timeout: float, allocator: str = "sdx4") -> dict[str, Any]:
    """Run one measurement; kill it when its RSS passes mem_limit (the watchdog) or after timeout.
    `allocator`: the child's C allocator (_proc.allocator_env): sdx4's choice for ours, the system's for diffusers."""
    env = allocator_env(dict(os.environ), allocator)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak, t0, killed = 0, time.time(), None
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                rss = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
            peak = max(peak, rss)
        except (OSError, StopIteration):
            pass
        if peak > mem_limit:
            killed = f"killed by the watchdog: RSS passed {mem_limit / GiB:.1f} GiB"
        elif time.time() - t0 > timeout:
            killed = f"killed after {timeout:.0f} s"
        if killed:
            proc.kill()
            proc.wait()
            break
        time.sleep(0.2)
    out, err = proc.communicate()
    if killed:
        return {"failed": killed, "watchdog_peak_rss_gib": peak / GiB}
    if proc.returncode != 0:
        return {"failed": f"exit {proc.returncode}: {err.strip().splitlines()[-1] if err.strip() else ''}"}
    return json.loads(out.strip().splitlines()[-1])


def planner_estimate(size: int, budget: int | None) -> dict[str, Any]:
    """The planner's plan for a size x size input with the full model's fp32 weights resident during a
    CPU run (UNet + VAE: the text encoder is dropped once the prompts are encoded)."""
    from sdx4.engine import budget as memory

    weights = memory.full_model_weights_bytes("fp32")
    budget = budget if budget is not None else memory.default_budget(weights, "cpu")
    plan = memory.plan_memory(size, size, budget_bytes=budget, weights_bytes=weights, samples_per_tile=2)
    return {"input_px": size, "output_px": 4 * size, **plan.describe()}


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| input -> output | impl | allocator | wall s | s / output MP | denoise s | decode s | CPU share | peak RSS GiB | peak RSS in denoising GiB "
        "| tiles (size/overlap, UNet batch) | VAE decode | seam score (UNet tiles / VAE attention windows) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        io = f"{r['size']} -> {4 * r['size']}"
        if "failed" in r:
            lines.append(f"| {io} | {r['impl']} | {r.get('allocator', '?')} | failed: {r['failed']} | | | | | | | | | |")
            continue
        t = r.get("tiling")
        tiles = f"{t['tiles']} ({t['tile_size']}/{t['tile_overlap']}, {t.get('unet_batch') or 'all'})" if t else "-"
        vae = r.get("vae_decode")
        vae_s = "untiled"
        if vae:
            vae_s = (f"{vae['tiles']} tiles of {vae['tile_size']}" if vae["tiled"] else "untiled") + (
                ", global attention" if vae["attention"] == "global" else f", attention in {vae.get('attention_windows')} windows")
            if vae.get("spilled_bytes"):
                vae_s += f", {vae['spilled_bytes'] / GiB:.1f} GiB spilled at a time"
                if vae.get("spill_traffic_bytes"):
                    vae_s += f" ({vae['spill_traffic_bytes'] / GiB:.1f} GiB written)"
            if vae.get("unet_released"):
                vae_s += ", UNet released"
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        seam = f"{fmt(r.get('seam_score'))} / {fmt(r.get('attention_seam_score'))}"
        den = f"{r['peak_rss_denoise_gib']:.2f}" if r.get("peak_rss_denoise_gib") else "-"
        tm = r.get("timings", {})
        stage = lambda k: f"{tm[k]:.1f}" if k in tm else "-"  # noqa: E731
        share = f"{r['cpu_share']:.2f}" if "cpu_share" in r else "-"
        lines.append(
            f"| {io} | {r['impl']} | {r.get('allocator', '?')} | {r['seconds']:.1f} | {r['seconds_per_output_mp']:.1f} | {stage('denoising')} | {stage('decoding')} "
            f"| {share} | {r['peak_rss_gib']:.2f} | {den} | {tiles} | {vae_s} | {seam} |"
        )
    spread = per_mp_spread(results["runs"])
    if spread:
        lines += ["", f"sdx4 seconds per output MP, max / min over {sorted(spread['seconds_per_output_mp'])} px: "
                      f"{spread['max_over_min']:.3f} (target <= 1.15: {'met' if spread['met'] else 'missed'})."]
    if results.get("blends"):
        lines += ["", "| blend | tiles | seam score |", "|---|---|---|"]
        for b in results["blends"]:
            seam = f"{b['seam_score']:.3f}" if b.get("seam_score") is not None else b.get("failed", "-")
            lines.append(f"| {b.get('blend')} | {b.get('tiling', {}).get('tiles', '-')} | {seam} |")
    study = results.get("blend_study", {})
    if study.get("blend_study"):
        lines += ["", f"Blend study ({study['size']} px latent, {study['blend_study'][0]['tiles']} tiles of {study['tile']} px, "
                  f"overlap {study['overlap']}; one set of UNet tile predictions merged three ways):", "",
                  "| blend | latent seam score | untiled prediction's score on the same lines | mean abs error vs untiled (relative) |",
                  "|---|---|---|---|"]
        for b in study["blend_study"]:
            lines.append(f"| {b['blend']} | {b['latent_seam_score']:.3f} | {b['untiled_latent_seam_score']:.3f} | {b['relative_error_vs_untiled']:.3f} |")
    elif study:
        lines += ["", f"Blend study failed: {study.get('failed')}"]
    p = results["planner_1024"]
    lines += [
        "",
        f"Planner estimate for a 1024 px input (4096 px out), budget {p['memory_budget_gib']:.2f} GiB: "
        f"{p['memory_estimate_gib']:.2f} GiB peak, {p['tiles']} tiles of {p['tile_size']} px (overlap {p['tile_overlap']}), "
        f"tile batch {p['tile_batch']}, VAE tiles of {p['vae_tile_size']} latent px.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=("ours", "diffusers"), default="ours", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=128, help=argparse.SUPPRESS)
    p.add_argument("--out-png", default=None, help=argparse.SUPPRESS)
    p.add_argument("--blend", default=None, help=argparse.SUPPRESS)
    p.add_argument("--blend-study-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--blend-tile-size", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--blend-tile-overlap", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--blend-study", type=int, default=0, metavar="SIZE",
                   help="score the blends on ONE set of tile predictions of the UNet (latent space) at this size")
    p.add_argument("--model", default=None, help="model folder (default: the cached full-size random model)")
    p.add_argument("--sizes", type=int, nargs="*", default=[128, 256], help="input sizes in px (none: skip the side-by-side runs)")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--max-memory", default="5GiB", help="sdx4's memory budget")
    p.add_argument("--tile-size", type=int, default=None, help="force sdx4's tile size")
    p.add_argument("--tile-overlap", type=int, default=None, help="force sdx4's tile overlap")
    p.add_argument("--mem-limit", type=float, default=18.0, help="watchdog: kill a run above this RSS (GiB)")
    p.add_argument("--timeout", type=float, default=3600.0, help="kill a run after this many seconds")
    p.add_argument("--skip-diffusers", action="store_true")
    p.add_argument("--impls", nargs="+", choices=("ours", "diffusers"), default=None, help="which implementations to run (default both)")
    p.add_argument("--blends", type=int, default=0, metavar="SIZE", help="also score each blend at this input size (forced tiles)")
    p.add_argument("--blend-tile", type=int, nargs=2, default=None, metavar=("SIZE", "OVERLAP"), help="tiles for --blends (default: half the size, a quarter overlap)")
    p.add_argument("--out", default="benchmarks/results/large_images", help="output path without suffix")
    args = p.parse_args(argv)
    if args.child and args.blend_study_child:
        blend_study(args)
        return 0
    if args.child:
        child(args)
        return 0

    from sdx4.model.placement import cpu_model_name
    from sdx4.options import parse_size
    from sdx4.model.random_model import cached_random_model

    model = args.model or str(cached_random_model("full"))
    mem_limit = int(args.mem_limit * GiB)
    planner = planner_estimate(1024, parse_size(args.max_memory) if args.max_memory else None)
    print("planner, 1024 px input -> 4096 px:", json.dumps(planner), flush=True)
    results: dict[str, Any] = {
        "machine": {"cpu": cpu_model_name(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "settings": {"steps": args.steps, "guidance": 9.0, "dtype": "fp32", "device": "cpu", "max_memory": args.max_memory},
        "planner_1024": planner,
        "runs": [],
        "blends": [],
    }
    import torch

    results["machine"]["torch"] = torch.__version__
    base = [sys.executable, __file__, "--child", "--model", model, "--steps", str(args.steps)]
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            impls = args.impls or (["ours"] + ([] if args.skip_diffusers else ["diffusers"]))
            for impl in impls:
                cmd = base + ["--impl", impl, "--size", str(size), "--out-png", f"{tmp}/{impl}_{size}.png"]
                if impl == "ours":
                    if args.max_memory:
                        cmd += ["--max-memory", args.max_memory]
                    if args.tile_size:
                        cmd += ["--tile-size", str(args.tile_size)]
                    if args.tile_overlap is not None:
                        cmd += ["--tile-overlap", str(args.tile_overlap)]
                alloc = "sdx4" if impl == "ours" else "system"
                row = {"impl": impl, "size": size, **run_child(cmd, mem_limit, args.timeout, alloc)}
                print(json.dumps(row), flush=True)
                results["runs"].append(row)
        if args.blends:
            tile, overlap = args.blend_tile or (args.blends // 2, args.blends // 8)
            for blend in ("uniform", "gaussian", "feather"):
                cmd = base + ["--impl", "ours", "--size", str(args.blends), "--blend", blend,
                              "--tile-size", str(tile), "--tile-overlap", str(overlap)]
                row = {"blend": blend, **run_child(cmd, mem_limit, args.timeout)}
                print(json.dumps(row), flush=True)
                results["blends"].append(row)
        if args.blend_study:
            tile, overlap = args.blend_tile or (args.blend_study // 2, args.blend_study // 8)
            cmd = base + ["--blend-study-child", "--size", str(args.blend_study),
                          "--blend-tile-size", str(tile), "--blend-tile-overlap", str(overlap)]
            row = run_child(cmd, mem_limit, args.timeout)
            print(json.dumps(row), flush=True)
            results["blend_study"] = row
    results["per_mp_spread"] = per_mp_spread(results["runs"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
