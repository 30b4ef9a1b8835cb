"""Animations and videos: every frame upscaled (layer 4, beside the public API; no torch at import).

Animations (animated GIF, WebP, APNG): `upscale_animation` (video/animation.py). The flicker measure:
`FlickerMeter` (video/flicker.py).
"""

from .animation import (
    TEMPORAL_MODES,
    AnimationResult,
    check_animation_options,
    upscale_animation,
)
from .flicker import FlickerMeter

__all__ = [
    "TEMPORAL_MODES",
    "AnimationResult",
    "FlickerMeter",
    "check_animation_options",
    "upscale_animation",
]
