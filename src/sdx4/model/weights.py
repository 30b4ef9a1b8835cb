"""Reading safetensors weights straight into the target dtype, one tensor at a time.

`from_pretrained` memory-maps the whole fp32 file and converts it: while loading, the mapped fp32
pages and the converted copy are both resident (measured: diffusers' bf16 pipeline peaks at 93% of
its fp32 peak). Here each tensor is read with plain file reads into a buffer of its own size and
converted at once, so the peak is the converted model plus one tensor. The model object is built
with empty (meta) weights and the tensors are assigned, so no random initialisation happens either.

Used only where the file and the module agree exactly (single-file safetensors, same key names,
same shapes); anything else — sharded files, legacy key names that diffusers converts on load — goes
through `from_pretrained` (see models.py), so correctness never depends on this shortcut.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch

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


class WeightsMismatch(ValueError):
    """The file does not fit the module exactly (the caller falls back to from_pretrained)."""


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The safetensors JSON header and the byte offset where tensor data starts."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100_000_000:
            raise WeightsMismatch(f"{path}: implausible safetensors header size {n}")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def read_state_dict(path: Path, dtype: torch.dtype, channels_last: bool = False) -> dict[str, torch.Tensor]:
    """name -> tensor; floating-point tensors converted to `dtype` as they are read (and 4-D ones, the
    convolution kernels, laid out channels-last when asked: converting afterwards would need a copy).

    Every tensor is read into ONE reusable buffer (as large as the largest tensor) and converted or
    copied out of it: peak memory is the result plus that buffer, with no allocator churn.
    """
    header, base = read_header(path)
    sizes = [end - begin for begin, end in (info["data_offsets"] for info in header.values())]
    scratch = torch.empty(max(sizes, default=0), dtype=torch.uint8)
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb", buffering=0) as f:
        for name, info in header.items():
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
                raise WeightsMismatch(f"{path}: file is truncated in tensor {name}")
            t = raw.view(src).reshape(shape)  # a view of the scratch buffer
            target = dtype if t.is_floating_point() else src
            fmt = torch.channels_last if channels_last and t.ndim == 4 else torch.contiguous_format
            out[name] = t.to(target, memory_format=fmt, copy=True)  # always a copy: the scratch buffer is reused
    return out


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


def load_diffusers_model(cls: Any, folder: Path, dtype: torch.dtype, channels_last: bool = False) -> Any:
    """A diffusers model (UNet2DConditionModel, AutoencoderKL) from `folder` in `dtype`."""
    from accelerate import init_empty_weights

    weights = folder / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise WeightsMismatch(f"{weights}: no single safetensors file")
    with init_empty_weights():
        model = cls.from_config(cls.load_config(folder))
    return assign_weights(model, read_state_dict(weights, dtype, channels_last)).eval()


def load_transformers_model(cls: Any, config_cls: Any, folder: Path, dtype: torch.dtype) -> Any:
    """A transformers model (CLIPTextModel) from `folder` in `dtype`."""
    from accelerate import init_empty_weights

    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise WeightsMismatch(f"{weights}: no single safetensors file")
    config = config_cls.from_pretrained(folder)
    with init_empty_weights():
        model = cls(config)
    model = assign_weights(model, read_state_dict(weights, dtype))
    # Buffers built at construction (position ids) stay as they are; floating ones follow the dtype.
    for name, buf in model.named_buffers():
        if buf.is_floating_point() and buf.dtype != dtype:
            raise WeightsMismatch(f"buffer {name} is {buf.dtype}, expected {dtype}")
    return model.eval()
