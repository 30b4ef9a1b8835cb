"""The embeddings of the prompts known at load, kept in the cache folder beside the converted weights.

`sdx4.load` encodes the prompts it is given (the command line's --prompt and --negative-prompt, by default
both empty) before the UNet loads. A later start with the same model and prompts reads their embeddings
(1 x 77 x 1024 values: a few hundred KB) from `<cache>/prompts/` instead of loading the text encoder and
running it (on a 2-core CPU about half a second, and the encoder's memory). The embeddings are stored exactly
as the in-process cache holds them (the encoder's output in the UNet's dtype), so a start that reads them
gives the same images bit for bit (tested).

Only the prompts given to `load` are kept: the prompts of a server's jobs or of later calls are never written
to disk, and a file holds no prompt text, only a hash of it. An entry is keyed by what made it: the text
encoder's weight file (resolved path, size, modification time), its config, the dtypes, torch's and sdx4's
versions (as the weight cache's entries, weight_cache.entry_key), the tokenizer's files, the device type and
the prompt. Only for a model folder read through the weight cache (the same switch turns both off:
SDX4_WEIGHT_CACHE=0, `--no-weight-cache`); `sdx4 cache clear --weights` removes both. An entry that does not
match its key, its shape or holds NaN/inf is ignored and replaced; writes go to a temporary file renamed into
place; a read-only or full disk is a warning, never an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
from pathlib import Path
from typing import Any

import torch

from ..cache import PROMPTS_DIR, cache_root

log = logging.getLogger("sdx4")

_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")
_TENSOR = "embeds"
_TIMINGS = ("encoder_load_s", "encode_s")


def entry_key(components: Any, prompt: str) -> dict[str, Any] | None:
    """What an entry depends on, or None when embeddings are not kept for this model (not a model folder, the
    weight cache off, or no single text-encoder safetensors file)."""
    from ..model.weight_cache import entry_key as weights_key

    folder = getattr(components, "folder", None)
    if folder is None or not getattr(components, "weight_cache", False):
        return None
    weights = Path(folder) / "text_encoder" / "model.safetensors"
    if not weights.is_file():
        return None
    placement = components.placement
    tokenizer = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        path = Path(folder) / "tokenizer" / name
        if path.is_file():
            tokenizer.update(name.encode() + b"\0" + path.read_bytes())
    return {
        **weights_key(weights, placement.text_dtype, False),
        "stored_dtype": str(placement.unet_dtype).removeprefix("torch."),
        "device": placement.device.type,
        "tokenizer_sha256": tokenizer.hexdigest()[:16],
        "prompt_sha256": hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest(),
    }


def entry_path(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_root() / PROMPTS_DIR / f"{digest}.safetensors"


def read(components: Any, prompt: str) -> tuple[torch.Tensor, dict[str, float]] | None:
    """The kept embedding of `prompt` for this model (1 x 77 x D, the UNet's dtype) and the text encoder's
    timings measured when it was written ({"encoder_load_s", "encode_s"}: what a new prompt will cost, for
    the estimates), or None (not kept, not keepable, or an entry that does not hold up: removed, to be
    written again)."""
    key = entry_key(components, prompt)
    if key is None:
        return None
    path = entry_path(key)
    if not path.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if json.loads(meta.get("key", "null")) != key:
                raise ValueError("its key does not match this model and prompt")
            embeds = f.get_tensor(_TENSOR)
            timing = json.loads(meta.get("timing", "{}"))
        tokens = components.tokenizer.model_max_length  # the width is keyed by the encoder's config
        if (embeds.ndim != 3 or embeds.shape[:2] != (1, tokens)
                or str(embeds.dtype).removeprefix("torch.") != key["stored_dtype"]):
            raise ValueError(f"a {embeds.dtype} tensor of shape {tuple(embeds.shape)}")
        if not torch.isfinite(embeds).all():
            raise ValueError("NaN or inf values")
        if not isinstance(timing, dict):
            raise ValueError("its timing is not a mapping")
        timing = {k: float(v) for k, v in timing.items()
                  if k in _TIMINGS and isinstance(v, (int, float)) and math.isfinite(v) and v >= 0}
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        log.warning("prompt cache: ignoring %s (%s)", path.name, e)
        try:
            path.unlink(missing_ok=True)
        except OSError as gone:  # a read-only cache folder: the entry stays ignored, the start goes on
            log.warning("prompt cache: could not remove %s: %s", path.name, gone)
        return None
    return embeds.to(components.placement.device), timing


def write(components: Any, prompt: str, embeds: torch.Tensor, timing: dict[str, float | None] | None = None) -> Path | None:
    """Keep `embeds` (what the in-process cache holds for `prompt`) and the encoder's `timing` ({"encoder_load_s",
    "encode_s"}, the known ones); the file, or None when not kept."""
    key = entry_key(components, prompt)
    if key is None or not torch.isfinite(embeds).all():
        return None
    from safetensors.torch import save_file

    path = entry_path(key)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        known = {k: v for k, v in (timing or {}).items() if k in _TIMINGS and v is not None}
        save_file({_TENSOR: embeds.detach().to("cpu").contiguous()}, tmp,
                  metadata={"key": json.dumps(key), "timing": json.dumps(known)})
        os.replace(tmp, path)
        return path
    except OSError as e:
        log.warning("prompt cache: could not keep an embedding: %s", e)
        tmp.unlink(missing_ok=True)
        return None
