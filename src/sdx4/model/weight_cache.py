"""Converted weights kept once per model and machine, mapped at later starts (the fast start).

Streaming a model's safetensors into the target dtype and layout (weights.py) reads and converts every
tensor at each start. The first start keeps the result: one safetensors file per component in the target
dtype, 4-D kernels stored in their channels-last (NHWC) order, under `<cache>/weights/` ($SDX4_CACHE or
~/.cache/sdx4). Later starts map that file, one private memory map per tensor (weights.map_tensors:
nothing is read until used, nothing is copied: a channels-last kernel is a permuted VIEW of the mapped
bytes; a tensor's pages go back when it is freed, e.g. once prepack has packed it) and assign the tensors
to the empty module, so the speed tricks (prepack) read them from the page cache.

An entry is keyed by what made it: the weight file (resolved path, size, modification time), its config,
the target dtype and layout, torch's and sdx4's versions. A changed model, torch or sdx4 makes a new entry.
Its sidecar `<digest>.json` records the key, the file's size and a hash of 64 blocks sampled across it,
and that every tensor was checked for NaN/inf when it was written (weights.read_state_dict checks each
tensor as it converts it): a truncated, resized or overwritten entry is found at the next start and
rebuilt; the module's shapes are compared with the entry's header as with the model's own file. Writes go
to a temporary file renamed into place (data first, then the sidecar), so concurrent starts never see
half a file. `SDX4_WEIGHT_CACHE=0` (or `LoadOptions(weight_cache=False)`, `--no-weight-cache`) turns it off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..cache import WEIGHTS_DIR, cache_root

log = logging.getLogger("sdx4")

ENV = "SDX4_WEIGHT_CACHE"
#: Sampled blocks of a cache file hashed into its sidecar: found damage costs 64 small reads, not a full pass.
SAMPLE_BLOCKS, SAMPLE_BYTES = 64, 4096
_NHWC_KEY = "sdx4_nhwc"


def enabled(requested: bool = True) -> bool:
    """Whether to use the weight cache: asked for, and not turned off by SDX4_WEIGHT_CACHE=0."""
    return requested and os.environ.get(ENV, "1").strip().lower() not in (
        "0",
        "false",
        "no",
        "off",
    )


def entry_key(weights: Path, dtype: torch.dtype, channels_last: bool) -> dict[str, Any]:
    """What an entry depends on (the sidecar keeps it, people read it in `sdx4 cache info`)."""
    from .._version import __version__

    src = weights.resolve()
    st = src.stat()
    config = weights.with_name("config.json")
    config_hash = (
        hashlib.sha256(config.read_bytes()).hexdigest()[:16] if config.is_file() else ""
    )
    return {
        "source": str(src),
        "source_size": st.st_size,
        "source_mtime_ns": st.st_mtime_ns,
        "config_sha256": config_hash,
        "dtype": str(dtype).removeprefix("torch."),
        "channels_last": channels_last,
        "torch": torch.__version__,
        "sdx4": __version__,
    }


def entry_paths(key: dict[str, Any]) -> tuple[Path, Path]:
    """(data file, sidecar) of an entry."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    folder = cache_root() / WEIGHTS_DIR
    return folder / f"{digest}.safetensors", folder / f"{digest}.json"


