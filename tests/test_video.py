"""sdx4.video: clips made here with PyAV (audio, subtitles, chapters, rotation, VFR), upscaled through the video
path; frames, timestamps, copied packets, resume, bad inputs and the CLI checked."""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")

from conftest import run_cli

import sdx4
from sdx4 import video
from sdx4.video import VideoInputError, VideoOptions

TB = Fraction(1, 90000)


def frame_pixels(i: int, h: int = 32, w: int = 48, static: bool = False) -> np.ndarray:
    rng = np.random.RandomState(0 if static else i)
    return rng.randint(0, 256, size=(h, w, 3), dtype=np.uint8)


def make_clip(path: Path, n: int = 6, *, size=(48, 32), pts=None, audio=True, subs=True, rotation=0, static=False,
              codec="libx264", chapters=True, sizes=None, bt709=False) -> Path:  # fmt: skip
    """A small clip: `n` frames (random pixels; `static`: all the same), AAC audio, a subtitle, a chapter."""
    pts = pts if pts is not None else [i * 7500 for i in range(n)]  # 12 fps in 1/90000
    mkv = path.suffix == ".mkv"
    out = av.open(str(path), "w")
    v = out.add_stream(codec, rate=12)
    v.width, v.height = size
    v.pix_fmt = "yuv420p" if codec != "mjpeg" else "yuvj420p"
    v.time_base = TB
    v.codec_context.time_base = TB
    if rotation:
        v.set_display_rotation(rotation)
    if bt709:  # tagged BT.709 (matrix, primaries, transfer), limited range
        for key in ("colorspace", "color_primaries", "color_trc"):
            setattr(v.codec_context, key, 1)
        v.codec_context.color_range = 1
    out.metadata["title"] = "a test clip"
    a = s = None
    if audio:
        a = out.add_stream("aac", rate=16000)
        a.layout = "mono"
    if subs:
        s = out.add_mux_stream("subrip" if mkv else "mov_text")
        s.time_base = Fraction(1, 1000)
    if chapters:
        out.set_chapters(
            [
                {
                    "id": 1,
                    "start": 0,
                    "end": 300,
                    "time_base": Fraction(1, 1000),
                    "metadata": {"title": "one"},
                }
            ]
        )
    other = None  # `sizes`: frames of another size come from a second encoder into the same stream
    for i, p in enumerate(pts):
        w, h = sizes[i] if sizes else size
        f = av.VideoFrame.from_ndarray(
            frame_pixels(i, h, w, static), format="rgb24"
        ).reformat(format=v.pix_fmt)
        f.pts, f.time_base = p, TB
        if (w, h) == tuple(size):
            out.mux(v.encode(f))
            continue
        if other is None:
            other = av.CodecContext.create(codec, "w")
            other.width, other.height, other.pix_fmt, other.time_base = (
                w,
                h,
                v.pix_fmt,
                TB,
            )
        for pkt in other.encode(f):
            pkt.stream = v
            out.mux(pkt)
    out.mux(v.encode(None))
    if a is not None:
        for i in range(8):
            af = av.AudioFrame.from_ndarray(np.random.RandomState(i).rand(1, 1024).astype(np.float32) * 0.2 - 0.1,
                                            format="fltp", layout="mono")  # fmt: skip
            af.sample_rate, af.pts = 16000, i * 1024
            out.mux(a.encode(af))
        out.mux(a.encode(None))
    if s is not None:
        text = b"hello"
        pkt = av.Packet(text if mkv else len(text).to_bytes(2, "big") + text)
        pkt.stream, pkt.pts, pkt.dts, pkt.duration, pkt.time_base = (
            s,
            0,
            0,
            300,
            Fraction(1, 1000),
        )
        out.mux(pkt)
    out.close()
    return path


def decoded(path: Path) -> list:
    with av.open(str(path)) as c:
        return [
            (f.pts, f.to_ndarray(format="rgb24"), f.rotation) for f in c.decode(video=0)
        ]


def packets(path: Path, kind: str) -> list[bytes]:
    with av.open(str(path)) as c:
        streams = [s for s in c.streams if s.type == kind]
        return [bytes(p) for p in c.demux(*streams) if p.size]


