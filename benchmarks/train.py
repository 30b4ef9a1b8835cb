"""Training benchmark: `sdx4 train`'s step time and peak memory against the loop a user would otherwise write
(diffusers' train_text_to_image_lora.py adapted to the x4 upscaler: add_adapter(LoraConfig), AdamW, the same
recipe and settings), in one alternating run.

    flock /tmp/sdx4-heavy.lock python benchmarks/train.py                 # full-size random model, this CPU
    python benchmarks/train.py --size tiny --steps 2 --reps 1             # smoke test on a tiny random model

Configurations: {sdx4, peer} x crop (full: 256 and 512 px high-res = 64 and 128 latent px; tiny: 32 and 64)
x precision (bf16, fp32) x gradient checkpointing (on, off). Every measurement is a FRESH subprocess (peak RSS,
VmHWM, weights included, does not mix); reps alternate the configurations in a rotating order, so drift in the
machine's speed hits all alike. Each subprocess runs --warmup steps, then --steps timed steps (LoRA rank 16,
targets attn+conv, batch 1, lr 1e-4, AdamW); the step time is the median of the timed steps, then the median
over reps; the peak is the largest over reps.

What each side does:
- sdx4: `sdx4.train.train()` on a folder of images (the real command's path: data loading, checkpoints off
  until the end), in a process started the way the `sdx4` command starts itself: with tcmalloc preloaded when
  the system has it (sdx4.speed.allocator.reexec_env, the CLI's own rule; SDX4_ALLOCATOR=system turns it off).
  glibc's malloc keeps freed mid-sized activations in its heap: at 512 px the same run peaks ~0.7 GiB higher. Its design for memory: prompts encoded once, the text encoder dropped before the UNet loads;
  frozen weights in the training precision; only the LoRA parameters in the optimizer; gradients set to None.
- peer: diffusers + peft as in the example script: every component loaded with from_pretrained, frozen weights
  cast to the precision (its "weight_dtype"), cast_training_params for the LoRA weights, the text encoder run
  on every step, torch.autocast for bf16, unet.enable_gradient_checkpointing() when on. Run as a user runs
  such a script (`python train_lora.py`: the system allocator). --peer-tcmalloc adds "peer-tcmalloc" rows: the
  same loop with tcmalloc preloaded by hand, to show what the allocator alone is worth.

Writes train.json and train.md to --out (default bench-out/).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
RANK, LR = 16, 1e-4


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def make_images(folder: Path, crop: int, count: int = 4) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        arr = np.random.RandomState(i).randint(
            0, 256, (crop + crop // 2, crop + crop // 4, 3), dtype=np.uint8
        )
        Image.fromarray(arr).save(folder / f"im{i}.png")
    return folder


def child_sdx4(cfg: dict[str, Any], total: int) -> list[float]:
    from sdx4.options import LoadOptions
    from sdx4.train import TrainOptions, train

    with tempfile.TemporaryDirectory() as tmp:
        options = TrainOptions(
            rank=RANK,
            learning_rate=LR,
            steps=total,
            crop=cfg["crop"],
            precision=cfg["precision"],
            gradient_checkpointing=cfg["gc"],
            checkpoint_every=0,
            val_every=0,
        )
        train(
            cfg["images"],
            Path(tmp) / "run",
            options,
            load=LoadOptions(model=cfg["model"], device="cpu"),
        )
        log = [
            json.loads(x)
            for x in (Path(tmp) / "run" / "log.jsonl").read_text().splitlines()
        ]
    return [r["seconds"] for r in log]


def child_peer(cfg: dict[str, Any], total: int) -> list[float]:
    """diffusers' train_text_to_image_lora.py, adapted to the x4 upscaler (7-channel input, noise-level labels)."""
    import random

    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    from sdx4.train.options import TARGET_PRESETS

    model = cfg["model"]
    weight_dtype = torch.bfloat16 if cfg["precision"] == "bf16" else torch.float32
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    low_res_scheduler = DDPMScheduler.from_pretrained(
        model, subfolder="low_res_scheduler"
    )
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    unet.to(dtype=weight_dtype)
    vae.to(dtype=torch.float32)  # the VAE breaks in half precision
    text_encoder.to(dtype=weight_dtype)
    unet.add_adapter(
        LoraConfig(
            r=RANK,
            lora_alpha=RANK,
            init_lora_weights="gaussian",
            target_modules=list(TARGET_PRESETS["attn+conv"]),
        )
    )
    if weight_dtype != torch.float32:
        cast_training_params(unet, dtype=torch.float32)
    if cfg["gc"]:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    files = sorted(Path(cfg["images"]).glob("*.png"))
    crop = cfg["crop"]
    unet.train()
    times = []
    for step in range(total):
        t0 = time.perf_counter()
        im = Image.open(random.choice(files)).convert("RGB")
        x, y = random.randint(0, im.width - crop), random.randint(0, im.height - crop)
        hr = im.crop((x, y, x + crop, y + crop))
        lr = hr.resize((crop // 4, crop // 4), Image.Resampling.BICUBIC)
        to_t = lambda a: (
            torch.from_numpy(np.asarray(a)).permute(2, 0, 1)[None].float() / 127.5 - 1
        )
        ids = tokenizer(
            [""],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        with torch.autocast(
            "cpu", dtype=torch.bfloat16, enabled=weight_dtype == torch.bfloat16
        ):
            latents = (
                vae.encode(to_t(hr)).latent_dist.sample() * vae.config.scaling_factor
            )
            noise = torch.randn_like(latents)
            timesteps = torch.randint(
                0, noise_scheduler.config.num_train_timesteps, (1,)
            ).long()
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            level = torch.randint(0, 350, (1,)).long()
            low = low_res_scheduler.add_noise(
                to_t(lr), torch.randn(1, 3, crop // 4, crop // 4), level
            )
            encoder_hidden_states = text_encoder(ids, return_dict=False)[0]
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
            pred = unet(
                torch.cat([noisy, low], 1),
                timesteps,
                encoder_hidden_states,
                class_labels=level,
                return_dict=False,
            )[0]
            loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - t0)
        del step
    return times


def child(cfg: dict[str, Any]) -> None:
    total = cfg["warmup"] + cfg["steps"]
    t0 = time.perf_counter()
    times = child_sdx4(cfg, total) if cfg["impl"] == "sdx4" else child_peer(cfg, total)
    timed = times[cfg["warmup"] :]
    print(
        json.dumps(
            {
                "step_s": statistics.median(timed),
                "steps_s": timed,
                "peak_rss": peak_rss(),
                "allocator": allocator_active(),
                "wall_s": time.perf_counter() - t0,
            }
        )
    )


def allocator_active() -> str:
    from sdx4.speed.allocator import active

    return active()


def child_env(impl: str, env: dict[str, str]) -> dict[str, str]:
    """The environment a measurement runs in: sdx4 as its command starts itself (tcmalloc when installed),
    the peer as a plain script, peer-tcmalloc with tcmalloc preloaded by hand."""
    from sdx4.speed.allocator import reexec_env

    if impl == "peer":
        return env
    return reexec_env(env, current="system") or env


def config_name(c: dict[str, Any]) -> str:
    return f"{c['impl']}-{c['crop']}px-{c['precision']}-{'gc' if c['gc'] else 'nogc'}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--size", choices=("full", "tiny"), default="full")
    p.add_argument(
        "--crops",
        type=int,
        nargs="+",
        help="high-res crop sides (default: full 256 512, tiny 32 64)",
    )
    p.add_argument("--precisions", nargs="+", default=["bf16", "fp32"])
    p.add_argument(
        "--gc",
        choices=("on", "off", "both"),
        default="both",
        help="gradient checkpointing",
    )
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "bench-out")
    p.add_argument(
        "--peer-tcmalloc",
        action="store_true",
        help="also run the peer with tcmalloc preloaded (peer-tcmalloc rows)",
    )
    a = p.parse_args()
    if a.child:
        child(json.loads(a.child))
        return 0

    from sdx4.model.random_model import build_random_model, cached_random_model

    crops = a.crops or ([256, 512] if a.size == "full" else [32, 64])
    tmp = Path(tempfile.mkdtemp(prefix="sdx4-train-bench-"))
    model = (
        cached_random_model("full")
        if a.size == "full"
        else build_random_model(tmp / "tiny", "tiny", 0)
    )
    gcs = {"on": [True], "off": [False], "both": [True, False]}[a.gc]
    configs = [
        {
            "impl": impl,
            "crop": crop,
            "precision": prec,
            "gc": gc,
            "model": str(model),
            "images": str(make_images(tmp / f"images-{crop}", crop)),
            "steps": a.steps,
            "warmup": a.warmup,
        }
        for crop, prec, gc, impl in itertools.product(
            crops,
            a.precisions,
            gcs,
            ("sdx4", "peer", "peer-tcmalloc") if a.peer_tcmalloc else ("sdx4", "peer"),
        )
    ]
    runs: dict[str, list[dict[str, Any]]] = {config_name(c): [] for c in configs}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    for rep in range(a.reps):
        order = (
            configs[rep % len(configs) :] + configs[: rep % len(configs)]
        )  # rotate: drift hits all alike
        for c in order:
            name = config_name(c)
            out = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(c)],
                check=False,
                capture_output=True,
                text=True,
                env=child_env(c["impl"], env),
            )
            if out.returncode != 0:
                print(f"{name}: FAILED\n{out.stderr[-3000:]}", file=sys.stderr)
                return 1
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(
                f"rep {rep + 1}/{a.reps} {name}: {runs[name][-1]['step_s']:.3f} s/step, "
                f"peak {runs[name][-1]['peak_rss'] / 2**30:.2f} GiB ({runs[name][-1]['allocator']})",
                file=sys.stderr,
            )

    rows = []
    for crop, prec, gc in itertools.product(crops, a.precisions, gcs):

        def summary(
            impl: str, crop: int = crop, prec: str = prec, gc: bool = gc
        ) -> dict[str, float]:
            r = runs[
                config_name({"impl": impl, "crop": crop, "precision": prec, "gc": gc})
            ]
            return {
                "step_s": statistics.median(x["step_s"] for x in r),
                "peak_gib": max(x["peak_rss"] for x in r) / 2**30,
                "allocator": r[0]["allocator"],
            }

        ours, peer = summary("sdx4"), summary("peer")
        extra = {"peer_tcmalloc": summary("peer-tcmalloc")} if a.peer_tcmalloc else {}
        rows.append(
            {
                "crop": crop,
                "latent": crop // 4,
                "precision": prec,
                "gradient_checkpointing": gc,
                "sdx4": ours,
                "peer": peer,
                "time_ratio": ours["step_s"] / peer["step_s"],
                "memory_ratio": ours["peak_gib"] / peer["peak_gib"],
                **extra,
            }
        )
    a.out.mkdir(parents=True, exist_ok=True)
    import platform

    result = {
        "size": a.size,
        "steps": a.steps,
        "warmup": a.warmup,
        "reps": a.reps,
        "rank": RANK,
        "machine": platform.processor() or platform.machine(),
        "threads": os.cpu_count(),
        "rows": rows,
        "runs": runs,
    }
    (a.out / "train.json").write_text(json.dumps(result, indent=1))
    lines = [
        (
            "| HR crop (latent) | precision | grad. ckpt | sdx4 s/step | peer s/step | time ratio | sdx4 peak GiB | "
            "peer peak GiB | memory ratio |"
            + (" peer+tcmalloc s/step | peer+tcmalloc peak GiB |" if a.peer_tcmalloc else "")
        ),
        "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if a.peer_tcmalloc else ""),
    ]
    for r in rows:
        lines.append(
            f"| {r['crop']} ({r['latent']}) | {r['precision']} | {'on' if r['gradient_checkpointing'] else 'off'} "
            f"| {r['sdx4']['step_s']:.3f} | {r['peer']['step_s']:.3f} | {r['time_ratio']:.2f}x "
            f"| {r['sdx4']['peak_gib']:.2f} | {r['peer']['peak_gib']:.2f} | {r['memory_ratio']:.2f}x |"
            + (
                f" {r['peer_tcmalloc']['step_s']:.3f} | {r['peer_tcmalloc']['peak_gib']:.2f} |"
                if a.peer_tcmalloc
                else ""
            )
        )
    lines.append(
        "\nAllocators: sdx4 "
        + ", ".join(sorted({r["sdx4"]["allocator"] for r in rows}))
        + "; peer "
        + ", ".join(sorted({r["peer"]["allocator"] for r in rows}))
        + "."
    )
    (a.out / "train.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