def sample_hash(path: Path, size: int | None = None) -> str:
    """sha256 of SAMPLE_BLOCKS blocks spread evenly over the file (its first and last bytes included)."""
    size = path.stat().st_size if size is None else size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb", buffering=0) as f:
        for i in range(SAMPLE_BLOCKS):
            f.seek(max(0, (size - SAMPLE_BYTES) * i // (SAMPLE_BLOCKS - 1)))
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def read(
    weights: Path,
    dtype: torch.dtype,
    channels_last: bool,
    read_header: Callable[[Path], tuple[dict[str, Any], int]],
    check_header: Callable[[dict[str, Any], str], object],
    map_tensors: Callable[[Path, dict[str, Any], int], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor] | None:
    """The kept state dict of `weights` in this dtype and layout, memory-mapped (None: no valid entry; a
    damaged one is removed, to be rebuilt). `read_header(path)` reads and checks a safetensors header against
    the file's size, `check_header(header, label)` compares its names and shapes with the module,
    `map_tensors(path, header, base)` maps each tensor (weights.py passes them: this module does not import it)."""
    from .errors import ModelConfigError

    key = entry_key(weights, dtype, channels_last)
    data, sidecar = entry_paths(key)
    if not sidecar.is_file() or not data.is_file():
        return None
    try:
        meta = json.loads(sidecar.read_text())
        size = data.stat().st_size
        if (
            not isinstance(meta, dict)
            or meta.get("key") != key
            or not meta.get("finite_checked")
        ):
            raise ValueError("its sidecar does not match this model")
        if meta.get("size") != size:
            raise ValueError(
                f"{size} bytes, {meta.get('size')} written (truncated or replaced)"
            )
        if meta.get("sample_sha256") != sample_hash(data, size):
            raise ValueError("its sampled hash differs from the one written (damaged)")
        header, base = read_header(data)  # lengths and offsets against the file's size
        nhwc = set(meta.get("nhwc", []))
        as_module = dict(header)
        for name in nhwc & set(header):
            n, h, w, c = header[name]["shape"]
            as_module[name] = {**header[name], "shape": [n, c, h, w]}
        check_header(as_module, str(data))  # names and shapes, as the model's own file
        state = map_tensors(
            data, header, base
        )  # mapped lazily: no byte is read or copied here
    except (OSError, ValueError, ModelConfigError) as e:
        log.warning("weight cache: rebuilding %s (%s)", data.name, e)
        remove_entry(data, sidecar)
        return None
    for name in nhwc:
        state[name] = state[name].permute(
            0, 3, 1, 2
        )  # N,H,W,C bytes -> an N,C,H,W channels-last view
    return state


def write(
    weights: Path,
    dtype: torch.dtype,
    channels_last: bool,
    state: dict[str, torch.Tensor],
) -> Path | None:
    """Keep `state` (already converted and checked for NaN/inf by read_state_dict) as an entry; atomic.
    Returns the data file, or None when it could not be written (a read-only or full disk: a warning)."""
    from safetensors.torch import save_file

    key = entry_key(weights, dtype, channels_last)
    data, sidecar = entry_paths(key)
    tensors, nhwc = {}, []
    for name, t in state.items():
        if (
            t.ndim == 4
            and not t.is_contiguous()
            and t.is_contiguous(memory_format=torch.channels_last)
        ):
            tensors[name] = t.permute(
                0, 2, 3, 1
            )  # contiguous NHWC: the same bytes, no copy
            nhwc.append(name)
        else:
            tensors[name] = t.contiguous()
    import threading

    unique = f"{os.getpid()}.{threading.get_ident()}"  # concurrent writers (processes or threads) never share one
    tmp_data = data.with_name(f".{data.name}.{unique}.tmp")
    tmp_side = sidecar.with_name(f".{sidecar.name}.{unique}.tmp")
    try:
        data.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, tmp_data, metadata={_NHWC_KEY: json.dumps(nhwc)})
        size = tmp_data.stat().st_size
        side = {
            "key": key,
            "size": size,
            "sample_sha256": sample_hash(tmp_data, size),
            "finite_checked": True,
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "tensors": len(tensors),
            "nhwc": nhwc,
        }
        tmp_side.write_text(json.dumps(side, indent=1))
        os.replace(tmp_data, data)
        os.replace(tmp_side, sidecar)
        return data
    except OSError as e:
        log.warning("weight cache: could not keep %s: %s", weights, e)
        for p in (tmp_data, tmp_side):
            p.unlink(missing_ok=True)
        return None


def remove_entry(data: Path, sidecar: Path) -> None:
    for p in (sidecar, data):
        try:
            p.unlink(missing_ok=True)
        except OSError as e:
            log.warning("weight cache: could not remove %s: %s", p, e)
