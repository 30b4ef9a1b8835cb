"""Animated GIF, WebP and APNG: every frame upscaled, timing, loop and disposal kept, the same format out
(or MP4/WebM), the same seed for every frame, the flicker measure reported, and the temporal colour fix."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

import sdx4
from sdx4 import cli
from sdx4.imageio import (
    MAX_ANIMATION_FRAMES,
    ImageInputError,
    is_animated,
    probe_animation,
    read_animation_metadata,
)
from sdx4.imageio.animation import gif_frames
from sdx4.options import OptionsError, UpscaleOptions
from sdx4.video import upscale_animation
from sdx4.video.flicker import FlickerMeter, bicubic_upscale
from sdx4.video.temporal import temporal_colorfix, temporal_flow

BICUBIC = UpscaleOptions(method="bicubic")


def _frames(
    n: int = 3, size: tuple[int, int] = (16, 12), seed: int = 0
) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        for _ in range(n)
    ]


def _read_frames(path) -> list[np.ndarray]:
    with Image.open(path) as im:
        out = []
        for i in range(im.n_frames):
            im.seek(i)
            out.append(np.asarray(im.convert("RGBA")))
        return out


def _bicubic(frame: Image.Image, scale: int = 4) -> np.ndarray:
    return np.asarray(
        frame.resize(
            (frame.width * scale, frame.height * scale), Image.Resampling.BICUBIC
        )
    )


# --- round trips: frame count, durations, loop, disposal, size, format -----------------------------------


def test_a_gif_round_trip_keeps_frames_durations_loop_and_disposal(tmp_path):
    frames = _frames(4)
    src = tmp_path / "anim.gif"
    frames[0].save(
        src,
        save_all=True,
        append_images=frames[1:],
        duration=[50, 60, 70, 80],
        loop=2,
        disposal=[1, 2, 1, 3],
    )
    result = upscale_animation(None, src, tmp_path / "out.gif", BICUBIC)
    info = probe_animation(tmp_path / "out.gif")
    assert (info.format, info.frames, info.size) == ("GIF", 4, (64, 48))
    assert info.durations == (50, 60, 70, 80)
    assert info.loop == 2
    assert info.disposal == (1, 2, 1, 3)
    assert (result.frames, result.size) == (4, (64, 48))
    record = read_animation_metadata(tmp_path / "out.gif")
    assert record["animation"] == {
        "format": "GIF", "output_format": "GIF", "frames": 4, "durations_ms": [50, 60, 70, 80], "loop": 2,
        "seed_per_frame": "same",
    }  # fmt: skip
    assert record["flicker"] == result.flicker and record["flicker"]["frames"] == 4
    assert record["method"] == "bicubic" and record["input"] == "anim.gif"


def test_a_gif_without_a_loop_count_plays_once_again(tmp_path):
    frames = _frames(2)
    frames[0].save(
        tmp_path / "once.gif", save_all=True, append_images=frames[1:], duration=100
    )
    assert probe_animation(tmp_path / "once.gif").loop is None
    upscale_animation(None, tmp_path / "once.gif", tmp_path / "out.gif", BICUBIC)
    with Image.open(tmp_path / "out.gif") as im:
        assert "loop" not in im.info


def test_a_webp_round_trip_is_lossless_and_keeps_durations_loop_and_alpha(tmp_path):
    frames = [f.convert("RGBA") for f in _frames(3)]
    frames[1].putalpha(Image.new("L", frames[1].size, 100))
    src = tmp_path / "anim.webp"
    frames[0].save(
        src,
        save_all=True,
        append_images=frames[1:],
        duration=[40, 80, 120],
        loop=5,
        lossless=True,
    )
    upscale_animation(None, src, tmp_path / "out.webp", BICUBIC)
    info = probe_animation(tmp_path / "out.webp")
    assert (info.format, info.frames, info.size, info.durations, info.loop) == (
        "WEBP",
        3,
        (64, 48),
        (40, 80, 120),
        5,
    )
    got = _read_frames(tmp_path / "out.webp")
    for frame, out in zip(frames, got, strict=True):
        rgb = _bicubic(frame.convert("RGB"))
        alpha = np.asarray(
            frame.getchannel("A").resize((64, 48), Image.Resampling.BICUBIC)
        )
        np.testing.assert_array_equal(out[..., :3], rgb)
        np.testing.assert_array_equal(out[..., 3], alpha)


def test_an_apng_round_trip_keeps_dispose_and_blend_ops_and_the_composited_frames(
    tmp_path,
):
    base = Image.new("RGBA", (16, 12), (200, 40, 40, 255))
    patch = Image.new("RGBA", (16, 12), (0, 0, 0, 0))
    patch.paste((20, 220, 20, 255), (4, 4, 10, 9))
    third = Image.new("RGBA", (16, 12), (30, 30, 220, 255))
    src = tmp_path / "anim.png"
    base.save(src, save_all=True, append_images=[patch, third], duration=[100, 200, 300], loop=0,
              disposal=[0, 0, 1], blend=[0, 1, 0])  # fmt: skip
    upscale_animation(None, src, tmp_path / "out.png", BICUBIC)
    info = probe_animation(tmp_path / "out.png")
    assert (info.format, info.frames, info.size, info.durations, info.loop) == (
        "PNG",
        3,
        (64, 48),
        (100, 200, 300),
        0,
    )
    assert info.disposal == (0, 0, 1) and info.blend == (0, 1, 0)
    got = _read_frames(tmp_path / "out.png")
    # Frame 2 is the patch blended OVER frame 1: what was upscaled is that composite, not the bare patch.
    composite = base.copy()
    composite.alpha_composite(patch)
    np.testing.assert_array_equal(got[1][..., :3], _bicubic(composite.convert("RGB")))
    assert tuple(got[1][0, 0]) == (200, 40, 40, 255)
    assert sdx4.read_metadata(tmp_path / "out.png")["animation"]["format"] == "PNG"


def test_gif_frames_are_composited_before_upscaling_and_transparency_is_kept(tmp_path):
    first = Image.new("RGBA", (16, 12), (0, 0, 0, 0))
    first.paste(
        (250, 250, 250, 255), (0, 0, 8, 12)
    )  # left half white, right half transparent
    second = Image.new("RGBA", (16, 12), (0, 0, 0, 0))
    second.paste(
        (250, 0, 0, 255), (10, 2, 14, 6)
    )  # a red square; with disposal 1 the white stays
    src = tmp_path / "t.gif"
    first.save(
        src, save_all=True, append_images=[second], duration=100, loop=0, disposal=1
    )
    upscale_animation(None, src, tmp_path / "out.gif", BICUBIC)
    got = _read_frames(tmp_path / "out.gif")
    assert len(got) == 2 and got[0].shape == (48, 64, 4)
    # Frame 2 shows the white half of frame 1 (composited) and the red square; the rest stays transparent.
    assert got[1][20, 8, 3] == 255 and got[1][20, 8, :3].min() > 230
    assert (
        got[1][16, 48, 3] == 255 and got[1][16, 48, 0] > 200 and got[1][16, 48, 1] < 40
    )
    assert got[1][40, 60, 3] == 0 and got[0][40, 60, 3] == 0
    with Image.open(tmp_path / "out.gif") as im:
        im.seek(1)
        assert (
            im.disposal_method == 2
        )  # whole frames with transparency replace the canvas


def test_the_gif_palette_is_computed_over_all_frames_and_stays_close_to_the_upscale(
    tmp_path,
):
    # Smooth gradients in two different hues on two frames: ONE palette must serve both.
    ys, xs = np.mgrid[0:24, 0:32]
    red = np.stack([xs * 8, ys * 4, np.zeros_like(xs)], -1).astype(np.uint8)
    blue = np.stack([np.zeros_like(xs), ys * 4, xs * 8], -1).astype(np.uint8)
    frames = [Image.fromarray(red), Image.fromarray(blue)]
    src = tmp_path / "g.webp"
    frames[0].save(
        src, save_all=True, append_images=frames[1:], duration=100, lossless=True
    )
    upscale_animation(None, src, tmp_path / "out.gif", BICUBIC)
    got = _read_frames(tmp_path / "out.gif")
    for frame, out in zip(frames, got, strict=True):
        err = np.abs(out[..., :3].astype(float) - _bicubic(frame)).mean()
        assert err < 6, err  # 256 colours over both gradients
    quantized, transparency = gif_frames([Image.fromarray(_bicubic(f)) for f in frames])
    assert transparency is None and [q.mode for q in quantized] == ["P", "P"]
    assert (
        quantized[0].getpalette() == quantized[1].getpalette()
    )  # one palette for the clip
    reds = {
        tuple(quantized[0].getpalette()[3 * i : 3 * i + 3])
        for i in np.unique(np.asarray(quantized[0])).tolist()
    }
    blues = {
        tuple(quantized[0].getpalette()[3 * i : 3 * i + 3])
        for i in np.unique(np.asarray(quantized[1])).tolist()
    }
    assert (
        max(r for r, _, _ in reds) > 200 and max(b for _, _, b in blues) > 200
    )  # both hues are in it


def test_animated_inputs_are_recognised_and_single_frames_are_not(tmp_path):
    frames = _frames(2)
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "one.gif")
    assert is_animated(tmp_path / "a.gif") and not is_animated(tmp_path / "one.gif")
    assert not is_animated(tmp_path / "missing.gif")


# --- options and limits, checked before any work ----------------------------------------------------------


def test_the_single_image_api_still_refuses_an_animation_and_names_the_animation_api(
    tmp_path,
):
    frames = _frames(3)
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(
        ImageInputError,
        match=r"a\.gif: an animated image with 3 frames; .*sdx4\.video\.upscale_animation",
    ):
        sdx4.upscale(tmp_path / "a.gif", method="bicubic")


def test_bad_options_outputs_and_limits_are_refused_before_any_work_and_leave_nothing(
    tmp_path, monkeypatch
):
    frames = _frames(3)
    src = tmp_path / "a.gif"
    frames[0].save(src, save_all=True, append_images=frames[1:])
    with pytest.raises(
        OptionsError, match="num_images must be 1 for an animation"
    ) as e:
        upscale_animation(None, src, tmp_path / "o.gif", BICUBIC.replace(num_images=2))
    assert e.value.option == "num_images"
    with pytest.raises(
        OptionsError, match="temporal must be one of none, colorfix, flow; got .blur."
    ):
        upscale_animation(None, src, tmp_path / "o.gif", BICUBIC, temporal="blur")
    with pytest.raises(OptionsError, match="method 'sd' needs the model") as e:
        upscale_animation(None, src, tmp_path / "o.gif", UpscaleOptions())
    with pytest.raises(
        ImageInputError,
        match=r"o\.jpg: an animation's output must end in one of .gif, .webp",
    ):
        upscale_animation(None, src, tmp_path / "o.jpg", BICUBIC)
    (tmp_path / "o.gif").write_bytes(b"x")
    with pytest.raises(
        ImageInputError, match=r"o\.gif: already exists \(pass --overwrite"
    ):
        upscale_animation(None, src, tmp_path / "o.gif", BICUBIC)
    monkeypatch.setattr("sdx4.imageio.animation.MAX_ANIMATION_FRAMES", 2)
    with pytest.raises(
        ImageInputError, match=r"a\.gif: 3 frames is over the limit of 2 frames"
    ):
        upscale_animation(None, src, tmp_path / "p.gif", BICUBIC)
    monkeypatch.setattr("sdx4.imageio.animation.MAX_ANIMATION_OUTPUT_PIXELS", 9_000)
    monkeypatch.setattr(
        "sdx4.imageio.animation.MAX_ANIMATION_FRAMES", MAX_ANIMATION_FRAMES
    )
    with pytest.raises(
        ImageInputError,
        match=r"a\.gif: 3 frames of 64x48 = 0.00922 MP of output is over the 0.009 MP limit",
    ):
        upscale_animation(None, src, tmp_path / "p.gif", BICUBIC)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gif", "o.gif"]


# --- the same seed for every frame: a static animation gives identical frames -----------------------------


def test_a_static_animation_gives_identical_output_frames_with_the_model(
    tmp_path, tiny_upscaler
):
    still = _frames(1, (12, 10), seed=3)[0]
    src = tmp_path / "static.png"
    # Differing dispose ops keep Pillow from merging the identical frames into one.
    still.save(
        src,
        save_all=True,
        append_images=[still.copy(), still.copy()],
        duration=100,
        disposal=[0, 1, 0],
    )
    assert probe_animation(src).frames == 3
    opts = UpscaleOptions(steps=2, guidance=1.0)  # seed None: drawn ONCE for the clip
    result = upscale_animation(tiny_upscaler, src, tmp_path / "out.png", opts)
    got = _read_frames(tmp_path / "out.png")
    assert len(got) == 3 and got[0].shape == (40, 48, 4)
    assert (
        np.abs(got[0][..., :3].astype(int) - _bicubic(still)).mean() > 1
    )  # the model's output, not a copy
    np.testing.assert_array_equal(got[0], got[1])
    np.testing.assert_array_equal(got[0], got[2])
    assert result.flicker["flicker"] == 0.0 and result.flicker["ratio"] == 1.0
    assert (
        isinstance(result.metadata["seed"], int) and result.metadata["method"] == "sd"
    )


def test_a_static_animation_written_as_gif_becomes_one_frame_for_the_whole_duration(
    tmp_path,
):
    still = _frames(1, (12, 10), seed=3)[0]
    src = tmp_path / "static.png"
    still.save(src, save_all=True, append_images=[still.copy(), still.copy()], duration=[100, 200, 300],
               disposal=[0, 1, 0])  # fmt: skip
    upscale_animation(
        None, src, tmp_path / "out.gif", BICUBIC
    )  # Pillow alone raises TypeError here
    with Image.open(tmp_path / "out.gif") as im:
        assert (getattr(im, "n_frames", 1), im.info["duration"], im.size) == (
            1,
            600,
            (48, 40),
        )


# --- video out, the CLI ------------------------------------------------------------------------------------


def test_the_cli_writes_an_mp4_from_a_gif_with_the_frame_timing(tmp_path):
    av = pytest.importorskip("av")
    frames = _frames(3, (16, 12))
    frames[0].save(
        tmp_path / "a.gif",
        save_all=True,
        append_images=frames[1:],
        duration=[100, 200, 100],
        loop=0,
    )
    out = run_cli(
        "upscale",
        str(tmp_path / "a.gif"),
        "--method",
        "bicubic",
        "-o",
        str(tmp_path / "a.mp4"),
    )
    assert out.returncode == 0, out.stderr
    assert f"a.gif -> {tmp_path / 'a.mp4'} (3 frames, 64x48)" in out.stderr
    assert "flicker " in out.stderr and "ratio 1.00" in out.stderr
    with av.open(str(tmp_path / "a.mp4")) as c:
        decoded = list(c.decode(c.streams.video[0]))
    assert len(decoded) == 3
    assert (decoded[0].width, decoded[0].height) == (64, 48)
    assert [round(float(f.time), 3) for f in decoded] == [0.0, 0.1, 0.3]
    err = np.abs(
        decoded[1].to_ndarray(format="rgb24").astype(float) - _bicubic(frames[1])
    ).mean()
    assert err < 25  # H.264 at crf 18 on random noise, for a 0..255 image


def test_the_cli_keeps_the_format_beside_the_input_and_prints_the_flicker_line(
    tmp_path, capsys
):
    frames = _frames(2)
    frames[0].save(
        tmp_path / "a.webp",
        save_all=True,
        append_images=frames[1:],
        duration=90,
        lossless=True,
    )
    assert (
        cli.main(
            ["upscale", str(tmp_path / "a.webp"), "--method", "bicubic", "--scale", "2"]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert f"a.webp -> {tmp_path / 'a_x2_bicubic.webp'} (2 frames, 32x24)" in err
    assert (
        "flicker 0.00" not in err
        and "(bicubic " in err
        and "ratio 1.00; temporal none)" in err
    )
    assert probe_animation(tmp_path / "a_x2_bicubic.webp").durations == (90, 90)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["-o", "{tmp}/x.jpg"], r"x\.jpg: an animation's output must end in one of"),
        (["--num-images", "2"], r"--num-images: num_images must be 1 for an animation"),
        (["-o", "-"], r"-o -: an animation cannot go to stdout"),
        (
            ["{tmp}/still.png"],
            r"a\.gif: an animation cannot be upscaled in one command with still images",
        ),
    ],
)
def test_cli_mistakes_exit_2_with_a_message_and_write_nothing(
    tmp_path, capsys, extra, message
):
    frames = _frames(2)
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "still.png")
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = [
        "upscale",
        str(tmp_path / "a.gif"),
        *[a.format(tmp=tmp_path) for a in extra],
        "--method",
        "bicubic",
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdx4: error: ") and "Traceback" not in err
    assert pytest.importorskip("re").search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# --- temporal colour fix ----------------------------------------------------------------------------------


def _moving_clip(n: int = 5, size: int = 32) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    big = rng.random((size + 20, size + 20, 3)) * 255
    k = np.ones(5) / 5
    for axis in (0, 1):
        big = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), axis, big)
    big = (big - big.min()) / (big.max() - big.min()) * 200 + 20
    return [
        big[10 : 10 + size, 10 - s : 10 - s + size].astype(np.uint8) for s in range(n)
    ]


def _flicker(outputs, inputs) -> dict:
    meter = FlickerMeter()
    for out, inp in zip(outputs, inputs, strict=True):
        meter.add(np.asarray(out.convert("RGB")), inp)
    return meter.result()


def test_temporal_colorfix_removes_frame_to_frame_colour_pumping_and_keeps_a_steady_shift():
    inputs = _moving_clip()
    # A method that warms every frame by +12 in red (steady) and pumps brightness up and down per frame.
    pump = [0, 18, -15, 7, -10]  # averages 0
    outputs = []
    for inp, p in zip(inputs, pump, strict=True):
        up = bicubic_upscale(inp, (128, 128)).astype(float) + p
        up[..., 0] += 12
        outputs.append(Image.fromarray(np.clip(up, 0, 255).astype(np.uint8)))
    before = _flicker(outputs, inputs)
    fixed = temporal_colorfix(outputs, inputs)
    after = _flicker(fixed, inputs)
    assert before["ratio"] > 3 and after["ratio"] < 1.3, (before, after)
    # The steady warm shift stays: red is still ~12 above the bicubic reference on average.
    red_shift = np.mean([np.asarray(f, float)[..., 0].mean() - bicubic_upscale(i, (128, 128))[..., 0].mean()
                         for f, i in zip(fixed, inputs, strict=True)])  # fmt: skip
    assert 11 < red_shift < 13


def test_temporal_colorfix_leaves_a_bicubic_clip_as_it_is_and_is_recorded(tmp_path):
    frames = [Image.fromarray(f) for f in _moving_clip(3)]
    frames[0].save(
        tmp_path / "m.png", save_all=True, append_images=frames[1:], duration=50
    )
    result = upscale_animation(
        None, tmp_path / "m.png", tmp_path / "o.png", BICUBIC, temporal="colorfix"
    )
    assert result.metadata["temporal"] == "colorfix"
    got = _read_frames(tmp_path / "o.png")
    for frame, out in zip(frames, got, strict=True):
        assert np.abs(out[..., :3].astype(int) - _bicubic(frame)).max() <= 1
    assert (
        json.loads(json.dumps(result.flicker))
        == sdx4.read_metadata(tmp_path / "o.png")["flicker"]
    )


def test_animated_bytes_are_recognised_too():
    buf = io.BytesIO()
    frames = _frames(2)
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert (
        is_animated(buf.getvalue())
        and probe_animation(buf.getvalue(), "up.gif").frames == 2
    )


def test_temporal_flow_averages_invented_detail_along_the_motion_and_lowers_flicker():
    inputs = _moving_clip(6)
    rng = np.random.default_rng(5)
    outputs = []
    for inp in inputs:  # a method that invents different fine detail in every frame
        up = bicubic_upscale(inp, (128, 128)).astype(float) + rng.normal(
            0, 12, (128, 128, 3)
        )
        outputs.append(Image.fromarray(np.clip(up, 0, 255).astype(np.uint8)))
    before = _flicker(outputs, inputs)
    after = _flicker(temporal_flow(outputs, inputs), inputs)
    assert after["flicker"] < 0.75 * before["flicker"], (before, after)
    # A clip that moves the way its references move is left almost as it is.
    clean = [Image.fromarray(bicubic_upscale(i, (128, 128))) for i in inputs]
    blended = temporal_flow(clean, inputs)
    assert (
        max(
            np.abs(np.asarray(a, float) - np.asarray(b, float)).mean()
            for a, b in zip(clean, blended, strict=True)
        )
        < 2
    )


def test_temporal_flow_gives_no_blending_across_a_cut():
    a, b = _moving_clip(1)[0], 255 - _moving_clip(1)[0]
    frames = [Image.fromarray(bicubic_upscale(x, (128, 128))) for x in (a, b)]
    blended = temporal_flow(frames, [a, b])
    assert (
        np.abs(np.asarray(blended[1], float) - np.asarray(frames[1], float)).mean()
        < 1.5
    )


def test_temporal_is_refused_for_folders_and_videos_rather_than_ignored(
    tmp_path, capsys
):
    (tmp_path / "in").mkdir()
    _frames(1)[0].save(tmp_path / "in" / "a.png")
    assert (
        cli.main(
            [
                "upscale",
                str(tmp_path / "in"),
                "--method",
                "bicubic",
                "--temporal",
                "flow",
            ]
        )
        == 2
    )
    assert (
        "--temporal only applies to animated GIF/WebP/APNG INPUTs, not a folder"
        in capsys.readouterr().err
    )
    (tmp_path / "clip.mp4").write_bytes(b"x")
    assert (
        cli.main(
            [
                "upscale",
                str(tmp_path / "clip.mp4"),
                "--method",
                "bicubic",
                "--temporal",
                "flow",
            ]
        )
        == 2
    )
    assert (
        "--temporal only applies to animated GIF/WebP/APNG INPUTs, not a video INPUT"
        in capsys.readouterr().err
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "in"]


def test_the_flicker_benchmark_runs_and_reports_every_temporal_mode(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "flicker_bench", Path(__file__).parents[1] / "benchmarks" / "flicker.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    assert (
        bench.main(
            ["--methods", "bicubic", "--frames", "3", "--size", "16", "--out", str(out)]
        )
        == 0
    )
    rows = json.loads(out.read_text())["rows"]
    assert [r["temporal"] for r in rows] == ["none", "colorfix", "flow"]
    assert (
        rows[0]["ratio"] == 1.0
        and rows[0]["frames"] == 3
        and rows[2]["flicker"] <= rows[0]["flicker"]
    )


def test_max_job_cost_counts_every_frame_of_an_animation(
    tmp_path, tiny_model_dir, capsys
):
    frames = _frames(3)
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    argv = [
        "upscale",
        str(tmp_path / "a.gif"),
        "--model",
        str(tiny_model_dir),
        "--steps",
        "2",
        "--max-job-cost",
        "0.0001",
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert (
        "a.gif: --max-job-cost: this animation (3 frames of 16x12) costs" in err
        and "over the limit of 0.0001" in err
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gif"]


# --- any scale and width/height (options.output_size, options.size_tag) ------------------------------------


@pytest.mark.parametrize(
    ("argv", "name", "size"),
    [
        (["--scale", "1.5"], "a_x1.5_bicubic.gif", (24, 17)),  # 16x11 x 1.5 = 24x16.5, half up
        (["--width", "40"], "a_40w_bicubic.gif", (40, 28)),  # 11 x 40/16 = 27.5 -> 28
        (["--width", "20", "--height", "30"], "a_20x30_bicubic.gif", (20, 30)),
    ],
)
def test_the_cli_names_and_sizes_an_animation_by_float_scale_and_width_height(tmp_path, capsys, argv, name, size):
    frames = _frames(2, size=(16, 11))
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=80)
    assert cli.main(["upscale", str(tmp_path / "a.gif"), "--method", "bicubic", *argv]) == 0
    out = tmp_path / name
    assert probe_animation(out).size == size and probe_animation(out).frames == 2, capsys.readouterr().err


def test_animation_limits_use_the_exact_output_size(tmp_path, monkeypatch):
    import sdx4.imageio.animation as anim

    frames = _frames(2, size=(16, 11))
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    opts = UpscaleOptions(method="bicubic", width=40)  # 40x28 per frame, 2 frames = 2240 pixels
    assert probe_animation(tmp_path / "a.gif", output_size=opts.output_size).output_pixels(
        output_size=opts.output_size
    ) == 2240
    monkeypatch.setattr(anim, "MAX_ANIMATION_OUTPUT_PIXELS", 2239)
    with pytest.raises(ImageInputError, match=r"2 frames of 40x28 = .* over the"):
        upscale_animation(None, tmp_path / "a.gif", tmp_path / "b.gif", opts)
    monkeypatch.setattr(anim, "MAX_ANIMATION_OUTPUT_PIXELS", 2240)
    assert upscale_animation(None, tmp_path / "a.gif", tmp_path / "b.gif", opts).size == (40, 28)
    with pytest.raises(OptionsError, match="width 8 is smaller than the input's width 16"):
        upscale_animation(None, tmp_path / "a.gif", tmp_path / "c.gif", opts.replace(width=8))
    assert not (tmp_path / "c.gif").exists()


def test_a_width_out_of_range_for_an_animation_exits_2_in_the_cli(tmp_path, capsys):
    frames = _frames(2, size=(16, 11))
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    assert cli.main(["upscale", str(tmp_path / "a.gif"), "--method", "bicubic", "--width", "300"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdx4: error: ") and "--width: width 300 is over 16 x the input's width 16" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gif"]
