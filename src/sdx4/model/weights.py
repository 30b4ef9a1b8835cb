"""Reading safetensors weights straight into the target dtype, one tensor at a time.

`from_pretrained` memory-maps the whole fp32 file and converts it: while loading, the mapped fp32
pages and the converted copy are both resident (measured: diffusers' bf16 pipeline peaks at 93% of
its fp32 peak). Here each tensor is read with plain file reads into a buffer of its own size and
converted at once, so the peak is the converted model plus one tensor. The model object is built
with empty (meta) weights and the tensors are assigned, so no random initialisation happens either.

Used only where the file and the module agree (single-file safetensors, same key names, same shapes);
key names that differ both ways — legacy names that diffusers converts on load — and sharded files go
through `from_pretrained` (see loading.py), so correctness never depends on this shortcut.

A damaged file is a `ModelConfigError` naming the file and the first bad tensor, found from the header
before any tensor is read where possible: an empty or truncated file, a header that is not JSON, data
shorter than the header says, a tensor of the wrong shape or missing, non-finite values (NaN/inf).
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from pathlib import Path
from typing import Any

import torch

from .errors import ModelConfigError

log = logging.getLogger("sdx4")

#: safetensors dtype names -> torch dtypes.
ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
#: Tensors a file may hold that the module does not: position ids older transformers saved as a buffer.
_BENIGN_EXTRA = re.compile(r"(^|\.)position_ids$")


class WeightsMismatch(ValueError):
    """The file does not fit the module exactly (the caller falls back to from_pretrained)."""


def read_header(path: Path, label: str | None = None) -> tuple[dict[str, Any], int]:
    """The safetensors JSON header and the byte offset where tensor data starts, checked against the
    file's size (a ModelConfigError naming `label`, the file as the user knows it, when damaged)."""
    label = label or str(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelConfigError(
                f"{label}: {size} bytes, too short for a safetensors file (empty or truncated; copy or download it again)"
            )
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise ModelConfigError(
                f"{label}: the safetensors header says it is {n} bytes long but the file has {size} bytes "
                "(truncated, or not a safetensors file)"
            )
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise ModelConfigError(f"{label}: the safetensors header is not valid JSON ({e}); the file is damaged") from None
    if not isinstance(header, dict):
        raise ModelConfigError(f"{label}: the safetensors header is a {type(header).__name__}, expected a JSON object")
    header.pop("__metadata__", None)
    base = 8 + n
    for name, info in header.items():
        _check_entry(label, name, info, size - base)
    return header, base


def _check_entry(label: str, name: str, info: Any, data_size: int) -> None:
    """One header entry: a dtype, a shape, and offsets that lie in the file and fit the shape."""
    ok = isinstance(info, dict) and isinstance(info.get("shape"), list) and isinstance(info.get("data_offsets"), list)
    ok = ok and all(isinstance(d, int) and d >= 0 for d in info["shape"]) and len(info["data_offsets"]) == 2
    ok = ok and all(isinstance(o, int) for o in info["data_offsets"]) and 0 <= info["data_offsets"][0] <= info["data_offsets"][1]
    if not ok:
        raise ModelConfigError(
            f"{label}: header entry of tensor {name} is {info!r}; expected dtype, shape and data_offsets [begin, end]"
        )
    begin, end = info["data_offsets"]
    src = ST_DTYPES.get(info.get("dtype"))
    if src is not None:
        expected = math.prod(info["shape"]) * src.itemsize
        if end - begin != expected:
            raise ModelConfigError(
                f"{label}: tensor {name} has {end - begin} bytes of data but its shape {tuple(info['shape'])} in "
                f"{info['dtype']} needs {expected}; the file is damaged"
            )
    if end > data_size:
        raise ModelConfigError(
            f"{label}: truncated: tensor {name} ends at byte {end} of the data but the file holds only {data_size} "
            "bytes of data; copy or download it again"
        )


def check_finite(name: str, t: torch.Tensor, label: str, source: torch.Tensor | None = None) -> None:
    """Refuse NaN/inf in a floating tensor `t` (as converted; `source`, as read, tells an overflow of the
    conversion, e.g. beyond fp16's 65504, from damage). One pass over the converted bytes (half the fp32
    ones in bf16): the minimum and maximum, into which NaN propagates; bad values are counted only when
    there are some. Measured (2-core CPU): 0.11 s for the full-size model's 869 M values, fp32 or bf16."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    flat = t.permute(0, 2, 3, 1) if t.ndim == 4 and not t.is_contiguous() else t  # channels-last: a dense view
    lo, hi = (float(v) for v in torch.aminmax(flat.reshape(-1)))
    if math.isfinite(lo) and math.isfinite(hi):
        return
    bad = int((~torch.isfinite(t)).sum())
    if source is not None and source.dtype != t.dtype and bool(torch.isfinite(source).all()):
        raise ModelConfigError(
            f"{label}: tensor {name} has {bad} values beyond the range of {str(t.dtype).removeprefix('torch.')} "
            "(finite in the file); load this model in a wider precision (--dtype fp32)"
        )
    raise ModelConfigError(
        f"{label}: tensor {name} has {bad} non-finite values (NaN or inf) of {t.numel()}; the weights are damaged"
    )


def read_state_dict(
    path: Path,
    dtype: torch.dtype,
    channels_last: bool = False,
    label: str | None = None,
    names: set[str] | None = None,
    header: tuple[dict[str, Any], int] | None = None,
) -> dict[str, torch.Tensor]:
    """name -> tensor; floating-point tensors converted to `dtype` as they are read (and 4-D ones, the
    convolution kernels, laid out channels-last when asked: converting afterwards would need a copy).
    `names`: read only these tensors (the others are skipped). Each tensor is checked for NaN/inf once.

    Every tensor is read into ONE reusable buffer (as large as the largest tensor) and converted or
    copied out of it: peak memory is the result plus that buffer, with no allocator churn.
    """
    label = label or str(path)
    header_, base = header if header is not None else read_header(path, label)
    wanted = {k: v for k, v in header_.items() if names is None or k in names}
    sizes = [end - begin for begin, end in (info["data_offsets"] for info in wanted.values())]
    scratch = torch.empty(max(sizes, default=0), dtype=torch.uint8)
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb", buffering=0) as f:
        for name, info in wanted.items():
            src = ST_DTYPES.get(info["dtype"])
            if src is None:
                raise WeightsMismatch(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            shape = info["shape"]
            if end == begin:
                out[name] = torch.empty(shape, dtype=src)
                continue
            raw = scratch[: end - begin]
            f.seek(base + begin)
            if f.readinto(memoryview(raw.numpy())) != end - begin:
                raise ModelConfigError(f"{label}: truncated in tensor {name}; copy or download it again")
            t = raw.view(src).reshape(shape)  # a view of the scratch buffer
            target = dtype if t.is_floating_point() else src
            fmt = torch.channels_last if channels_last and t.ndim == 4 else torch.contiguous_format
            out[name] = t.to(target, memory_format=fmt, copy=True)  # always a copy: the scratch buffer is reused
            check_finite(name, out[name], label, source=t)  # NaN/inf, damage or an overflow of the conversion
    return out


#: Tensors smaller than this are read into memory instead of mapped: every memory map holds a file descriptor
#: while it lives, and a model has hundreds of small tensors (the service must not run out of descriptors).
SMALL_TENSOR_BYTES = 1 << 20


def map_tensors(path: Path, header: dict[str, Any], base: int) -> dict[str, torch.Tensor]:
    """name -> tensor, each in a private (copy-on-write) memory map of its own pages of `path`: nothing is read
    until used, nothing is copied, and a tensor's pages go back when it is freed. (One map of the whole file,
    as safetensors' load_file makes, lives while any tensor of it does: every page the speed tricks read
    while packing the UNet's weights would stay resident beside the packed copies.) `header`: read_header's."""
    import mmap

    grain = mmap.ALLOCATIONGRANULARITY
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        for name, info in header.items():
            src = ST_DTYPES.get(info["dtype"])
            if src is None:
                raise ValueError(f"tensor {name} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            if end == begin:
                out[name] = torch.empty(info["shape"], dtype=src)
                continue
            start = base + begin
            if end - begin < SMALL_TENSOR_BYTES:  # biases, norms: read, not mapped (each map holds a descriptor)
                f.seek(start)
                data = bytearray(f.read(end - begin))
                out[name] = torch.frombuffer(data, dtype=src).reshape(info["shape"])
                continue
            at = start // grain * grain  # maps start on the allocation grain
            view = mmap.mmap(f.fileno(), start + (end - begin) - at, access=mmap.ACCESS_COPY, offset=at)
            # frombuffer keeps the map alive as long as the tensor (it is unmapped when the tensor is freed)
            out[name] = torch.frombuffer(view, dtype=src, count=(end - begin) // src.itemsize, offset=start - at).reshape(info["shape"])
    return out


def check_against_module(
    module: torch.nn.Module, header: dict[str, Any], label: str, config_label: str, warn: bool = True
) -> set[str]:
    """Compare a file's header with a module built from its config, before any tensor is read; returns the
    names to read. The same name with another shape, or tensors missing (none renamed), is a
    ModelConfigError; names that differ both ways is a WeightsMismatch (legacy names: from_pretrained
    converts them); tensors the module does not have are skipped, with a warning."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    for name, shape in expected.items():
        if name in header and tuple(header[name]["shape"]) != shape:
            raise ModelConfigError(
                f"{label}: tensor {name} has shape {tuple(header[name]['shape'])} but {config_label} gives "
                f"{shape}: the weights and the config do not match"
            )
    missing = [k for k in expected if k not in header]
    unexpected = sorted(k for k in header if k not in expected)
    if missing and unexpected:
        raise WeightsMismatch(f"keys differ: missing {sorted(missing)[:3]}, unexpected {unexpected[:3]}")
    if missing:
        raise ModelConfigError(
            f"{label}: {len(missing)} tensors that {config_label} needs are missing, the first {missing[0]} "
            f"(shape {expected[missing[0]]}); the file is incomplete or belongs to another model"
        )
    extra = [k for k in unexpected if not _BENIGN_EXTRA.search(k)]
    if extra and warn:
        log.warning(
            "%s: ignoring %d tensors that %s does not use, the first %s", label, len(extra), config_label, extra[0]
        )
    return set(expected)


def assign_weights(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Put `state` into a module built with empty weights; every key and shape must match."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise WeightsMismatch(f"keys differ: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, t in expected.items():
        if tuple(t.shape) != tuple(state[name].shape):
            raise WeightsMismatch(f"{name}: shape {tuple(state[name].shape)} != {tuple(t.shape)}")
    module.load_state_dict(state, strict=True, assign=True)
    return module


def _stream(module: torch.nn.Module, weights: Path, dtype: torch.dtype, channels_last: bool, root: Path | None,
            cache: bool = False) -> Any:
    """Read `weights` into `module`; with `cache`, from the converted copy kept in the cache folder when there
    is a valid one (weight_cache.py: mapped, not read), else streamed and then kept there."""
    label, config_label = _label(weights, root), _label(weights.with_name("config.json"), root)
    header = read_header(weights, label)
    names = check_against_module(module, header[0], label, config_label)
    if cache:
        from . import weight_cache

        kept = weight_cache.read(weights, dtype, channels_last, read_header,
                                 lambda h, where: check_against_module(module, h, where, "the module", warn=False),
                                 map_tensors)
        if kept is not None:
            return assign_weights(module, {k: v for k, v in kept.items() if k in names})
    state = read_state_dict(weights, dtype, channels_last, label, names, header)
    if cache:
        weight_cache.write(weights, dtype, channels_last, state)
    return assign_weights(module, state)


def _label(path: Path, root: Path | None) -> str:
    """The file as the user knows it: relative to the model folder when that is known."""
    try:
        return str(path.relative_to(root)) if root is not None else str(path)
    except ValueError:
        return str(path)


def load_diffusers_model(
    cls: Any, folder: Path, dtype: torch.dtype, channels_last: bool = False, root: Path | None = None,
    empty: Any = None, cache: bool = False,
) -> Any:
    """A diffusers model (UNet2DConditionModel, AutoencoderKL) from `folder` in `dtype`; `root`, the model
    folder, names files in messages; `empty`: the model already built from its config with meta weights."""
    from accelerate import init_empty_weights

    weights = folder / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise WeightsMismatch(f"{weights}: no single safetensors file")
    read_header(weights, _label(weights, root))  # a damaged file is reported before the config is even built
    model = empty
    if model is None:
        with init_empty_weights():
            model = cls.from_config(cls.load_config(folder))
    return _stream(model, weights, dtype, channels_last, root, cache).eval()


def load_transformers_model(
    cls: Any, config_cls: Any, folder: Path, dtype: torch.dtype, root: Path | None = None, empty: Any = None,
    cache: bool = False,
) -> Any:
    """A transformers model (CLIPTextModel) from `folder` in `dtype`."""
    from accelerate import init_empty_weights

    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise WeightsMismatch(f"{weights}: no single safetensors file")
    read_header(weights, _label(weights, root))
    model = empty
    if model is None:
        with init_empty_weights():
            model = cls(config_cls.from_pretrained(folder))
    model = _stream(model, weights, dtype, False, root, cache)
    # Buffers built at construction (position ids) stay as they are; floating ones follow the dtype.
    for name, buf in model.named_buffers():
        if buf.is_floating_point() and buf.dtype != dtype:
            raise WeightsMismatch(f"buffer {name} is {buf.dtype}, expected {dtype}")
    return model.eval()
