"""Start-up time: `sdx4.load` cold (weights streamed and converted), building the weight cache, and cached (the
converted weights memory-mapped from the cache folder); then the whole-process time of a short run,
`sdx4 upscale` (10 steps, 64 px) beside a diffusers script doing the same. Each in a fresh process.

    python benchmarks/load.py               # full-size random model (~/.cache/sdx4/random-full-seed0)
    python benchmarks/load.py --quick       # smoke test: tiny random model, 2 steps, 1 rep

Target (issue 20): a cached load of the full-size model within 1.5 s. Every load is timed after the libraries
are imported (the import is reported on its own line, beside diffusers' pipeline import), as the issue's anchors
were measured. Reports load.json and load.md in --out,
with the cache's disk use. The weight cache used is a folder of its own under --out (removed at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# The libraries (torch, diffusers' model and scheduler classes, transformers' CLIP) are imported first and timed
# apart: the load is what follows, measured as the issue's anchors were (diffusers' 0.3 s fp32 mmap load cannot
# include its 2+ s import). Without this, sdx4.load would pay diffusers' lazy imports (its models package pulls
# in peft, torch._dynamo and, where installed, scipy.stats) and the time would say nothing about the weights.
LIBRARIES = """
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer
"""

LOAD = """
import json, time, sys
t0 = time.perf_counter()
import sdx4
sdx4.api.quiet_libraries()
""" + LIBRARIES + """
t1 = time.perf_counter()
up = sdx4.load(sys.argv[1], device="cpu", dtype=sys.argv[2])
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "unet_dtype": up.info["unet_dtype"]}))
"""

DIFFUSERS_LOAD = """
import json, time, sys
t0 = time.perf_counter()
import torch
from diffusers import StableDiffusionUpscalePipeline
t1 = time.perf_counter()
pipe = StableDiffusionUpscalePipeline.from_pretrained(sys.argv[1], torch_dtype=getattr(torch, sys.argv[2]))
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1}))
"""

DIFFUSERS = """
import sys, torch, numpy as np
from PIL import Image
from diffusers import StableDiffusionUpscalePipeline
pipe = StableDiffusionUpscalePipeline.from_pretrained(sys.argv[1], torch_dtype=torch.float32)
pipe.set_progress_bar_config(disable=True)
img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (int(sys.argv[3]), int(sys.argv[3]), 3), dtype=np.uint8))
pipe(prompt="", image=img, num_inference_steps=int(sys.argv[2]), generator=torch.Generator().manual_seed(0)).images[0].save(sys.argv[4])
"""


def child(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, check=False
    )
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(
            f"child failed ({r.returncode}): {' '.join(args[:3])}\n{r.stderr[-3000:]}"
        )
    return wall, r.stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        default=None,
        help="model folder; default: the cached random full-size model",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: tiny random model, 2 steps, 1 rep",
    )
    p.add_argument(
        "--reps",
        type=int,
        default=3,
        help="timed repetitions of each cached/cold start",
    )
    p.add_argument(
        "--steps", type=int, default=10, help="steps of the whole-process run"
    )
    p.add_argument(
        "--size", type=int, default=64, help="input px of the whole-process run"
    )
    p.add_argument("--dtype", default="auto", help="sdx4's --dtype")
    p.add_argument("--out", default="bench-out", help="folder for load.json / load.md")
    a = p.parse_args(argv)
    if a.quick:
        a.reps, a.steps, a.size = 1, 2, 16
    from sdx4.model.random_model import cached_random_model

    model = a.model or str(cached_random_model("tiny" if a.quick else "full"))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "weight-cache"
    shutil.rmtree(cache, ignore_errors=True)
    precision = (
        Path(os.environ.get("SDX4_CACHE") or Path.home() / ".cache" / "sdx4")
        / "cpu-precision.json"
    )
    cache.mkdir()
    if (
        precision.exists()
    ):  # the machine's bf16 choice, so that no run measures it again
        shutil.copy(precision, cache / precision.name)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "SDX4_CACHE": str(cache),
        "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    load = lambda extra: json.loads(
        child(["-c", LOAD, model, a.dtype], {**env, **extra})[1]
    )

    cold = [load({"SDX4_WEIGHT_CACHE": "0"}) for _ in range(a.reps)]
    build = load(
        {}
    )  # the first start with the cache on: streams, then writes the converted copies
    cached = [load({}) for _ in range(a.reps)]
    peer = {
        dt: [json.loads(child(["-c", DIFFUSERS_LOAD, model, dt], env)[1]) for _ in range(a.reps)]
        for dt in ("bfloat16", "float32")
    }
    from sdx4.cache import cache_info

    os.environ["SDX4_CACHE"] = str(cache)
    disk = cache_info()["weights_bytes"]
    img = out / "load-input.png"
    import numpy as np
    from PIL import Image

    Image.fromarray(
        np.random.RandomState(0).randint(0, 256, (a.size, a.size, 3), dtype=np.uint8)
    ).save(img)
    run = [
        "-m",
        "sdx4",
        "upscale",
        str(img),
        "--model",
        model,
        "--dtype",
        a.dtype,
        "--steps",
        str(a.steps),
        "--seed",
        "0",
        "-o",
        str(out / "load-sdx4.png"),
        "--overwrite",
        "-q",
    ]
    sdx4_wall = [child(run, env)[0] for _ in range(a.reps)]
    diff_wall = [
        child(
            [
                "-c",
                DIFFUSERS,
                model,
                str(a.steps),
                str(a.size),
                str(out / "load-diffusers.png"),
            ],
            env,
        )[0]
        for _ in range(a.reps)
    ]
    med = lambda xs: round(statistics.median(xs), 3)
    report = {
        "model": model,
        "quick": a.quick,
        "dtype": cold[0]["unet_dtype"],
        "reps": a.reps,
        "load_cold_s": med([c["load_s"] for c in cold]),
        "load_building_cache_s": round(build["load_s"], 3),
        "load_cached_s": med([c["load_s"] for c in cached]),
        "import_s": med([c["import_s"] for c in cached]),
        "diffusers_load_bf16_s": med([c["load_s"] for c in peer["bfloat16"]]),
        "diffusers_load_fp32_s": med([c["load_s"] for c in peer["float32"]]),
        "diffusers_import_s": med([c["import_s"] for c in peer["float32"]]),
        "weight_cache_bytes": disk,
        "process_sdx4_s": med(sdx4_wall),
        "process_diffusers_fp32_s": med(diff_wall),
        "run": {"steps": a.steps, "size": a.size},
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    shutil.rmtree(cache, ignore_errors=True)
    (out / "load.json").write_text(json.dumps(report, indent=1))
    md = (
        f"| | seconds |\n|---|---:|\n"
        f"| import: sdx4 and the libraries its load uses (torch, diffusers, transformers) | {report['import_s']:.2f} |\n"
        f"| import: diffusers' StableDiffusionUpscalePipeline | {report['diffusers_import_s']:.2f} |\n"
        f"| sdx4.load, cold (SDX4_WEIGHT_CACHE=0) | {report['load_cold_s']:.2f} |\n"
        f"| sdx4.load, first start (builds the cache) | {report['load_building_cache_s']:.2f} |\n"
        f"| sdx4.load, cached | {report['load_cached_s']:.2f} |\n"
        f"| diffusers from_pretrained, torch_dtype=bfloat16 | {report['diffusers_load_bf16_s']:.2f} |\n"
        f"| diffusers from_pretrained, torch_dtype=float32 (lazy mmap) | {report['diffusers_load_fp32_s']:.2f} |\n"
        f"| whole process, sdx4 upscale {a.steps} steps {a.size} px (cached) | {report['process_sdx4_s']:.2f} |\n"
        f"| whole process, diffusers fp32, same run | {report['process_diffusers_fp32_s']:.2f} |\n\n"
        f"Weight cache on disk: {disk / 2**30:.2f} GiB = {disk / 2**20:.1f} MiB ({report['dtype']} UNet/text encoder, fp32 VAE).\n"
    )
    (out / "load.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
