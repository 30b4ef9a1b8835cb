"""Finding the model folder: a local folder in diffusers layout, or a Hub id fetched through the Hugging Face
cache (only the files the x4 upscaler needs). No torch here.

The local-path rule (`looks_like_path`) lives here and nowhere else.
"""

from __future__ import annotations

import logging
import re
import socket
import urllib.parse
from pathlib import Path

from ..options import DEFAULT_MODEL
from .errors import ModelNotFoundError, ModelPathError

log = logging.getLogger("sdx4")

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "low_res_scheduler")
#: What to fetch from the Hub: configs, tokenizer files and safetensors weights, nothing else
#: (the repo also holds multi-GB .ckpt / .bin copies we never need).
HUB_ALLOW_PATTERNS = [
    "model_index.json",
    "*/config.json",
    "*/scheduler_config.json",
    "tokenizer/*",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def missing_parts(folder: Path) -> list[str]:
    missing = [c for c in COMPONENTS if not (folder / c).is_dir()]
    for comp, files in (
        ("unet", ("config.json",)),
        ("vae", ("config.json",)),
        ("text_encoder", ("config.json",)),
        ("scheduler", ("scheduler_config.json",)),
        ("low_res_scheduler", ("scheduler_config.json",)),
    ):
        if comp not in missing:
            missing += [f"{comp}/{f}" for f in files if not (folder / comp / f).is_file()]
    for comp in ("unet", "vae", "text_encoder"):
        d = folder / comp
        if d.is_dir() and not any(p.suffix in (".safetensors", ".bin") for p in d.iterdir()):
            missing.append(f"{comp}/<weights>.safetensors")
    return missing


def looks_like_path(model: str) -> bool:
    """`./x`, `/x`, `~/x`, `a/b/c`, `C:\\x` are paths; `org/name` is a Hub id unless such a folder exists."""
    return model.startswith((".", "/", "~")) or "\\" in model or model.count("/") != 1


def resolve_model_dir(model: str = DEFAULT_MODEL) -> Path:
    """A local folder in diffusers layout for `model` (a path, or a Hub id fetched via the HF cache)."""
    if not isinstance(model, str) or not model.strip():
        raise ModelNotFoundError(f"model must be a Hub id like {DEFAULT_MODEL!r} or a folder path; got {model!r}")
    local = Path(model).expanduser()
    if local.exists() or looks_like_path(model) or not _HUB_ID.match(model):
        if not local.exists():
            raise ModelPathError(
                f"model folder {model!r} does not exist. Pass --model PATH to a folder in diffusers layout "
                f"(with {', '.join(COMPONENTS)}), or a Hub id such as {DEFAULT_MODEL!r}."
            )
        if not local.is_dir():
            raise ModelPathError(
                f"model {model!r} is a file; --model needs a folder in diffusers layout or a single-file checkpoint "
                "(.safetensors or .ckpt)"
            )
        missing = missing_parts(local)
        if missing:
            raise ModelPathError(
                f"model folder {model!r} is not in diffusers layout: missing {', '.join(missing)}"
            )
        return local
    return _hub_snapshot(model)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """A quick TCP connect to the Hub endpoint, so a machine without network fails in seconds."""
    url = urllib.parse.urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download

    cache = constants.HF_HUB_CACHE
    fix = (
        "Fix: connect this machine to the Hub once so the model is cached, or download it elsewhere and "
        "pass --model PATH to the local folder (diffusers layout)."
    )
    # 1. The cache first: no network needed when the model is already there.
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS, local_files_only=True))
        if not missing_parts(folder):
            return folder
    except Exception as e:  # LocalEntryNotFoundError and friends: not (fully) cached
        log.debug("not in the cache: %s", e)
    if _hub_offline():
        raise ModelNotFoundError(
            f"model {repo_id!r} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE=1 forbids "
            f"downloading it. {fix} Or unset HF_HUB_OFFLINE to download it."
        )
    endpoint = constants.ENDPOINT
    if not _hub_reachable(endpoint):
        raise ModelNotFoundError(
            f"model {repo_id!r} is not in the Hugging Face cache ({cache}) and the Hub ({endpoint}) cannot be "
            f"reached from this machine. {fix} Set HF_HUB_OFFLINE=1 to skip network look-ups."
        )
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS))
    except Exception as e:
        raise ModelNotFoundError(f"could not download model {repo_id!r} from {endpoint}: {e}. {fix}") from e
    missing = missing_parts(folder)
    if missing:
        raise ModelPathError(f"Hub repo {repo_id!r} is not a diffusers x4 upscaler: missing {', '.join(missing)}")
    return folder


