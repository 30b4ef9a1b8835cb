"""The UNet's convolution and linear weights packed once into oneDNN's layout, on a CPU.

Eager PyTorch hands oneDNN a plain weight on every convolution and linear call, and oneDNN reorders it
into its blocked layout each time: the whole UNet's weights (1.9 GB in fp32) are read and rewritten on
every step. Where the activations are small (the UNet's deep levels: 1024 channels at 8x8 for a 64 px
input) that copy costs as much as the arithmetic. `install(unet)` makes each Conv2d and Linear pack its
weight once, on its first call (a convolution for the input shape of that call: the layout oneDNN picks
depends on it), and then run `torch.ops.mkldnn._convolution_pointwise` / `_linear_pointwise` on the
packed weight, the ops torch.compile's CPU freezing pass emits. The packed weight replaces the plain one
(a non-persistent buffer named `weight`), so nothing is held twice.

Values: on the UNet's shapes, convolutions and bf16 linear layers run the oneDNN kernels eager PyTorch
runs, bit for bit (the full-size bf16 UNet's output is identical). Eager PyTorch runs fp32 linear layers
through MKL's sgemm (and tiny layers of either kind through other kernels); those differ in float rounding
only (fp32: ~3e-6 on the full-size UNet's output of magnitude ~1).

When a convolution is then called with another input shape on two calls in a row (a new image size), it
repacks for that shape; shapes that alternate call by call keep the first packing (oneDNN reorders it on
the fly: the same values, more slowly). Linear layers are packed for no particular row count and never
repacked: their values would otherwise depend on the shapes run before (see `_packed_weight`).
Convolutions other than zero-padded ones with numeric padding, dtypes other than fp32/bf16, and devices
other than the CPU are left to eager PyTorch. `SDX4_PREPACK=0` turns it off (for measuring).

`uninstall(model)` gives each layer its plain weight back, unpacked from the packed one (`to_dense`: the
reorder only moves values, so they come back bit for bit), as a parameter in the memory format and place
it had, and drops the forward installed here. Nothing is kept to do so but the weight's strides and the
layer's parameter order (`_sdx4_plain`): no second copy of any weight is ever resident. While unpacking,
one layer at a time holds its packed weight, a dense copy and the copy in its own strides: at most the
largest layer's weight twice more, 59 MB in the full-size fp32 UNet (1280 x 1280 x 3 x 3), against
1.9 GB for a kept copy of every weight.
"""

from __future__ import annotations

import os
import types
from typing import Any

import torch

DTYPES = (torch.float32, torch.bfloat16)
ENV = "SDX4_PREPACK"


def available() -> bool:
    """oneDNN is in this torch build and has the packed ops."""
    ops = torch.ops.mkldnn
    return bool(torch.backends.mkldnn.is_available()) and all(
        hasattr(ops, n) for n in ("_convolution_pointwise", "_linear_pointwise", "_reorder_linear_weight")
    )


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def packable(module: torch.nn.Module) -> bool:
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.device.type != "cpu" or w.dtype not in DTYPES or w.is_mkldnn:
        return False
    if type(module) is torch.nn.Linear:
        return True
    if type(module) is torch.nn.Conv2d:
        return module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return False


def install(model: torch.nn.Module) -> int:
    """Let every packable Conv2d and Linear of `model` pack its weight on first use; returns how many. A layer
    with a forward of its own already (this module's, or another wrapper) is left alone."""
    if not (available() and enabled()):
        return 0
    modules = [m for m in model.modules() if packable(m) and "forward" not in vars(m)]
    for m in modules:
        m._sdx4_plain = (m.weight.stride(), m.weight.requires_grad, tuple(m._parameters))  # no tensor
        m._sdx4_packed_for = None  # conv: the input shape it is packed for; linear: its first call's (None: plain)
        m._sdx4_next_shape = None  # a new shape seen once: repack if the next call has it too
        m.forward = types.MethodType(_conv_forward if isinstance(m, torch.nn.Conv2d) else _linear_forward, m)
    return len(modules)


def installed(model: torch.nn.Module) -> int:
    """How many layers of `model` run through this module (packed already or on their next call)."""
    return sum(hasattr(m, "_sdx4_packed_for") for m in model.modules())


def uninstall(model: torch.nn.Module) -> int:
    """Give every layer `install` changed its plain weight parameter and nn.Conv2d's / nn.Linear's own forward
    back (module docstring); returns how many layers."""
    modules = [m for m in model.modules() if hasattr(m, "_sdx4_plain")]
    for m in modules:
        strides, requires_grad, order = m._sdx4_plain
        if "weight" in m._buffers:  # packed: unpack, then drop the packed buffer before the next layer
            dense = m._buffers.pop("weight").to_dense()
            plain = torch.empty_strided(dense.shape, strides, dtype=dense.dtype).copy_(dense)  # its layout as loaded
            del dense
            m.register_parameter("weight", torch.nn.Parameter(plain, requires_grad=requires_grad))
            params = dict(m._parameters)  # weight first again, as nn.Conv2d / nn.Linear register it
            m._parameters.clear()
            m._parameters.update((name, params[name]) for name in order)
        for name in ("forward", "_sdx4_plain", "_sdx4_packed_for", "_sdx4_next_shape"):
            delattr(m, name)
    return len(modules)


def _pack(module: Any, shape: tuple[int, ...]) -> None:
    w = module.weight
    dense = w.to_dense() if w.is_mkldnn else w.detach()
    if isinstance(module, torch.nn.Conv2d):
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
            dense.to_mkldnn(), list(module.padding), list(module.stride), list(module.dilation), module.groups, list(shape)
        )
    else:  # for no particular row count: see _packed_weight
        packed = torch.ops.mkldnn._reorder_linear_weight(dense, None)
    del dense, w
    if "weight" in module._parameters:
        del module._parameters["weight"]
    module.register_buffer("weight", packed, persistent=False)
    module._sdx4_packed_for, module._sdx4_next_shape = shape, None


def _packed_weight(module: Any, x: torch.Tensor) -> torch.Tensor | None:
    """The packed weight to run `x` with, packing or repacking first where due; None: run eagerly."""
    if x.dtype != module.weight.dtype or x.device.type != "cpu" or torch.is_grad_enabled() and x.requires_grad:
        return None
    shape = tuple(x.shape)
    if isinstance(module, torch.nn.Linear):
        # Packed once, for any row count: a linear layer packed for one row runs another kernel than one
        # packed for many (values differ in rounding), so packing by shape would make an image depend on
        # the shapes run before it. A convolution's values do not depend on its packing (tested).
        if module._sdx4_packed_for is None:
            _pack(module, shape)
        return module.weight
    if module._sdx4_packed_for is None or (shape != module._sdx4_packed_for and shape == module._sdx4_next_shape):
        _pack(module, shape)
    elif shape != module._sdx4_packed_for:
        module._sdx4_next_shape = shape
    else:
        module._sdx4_next_shape = None
    return module.weight


def _dense(module: Any) -> torch.Tensor:
    w = module.weight
    return w.to_dense() if w.is_mkldnn else w


def _conv_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    w = _packed_weight(self, x) if x.dim() == 4 else None
    if w is None:
        return self._conv_forward(x, _dense(self), self.bias)
    return torch.ops.mkldnn._convolution_pointwise(
        x, w, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups, "none", [], ""
    )


def _linear_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    w = _packed_weight(self, x) if x.dim() >= 2 else None
    if w is None:
        return torch.nn.functional.linear(x, _dense(self), self.bias)
    return torch.ops.mkldnn._linear_pointwise(x, w, self.bias, "none", [], "")