BICUBIC = sdx4.UpscaleOptions(method="bicubic")
LOSSLESS = VideoOptions(codec="ffv1", chunk_frames=2)


def test_a_clip_keeps_its_frames_timestamps_audio_subtitles_chapters_and_rotation(
    tmp_path,
):
    src = make_clip(tmp_path / "clip.mp4", 5, rotation=90, bt709=True)
    report = video.upscale_video(
        None, src, tmp_path / "out.mp4", BICUBIC, VideoOptions(chunk_frames=2)
    )
    assert report.flicker is not None and report.flicker["frames"] == 5  # FlickerMeter
    assert (report.frames, report.chunks, report.output_size) == (5, 3, (192, 128))
    out = decoded(tmp_path / "out.mp4")
    assert [p for p, _, _ in out] == [0, 7500, 15000, 22500, 30000]
    assert all(a.shape == (128, 192, 3) and rot == 90 for _, a, rot in out)
    with av.open(str(tmp_path / "out.mp4")) as c:
        assert c.streams.video[0].time_base == TB
        assert [s.type for s in c.streams][:3] == ["video", "audio", "subtitle"]
        assert c.chapters()[0]["metadata"]["title"] == "one"
        assert c.metadata["title"] == "a test clip"
        first = next(c.decode(video=0))
        assert (first.colorspace, first.color_primaries, first.color_trc) == (1, 1, 1)
        tag = json.loads(c.metadata["sdx4"])
    assert (tag["method"], tag["frames"], tag["codec"], tag["input_size"]) == (
        "bicubic",
        5,
        "h264",
        [48, 32],
    )
    assert (
        video.read_video_metadata(tmp_path / "out.mp4")["seed"]
        == report.metadata["seed"]
    )
    src_audio = packets(src, "audio")
    assert (
        len(src_audio) >= 8 and packets(tmp_path / "out.mp4", "audio") == src_audio
    )  # byte-identical copies
    assert packets(tmp_path / "out.mp4", "subtitle") == packets(src, "subtitle")
    assert not video.parts_folder(tmp_path / "out.mp4").exists()


def test_variable_frame_rate_keeps_every_pts_across_chunks(tmp_path):
    pts = [0, 3000, 12000, 13000, 40000, 41000, 90000]
    src = make_clip(tmp_path / "vfr.mp4", pts=pts, audio=False, subs=False)
    video.upscale_video(
        None, src, tmp_path / "out.mp4", BICUBIC, VideoOptions(chunk_frames=3)
    )
    assert [p for p, _, _ in decoded(tmp_path / "out.mp4")] == pts
    video.upscale_video(
        None,
        src,
        tmp_path / "out.mkv",
        BICUBIC,
        VideoOptions(codec="ffv1", chunk_frames=2),
    )
    # Matroska counts in milliseconds: the same instants
    assert [p for p, _, _ in decoded(tmp_path / "out.mkv")] == [
        round(p / 90) for p in pts
    ]


def test_lossless_output_is_the_bicubic_upscale_of_each_frame(tmp_path):
    src = make_clip(tmp_path / "clip.mkv", 3, audio=False, subs=False, codec="ffv1")
    video.upscale_video(None, src, tmp_path / "out.mkv", BICUBIC, LOSSLESS)
    ins, outs = decoded(src), decoded(tmp_path / "out.mkv")
    for (_, a, _), (_, b, _) in zip(ins, outs):
        want = np.asarray(sdx4.upscale(a, BICUBIC).image)
        # yuv444p round trip of the output: within 2 levels of the RGB upscale
        assert np.abs(want.astype(int) - b.astype(int)).max() <= 3


def test_a_static_clip_gives_equal_frames_with_sd(tmp_path, tiny_upscaler):
    src = make_clip(
        tmp_path / "still.mkv",
        3,
        size=(16, 16),
        static=True,
        audio=False,
        subs=False,
        codec="ffv1",
    )
    opts = sdx4.UpscaleOptions(steps=2, seed=None)
    report = video.upscale_video(
        tiny_upscaler, src, tmp_path / "out.mkv", opts, LOSSLESS
    )
    frames = [a for _, a, _ in decoded(tmp_path / "out.mkv")]
    assert len(frames) == 3 and frames[0].shape == (64, 64, 3)
    assert all(
        np.array_equal(frames[0], f) for f in frames[1:]
    )  # one seed for every frame
    assert report.metadata["steps"] == 2 and isinstance(report.metadata["seed"], int)


