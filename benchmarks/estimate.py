"""Estimate against actual: sdx4's time estimate before a run (`Upscaler.estimate`) next to the run's wall time,
at several input sizes and for each preset (target: within 25%).

    python benchmarks/estimate.py                                  # full-size random model: 64, 128, 256 px x every preset
    python benchmarks/estimate.py --sizes 64 128 --presets fast    # a subset
    python benchmarks/estimate.py --quick                          # smoke test: tiny random model, 2 steps

The model is built once (`python -m sdx4.random_model DIR --size full`, cached in ~/.cache/sdx4/random-full-seed0)
and loaded once; the first estimate measures this machine's calibration (or reads it from the cache folder:
the report says which). Every (size, preset) pair is estimated, then run, in one process. Reports
estimate.json and estimate.md in --out. Full size at 256 px with the reference preset (75 DDIM steps) takes
tens of minutes on a 2-core CPU; run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[64, 128, 256],
        help="input sizes in px (square)",
    )
    p.add_argument(
        "--presets", nargs="+", default=None, help="presets to run (default: every one)"
    )
    p.add_argument(
        "--model",
        default=None,
        help="model folder; default: the cached random full-size model",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: tiny random model, sizes 16 and 32, 2 steps",
    )
    p.add_argument(
        "--out", default="bench-out", help="folder for estimate.json / estimate.md"
    )
    p.add_argument("--dtype", default="auto", help="sdx4's --dtype")
    p.add_argument("--steps", type=int, default=None,
                   help="override every preset's step count (the preset then names the sampler); long runs at 256 px")
    a = p.parse_args(argv)

    import sdx4
    from sdx4.model.random_model import cached_random_model

    presets = a.presets or list(sdx4.PRESETS)
    sizes = [16, 32] if a.quick else a.sizes
    model = a.model or str(cached_random_model("tiny" if a.quick else "full"))
    sdx4.api.quiet_libraries()
    t0 = time.perf_counter()
    up = sdx4.load(model, device="cpu", dtype=a.dtype)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    from sdx4.cache import CALIBRATION_FILE, cache_root

    had = (cache_root() / CALIBRATION_FILE).exists()
    cal = up.calibrate()
    calibrate_s = time.perf_counter() - t0
    rows = []
    for size in sizes:
        image = np.random.RandomState(size).randint(
            0, 256, (size, size, 3), dtype=np.uint8
        )
        for preset in presets:
            opts = sdx4.preset_options(
                preset, seed=0, **({"steps": 2} if a.quick else {"steps": a.steps} if a.steps else {})
            )
            est = up.estimate((size, size), opts)
            t0 = time.perf_counter()
            result = up(image, opts)
            actual = time.perf_counter() - t0
            row = {
                "size": size,
                "preset": preset,
                "scheduler": opts.scheduler,
                "steps": opts.steps,
                "estimate_s": round(est.seconds, 3),
                "actual_s": round(actual, 3),
                "ratio": round(est.seconds / actual, 3),
                "tiles": est.tiles,
                "estimate_parts": {k: round(v, 3) for k, v in est.parts.items()},
                "actual_parts": result.metadata.get("timings"),
                "peak_estimate_gib": round(est.peak_bytes / 2**30, 3),
                "summary": est.summary,
            }
            rows.append(row)
            print(
                f"{size} px {preset}: estimate {est.seconds:.2f} s, actual {actual:.2f} s, ratio {row['ratio']:.2f}",
                file=sys.stderr,
            )
    within = sum(0.75 <= r["ratio"] <= 1.25 for r in rows)
    report = {
        "model": model,
        "quick": a.quick,
        "info": up.info,
        "load_s": round(load_s, 3),
        "calibration": {
            **cal.as_dict(),
            "was_cached": had,
            "seconds": round(calibrate_s, 3),
        },
        "rows": rows,
        "within_25_percent": f"{within}/{len(rows)}",
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "estimate.json").write_text(json.dumps(report, indent=1, default=str))
    lines = [
        "| input px | preset | scheduler, steps | estimate s | actual s | estimate / actual |",
        "|---|---|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['size']} | {r['preset']} | {r['scheduler']}, {r['steps']} | {r['estimate_s']:.2f} | {r['actual_s']:.2f} "
        f"| {r['ratio']:.2f} |"
        for r in rows
    ]
    lines.append(
        f"\nWithin 25%: {report['within_25_percent']}. Calibration {calibrate_s:.2f} s "
        f"({'read from the cache' if had else 'measured'}); load {load_s:.2f} s."
    )
    (out / "estimate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
