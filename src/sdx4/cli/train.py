"""`sdx4 train HR_DIR -o RUN_DIR`: LoRA fine-tuning of the UNet (sdx4.train). Every option's default is read
from TrainOptions; torch is imported only when the run starts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..options import DEFAULT_MODEL, LoadOptions, OptionsError
from ..train import PRECISIONS, TARGET_PRESETS, TrainOptions
from .args import EXIT_OK, UsageError

#: TrainOptions field -> (flag, help). The defaults come from the dataclass.
FLAGS: dict[str, tuple[str, str]] = {
    "rank": ("--rank", "LoRA rank"),
    "alpha": (
        "--alpha",
        "LoRA alpha (the update is scaled by alpha/rank); default: the rank",
    ),
    "targets": (
        "--targets",
        f"modules LoRA adapts: {', '.join(TARGET_PRESETS)} or a comma-separated list (to_q,conv1)",
    ),
    "learning_rate": ("--lr", "AdamW learning rate"),
    "lr_schedule": ("--lr-schedule", "constant or cosine (after the warm-up)"),
    "warmup_steps": ("--warmup-steps", "linear learning-rate warm-up steps"),
    "steps": ("--steps", "optimizer steps"),
    "batch_size": ("--batch-size", "crops per micro-batch"),
    "grad_accumulation": ("--grad-accumulation", "micro-batches per optimizer step"),
    "max_grad_norm": ("--max-grad-norm", "clip gradients to this norm (0 = off)"),
    "precision": (
        "--precision",
        f"{', '.join(PRECISIONS)}: auto = bf16 on CUDA, the measured choice on a CPU",
    ),
    "crop": ("--crop", "high-res crop side in pixels (the low-res input is crop/4)"),
    "degradation": (
        "--degradation",
        "bicubic (as the model was trained) or realistic (blur, noise, JPEG)",
    ),
    "max_noise_level": (
        "--max-noise-level",
        "low-res noise levels are drawn from [0, this); default: the model's 350",
    ),
    "seed": ("--seed", "seed of every random draw"),
    "workers": ("--workers", "data-loader worker processes"),
    "checkpoint_every": (
        "--checkpoint-every",
        "steps between checkpoints (0 = only at the end)",
    ),
    "keep_checkpoints": ("--keep-checkpoints", "checkpoints kept"),
    "val_every": ("--val-every", "steps between validations (0 = none)"),
    "val_count": (
        "--val-count",
        "images of HR_DIR held out for validation without --val-dir (default: 1 from 8 images)",
    ),
    "val_steps": ("--val-steps", "DDIM steps of a validation upscale"),
}
BOOL_FLAGS = {
    "gradient_checkpointing": (
        "--gradient-checkpointing",
        "recompute activations in the backward pass (less memory)",
    ),
    "pad_small": (
        "--pad-small",
        "pad images smaller than the crop (reflect) instead of refusing them",
    ),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    import dataclasses

    p = subparsers.add_parser(
        "train",
        help="fine-tune a LoRA on your own high-res images",
        description=(
            "LoRA fine-tuning of the x4 upscaler's UNet with the model's own recipe (v-prediction, noise-augmented "
            "low-res input made by bicubic /4 from random crops). Writes RUN_DIR/lora.safetensors, which "
            "diffusers' load_lora_weights accepts, plus checkpoints, log.jsonl and validation grids."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "hr_dir",
        metavar="HR_DIR",
        help="folder of high-res training images (prompts from NAME.txt)",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="RUN_DIR",
        help="run folder (new or empty; or --resume)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in RUN_DIR from its last checkpoint",
    )
    p.add_argument(
        "--pairs",
        metavar="LR_DIR",
        help="real low-res images matched to HR_DIR by name (exactly 1/4 the size)",
    )
    p.add_argument(
        "--captions",
        metavar="FILE",
        help="prompts: CSV (path,prompt) or JSONL ({path, prompt})",
    )
    p.add_argument(
        "--val-dir", metavar="DIR", help="held-out high-res images for validation"
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="Hub id or local folder in diffusers layout",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    defaults = {f.name: f.default for f in dataclasses.fields(TrainOptions)}
    types = {"alpha": float, "learning_rate": float, "max_grad_norm": float}
    for name, (flag, text) in FLAGS.items():
        kind = types.get(name, str if isinstance(defaults[name], str) else int)
        p.add_argument(flag, dest=name, type=kind, default=defaults[name], help=text)
    for name, (flag, text) in BOOL_FLAGS.items():
        p.add_argument(
            flag,
            dest=name,
            action=argparse.BooleanOptionalAction,
            default=defaults[name],
            help=text,
        )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress bar or messages, errors only",
    )
    p.set_defaults(func=cmd_train)


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    values = {name: getattr(args, name) for name in (*FLAGS, *BOOL_FLAGS)}
    try:
        return TrainOptions(**values)
    except OptionsError as e:
        raise UsageError(_flag_message(e)) from None


def _flag_message(e: OptionsError) -> str:
    flag = (FLAGS.get(e.option or "") or BOOL_FLAGS.get(e.option or "") or (None,))[0]
    return f"{flag}: {e}" if flag else str(e)


def cmd_train(args: argparse.Namespace) -> int:
    from .. import api
    from ..quality.metrics import psnr_y, ssim_y
    from ..train import CheckpointError, TrainInputError, train

    options = options_from_args(args)
    try:
        load = LoadOptions(model=args.model or DEFAULT_MODEL, device=args.device)
    except OptionsError as e:
        raise UsageError(str(e)) from None
    say = (
        (lambda line: None)
        if args.quiet
        else (lambda line: print(line, file=sys.stderr))
    )
    bar = None

    def progress(event: dict) -> None:
        nonlocal bar
        if args.quiet:
            return
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(
                total=event["steps"],
                initial=event["step"] - 1,
                unit="step",
                file=sys.stderr,
                dynamic_ncols=True,
            )
        bar.set_postfix(
            loss=f"{event['loss']:.4g}", lr=f"{event['lr']:.3g}", refresh=False
        )
        bar.update(1)

    api.quiet_libraries()
    try:
        result = train(
            Path(args.hr_dir),
            Path(args.output),
            options,
            load=load,
            pairs=args.pairs,
            captions=args.captions,
            val_dir=args.val_dir,
            resume=args.resume,
            metrics={"psnr_y": psnr_y, "ssim_y": ssim_y},
            progress=progress,
            say=say,
        )
    except (TrainInputError, OptionsError) as e:
        raise UsageError(
            _flag_message(e) if isinstance(e, OptionsError) else str(e)
        ) from None
    except api.ModelPathError as e:
        raise UsageError(str(e)) from None
    except CheckpointError as e:
        print(
            f"sdx4: error: {e.strerror}; resume with --resume once fixed",
            file=sys.stderr,
        )
        return 1
    finally:
        if bar is not None:
            bar.close()
    for note in result.notes:
        say(note)
    say(
        f"wrote {result.lora} ({result.steps} steps, final loss {result.final_loss if result.final_loss is not None else 'n/a'})"
    )
    return EXIT_OK