class Counting:
    """An upscaler that counts its calls (bicubic underneath) and can stop the run after `stop_after` calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.info = {}

    def check(self, options, size) -> None:
        pass

    def __call__(self, image, options):
        self.calls += 1
        return sdx4.upscale(image, options)


def test_a_cancelled_run_continues_from_its_last_finished_chunk(tmp_path):
    src = make_clip(tmp_path / "clip.mkv", 7)
    whole = tmp_path / "whole.mkv"
    video.upscale_video(None, src, whole, BICUBIC, LOSSLESS)
    dst = tmp_path / "out.mkv"
    first = Counting()
    with pytest.raises(video.VideoCancelled, match="run the same command again"):
        video.upscale_video(
            first, src, dst, BICUBIC, LOSSLESS, cancel=lambda: first.calls >= 3
        )
    parts = video.parts_folder(dst)
    manifest = json.loads((parts / "manifest.json").read_text())
    assert (
        sorted(manifest["chunks"]) == ["0"] and first.calls == 3
    )  # frame 2 started chunk 1, not finished
    assert (
        sorted(p.name for p in parts.iterdir()) == ["chunk-000000.mkv", "manifest.json"]
        and not dst.exists()
    )
    second = Counting()
    seen = []
    report = video.upscale_video(
        second, src, dst, BICUBIC, LOSSLESS, progress=lambda d, n: seen.append((d, n))
    )
    assert (
        second.calls == 5 and report.chunks_reused == 1 and report.frames_upscaled == 5
    )
    assert seen[-1] == (7, 7)
    got, want = decoded(dst), decoded(whole)
    assert [p for p, _, _ in got] == [p for p, _, _ in want]
    assert all(np.array_equal(a, b) for (_, a, _), (_, b, _) in zip(got, want))
    assert not parts.exists()


def test_a_killed_cli_run_continues(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    src = make_clip(tmp_path / "clip.mkv", 12)
    dst = tmp_path / "out.mkv"
    args = [
        "upscale",
        str(src),
        "-o",
        str(dst),
        "--method",
        "bicubic",
        "--video-codec",
        "ffv1",
        "--chunk-frames",
        "2",
    ]
    # a slow upscaler (0.3 s per frame) so that the kill lands mid-run
    code = ("import sys, time, sdx4.api as api; f = api.upscale_classical_result\n"
            "api.upscale_classical_result = lambda *a, **k: (time.sleep(0.3), f(*a, **k))[1]\n"
            "from sdx4.cli import main; sys.exit(main(sys.argv[1:]))")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], env=env, stderr=subprocess.PIPE
    )
    parts = video.parts_folder(dst)
    deadline = time.time() + 60
    while time.time() < deadline:
        m = parts / "manifest.json"
        if m.exists() and len(json.loads(m.read_text())["chunks"]) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: exit 130 with the hint, chunks kept
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and b"run the same command again to continue" in err
    assert len(json.loads((parts / "manifest.json").read_text())["chunks"]) >= 2
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], env=env, stderr=subprocess.PIPE
    )
    deadline = time.time() + 60
    while (
        time.time() < deadline
    ):  # the second run continues; killed (-9) after 2 more chunks
        if len(json.loads((parts / "manifest.json").read_text())["chunks"]) >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads((parts / "manifest.json").read_text())["chunks"]
    assert 4 <= len(done) < 6 and not dst.exists()
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert f"{len(done)} of 6 chunks from an earlier run" in r.stderr
    assert [p for p, _, _ in decoded(dst)] == [
        p for p, _, _ in decoded(src)
    ]  # 12 frames, source times
    assert not parts.exists()


def test_a_work_folder_of_other_options_is_refused_with_how_to_start_over(tmp_path):
    src = make_clip(tmp_path / "clip.mkv", 4)
    dst = tmp_path / "out.mkv"
    with pytest.raises(video.VideoCancelled):
        video.upscale_video(None, src, dst, BICUBIC, LOSSLESS, cancel=lambda: True)
    with pytest.raises(
        VideoInputError, match=r"options\.method: 'bicubic' then, 'lanczos' now.*rm -r"
    ):
        video.upscale_video(
            None, src, dst, sdx4.UpscaleOptions(method="lanczos"), LOSSLESS
        )
    assert (
        video.parts_folder(dst) / "manifest.json"
    ).exists()  # kept: the user decides


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda p: (p.write_text("not a video"), p)[1],
            "not a video this PyAV build can read",
        ),
        (lambda p: make_clip(p.with_suffix(".mkv"), 0, subs=False), "has no frames"),
    ],
)
def test_bad_clips_are_refused_before_any_work(tmp_path, make, message):
    src = make(tmp_path / "bad.mp4")
    with pytest.raises(VideoInputError, match=message):
        video.upscale_video(None, src, tmp_path / "out.mp4", BICUBIC)
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]


def test_an_audio_only_file_has_no_video_stream(tmp_path):
    src = tmp_path / "sound.mp4"
    with av.open(str(src), "w") as out:
        a = out.add_stream("aac", rate=16000)
        a.layout = "mono"
        af = av.AudioFrame.from_ndarray(
            np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
        )
        af.sample_rate, af.pts = 16000, 0
        out.mux(a.encode(af))
        out.mux(a.encode(None))
    with pytest.raises(VideoInputError, match="has no video stream .it holds audio"):
        video.probe(src)


def test_a_frame_over_the_pixel_limit_is_refused(tmp_path, monkeypatch):
    src = make_clip(tmp_path / "clip.mp4", 2)
    import sys

    monkeypatch.setattr(sys.modules["sdx4.video.checks"], "MAX_INPUT_PIXELS", 1000)
    with pytest.raises(
        VideoInputError, match="48x32 = 0 MP is over the 0 MP input limit"
    ):
        video.probe(src)


def test_a_size_change_mid_clip_names_the_frame_and_leaves_nothing(tmp_path):
    src = make_clip(
        tmp_path / "clip.mkv",
        5,
        codec="mjpeg",
        sizes=[(48, 32)] * 3 + [(32, 32)] * 2,
        audio=False,
        subs=False,
    )
    dst = tmp_path / "out.mkv"
    with pytest.raises(
        VideoInputError, match="frame 3 is 32x32 but the clip starts at 48x32"
    ):
        video.upscale_video(None, src, dst, BICUBIC, LOSSLESS)
    assert not dst.exists() and not video.parts_folder(dst).exists()


def test_outputs_and_codecs_that_cannot_work_are_refused(tmp_path):
    src = make_clip(tmp_path / "clip.mp4", 2)
    info = video.probe(src)
    with pytest.raises(VideoInputError, match="a video output must end in"):
        video.plan_encoding(tmp_path / "out.png", info, VideoOptions(), 4)
    with pytest.raises(VideoInputError, match="webm cannot hold h264"):
        video.plan_encoding(tmp_path / "out.webm", info, VideoOptions(codec="h264"), 4)
    with pytest.raises(
        VideoInputError, match="audio stream #1 .aac. cannot be copied into webm"
    ):
        video.plan_encoding(tmp_path / "out.webm", info, VideoOptions(), 4)
    assert (
        video.plan_encoding(
            tmp_path / "out.webm", info, VideoOptions(keep_audio=False), 4
        ).codec
        == "vp9"
    )
    with pytest.raises(VideoInputError, match="cannot encode pixel format rgb48le"):
        video.plan_encoding(
            tmp_path / "out.mp4", info, VideoOptions(pix_fmt="rgb48le"), 4
        )
    with pytest.raises(sdx4.OptionsError, match="crf must be 0..51") as e:
        VideoOptions(codec="h264", crf=60)
    assert e.value.option == "crf"
    odd = video.plan_encoding(
        tmp_path / "out.mp4", info, VideoOptions(), 3
    )  # 144x96: even already
    assert odd.size == (144, 96) and not odd.padded


def test_an_odd_output_size_is_padded_by_one_pixel_for_yuv420p(tmp_path):
    src = make_clip(
        tmp_path / "clip.mkv", 2, size=(15, 9), audio=False, subs=False, codec="ffv1"
    )
    info = video.probe(src)
    enc = video.plan_encoding(
        tmp_path / "out.mp4", info, VideoOptions(), 3
    )  # 45x27 -> 46x28
    assert enc.size == (46, 28) and enc.padded
    video.upscale_video(
        None, src, tmp_path / "out.mp4", sdx4.UpscaleOptions(method="nearest", scale=3)
    )
    frames = decoded(tmp_path / "out.mp4")
    assert frames[0][1].shape == (28, 46, 3)
    assert video.plan_encoding(
        tmp_path / "o.mkv", info, VideoOptions(codec="ffv1"), 3
    ).size == (45, 27)


def test_is_video_goes_by_suffix():
    assert (
        video.is_video("a/B.MP4")
        and video.is_video("x.webm")
        and video.is_video("x.avi")
    )
    assert not video.is_video("x.png") and not video.is_video("mp4")


def test_cli_end_to_end_and_its_exit_codes(tmp_path):
    src = make_clip(tmp_path / "clip.mp4", 3)
    r = run_cli("upscale", str(src), "--method", "bicubic", "--crf", "23")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^flicker \d+\.\d\d \(bicubic \d+\.\d\d, ratio \d+\.\d\d\)$", r.stderr, re.M), r.stderr
    out = tmp_path / "clip_x4_bicubic.mp4"
    assert (
        len(decoded(out)) == 3
        and json.loads(av.open(str(out)).metadata["sdx4"])["crf"] == 23
    )
    r = run_cli("upscale", str(src), "--method", "bicubic", "-o", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr
    (tmp_path / "text.mp4").write_text("hello")
    r = run_cli(
        "upscale",
        str(tmp_path / "text.mp4"),
        "--method",
        "bicubic",
        "-o",
        str(tmp_path / "t.mp4"),
    )
    assert (
        r.returncode == 2
        and "sdx4: error:" in r.stderr
        and "not a video" in r.stderr
        and "Traceback" not in r.stderr
    )
    r = run_cli(
        "upscale", str(src), "--method", "bicubic", "-o", str(tmp_path / "x.png")
    )
    assert r.returncode == 2 and "a video output must end in" in r.stderr
    r = run_cli(
        "upscale",
        str(src),
        "--method",
        "bicubic",
        "--crf",
        "99",
        "-o",
        str(tmp_path / "y.mp4"),
    )
    assert r.returncode == 2 and "--crf" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "clip.mp4",
        "clip_x4_bicubic.mp4",
        "text.mp4",
    ]


def test_video_flags_need_a_video_input(tmp_path, rng_image):
    from PIL import Image

    Image.fromarray(rng_image()).save(tmp_path / "a.png")
    r = run_cli(
        "upscale", str(tmp_path / "a.png"), "--method", "bicubic", "--crf", "20"
    )
    assert r.returncode == 2 and "--crf only applies to video INPUTs" in r.stderr
    src = make_clip(tmp_path / "clip.mp4", 2)
    r = run_cli("upscale", str(src), "--method", "bicubic", "--workers", "2")
    assert r.returncode == 2 and "--workers only applies with --engine ray" in r.stderr
    assert not (tmp_path / "clip_x4_bicubic.mp4").exists()


def test_a_folder_run_takes_a_video_and_an_image(tmp_path, rng_image):
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    make_clip(folder / "clip.mkv", 3)
    Image.fromarray(rng_image()).save(folder / "photo.png")
    (folder / "notes.txt").write_text("not an input")
    r = run_cli(
        "upscale", str(folder), "-o", str(tmp_path / "out"), "--method", "bicubic"
    )
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    assert len(decoded(out / "clip_x4_bicubic.mkv")) == 3
    assert decoded(out / "clip_x4_bicubic.mkv")[0][1].shape == (128, 192, 3)
    assert packets(out / "clip_x4_bicubic.mkv", "audio") == packets(
        folder / "clip.mkv", "audio"
    )
    assert Image.open(out / "photo_x4_bicubic.png").size == (96, 128)
    records = {
        rec["input"]: rec
        for rec in map(
            json.loads, (out / "sdx4-manifest.jsonl").read_text().splitlines()
        )
    }
    assert (
        records["clip.mkv"]["status"] == "ok" and records["photo.png"]["status"] == "ok"
    )
    assert (
        records["clip.mkv"]["outputs"] == ["clip_x4_bicubic.mkv"]
        and records["notes.txt"]["status"] == "skipped"
    )
    r = run_cli(
        "upscale", str(folder), "-o", str(tmp_path / "out"), "--method", "bicubic"
    )  # all done: nothing redone
    assert r.returncode == 0, r.stderr
    r = run_cli(
        "upscale",
        str(folder),
        "-o",
        str(tmp_path / "out2"),
        "--method",
        "bicubic",
        "--crf",
        "20",
    )
    assert r.returncode == 2 and "--crf only applies to video INPUTs" in r.stderr


@pytest.mark.parametrize(
    ("suffix", "codec", "decoder"),
    [(".webm", None, "vp9"), (".mkv", "h265", "hevc"), (".mp4", "av1", None)],
)
def test_each_output_codec_encodes_and_decodes(tmp_path, suffix, codec, decoder):
    src = make_clip(tmp_path / "clip.mp4", 3, audio=False, subs=False)
    dst = tmp_path / f"out{suffix}"
    opts = VideoOptions(codec=codec, chunk_frames=2)
    report = video.upscale_video(None, src, dst, BICUBIC, opts)
    assert report.metadata["codec"] == (codec or "vp9")
    with av.open(str(dst)) as c:
        name = c.streams.video[0].codec_context.name
        frames = [f.to_ndarray(format="rgb24").shape for f in c.decode(video=0)]
    assert frames == [(128, 192, 3)] * 3
    assert name in ((decoder,) if decoder else ("av1", "libdav1d", "libaom-av1"))


def test_the_video_benchmark_smoke_run_reports_both_paths(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    out = tmp_path / "video.json"
    cmd = [sys.executable, str(root / "benchmarks" / "video.py"), "--smoke"]
    proc = subprocess.run(
        [*cmd, "--methods", "bicubic,nosuch", "--out", str(out)],
        check=False,
        capture_output=True,
        text=True,
        env={
            "PYTHONPATH": str(root / "src"),
            "HF_HUB_OFFLINE": "1",
            "PATH": "/usr/bin:/bin",
        },
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    bicubic, nosuch = report["rows"]
    assert report["smoke"] and bicubic["frames"] == 4 and bicubic["within_5pct"] is None
    assert bicubic["image_fps"] > 0 and bicubic["video_fps"] > 0
    assert len(bicubic["video_path_s"]) == 1 and "overhead" in bicubic
    assert nosuch == {"method": "nosuch", "skipped": "this sdx4 has no method 'nosuch'"}


def test_ray_spreads_the_chunks_and_continues_a_local_run(tmp_path):
    pytest.importorskip("ray")
    src = make_clip(tmp_path / "clip.mkv", 7)
    whole = tmp_path / "whole.mkv"
    video.upscale_video(None, src, whole, BICUBIC, LOSSLESS)
    dst = tmp_path / "out.mkv"
    first = Counting()
    with pytest.raises(video.VideoCancelled):
        video.upscale_video(
            first, src, dst, BICUBIC, LOSSLESS, cancel=lambda: first.calls >= 2
        )
    seen = []
    report = video.upscale_video_ray(
        None,
        src,
        dst,
        BICUBIC,
        LOSSLESS,
        workers=2,
        progress=lambda d, n: seen.append((d, n)),
    )
    assert (report.chunks, report.chunks_reused, report.frames_upscaled) == (4, 1, 5)
    assert seen[-1] == (7, 7) and report.frames == 7
    got, want = decoded(dst), decoded(whole)
    assert [p for p, _, _ in got] == [p for p, _, _ in want]
    assert all(np.array_equal(a, b) for (_, a, _), (_, b, _) in zip(got, want))
    assert packets(dst, "audio") == packets(src, "audio")
    assert not video.parts_folder(dst).exists()


def test_without_pyav_the_message_names_the_extra(tmp_path, monkeypatch, capsys):
    import sys

    from sdx4.cli import main

    src = make_clip(tmp_path / "clip.mp4", 2)
    monkeypatch.setitem(sys.modules, "av", None)  # import av now fails
    with pytest.raises(video.VideoMissingError, match=r'pip install -e "\.\[video\]"'):
        video.probe(src)
    assert main(["upscale", str(src), "--method", "bicubic"]) == 1
    assert (
        'sdx4: error: video needs PyAV (the `av` package): pip install -e ".[video]"'
        in capsys.readouterr().err
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_a_codec_this_pyav_build_cannot_encode_is_refused(tmp_path, monkeypatch):
    import sys

    src = make_clip(tmp_path / "clip.mp4", 2)
    checks = sys.modules["sdx4.video.checks"]
    monkeypatch.setitem(checks.ENCODERS, "av1", ("libnosuch-av1",))
    with pytest.raises(
        VideoInputError, match=r"this PyAV build has no av1 encoder \(libnosuch-av1\)"
    ):
        video.plan_encoding(
            tmp_path / "o.mp4", video.probe(src), VideoOptions(codec="av1"), 4
        )


def test_frames_are_converted_with_the_clip_s_own_colour_matrix(tmp_path):
    src = make_clip(
        tmp_path / "c.mkv", 2, audio=False, subs=False, codec="ffv1", bt709=True
    )
    video.upscale_video(None, src, tmp_path / "out.mkv", BICUBIC, LOSSLESS)

    def rgb709(path):  # decoded with BT.709, limited range: what the tags say
        with av.open(str(path)) as c:
            return [
                f.to_ndarray(format="rgb24", src_colorspace=1, src_color_range=1)
                for f in c.decode(video=0)
            ]

    for a, b in zip(rgb709(src), rgb709(tmp_path / "out.mkv")):
        want = np.asarray(sdx4.upscale(a, BICUBIC).image).astype(int)
        assert np.abs(want - b.astype(int)).max() <= 3


@pytest.mark.parametrize(
    ("options", "out_size", "encoded"),
    [
        (dict(scale=1.5), (23, 14), (24, 14)),  # 15x9 x 1.5 = 22.5x13.5, half up; odd width padded for yuv420p
        (dict(width=40), (40, 24), (40, 24)),  # 9 x 40/15 = 24
        (dict(height=20), (33, 20), (34, 20)),  # 15 x 20/9 = 33.3
    ],
)
def test_a_float_scale_or_width_height_encodes_exactly_what_the_upscaler_returns(tmp_path, options, out_size, encoded):
    src = make_clip(tmp_path / "clip.mkv", 2, size=(15, 9), audio=False, subs=False, codec="ffv1")
    opts = sdx4.UpscaleOptions(method="bicubic", **options)
    enc = video.plan_encoding(tmp_path / "out.mp4", video.probe(src), VideoOptions(), opts.scale, opts.output_size)
    assert enc.size == encoded and enc.padded == (encoded != out_size)
    report = video.upscale_video(None, src, tmp_path / "out.mp4", opts)
    frames = decoded(tmp_path / "out.mp4")
    assert len(frames) == 2 and frames[0][1].shape == (encoded[1], encoded[0], 3)
    meta = video.read_video_metadata(tmp_path / "out.mp4")
    assert meta["output_size"] == list(out_size) and report.frames == 2
    assert meta["scale"] == {(23, 14): 1.5, (40, 24): 2.6667, (33, 20): 2.2}[out_size]  # width/height: output/input


def test_the_cli_names_a_clip_by_its_size_tag_and_refuses_a_width_out_of_range(tmp_path):
    src = make_clip(tmp_path / "clip.mkv", 2, size=(16, 10), audio=False, subs=False, codec="ffv1")
    r = run_cli("upscale", str(src), "--method", "bicubic", "--width", "40")
    assert r.returncode == 0, r.stderr
    assert "clip_40w_bicubic.mkv (40x25, 2 frames)" in r.stdout + r.stderr
    assert video.probe(tmp_path / "clip_40w_bicubic.mkv").size == (40, 26)  # 25 padded to even (yuv420p)
    r = run_cli("upscale", str(src), "--method", "bicubic", "--scale", "2.5")
    assert r.returncode == 0, r.stderr
    assert "clip_x2.5_bicubic.mkv (40x25, 2 frames)" in r.stdout + r.stderr
    r = run_cli("upscale", str(src), "--method", "bicubic", "--height", "5")
    assert r.returncode == 2 and "--height: height 5 is smaller than the input's height 10" in r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mkv", "clip_40w_bicubic.mkv", "clip_x2.5_bicubic.mkv"]
