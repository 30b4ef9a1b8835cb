"""The UNet calls of one denoising step: a batch split into calls as the memory plan says, with the text-free
prefix of a guidance pair shared when its halves are equal (speed.guidance_prefix)."""

from __future__ import annotations

from typing import Any

import torch

from ..speed import guidance_prefix


def unet_in_calls(
    unet: Any,
    x: torch.Tensor,
    t: torch.Tensor,
    embeds: torch.Tensor,
    labels: torch.Tensor,
    per_call: int | None,
    pair_half: int | None = None,
) -> torch.Tensor:
    """The UNet on batch x (B,7,h,w), `per_call` samples per call (None: all at once). Splitting the
    CFG pair halves the working memory for the same FLOPs (the memory plan asks for it when it saves tiles).
    pair_half: with guidance, samples per half of each pair; in one call, the UNet's text-free prefix
    then runs once per pair when the halves are equal (guidance_prefix)."""
    def call(i: int, j: int) -> torch.Tensor:
        return unet(x[i:j], t, encoder_hidden_states=embeds[i:j], class_labels=labels[i:j], return_dict=False)[0]

    b = x.shape[0]
    pairs = pair_half is not None and guidance_prefix.pairs_equal(x, labels, pair_half)
    if per_call is None or per_call >= b:
        if pairs:
            with guidance_prefix.shared(b // (2 * pair_half), pair_half):
                return call(0, b)
        return call(0, b)
    parts = []
    if pairs and per_call == pair_half:  # each call is one half of a pair: the second replays the first's prefix
        for i in range(0, b, 2 * per_call):
            prefix: list[Any] = []
            with guidance_prefix.recording(prefix):
                parts.append(call(i, i + per_call))
            with guidance_prefix.replaying(prefix):
                parts.append(call(i + per_call, i + 2 * per_call))
            del prefix
    else:
        parts = [call(i, i + per_call) for i in range(0, b, per_call)]
    return torch.cat(parts)  # B,4,h,w

