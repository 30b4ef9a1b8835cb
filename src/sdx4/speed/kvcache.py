"""Cross-attention keys and values computed once per prompt, not at every step.

Each cross-attention layer projects the prompt embeddings into keys and values (`to_k`, `to_v`). The
embeddings are the same tensor at every step of the denoising loop, yet the UNet recomputes both
projections at each step: 26 layers x 2 in the full-size x4 UNet (its first three levels attend only
to the prompt), ~3% of a UNet call for a 64 px input on the CPU (0.966x bf16, 0.959x fp32 with the
cache: docs/speed.md).

`install(unet)` sets a `RememberingProcessor` on each cross-attention layer through diffusers' own hook
(`Attention.set_processor`). It runs the processor that was there, unchanged (no diffusers body is copied),
on a view of the layer whose `to_k` / `to_v` remember their results for the last `ENTRIES` inputs and hand
a result back when called with the same input again. `clear(unet)` forgets them (the denoising loop calls
`speed.reset` after each loop, so nothing is held between images); `uninstall(unet)` sets the processors
that were there back. Only diffusers' plain processors are wrapped (`WRAPPED`: they call `attn.to_k(e)` and
`attn.to_v(e)` once each on the encoder states `e`); a layer with any other processor is left alone.

"The same input" is checked without reading the tensor: the same memory (data pointer), shape, strides,
dtype and device, and an unchanged version counter (PyTorch bumps it on every in-place write to a tensor
or to any view of it). The remembered input is kept referenced, so its memory cannot go to another
tensor while it is remembered. A remembered result written into since (its version counter moved) is
not handed back. So a result is bit for bit what the layer computes. Only without autograd and for
ordinary tensors (inference-mode tensors keep no version counter); otherwise the layer just runs.
"""

from __future__ import annotations

from typing import Any

import torch

ENTRIES = 2  # inputs remembered per layer: the halves of a guidance pair split by the memory plan, or two tile counts

#: One remembered projection: (input, its identity key, result, the result's version when remembered).
Entry = tuple[torch.Tensor, tuple[Any, ...], torch.Tensor, int]


def wrapped_processor_types() -> tuple[type, ...]:
    """diffusers' processors that project the encoder states with `attn.to_k` / `attn.to_v`, once each."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    return (AttnProcessor, AttnProcessor2_0)


class RememberingProcessor:
    """The attention processor of one cross-attention layer: runs `inner` (the processor that was there) with
    key/value projections that remember their results (module docstring). Holds that layer's cache."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner  # set back by `uninstall`
        self.keys: tuple[Entry, ...] = ()  # newest first, at most ENTRIES; replaced whole, never changed in place
        self.values: tuple[Entry, ...] = ()

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        # the same parameters as diffusers' AttnProcessor2_0, so Attention.forward passes the same arguments on
        return self.inner(_RememberingView(attn, self), hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

    def clear(self) -> None:
        self.keys, self.values = (), ()

    def held(self) -> int:
        return len(self.keys) + len(self.values)

    def project_key(self, layer: torch.nn.Module, x: Any) -> Any:
        y, self.keys = _remembered_or_run(layer, x, self.keys)
        return y

    def project_value(self, layer: torch.nn.Module, x: Any) -> Any:
        y, self.values = _remembered_or_run(layer, x, self.values)
        return y


class _RememberingView:
    """`attn` as the inner processor sees it during one call: every attribute is the layer's own, except
    `to_k` / `to_v`, which go through the processor's cache. Lives for that call only."""

    __slots__ = ("_attn", "_processor")

    def __init__(self, attn: Any, processor: RememberingProcessor) -> None:
        self._attn, self._processor = attn, processor

    def to_k(self, x: Any) -> Any:
        return self._processor.project_key(self._attn.to_k, x)

    def to_v(self, x: Any) -> Any:
        return self._processor.project_value(self._attn.to_v, x)

    def __getattr__(self, name: str) -> Any:  # only for names not defined above
        return getattr(self._attn, name)


def cross_attention_layers(unet: torch.nn.Module) -> list[Any]:
    """`unet`'s cross-attention layers (diffusers `Attention` modules that attend to the prompt)."""
    from diffusers.models.attention_processor import Attention

    return [m for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention]


def projections(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The key and value projections of `unet`'s cross-attention layers."""
    out: list[torch.nn.Module] = []
    for m in cross_attention_layers(unet):
        out += [p for p in (getattr(m, "to_k", None), getattr(m, "to_v", None)) if isinstance(p, torch.nn.Module)]
    return out


def processors(unet: torch.nn.Module | None) -> list[RememberingProcessor]:
    """The `RememberingProcessor`s installed on `unet` (none for None)."""
    if unet is None:
        return []
    return [p for m in unet.modules() if isinstance(p := getattr(m, "processor", None), RememberingProcessor)]


def install(unet: torch.nn.Module) -> int:
    """Set a `RememberingProcessor` on each cross-attention layer of `unet` whose processor is one of diffusers'
    plain ones; returns how many key/value projections remember (2 per layer; idempotent)."""
    wrapped = wrapped_processor_types()
    for m in cross_attention_layers(unet):
        if type(m.processor) in wrapped:
            m.set_processor(RememberingProcessor(m.processor))
    return 2 * len(processors(unet))


def uninstall(unet: torch.nn.Module) -> int:
    """Set back the processors `install` wrapped, dropping what they held; returns how many layers."""
    layers = [m for m in cross_attention_layers(unet) if isinstance(m.processor, RememberingProcessor)]
    for m in layers:
        m.processor.clear()
        m.set_processor(m.processor.inner)
    return len(layers)


def clear(unet: torch.nn.Module | None) -> None:
    """Forget every remembered input and result (no-op for None or a UNet without `install`)."""
    for p in processors(unet):
        p.clear()


def remembered(unet: torch.nn.Module) -> int:
    """How many results `unet`'s projections hold now."""
    return sum(p.held() for p in processors(unet))


def bytes_per_sample(unet: torch.nn.Module | None, tokens: int, dtype_bytes: int) -> int:
    """What the cache may hold per sample of a UNet call: the keys and values of `tokens` prompt tokens in
    every layer with a `RememberingProcessor`, for each of the ENTRIES inputs remembered (0 for None or a UNet
    without `install`). The memory plan counts it with each call's work."""
    if unet is None:
        return 0
    features = sum(
        m.to_k.out_features + m.to_v.out_features
        for m in cross_attention_layers(unet)
        if isinstance(m.processor, RememberingProcessor)
    )
    return features * tokens * dtype_bytes * ENTRIES


def _key(x: torch.Tensor) -> tuple[Any, ...]:
    return (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device, x._version)


def _remembered_or_run(layer: torch.nn.Module, x: Any, entries: tuple[Entry, ...]) -> tuple[Any, tuple[Entry, ...]]:
    """`layer(x)`, handed back from `entries` when `x` is an input remembered there; and the entries to keep.
    `entries` is read once: another thread may replace the processor's tuple, never change it."""
    if not isinstance(x, torch.Tensor) or torch.is_grad_enabled() or x.is_inference():
        return layer(x), entries
    key = _key(x)
    for _held, held_key, y, y_version in entries:
        if held_key == key and y._version == y_version:
            return y, entries
    y = layer(x)
    if isinstance(y, torch.Tensor) and not y.is_inference():
        # `x` itself is held: its memory stays its own while it is remembered
        entries = ((x, key, y, y._version),) + entries[: ENTRIES - 1]
    return y, entries
