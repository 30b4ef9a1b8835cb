"""The Real-ESRGAN family's two networks in plain PyTorch (no torchvision, no basicsr), and which one a state
dict holds.

RRDBNet: ESRGAN's generator (Wang et al. 2018, https://arxiv.org/abs/1809.00219) as Real-ESRGAN trains it
(Wang et al. 2021, https://arxiv.org/abs/2107.10833); key names as BasicSR's `rrdbnet_arch.py`: conv_first,
body.N.rdb1..3.conv1..5, conv_body, conv_up1, conv_up2, conv_hr, conv_last. Native x4; the x2 and x1 nets
pixel-unshuffle their input by 2 / 4 first (conv_first then takes 12 / 48 channels).
SRVGGNetCompact: Real-ESRGAN's small net (`srvgg_arch.py`; realesr-general-x4v3, realesr-animevideov3):
body.0 conv, then PReLU + conv pairs, a pixel shuffle, plus the nearest-upsampled input.

`detect` reads the architecture, width, depth and native scale from the keys and shapes alone, and refuses
anything else with the first key that does not fit. Pure functions of the state dict; torch is imported here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

Arch = Literal["RRDBNet", "SRVGGNetCompact"]


class ArchError(ValueError):
    """The state dict is not one of the networks here; the message says what it holds instead."""


@dataclass(frozen=True)
class NetSpec:
    """What a state dict holds: the architecture and the numbers that build it."""

    arch: Arch
    scale: int  # native factor of one pass: 4, 2 or 1 (RRDBNet), 1..4 (SRVGGNetCompact)
    num_feat: int  # channels of the features (width)
    depth: int  # RRDBNet: num_block (RRDB blocks); SRVGGNetCompact: num_conv (body convolutions)
    num_grow_ch: int = 0  # RRDBNet only: channels each dense layer adds

    @property
    def description(self) -> str:
        if self.arch == "RRDBNet":
            return f"RRDBNet x{self.scale} (num_feat {self.num_feat}, num_block {self.depth}, num_grow_ch {self.num_grow_ch})"
        return f"SRVGGNetCompact x{self.scale} (num_feat {self.num_feat}, num_conv {self.depth})"


# ---- RRDBNet ---------------------------------------------------------------------------------------------


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convolutions, each seeing every earlier output (dense), the result scaled by 0.2 and added."""

    def __init__(self, num_feat: int, num_grow_ch: int) -> None:
        super().__init__()
        for i in range(1, 6):
            out = num_feat if i == 5 else num_grow_ch
            setattr(self, f"conv{i}", nn.Conv2d(num_feat + (i - 1) * num_grow_ch, out, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for i in range(1, 5):
            feats.append(F.leaky_relu(getattr(self, f"conv{i}")(torch.cat(feats, 1)), 0.2))
        return self.conv5(torch.cat(feats, 1)) * 0.2 + x


class RRDB(nn.Module):
    """Three dense blocks in a residual, scaled by 0.2 (the residual-in-residual of ESRGAN)."""

    def __init__(self, num_feat: int, num_grow_ch: int) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """B,3,H,W in [0,1] -> B,3,sH,sW (s = scale; H, W multiples of 4 // s for s < 4)."""

    def __init__(self, scale: int = 4, num_feat: int = 64, num_block: int = 23, num_grow_ch: int = 32) -> None:
        super().__init__()
        if scale not in (1, 2, 4):
            raise ValueError(f"RRDBNet's scale must be 1, 2 or 4; got {scale}")
        self.scale = scale
        self.unshuffle = 4 // scale  # x2: 3 -> 12 channels at half size, x1: 48 at a quarter
        self.conv_first = nn.Conv2d(3 * self.unshuffle**2, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, 3, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)  # B,3r²,H/r,W/r; channel = c*r*r + i*r + j, as BasicSR's
        feat = self.conv_first(x)  # B,F,h,w
        feat = feat + self.conv_body(self.body(feat))
        feat = F.leaky_relu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)  # B,F,2h,2w
        feat = F.leaky_relu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)  # B,F,4h,4w
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


# ---- SRVGGNetCompact -------------------------------------------------------------------------------------


class SRVGGNetCompact(nn.Module):
    """B,3,H,W -> B,3,sH,sW: convolutions with PReLU at the input's size, a pixel shuffle, plus the input
    upsampled by nearest (the net learns the residual)."""

    def __init__(self, scale: int = 4, num_feat: int = 64, num_conv: int = 16) -> None:
        super().__init__()
        self.scale = scale
        layers: list[nn.Module] = [nn.Conv2d(3, num_feat, 3, 1, 1), nn.PReLU(num_feat)]
        for _ in range(num_conv):
            layers += [nn.Conv2d(num_feat, num_feat, 3, 1, 1), nn.PReLU(num_feat)]
        layers.append(nn.Conv2d(num_feat, 3 * scale * scale, 3, 1, 1))
        self.body = nn.ModuleList(layers)  # keys body.0 .. body.{2 num_conv + 2}, as srvgg_arch.py

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        out = F.pixel_shuffle(out, self.scale)  # B,3s²,H,W -> B,3,sH,sW
        return out + F.interpolate(x, scale_factor=self.scale, mode="nearest")


# ---- which net a state dict holds ------------------------------------------------------------------------

