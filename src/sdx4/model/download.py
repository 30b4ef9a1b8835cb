"""`sdx4 download`: fetch only the files one precision variant of the x4 upscaler needs, into a local folder
in diffusers layout that `--model` then loads. No torch here.

The Hub repo holds every weight several times (fp32 and fp16, safetensors and .bin, plus the 1.7 GB
single-file checkpoints x4-upscaler-ema.ckpt/.safetensors); `select_files` is the pure choice of what to
fetch from the repo's file list. Files come one by one through huggingface_hub (`hf_hub_download` into
the folder: progress bars, resumed after an interruption, skipped when already there). An fp16 file
(`model.fp16.safetensors`) is also linked under the plain name the loader reads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, get_args

from ..options import DEFAULT_MODEL
from .errors import ModelNotFoundError

Variant = Literal["fp16", "fp32"]
VARIANTS: tuple[str, ...] = get_args(Variant)
#: The networks and their weight file's name without extension.
WEIGHTS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}
CONFIG_FILES = (
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
    "low_res_scheduler/scheduler_config.json",
)


def select_files(repo_files: list[str], variant: str = "fp32") -> list[str]:
    """The files of `repo_files` (a diffusers repo's list) that the `variant` needs: configs, the tokenizer,
    and ONE weight file per network, safetensors before .bin, the variant's own before the plain fp32 one."""
    if variant not in VARIANTS:
        raise ValueError(
            f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}"
        )
    have = set(repo_files)
    missing = [f for f in CONFIG_FILES if f not in have]
    chosen = [f for f in CONFIG_FILES if f in have]
    tokenizer = sorted(
        f for f in have if f.startswith("tokenizer/") and f.count("/") == 1
    )
    if not tokenizer:
        missing.append("tokenizer/*")
    chosen += tokenizer
    for net, name in WEIGHTS.items():
        order = [f"{name}.safetensors", f"{name}.bin"]
        if variant == "fp16":
            order = [
                f"{name}.fp16.safetensors",
                f"{name}.safetensors",
                f"{name}.fp16.bin",
                f"{name}.bin",
            ]
        pick = next((f"{net}/{f}" for f in order if f"{net}/{f}" in have), None)
        if pick is None:
            missing.append(f"{net}/{name}.safetensors")
        else:
            chosen.append(pick)
    if missing:
        raise ModelNotFoundError(
            f"the repo is not an x4 upscaler in diffusers layout: it lacks {', '.join(missing)}"
        )
    return chosen


def default_folder(variant: str) -> Path:
    from ..cache import cache_root

    return cache_root() / "models" / f"stable-diffusion-x4-upscaler-{variant}"


def _plain_name(rel: str) -> str | None:
    """`unet/diffusion_pytorch_model.fp16.safetensors` -> the name the loader reads (None: already plain)."""
    for ext in (".safetensors", ".bin"):
        if rel.endswith(f".fp16{ext}"):
            return rel[: -len(f".fp16{ext}")] + ext
    return None


def _link(src: Path, dst: Path) -> None:
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        os.link(src, dst)  # no extra space; works on NTFS too
    except OSError:
        dst.symlink_to(src.name)


def download(
    repo_id: str = DEFAULT_MODEL,
    variant: str = "fp32",
    to: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Fetch the files `variant` needs from the Hub repo into `to` (default: the sdx4 cache's
    models/stable-diffusion-x4-upscaler-VARIANT) and return that folder (pass it as --model)."""
    from huggingface_hub import HfApi, constants, hf_hub_download

    from .hub import _hub_offline, _hub_reachable, missing_parts

    if variant not in VARIANTS:
        raise ValueError(
            f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}"
        )
    folder = Path(to).expanduser() if to else default_folder(variant)
    fix = (
        "Fix: run `sdx4 download` on a machine with network and copy the folder here, then pass "
        "--model PATH to it (or a single file: --model x4-upscaler-ema.safetensors)."
    )
    if _hub_offline():
        raise ModelNotFoundError(
            f"cannot download {repo_id!r}: HF_HUB_OFFLINE=1 forbids network access. {fix} "
            "Or unset HF_HUB_OFFLINE."
        )
    endpoint = constants.ENDPOINT
    if not _hub_reachable(endpoint):
        raise ModelNotFoundError(
            f"cannot download {repo_id!r}: the Hub ({endpoint}) cannot be reached from this "
            f"machine. {fix}"
        )
    try:
        files = select_files(HfApi().list_repo_files(repo_id), variant)
    except ModelNotFoundError as e:
        raise ModelNotFoundError(f"{repo_id}: {e}") from None
    except Exception as e:
        raise ModelNotFoundError(
            f"could not list the files of {repo_id!r} on {endpoint}: {e}"
        ) from e
    folder.mkdir(parents=True, exist_ok=True)
    if not progress:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    for rel in files:
        try:
            path = Path(hf_hub_download(repo_id, rel, local_dir=folder))
        except Exception as e:
            raise ModelNotFoundError(
                f"could not download {rel} of {repo_id!r}: {e}. Run the command again: it resumes."
            ) from e
        plain = _plain_name(rel)
        if plain is not None:
            _link(path, folder / plain)
    missing = missing_parts(folder)
    if missing:
        raise ModelNotFoundError(
            f"{folder} is incomplete after the download: missing {', '.join(missing)}"
        )
    return folder
