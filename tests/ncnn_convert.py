"""Test helper: an ncnn Real-ESRGAN model (.param + .bin) -> a PyTorch state dict with the published key names.

Used to check sdx4's torch RRDBNet / SRVGGNetCompact against the ncnn method with the same real weights.

.param: line 1 the magic 7767517, line 2 the layer and blob counts, then one layer a line:
  `Type Name n_in n_out in... out... k=v ...` (Convolution: 0=num_output 1=kernel 5=bias_term
  6=weight_data_size; PReLU: 0=num_slope).
.bin: the layers' data in .param order. A Convolution's weight (out, in, k, k) starts with a 4-byte tag:
  0 = raw fp32, 0x01306B47 = fp16 (padded to 4 bytes); its bias follows as raw fp32 (no tag). A PReLU's
  slopes are raw fp32. The other layers here (Split, Concat, Eltwise, BinaryOp, Interp, PixelShuffle) hold
  no data.
Key names follow BasicSR / Real-ESRGAN's files, written out here rather than taken from sdx4's modules, so
the conversion does not lean on the code it checks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

FP16_TAG = 0x01306B47
NO_DATA = {"Input", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "PixelShuffle", "Crop"}


def read_param(path: Path) -> list[tuple[str, str, dict[str, str]]]:
    """(type, name, {key: value}) per layer."""
    lines = path.read_text().split("\n")
    if lines[0].strip() != "7767517":
        raise ValueError(f"{path}: not an ncnn .param file (magic {lines[0]!r})")
    n_layers = int(lines[1].split()[0])
    layers = []
    for line in lines[2 : 2 + n_layers]:
        parts = line.split()
        kind, name, n_in, n_out = parts[0], parts[1], int(parts[2]), int(parts[3])
        params = dict(p.split("=", 1) for p in parts[4 + n_in + n_out :])
        layers.append((kind, name, params))
    return layers


def read_tensors(param: Path, weights: Path) -> list[tuple[str, list[np.ndarray]]]:
    """("conv", [weight, bias]) / ("prelu", [slopes]) in .param order, as float32 arrays."""
    data = weights.read_bytes()
    pos = 0

    def raw(count: int) -> np.ndarray:
        nonlocal pos
        out = np.frombuffer(data, "<f4", count, pos).copy()
        pos += 4 * count
        return out

    out: list[tuple[str, list[np.ndarray]]] = []
    for kind, name, p in read_param(param):
        if kind == "Convolution":
            n_out, k, size = int(p["0"]), int(p.get("1", "1")), int(p["6"])
            tag = int.from_bytes(data[pos : pos + 4], "little")
            pos += 4
            if tag == FP16_TAG:
                w = np.frombuffer(data, "<f2", size, pos).astype(np.float32)
                pos += (2 * size + 3) // 4 * 4
            elif tag == 0:
                w = raw(size)
            else:
                raise ValueError(f"{name}: weight tag {tag:#x} (quantized?) is not read here")
            w = w.reshape(n_out, size // (n_out * k * k), k, k)
            b = raw(n_out) if p.get("5", "0") == "1" else np.zeros(n_out, np.float32)
            out.append(("conv", [w, b]))
        elif kind == "PReLU":
            out.append(("prelu", [raw(int(p["0"]))]))
        elif kind not in NO_DATA:
            raise ValueError(f"{name}: layer type {kind} is not read here")
    if pos != len(data):
        raise ValueError(f"{weights}: {len(data) - pos} bytes left over after the last layer")
    return out


def rrdbnet_keys(n_convs: int) -> list[str]:
    """conv_first, body.N.rdb1..3.conv1..5, conv_body, conv_up1, conv_up2, conv_hr, conv_last."""
    blocks, rest = divmod(n_convs - 6, 15)
    if rest:
        raise ValueError(f"{n_convs} convolutions is not 6 + 15 x blocks")
    body = [f"body.{i}.rdb{j}.conv{k}" for i in range(blocks) for j in (1, 2, 3) for k in range(1, 6)]
    return ["conv_first", *body, "conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"]


def ncnn_to_state_dict(param: Path, weights: Path) -> dict[str, torch.Tensor]:
    """The ncnn model's weights under Real-ESRGAN's key names (RRDBNet without PReLU, SRVGGNetCompact with)."""
    layers = read_tensors(param, weights)
    sd: dict[str, torch.Tensor] = {}
    if any(kind == "prelu" for kind, _ in layers):  # SRVGGNetCompact: body.0 conv, body.1 prelu, ...
        for i, (kind, arrays) in enumerate(layers):
            if kind == "conv":
                sd[f"body.{i}.weight"], sd[f"body.{i}.bias"] = (torch.from_numpy(a) for a in arrays)
            else:
                sd[f"body.{i}.weight"] = torch.from_numpy(arrays[0])
        return sd
    for key, (_, (w, b)) in zip(rrdbnet_keys(len(layers)), layers, strict=True):
        sd[f"{key}.weight"], sd[f"{key}.bias"] = torch.from_numpy(w), torch.from_numpy(b)
    return sd
