"""Transformer blocks that hand back channels-last tensors (CPU, channels-last convolutions).

diffusers offers no hook here: the layout copy happens inside the private method
`Transformer2DModel._get_output_for_continuous_inputs`, so each block gets `_channels_last_output` instead,
that method's body without the copy. `DIFFUSERS_BODY` is the diffusers method it was made from (the same
in diffusers 0.30.0 and 0.42.1); tests/test_speed_door.py fails the day the installed diffusers' method
differs from it, so the copy is checked, not trusted. `uninstall` gives the blocks diffusers' method back.
"""

from __future__ import annotations

import types
from typing import Any

METHOD = "_get_output_for_continuous_inputs"

#: diffusers' `Transformer2DModel._get_output_for_continuous_inputs`, as `_channels_last_output` copies it.
DIFFUSERS_BODY = '''
    def _get_output_for_continuous_inputs(self, hidden_states, residual, batch_size, height, width, inner_dim):
        if not self.use_linear_projection:
            hidden_states = (
                hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2).contiguous()
            )
            hidden_states = self.proj_out(hidden_states)
        else:
            hidden_states = self.proj_out(hidden_states)
            hidden_states = (
                hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2).contiguous()
            )

        output = hidden_states + residual
        return output
'''


def normalised(source: str) -> str:
    """Python source without its whitespace: equal for the same code however it is indented or wrapped."""
    return "".join(source.split())


def _channels_last_output(self: Any, hidden_states: Any, residual: Any, batch_size: int, height: int, width: int, inner_dim: int) -> Any:
    # DIFFUSERS_BODY without its two contiguous calls: the B,H,W,C tokens stay channels-last, viewed as B,C,H,W
    if not self.use_linear_projection:
        hidden_states = self.proj_out(hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2))
    else:
        hidden_states = self.proj_out(hidden_states).reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
    return hidden_states + residual


def _blocks(unet: Any) -> list[Any]:
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    return [m for m in unet.modules() if isinstance(m, Transformer2DModel) and m.is_input_continuous]


def keep_transformer_outputs_channels_last(unet: Any) -> int:
    """Let the UNet's transformer blocks hand back channels-last tensors; returns how many were changed.

    diffusers' Transformer2DModel ends with `.permute(0, 3, 1, 2).contiguous()`, which copies its
    tokens (already laid out as channels-last) into NCHW; with channels-last convolutions the next conv
    then copies them back. Skipping both copies saves ~6% of a bf16 UNet step on a CPU (measured,
    docs/speed.md). Same values, another memory layout; used with channels-last convolutions (the CPU).
    A diffusers without this method is left alone.
    """
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    if not callable(getattr(Transformer2DModel, METHOD, None)):
        return 0
    blocks = _blocks(unet)
    for m in blocks:
        setattr(m, METHOD, types.MethodType(_channels_last_output, m))
    return len(blocks)


def uninstall(unet: Any) -> int:
    """Give the transformer blocks diffusers' own method back; returns how many."""
    blocks = [m for m in unet.modules() if getattr(vars(m).get(METHOD), "__func__", None) is _channels_last_output]
    for m in blocks:
        delattr(m, METHOD)
    return len(blocks)
