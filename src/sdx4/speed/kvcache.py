"""Cross-attention keys and values computed once per prompt, not at every step.

Each cross-attention layer projects the prompt embeddings into keys and values (`to_k`, `to_v`). The
embeddings are the same tensor at every step of the denoising loop, yet the UNet recomputes both
projections at each step: 26 layers x 2 in the full-size x4 UNet (its first three levels attend only
to the prompt), ~3% of a UNet call for a 64 px input on the CPU (0.966x bf16, 0.959x fp32 with the
cache: docs/speed.md).

`install(unet)` sets a `KVCacheProcessor` (diffusers' attention-processor hook, `Attention.set_processor`)
on the cross-attention layers that run diffusers' default `AttnProcessor2_0`: it runs that processor's
steps, but takes the keys and values of the last `ENTRIES` prompt-embedding inputs from what it
remembers. `clear(unet)` forgets them (the loop calls it, through `speed.reset`, after each denoising
loop, so nothing is held between images); `uninstall(unet)` sets the processors that were there again.

"The same input" is checked without reading the tensor: the same memory (data pointer), shape, strides,
dtype and device, and an unchanged version counter (PyTorch bumps it on every in-place write to a tensor
or to any view of it). The remembered input is kept referenced, so its memory cannot go to another
tensor while it is remembered. Remembered keys or values written into since (their version counter
moved) are not handed back. So keys and values are bit for bit what the layer computes, and so is the
output (the same operations as `AttnProcessor2_0`, tested against it). Only without autograd and for
ordinary tensors (inference-mode tensors keep no version counter); otherwise the projections just run.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

ENTRIES = 2  # inputs remembered per layer: the halves of a guidance pair split by the memory plan, or two tile counts


class KVCacheProcessor:
    """diffusers' `AttnProcessor2_0` for a cross-attention layer, with the prompt's keys and values remembered.

    `inner` is the processor it replaced (`uninstall` sets it again; calls this one does not handle go to it).
    `entries` holds (input, input key, keys, keys' version, values, values' version) of the last ENTRIES
    inputs, newest first: a tuple, replaced and never changed, so a concurrent reader sees a whole one.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.entries: tuple[tuple[Any, ...], ...] = ()

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
        if encoder_hidden_states is None or attention_mask is not None or hidden_states.ndim != 3 or args or kwargs:
            # not the UNet's cross-attention call (B,N,C tokens, a prompt, no mask): diffusers' own steps
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        # AttnProcessor2_0's steps for that call (install checked: no spatial/group/cross/q/k norms)
        batch_size = encoder_hidden_states.shape[0]
        query = attn.to_q(hidden_states)  # B,N,inner
        key, value = self.keys_values(attn, encoder_hidden_states)  # B,77,inner each
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # B,heads,N,head_dim
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # views: the remembered ones stay as they are
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)  # B,N,inner
        out = attn.to_out[1](attn.to_out[0](out))  # linear, dropout
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    def keys_values(self, attn: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(attn.to_k(x), attn.to_v(x))`, the remembered ones when `x` is a remembered input."""
        if torch.is_grad_enabled() or x.is_inference():
            return attn.to_k(x), attn.to_v(x)
        key = _key(x)
        entries = self.entries  # one read: another thread may replace the tuple, never change it
        for _held, held_key, k, k_version, v, v_version in entries:
            if held_key == key and k._version == k_version and v._version == v_version:
                return k, v
        k, v = attn.to_k(x), attn.to_v(x)
        if not (k.is_inference() or v.is_inference()):
            # `x` itself is held: its memory stays its own while it is remembered
            self.entries = ((x, key, k, k._version, v, v._version),) + entries[: ENTRIES - 1]
        return k, v


def projections(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The key and value projections of `unet`'s cross-attention layers."""
    out: list[torch.nn.Module] = []
    for m in _cross_attention(unet):
        out += [p for p in (getattr(m, "to_k", None), getattr(m, "to_v", None)) if isinstance(p, torch.nn.Module)]
    return out


def install(unet: torch.nn.Module) -> int:
    """Set a KVCacheProcessor on every cross-attention layer of `unet` that runs diffusers' AttnProcessor2_0
    without the norms it does not handle; returns how many key/value projections it caches (idempotent)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    for m in _cross_attention(unet):
        plain = all(getattr(m, n, None) is None for n in ("spatial_norm", "group_norm", "norm_q", "norm_k"))
        if type(m.processor) is AttnProcessor2_0 and plain and not m.norm_cross:
            m.set_processor(KVCacheProcessor(m.processor))
    return 2 * len(_cached(unet))


def uninstall(unet: torch.nn.Module) -> int:
    """Set the processors `install` replaced again (dropping what they remember); returns how many layers."""
    layers = _cached(unet)
    for m in layers:
        m.set_processor(m.processor.inner)
    return len(layers)


def clear(unet: torch.nn.Module | None) -> None:
    """Forget every remembered input, key and value (no-op for None or a UNet without `install`)."""
    if unet is None:
        return
    for m in _cached(unet):
        m.processor.entries = ()


def remembered(unet: torch.nn.Module) -> int:
    """How many keys and values (tensors) `unet`'s cross-attention layers hold now."""
    return sum(2 * len(m.processor.entries) for m in _cached(unet))


def bytes_per_sample(unet: torch.nn.Module | None, tokens: int, dtype_bytes: int) -> int:
    """What the cache may hold per sample of a UNet call: the keys and values of `tokens` prompt tokens in
    every cached layer, for each of the ENTRIES inputs remembered (0 for None or a UNet without
    `install`). The memory plan counts it with each call's work."""
    if unet is None:
        return 0
    width = sum(m.to_k.out_features + m.to_v.out_features for m in _cached(unet))
    return width * tokens * dtype_bytes * ENTRIES


def _cross_attention(unet: torch.nn.Module) -> list[Any]:
    from diffusers.models.attention_processor import Attention

    return [m for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention]


def _cached(unet: torch.nn.Module) -> list[Any]:
    """The attention layers running a KVCacheProcessor."""
    return [m for m in unet.modules() if isinstance(getattr(m, "processor", None), KVCacheProcessor)]


def _key(x: torch.Tensor) -> tuple[Any, ...]:
    return (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device, x._version)
