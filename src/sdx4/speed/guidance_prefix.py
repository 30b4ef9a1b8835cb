"""Classifier-free guidance without computing the shared part of the UNet twice.

With guidance the UNet runs on pairs: the same latents, timestep and noise level, once with the negative
and once with the positive prompt. The text enters at the first cross-attention; everything before it
(the down blocks without cross-attention, here the first one at full resolution with its downsampler,
and the first resnet of the next block) sees identical inputs in both halves of a pair. `shared(...)`
runs those modules on one half and copies the result: 28 of the 287 GFLOP per sample of the full-size
x4 UNet (~5% of a guided step), the same values up to the last bits of batch-size-dependent kernels.

When the memory plan runs each half of a pair as its own UNet call (`unet_batch`), the first call
records the prefix's outputs (`recording`) and the second replays them (`replaying`) instead.

The wrappers are installed once per UNet (`install`; `uninstall` takes them off) and do nothing unless a
call is inside one of these contexts, which the pipeline enters only after checking that the halves
really are equal (thread-local, so concurrent calls of other threads are unaffected).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch

_active = threading.local()  # .mode: ("pairs", pairs, half) | ("record", list) | ("replay", iterator) | None


def prefix_modules(unet: Any) -> list[Any]:
    """The modules whose inputs are equal across a guidance pair: the leading down blocks without
    cross-attention, then the first resnet of the first block with it (which runs before its attention)."""
    mods: list[Any] = []
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            if getattr(block, "resnets", None):
                mods.append(block.resnets[0])
            break
        mods.append(block)
    return mods


def install(unet: Any) -> int:
    """Wrap the UNet's prefix modules (idempotent); returns how many are wrapped."""
    mods = prefix_modules(unet)
    for m in mods:
        if getattr(m, "_sdx4_prefix", False):
            continue
        own = vars(m).get("forward")  # a forward set on the instance before ours (None: the class's)
        m.forward = _wrap(m.forward)
        m._sdx4_prefix = (own,)  # truthy: installed
    return len(mods)


def uninstall(unet: Any) -> int:
    """Unwrap what `install` wrapped: each module's forward is what it was before; returns how many."""
    mods = [m for m in unet.modules() if "_sdx4_prefix" in vars(m)]
    for m in mods:
        (own,) = m._sdx4_prefix
        del m._sdx4_prefix
        if own is None:
            del m.forward
        else:
            m.forward = own
    return len(mods)


def _wrap(forward: Any) -> Any:
    def run(hidden_states: torch.Tensor, temb: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        mode = getattr(_active, "mode", None)
        if mode is None:
            return forward(hidden_states, temb, *args, **kwargs)
        if mode[0] == "replay":
            out = next(mode[1], None)
            if out is None:
                raise RuntimeError("guidance_prefix: replaying more prefix calls than were recorded")
            return out
        if mode[0] == "record":
            out = forward(hidden_states, temb, *args, **kwargs)
            mode[1].append(out)
            return out
        _, pairs, half = mode
        out = forward(_pick(hidden_states, pairs, half), None if temb is None else _pick(temb, pairs, half), *args, **kwargs)
        return _expand(out, pairs, half)

    return run


def _pick(x: torch.Tensor, pairs: int, half: int) -> torch.Tensor:
    """The first half of every pair: B = pairs * 2 * half samples -> pairs * half (layout kept)."""
    if pairs == 1:
        return x[:half]
    return torch.cat([x[p * 2 * half : p * 2 * half + half] for p in range(pairs)])


def _expand(out: Any, pairs: int, half: int) -> Any:
    """Back to the full batch: each pair's half twice (tensors, and tuples of them, as the modules return)."""
    if isinstance(out, tuple):
        return tuple(_expand(o, pairs, half) for o in out)
    parts = [out[p * half : (p + 1) * half] for p in range(pairs)]
    return torch.cat([t for part in parts for t in (part, part)])


def pairs_equal(x: torch.Tensor, labels: torch.Tensor, half: int) -> bool:
    """True when batch x (B,C,h,w; B = pairs * 2 * half) and its labels repeat within every pair."""
    b = x.shape[0]
    if half < 1 or b % (2 * half) or labels.shape[0] != b:
        return False
    xs, ls = x.unflatten(0, (b // (2 * half), 2, half)), labels.unflatten(0, (b // (2 * half), 2, half))
    return bool(torch.equal(xs[:, 0], xs[:, 1]) and torch.equal(ls[:, 0], ls[:, 1]))


@contextlib.contextmanager
def _mode(mode: tuple[Any, ...]) -> Iterator[None]:
    previous = getattr(_active, "mode", None)
    _active.mode = mode
    try:
        yield
    finally:
        _active.mode = previous


def shared(pairs: int, half: int) -> contextlib.AbstractContextManager[None]:
    """UNet calls in this thread compute the prefix once per pair (the caller checked `pairs_equal`)."""
    return _mode(("pairs", pairs, half))


def recording(outputs: list[Any]) -> contextlib.AbstractContextManager[None]:
    """The UNet call in this thread appends its prefix modules' outputs to `outputs` (first half of a pair)."""
    return _mode(("record", outputs))


@contextlib.contextmanager
def replaying(outputs: list[Any]) -> Iterator[None]:
    """The UNet call in this thread takes its prefix outputs from `outputs` instead of computing them (the
    second half of a pair, with the same latents, timestep and noise level); all must be used."""
    it = iter(outputs)
    with _mode(("replay", it)):
        yield
    if next(it, None) is not None:
        raise RuntimeError("guidance_prefix: the replayed call used fewer prefix outputs than were recorded")
