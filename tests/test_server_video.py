"""The service takes animations (always) and videos (with allow_video) as jobs: limits checked before
queueing, progress in frames, the result in its own format with the right content type and name."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sdx4.service.app import create_app
from sdx4.service.jobs import QueueSettings
from sdx4.service.requests import ServerSettings

BICUBIC = {"method": "bicubic"}


def _gif(frames: int = 3, size: tuple[int, int] = (16, 12)) -> bytes:
    rng = np.random.default_rng(0)
    ims = [
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        for _ in range(frames)
    ]
    buf = io.BytesIO()
    ims[0].save(
        buf,
        format="GIF",
        save_all=True,
        append_images=ims[1:],
        duration=[100] * frames,
        loop=0,
    )
    return buf.getvalue()


def _mp4(tmp: Path, frames: int = 4, size: tuple[int, int] = (16, 12)) -> bytes:
    av = pytest.importorskip("av")
    path = tmp / "clip.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        rng = np.random.default_rng(1)
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(
                rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8),
                format="rgb24",
            )
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path.read_bytes()


def _client(upscaler, tmp_path: Path, **settings):
    app = create_app(
        upscaler,
        ServerSettings(
            queue=QueueSettings(results_dir=str(tmp_path / "results")), **settings
        ),
    )
    return TestClient(app, base_url="http://localhost")


def _post(c, data: bytes, name: str, ctype: str, **fields):
    return c.post(
        "/v1/jobs", data={**BICUBIC, **fields}, files={"image": (name, data, ctype)}
    )


def _wait(c, job_id: str) -> dict:
    for _ in range(600):
        snap = c.get(f"/v1/jobs/{job_id}").json()
        if snap["state"] in ("done", "failed", "cancelled"):
            return snap
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {snap}")


@pytest.fixture(scope="module")
def upscaler(tiny_upscaler):
    return tiny_upscaler


def test_an_animated_gif_upload_gives_an_animated_gif_with_frames_progress(
    upscaler, tmp_path
):
    with _client(upscaler, tmp_path) as c:
        r = _post(c, _gif(3), "party.gif", "image/gif")
        assert r.status_code == 202, r.text
        assert r.json()["media"] == "animation" and r.json()["frames_total"] == 3
        snap = _wait(c, r.json()["id"])
        assert snap["state"] == "done", snap
        assert (snap["frames_done"], snap["frames_total"]) == (3, 3)
        assert (
            snap["metadata"]["animation"]["frames"] == 3
            and snap["metadata"]["flicker"]["frames"] == 3
        )
        res = c.get(snap["result_urls"][0])
        assert res.status_code == 200
        assert res.headers["content-type"] == "image/gif"
        assert 'filename="party_x4.gif"' in res.headers["content-disposition"]
        with Image.open(io.BytesIO(res.content)) as im:
            assert (im.format, im.n_frames, im.size, im.info["loop"]) == (
                "GIF",
                3,
                (64, 48),
                0,
            )


def test_the_sync_endpoint_answers_an_animated_webp_with_an_animated_webp(
    upscaler, tmp_path
):
    rng = np.random.default_rng(2)
    ims = [
        Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
        for _ in range(2)
    ]
    buf = io.BytesIO()
    ims[0].save(
        buf,
        format="WEBP",
        save_all=True,
        append_images=ims[1:],
        duration=70,
        lossless=True,
    )
    with _client(upscaler, tmp_path) as c:
        r = c.post(
            "/v1/upscale",
            data=BICUBIC,
            files={"image": ("a.webp", buf.getvalue(), "image/webp")},
        )
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/webp"
        with Image.open(io.BytesIO(r.content)) as im:
            assert (im.n_frames, im.size) == (2, (64, 48))


def test_a_video_upload_is_refused_with_415_unless_videos_are_allowed(
    upscaler, tmp_path
):
    clip = _mp4(tmp_path)
    with _client(upscaler, tmp_path) as c:
        r = _post(c, clip, "clip.mp4", "video/mp4")
        assert r.status_code == 415
        assert r.json() == {
            "detail": "clip.mp4: a video; this server does not take videos (start it with sdx4 serve --allow-video)",
            "field": "image",
        }
        assert c.get("/health").json()["jobs"]["submitted"] == 0


def test_with_allow_video_a_video_is_a_job_with_frames_progress_and_a_downloadable_mp4(
    upscaler, tmp_path
):
    av = pytest.importorskip("av")
    clip = _mp4(tmp_path, frames=4)
    with _client(upscaler, tmp_path, allow_video=True) as c:
        assert c.get("/v1/info").json()["limits"]["allow_video"] is True
        r = _post(c, clip, "clip.mp4", "video/mp4")
        assert r.status_code == 202, r.text
        snap = _wait(c, r.json()["id"])
        assert snap["state"] == "done", snap
        assert (snap["media"], snap["frames_done"], snap["frames_total"]) == (
            "video",
            4,
            4,
        )
        res = c.get(snap["result_urls"][0])
        assert res.headers["content-type"] == "video/mp4"
        assert 'filename="clip_x4.mp4"' in res.headers["content-disposition"]
    out = tmp_path / "got.mp4"
    out.write_bytes(res.content)
    with av.open(str(out)) as cont:
        frames = list(cont.decode(cont.streams.video[0]))
    assert len(frames) == 4 and (frames[0].width, frames[0].height) == (64, 48)


@pytest.mark.parametrize(
    ("settings", "fields", "status", "message"),
    [
        (
            {"max_video_frames": 2},
            {},
            413,
            r"party\.gif: 3 frames is over the limit of 2 frames",
        ),
        (
            {"max_video_seconds": 0.2},
            {},
            413,
            r"party\.gif: 0\.3 s is over the limit of 0\.2 s",
        ),
        (
            {"max_output_pixels": 1000},
            {},
            413,
            r"party\.gif: the output would be 64x48 = 3072 pixels",
        ),
        (
            {},
            {"num_images": "2"},
            422,
            r"party\.gif: num_images must be 1 for an animation",
        ),
    ],
)
def test_animation_limits_are_checked_before_queueing(
    upscaler, tmp_path, settings, fields, status, message
):
    import re

    with _client(upscaler, tmp_path, **settings) as c:
        r = _post(c, _gif(3), "party.gif", "image/gif", **fields)
        assert r.status_code == status, r.text
        assert re.search(message, r.json()["detail"]), r.text
        assert c.get("/health").json()["jobs"]["submitted"] == 0


def test_video_limits_are_checked_before_queueing(upscaler, tmp_path):
    clip = _mp4(tmp_path, frames=4)
    with _client(upscaler, tmp_path, allow_video=True, max_video_frames=3) as c:
        r = _post(c, clip, "clip.mp4", "video/mp4")
        assert (
            r.status_code == 413
            and r.json()["detail"] == "clip.mp4: 4 frames is over the limit of 3 frames"
        )
    with _client(upscaler, tmp_path, allow_video=True, max_input_pixels=100) as c:
        r = _post(c, clip, "clip.mp4", "video/mp4")
        assert (
            r.status_code == 413
            and "clip.mp4: 16x12 frames are over the input limit of 100 pixels"
            in r.json()["detail"]
        )
    with _client(upscaler, tmp_path, allow_video=True) as c:
        r = _post(c, b"not a video at all", "clip.mp4", "video/mp4")
        assert r.status_code == 422 and r.json()["detail"].startswith(
            "clip.mp4: not a video this server can read"
        )
        assert c.get("/health").json()["jobs"]["submitted"] == 0


def test_bad_video_settings_are_refused_naming_the_setting():
    from sdx4.options import OptionsError

    with pytest.raises(
        OptionsError, match="max_video_frames must be a positive integer; got 0"
    ) as e:
        ServerSettings(max_video_frames=0)
    assert e.value.option == "max_video_frames"
    with pytest.raises(
        OptionsError, match="max_video_seconds must be a positive number; got -1"
    ):
        ServerSettings(max_video_seconds=-1)


def test_a_running_animation_job_can_be_cancelled_between_frames_and_leaves_no_result(
    upscaler, tmp_path
):
    with _client(upscaler, tmp_path) as c:
        r = _post(
            c,
            _gif(8, (24, 16)),
            "long.gif",
            "image/gif",
            method="sd",
            steps="2",
            guidance="1",
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        for _ in range(1200):
            snap = c.get(f"/v1/jobs/{job_id}").json()
            if (
                snap["state"] == "running"
                and snap["frames_done"] >= 1
                or snap["state"] != "queued"
                and snap["state"] != "running"
            ):
                break
            time.sleep(0.02)
        assert snap["state"] == "running", (
            snap
        )  # 8 frames: still running after the first
        assert c.delete(f"/v1/jobs/{job_id}").json()["result"] == "cancelling"
        snap = _wait(c, job_id)
        assert snap["state"] == "cancelled" and snap["frames_done"] < 8, snap
        assert c.get(f"/v1/jobs/{job_id}/result").status_code == 409
    leftovers = [
        p.name
        for p in (tmp_path / "results").iterdir()
        if p.is_file() and p.suffix in (".gif", ".tmp")
    ]
    assert leftovers == []


def test_float_scales_and_width_height_give_animations_and_videos_their_exact_size(upscaler, tmp_path):
    pytest.importorskip("av")
    clip = _mp4(tmp_path, frames=2)  # 16x12
    with _client(upscaler, tmp_path, allow_video=True) as c:
        r = _post(c, _gif(2), "party.gif", "image/gif", scale="2.5")
        snap = _wait(c, r.json()["id"])
        res = c.get(snap["result_urls"][0])
        assert 'filename="party_x2.5.gif"' in res.headers["content-disposition"]
        with Image.open(io.BytesIO(res.content)) as im:
            assert (im.n_frames, im.size) == (2, (40, 30))
        r = _post(c, clip, "clip.mp4", "video/mp4", width="40")
        snap = _wait(c, r.json()["id"])
        assert snap["state"] == "done", snap
        res = c.get(snap["result_urls"][0])
        assert 'filename="clip_40w.mp4"' in res.headers["content-disposition"]
        (tmp_path / "got.mp4").write_bytes(res.content)
        import av

        with av.open(str(tmp_path / "got.mp4")) as cont:
            frame = next(cont.decode(cont.streams.video[0]))
        assert (frame.width, frame.height) == (40, 30)
        for data, name, ctype in ((clip, "clip.mp4", "video/mp4"), (_gif(2), "party.gif", "image/gif")):
            r = _post(c, data, name, ctype, width="8")
            assert r.status_code == 422, r.text
            assert r.json()["detail"] == f"{name}: width 8 is smaller than the input's width 16: sdx4 only enlarges (output 8x6 for a 16x12 input)"
        assert c.get("/health").json()["jobs"]["submitted"] == 2
    with _client(upscaler, tmp_path, allow_video=True, max_output_pixels=431) as c:
        r = _post(c, clip, "clip.mp4", "video/mp4", scale="1.5")  # 24x18 = 432 pixels
        assert r.status_code == 413 and r.json()["detail"] == (
            "clip.mp4: output frames of 24x18 are over the output limit of 431 pixels"
        ), r.text
        r = _post(c, _gif(2), "party.gif", "image/gif", height="18")  # 24x18 again
        assert r.status_code == 413 and "party.gif: the output would be 24x18 = 432 pixels" in r.json()["detail"], r.text
