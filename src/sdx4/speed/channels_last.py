"""Transformer blocks that hand back channels-last tensors (CPU, channels-last convolutions)."""

from __future__ import annotations

import types
from typing import Any


def keep_transformer_outputs_channels_last(unet: Any) -> int:
    """Let the UNet's transformer blocks hand back channels-last tensors; returns how many were changed.

    diffusers' Transformer2DModel ends with `.permute(0, 3, 1, 2).contiguous()`, which copies its
    tokens (already laid out as channels-last) into NCHW; with channels-last convolutions the next conv
    then copies them back. Skipping both copies saves ~6% of a bf16 UNet step on a CPU (measured,
    docs/speed.md). Same values, another memory layout; used with channels-last convolutions (the CPU).
    A diffusers without this method is left alone.
    """
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    def output(self: Any, hidden_states: Any, residual: Any, batch_size: int, height: int, width: int, inner_dim: int) -> Any:
        if not self.use_linear_projection:
            hidden_states = self.proj_out(hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2))
        else:
            hidden_states = self.proj_out(hidden_states).reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
        return hidden_states + residual

    if not callable(getattr(Transformer2DModel, "_get_output_for_continuous_inputs", None)):
        return 0
    blocks = [m for m in unet.modules() if isinstance(m, Transformer2DModel) and m.is_input_continuous]
    for m in blocks:
        m._get_output_for_continuous_inputs = types.MethodType(output, m)
    return len(blocks)