_RRDB_KEY = re.compile(r"body\.(\d+)\.rdb[123]\.conv[1-5]\.(weight|bias)")
_SRVGG_KEY = re.compile(r"body\.(\d+)\.(weight|bias)")


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
    return tuple(sd[key].shape)


def detect(sd: Mapping[str, Any]) -> NetSpec:
    """The network `sd` (a state dict, wrappers removed) holds; ArchError naming what it is otherwise.
    Only keys and shapes are read; `build(spec)` then checks every key and shape exactly."""
    keys = list(sd)
    if not keys:
        raise ArchError("it holds no tensors")
    if "conv_first.weight" in sd:
        out, cin, kh, kw = _shape(sd, "conv_first.weight")
        scales = {3: 4, 12: 2, 48: 1}
        if cin not in scales or (kh, kw) != (3, 3):
            raise ArchError(f"conv_first.weight has shape {[out, cin, kh, kw]}: an RRDBNet takes 3 (x4), 12 (x2) or "
                            "48 (x1) input channels through a 3x3 convolution")
        blocks = {int(m.group(1)) for k in keys if (m := _RRDB_KEY.fullmatch(k))}
        if not blocks:
            raise ArchError("it has conv_first but no body.N.rdbM.convK blocks: not an RRDBNet")
        gap = min(set(range(max(blocks) + 1)) - blocks, default=None)
        if gap is not None:  # before any layer is built: one stray index must not claim a net of that depth
            raise ArchError(f"missing key 'body.{gap}.rdb1.conv1.weight' (its blocks go up to body.{max(blocks)}): "
                            "an RRDBNet's blocks are body.0, body.1, ... without a gap")
        grow = _shape(sd, "body.0.rdb1.conv1.weight")[0] if "body.0.rdb1.conv1.weight" in sd else 0
        return NetSpec("RRDBNet", scales[cin], out, max(blocks) + 1, grow)
    if "body.0.weight" in sd and all(_SRVGG_KEY.fullmatch(k) for k in keys):
        indices = sorted({int(_SRVGG_KEY.fullmatch(k).group(1)) for k in keys})  # type: ignore[union-attr]
        last = indices[-1]
        if "body.1.weight" not in sd or len(_shape(sd, "body.1.weight")) != 1:
            raise ArchError("an SRVGGNetCompact without PReLU activations (act_type relu or leakyrelu): only "
                            "act_type prelu (the published nets) is supported")
        gap = min(set(range(last + 1)) - set(indices), default=None)
        if gap is not None:  # before any layer is built: one stray index must not claim a net of that depth
            raise ArchError(f"missing key 'body.{gap}.weight' (its layers go up to body.{last}): an "
                            "SRVGGNetCompact's layers are body.0, body.1, ... without a gap")
        num_feat = _shape(sd, "body.0.weight")[0]
        out = _shape(sd, f"body.{last}.weight")[0]
        scale = math.isqrt(out // 3)
        if last % 2 or last < 2 or out % 3 or scale * scale * 3 != out:
            raise ArchError(f"body.{last}.weight has shape {list(_shape(sd, f'body.{last}.weight'))}: an SRVGGNetCompact "
                            "ends in a convolution to 3 x scale² channels at an even body index")
        return NetSpec("SRVGGNetCompact", scale, num_feat, (last - 2) // 2)
    if any(k.startswith("model.") for k in keys) and "model.0.weight" in sd:
        raise ArchError("an old-style ESRGAN file (keys model.0.weight, model.1.sub...): convert it to the RRDBNet "
                        "key layout of BasicSR / Real-ESRGAN (conv_first, body.N.rdb1...) first")
    sd_like = next((k for k in keys if k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.",
                                                      "down_blocks.", "up_blocks.", "lora_"))), None)
    if sd_like is not None:
        raise ArchError(f"a diffusion model's weights (key {sd_like!r}), not a Real-ESRGAN network")
    raise ArchError(f"not an RRDBNet or SRVGGNetCompact (first key {keys[0]!r}; expected conv_first.weight or body.0.weight)")


def build(spec: NetSpec) -> nn.Module:
    """The empty network of `spec` (float32, eval mode, no gradients)."""
    if spec.arch == "RRDBNet":
        net: nn.Module = RRDBNet(spec.scale, spec.num_feat, spec.depth, spec.num_grow_ch)
    else:
        net = SRVGGNetCompact(spec.scale, spec.num_feat, spec.depth)
    return net.eval().requires_grad_(False)


def load(sd: Mapping[str, Any], spec: NetSpec) -> nn.Module:
    """`build(spec)` with the weights of `sd`; ArchError naming the first missing, unexpected or misshapen key.
    Keys and shapes are checked against the net built on the meta device (no memory), so a file whose shapes
    claim a far wider net than its tensors hold is refused before that net is allocated."""
    with torch.device("meta"):
        own = build(spec).state_dict()
    unexpected = [k for k in sd if k not in own]
    if unexpected:
        raise ArchError(f"unexpected key {unexpected[0]!r} for {spec.description}"
                        + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    missing = [k for k in own if k not in sd]
    if missing:
        raise ArchError(f"missing key {missing[0]!r} for {spec.description}"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ArchError(f"{k} has shape {list(sd[k].shape)}; {spec.description} needs {list(v.shape)}")
    net = build(spec)  # the shapes match the file's tensors: as large as what was read, no larger
    net.load_state_dict({k: sd[k].to(torch.float32) for k in own}, strict=True)
    return net
