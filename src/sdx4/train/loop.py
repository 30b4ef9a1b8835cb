"""The training loop: load once (no speed tricks), encode the prompts once, then steps, checkpoints,
validation, and the final LoRA file. `train()` (run.py) has checked every input before this runs."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._version import __version__
from ..options import LoadOptions, OptionsError
from . import data as data_mod
from .checkpoint import checkpoint_dir, load_checkpoint, remove_partial, save_checkpoint
from .files import LOG_FILE, LORA_FILE, RUN_FILE, Inputs, TrainResult, truncate_log
from .lora_file import add_lora, save_lora, write_bytes_atomic
from .options import TrainOptions
from .step import StepModel, batch_loss, draw, stack


def resolve_precision(precision: str, device: str) -> tuple[str, str]:
    """(dtype name of the frozen weights, why) for `precision` on `device`; auto = bf16 on CUDA (fp16 where
    bf16 is not supported), the measured `--dtype auto` choice on a CPU (model/placement.py), else fp32."""
    from ..model.placement import resolve_placement

    placement = resolve_placement(device, "auto" if precision == "auto" else "fp32")
    if precision == "fp16" and placement.device.type != "cuda":
        raise OptionsError(
            "precision fp16 needs a CUDA GPU (use bf16 or fp32 on this device)",
            option="precision",
        )
    if precision != "auto":
        return precision, f"{precision}: asked for"
    if placement.device.type == "cuda":
        return (
            ("bf16", "bf16: CUDA")
            if torch.cuda.is_bf16_supported()
            else ("fp16", "fp16: CUDA without bf16")
        )
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[
        placement.unet_dtype
    ]
    return name, placement.dtype_reason


class Crops(torch.utils.data.Dataset):
    """Global sample index -> (high-res crop, low-res crop, example index); a pure function of the index."""

    def __init__(
        self, examples: tuple[data_mod.Example, ...], options: TrainOptions
    ) -> None:
        self.examples, self.options = examples, options

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        seed = self.options.seed
        which = data_mod.example_index(seed, index, len(self.examples))
        rng = np.random.default_rng(data_mod.sample_seed(seed, index, 0))
        hr, lr = data_mod.make_sample(self.examples[which], self.options, rng)
        return torch.from_numpy(hr), torch.from_numpy(lr), which  # H,W,3 / h,w,3 uint8


class FromIndex(torch.utils.data.Sampler):
    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def load_for_training(
    load: LoadOptions, dtype: str, prompts: list[str]
) -> tuple[Any, dict[str, torch.Tensor]]:
    """Components loaded through sdx4's loading code, with the speed tricks taken off again (training needs
    diffusers' plain module), and the embeddings of every prompt (the text encoder is dropped before the UNet
    loads: they are never in memory together)."""
    from ..engine import budget
    from ..engine.prompts import encode_prompt
    from ..model.loading import load_components

    embeds: dict[str, torch.Tensor] = {}

    def encode_then_drop(components: Any) -> None:
        for p in prompts:
            embeds[p] = encode_prompt(components, p).float()  # 1,77,D
        components.text_encoder = None
        budget.release_memory()

    components = load_components(
        load.model,
        device=load.device,
        dtype=dtype,
        vae_dtype="fp32",
        before_denoiser=encode_then_drop,
    )
    if components.speed is not None:
        components.speed.uninstall()  # prepacked weights, cached attention etc. off: a plain trainable UNet
        components.speed = None
    # Inference keeps convolution kernels channels-last; training runs oneDNN's backward faster on plain
    # (contiguous) kernels under gradient checkpointing (benchmarks/train.py).
    components.unet.to(memory_format=torch.contiguous_format)
    return components, embeds


def run_training(
    inputs: Inputs,
    record: dict[str, Any],
    run_dir: Path,
    options: TrainOptions,
    load: LoadOptions,
    resume: bool,
    metrics: dict[str, Callable[[Any, Any], float]],
    progress: Callable[[dict[str, Any]], None] | None,
    say: Callable[[str], None],
) -> TrainResult:
    from diffusers.optimization import get_scheduler

    from .validate import Validator, plot_curves

    dtype, why = resolve_precision(options.precision, load.device)
    val_examples = (
        inputs.val.examples if inputs.val is not None and options.val_every else ()
    )
    prompts = sorted(
        {e.prompt for e in inputs.train.examples}
        | {e.prompt for e in val_examples}
        | {""}
    )

    t0 = time.perf_counter()
    components, embeds = load_for_training(load, dtype, prompts)
    device = components.placement.device
    say(
        f"loaded {load.model} on {device} in {time.perf_counter() - t0:.1f} s; training in {dtype} ({why})"
    )
    if components.random_weights:
        say("warning: this model has RANDOM WEIGHTS (made for tests/benchmarks)")
    # The UNet halves the latent len(blocks)-1 times: the low-res crop must be a multiple of that.
    multiple = components.pad_multiple
    if (options.crop // data_mod.SCALE) % multiple:
        raise OptionsError(
            f"crop must be a multiple of {data_mod.SCALE * multiple} for this model (the low-res crop is crop/4 and "
            f"its UNet needs multiples of {multiple}); got {options.crop}",
            option="crop",
        )

    if (
        not val_examples
    ):  # training only encodes: the VAE decoder (~0.2 GB fp32 on the real model) can go
        components.vae.decoder = None
        components.vae.post_quant_conv = None
    unet = components.unet
    params = add_lora(unet, options, options.seed)
    unet.train()
    if options.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    autocast = (
        None
        if dtype == "fp32"
        else {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    )
    model = StepModel(
        unet,
        components.vae,
        components.scheduler,
        components.low_res_scheduler,
        options.max_noise_level or components.max_noise_level,
        device,
        autocast,
    )
    optimizer = torch.optim.AdamW(params, lr=options.learning_rate)
    lr_scheduler = get_scheduler(
        "cosine" if options.lr_schedule == "cosine" else "constant_with_warmup",
        optimizer,
        num_warmup_steps=options.warmup_steps,
        num_training_steps=options.steps,
    )
    scaler = torch.amp.GradScaler(device.type) if dtype == "fp16" else None

    run_dir.mkdir(parents=True, exist_ok=True)
    for p in remove_partial(run_dir):
        say(f"removed {p.name}, left half-written by the interrupted run")
    start, samples = 0, 0
    if inputs.resume_step:
        resumed = load_checkpoint(
            checkpoint_dir(run_dir, inputs.resume_step),
            unet,
            optimizer,
            lr_scheduler,
            scaler,
        )
        start, samples = resumed.step, resumed.samples
        say(f"resumed from {resumed.path} (step {start} of {options.steps})")
    else:
        torch.manual_seed(
            options.seed
        )  # the global RNGs start from the seed (nothing draws from them now)
        np.random.seed(options.seed % 2**32)
    write_bytes_atomic(
        run_dir / RUN_FILE,
        json.dumps(
            {**record, "status": "running", "precision": dtype}, indent=1
        ).encode(),
    )
    truncate_log(run_dir / LOG_FILE, start)
    validator = (
        Validator(model, components, embeds, val_examples, options, run_dir, metrics)
        if val_examples
        else None
    )
    if validator is not None:
        validator.truncate(start)

    loader = torch.utils.data.DataLoader(
        Crops(inputs.train.examples, options),
        batch_size=options.batch_size,
        sampler=FromIndex(samples, options.steps * options.samples_per_step),
        num_workers=options.workers,
    )
    batches = iter(loader)
    loss_value = None
    with open(run_dir / LOG_FILE, "a") as log_file:
        for step in range(start + 1, options.steps + 1):
            t_step = time.perf_counter()
            total = 0.0
            for _ in range(options.grad_accumulation):
                hr, lr, which = next(batches)
                gens = [
                    torch.Generator().manual_seed(
                        data_mod.sample_seed(options.seed, samples + i, 1)
                    )
                    for i in range(hr.shape[0])
                ]
                draws = stack([draw(g, model, tuple(lr.shape[1:3])) for g in gens])
                prompt_embeds = torch.cat(
                    [embeds[inputs.train.examples[int(i)].prompt] for i in which]
                )  # B,77,D
                loss = (
                    batch_loss(model, hr, lr, prompt_embeds, draws)
                    / options.grad_accumulation
                )
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"the loss is {loss.item()} at step {step}: lower the learning rate ({options.learning_rate}) "
                        f"or use precision fp32; the last checkpoint is kept"
                    )
                (scaler.scale(loss) if scaler is not None else loss).backward()
                total += float(loss.detach())
                samples += hr.shape[0]
            if scaler is not None:
                scaler.unscale_(optimizer)
            if options.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, options.max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            lr_now = lr_scheduler.get_last_lr()[0]
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = total
            seconds = time.perf_counter() - t_step
            entry = {
                "step": step,
                "loss": loss_value,
                "lr": lr_now,
                "samples": samples,
                "seconds": round(seconds, 4),
            }
            log_file.write(json.dumps(entry) + "\n")
            log_file.flush()
            if progress is not None:
                progress({**entry, "steps": options.steps})
            if (
                options.checkpoint_every
                and step % options.checkpoint_every == 0
                and step < options.steps
            ):
                save_checkpoint(
                    run_dir,
                    step,
                    samples,
                    unet,
                    optimizer,
                    lr_scheduler,
                    scaler,
                    options.keep_checkpoints,
                )
            if validator is not None and (
                step % options.val_every == 0 or step == options.steps
            ):
                result = validator(step)
                say(validator.describe(result))

    save_checkpoint(
        run_dir,
        options.steps,
        samples,
        unet,
        optimizer,
        lr_scheduler,
        scaler,
        options.keep_checkpoints,
    )
    info = {
        "base_model": load.model,
        "recipe": options.recipe(),
        "steps": str(options.steps),
        "data_fingerprint": inputs.train.fingerprint,
        "version": __version__,
        "precision": dtype,
    }
    lora = save_lora(run_dir / LORA_FILE, unet, info)
    plot, notes = plot_curves(run_dir)
    write_bytes_atomic(
        run_dir / RUN_FILE,
        json.dumps({**record, "status": "done", "precision": dtype}, indent=1).encode(),
    )
    return TrainResult(
        run_dir=run_dir,
        lora=lora,
        steps=options.steps,
        resumed_from=start,
        final_loss=loss_value,
        skipped=inputs.train.skipped,
        validation=validator.results if validator is not None else [],
        plot=plot,
        notes=notes,
    )
