"""FlickerMeter: motion-compensated frame-to-frame difference of an output clip vs its bicubic reference."""

from __future__ import annotations

import numpy as np
import pytest

from sdx4.video import flicker as flicker_mod
from sdx4.video.flicker import FlickerMeter, bicubic_upscale


def _pattern(size: int = 48, shift: int = 0) -> np.ndarray:
    """A textured RGB frame (smoothed noise), moved right by `shift` pixels (a moving pattern)."""
    rng = np.random.default_rng(7)
    big = rng.random((size + 40, size + 40, 3)) * 255
    # Smooth with a separable box filter so the texture has structure optical flow can follow.
    kernel = np.ones(5) / 5
    for axis in (0, 1):
        big = np.apply_along_axis(
            lambda v: np.convolve(v, kernel, mode="same"), axis, big
        )
    big = (big - big.min()) / (big.max() - big.min()) * 255
    return big[20 : 20 + size, 20 - shift : 20 - shift + size].astype(np.uint8)


def _measure(inputs, outputs) -> dict:
    meter = FlickerMeter()
    for out, inp in zip(outputs, inputs, strict=True):
        meter.add(out, inp)
    return meter.result()


def test_a_static_clip_gives_zero_flicker_and_ratio_one():
    frame = _pattern()
    inputs = [frame] * 4
    outputs = [bicubic_upscale(frame, (192, 192))] * 4
    result = _measure(inputs, outputs)
    assert result["frames"] == 4
    assert result["flicker"] == 0.0
    assert result["bicubic_flicker"] == 0.0
    assert result["ratio"] == 1.0
    assert result["warped"] is True


def test_a_moving_pattern_gives_low_warped_flicker_for_bicubic_and_ratio_one_against_itself():
    inputs = [_pattern(shift=s) for s in range(0, 10, 2)]
    outputs = [bicubic_upscale(f, (192, 192)) for f in inputs]
    result = _measure(inputs, outputs)
    # Unwarped, a 2 px (8 px output) shift of this texture changes pixels by over 10 grey levels.
    unwarped = np.mean(
        [np.abs(outputs[i].astype(float) - outputs[i - 1]).mean() for i in range(1, 5)]
    )
    assert unwarped > 10
    assert result["bicubic_flicker"] < unwarped / 4
    assert result["flicker"] == result["bicubic_flicker"]
    assert result["ratio"] == 1.0
    assert result["frames"] == 5


def test_random_per_frame_noise_gives_a_high_ratio():
    rng = np.random.default_rng(0)
    inputs = [_pattern(shift=s) for s in range(0, 10, 2)]
    outputs = []
    for f in inputs:
        up = bicubic_upscale(f, (192, 192)).astype(np.int16)
        noise = rng.integers(-40, 41, size=up.shape)
        outputs.append(np.clip(up + noise, 0, 255).astype(np.uint8))
    result = _measure(inputs, outputs)
    assert result["flicker"] > 15
    assert result["ratio"] > 3


def test_a_single_frame_has_no_pairs_and_zero_flicker():
    frame = _pattern()
    result = _measure([frame], [bicubic_upscale(frame, (192, 192))])
    assert result == {
        "flicker": 0.0,
        "bicubic_flicker": 0.0,
        "ratio": 1.0,
        "frames": 1,
        "warped": True,
    }


def test_without_opencv_the_meter_falls_back_to_unwarped_differences_and_says_so(
    monkeypatch,
):
    monkeypatch.setattr(flicker_mod, "_import_cv2", lambda: None)
    inputs = [_pattern(shift=s) for s in range(0, 6, 2)]
    outputs = [bicubic_upscale(f, (192, 192)) for f in inputs]
    result = _measure(inputs, outputs)
    unwarped = np.mean(
        [
            np.abs(outputs[i].astype(np.float32) - outputs[i - 1]).mean()
            for i in range(1, 3)
        ]
    )
    assert result["warped"] is False
    assert 'pip install -e ".[video]"' in result["note"]
    assert result["bicubic_flicker"] == pytest.approx(unwarped, abs=1e-3)


def test_bad_frames_are_refused_with_the_frame_named():
    meter = FlickerMeter()
    with pytest.raises(ValueError, match="output_frame must be an HxWx3 uint8 array"):
        meter.add(np.zeros((8, 8, 3), np.float32), np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="input_frame must be an HxWx3 uint8 array"):
        meter.add(np.zeros((8, 8, 3), np.uint8), np.zeros((2, 2), np.uint8))
    meter.add(np.zeros((8, 8, 3), np.uint8), np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(
        ValueError, match="size changed within the clip: 12x12 after 8x8"
    ):
        meter.add(np.zeros((12, 12, 3), np.uint8), np.zeros((3, 3, 3), np.uint8))
