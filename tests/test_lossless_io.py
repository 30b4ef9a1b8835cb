"""Nothing lost silently (issue 22, item 8): what an output keeps of its input (ICC profile, EXIF, grayscale),
and animated inputs never cut to their first frame. Through every writer: the API, the CLI,
folder runs and the server's results."""

from __future__ import annotations

import io
import json
import struct
import time

import numpy as np
import pytest
from PIL import Image, ImageCms

import sdx4
from sdx4 import cli
from sdx4.imageio import ImageInputError, open_image, read_metadata

MAKE, ORIENTATION, DATETIME = 0x010F, 0x0112, 0x0132


def _tag(sig: bytes, data: bytes) -> tuple[bytes, bytes]:
    return sig, data + b"\0" * (-len(data) % 4)


def _xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ \0\0\0\0" + b"".join(struct.pack(">i", round(v * 65536)) for v in (x, y, z))


def wide_gamut_profile(description: str = "sdx4 test Display P3", grey: bool = False) -> bytes:
    """A small ICC v2 RGB display profile with Display P3's primaries (D50-adapted) and gamma 2.2 (or,
    grey=True, a GRAY profile with that gamma)."""
    ascii_ = description.encode() + b"\0"
    desc = b"desc\0\0\0\0" + struct.pack(">I", len(ascii_)) + ascii_ + b"\0" * 4 + b"\0" * 4 + b"\0" * 3 + b"\0" * 67
    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, round(2.2 * 256))
    tags = [
        _tag(b"desc", desc),
        _tag(b"cprt", b"text\0\0\0\0No copyright, test data\0"),
        _tag(b"wtpt", _xyz(0.9642, 1.0, 0.8249)),
    ]
    if grey:
        tags.append(_tag(b"kTRC", curve))
    else:
        tags += [
            _tag(b"rXYZ", _xyz(0.5151, 0.2412, -0.0011)),
            _tag(b"gXYZ", _xyz(0.2920, 0.6922, 0.0419)),
            _tag(b"bXYZ", _xyz(0.1571, 0.0666, 0.7841)),
            _tag(b"rTRC", curve),
            _tag(b"gTRC", curve),
            _tag(b"bTRC", curve),
        ]
    offset = 128 + 4 + 12 * len(tags)
    table, body = struct.pack(">I", len(tags)), b""
    for sig, data in tags:
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (
        struct.pack(">I", size) + b"\0" * 4 + struct.pack(">I", 0x02100000) + b"mntr"
        + (b"GRAY" if grey else b"RGB ") + b"XYZ "
        + struct.pack(">6H", 2026, 1, 1, 0, 0, 0) + b"acsp" + b"\0" * 24 + struct.pack(">I", 0)
        + b"".join(struct.pack(">i", round(v * 65536)) for v in (0.9642, 1.0, 0.8249)) + b"\0" * 48
    )
    assert len(header) == 128
    return header + table + body


P3 = wide_gamut_profile()
GREY_PROFILE = wide_gamut_profile("sdx4 test grey gamma 2.2", grey=True)


def test_the_test_profile_is_a_wide_gamut_profile_littlecms_reads():
    profile = ImageCms.ImageCmsProfile(io.BytesIO(P3))
    assert ImageCms.getProfileDescription(profile).strip() == "sdx4 test Display P3"
    # Pure green in P3 lies outside sRGB: converted to sRGB it clips (a real wide-gamut profile, not sRGB).
    green = Image.new("RGB", (1, 1), (0, 255, 0))
    srgb = ImageCms.profileToProfile(green, profile, ImageCms.createProfile("sRGB"))
    assert srgb.getpixel((0, 0))[0] == 0 and srgb.getpixel((0, 0))[2] == 0  # R and B clip at 0


def _photo(rng_image, h=6, w=8):
    return Image.fromarray(rng_image(h, w), "RGB")


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp", ".tif"])
def test_cli_outputs_carry_the_input_icc_profile_byte_for_byte_and_pixels_are_not_converted(tmp_path, rng_image, suffix):
    im = _photo(rng_image)
    im.save(tmp_path / "p3.png", icc_profile=P3)
    im.save(tmp_path / "plain.png")
    for name in ("p3", "plain"):
        code = cli.main(["upscale", str(tmp_path / f"{name}.png"), "--method", "bicubic", "-q",
                         "-o", str(tmp_path / f"{name}_out{suffix}")])
        assert code == 0
    with Image.open(tmp_path / f"p3_out{suffix}") as out, Image.open(tmp_path / f"plain_out{suffix}") as plain:
        assert out.info["icc_profile"] == P3
        assert plain.info.get("icc_profile") is None  # nothing invented for an input without a profile
        assert np.array_equal(np.asarray(out), np.asarray(plain))  # the pixels are the same: no conversion


def test_folder_runs_keep_the_icc_profile_and_exif(tmp_path, rng_image):
    from sdx4.batch import BatchJob, run_batch

    (tmp_path / "in").mkdir()
    exif = Image.Exif()
    exif[MAKE] = "sdx4-test-camera"
    _photo(rng_image).save(tmp_path / "in" / "a.png", icc_profile=P3, exif=exif)
    run_batch(BatchJob(tmp_path / "in", tmp_path / "out", sdx4.UpscaleOptions(method="bicubic")))
    with Image.open(tmp_path / "out" / "a_x4_bicubic.png") as out:
        assert out.info["icc_profile"] == P3
        assert out.getexif()[MAKE] == "sdx4-test-camera"


def test_server_results_keep_the_icc_profile_and_exif(tmp_path, rng_image):
    from sdx4.service.jobs import JobManager, QueueSettings

    exif = Image.Exif()
    exif[MAKE] = "sdx4-test-camera"
    buf = io.BytesIO()
    _photo(rng_image).save(buf, format="PNG", icc_profile=P3, exif=exif)
    manager = JobManager(lambda image, options, progress=None: sdx4.upscale(image, options),
                         QueueSettings(results_dir=tmp_path / "results"))
    manager.start()
    try:
        job = manager.submit(sdx4.imageio.as_loaded(Image.open(io.BytesIO(buf.getvalue()))),
                             sdx4.UpscaleOptions(method="bicubic"), "a.png")
        for _ in range(500):
            if manager.snapshot(job.id)["state"] in ("done", "failed"):
                break
            time.sleep(0.01)
        assert manager.snapshot(job.id)["state"] == "done"
        with Image.open(manager.result_file(job.id, 0)) as out:
            assert out.info["icc_profile"] == P3
            assert out.getexif()[MAKE] == "sdx4-test-camera"
    finally:
        manager.close()


def _rotated_jpeg(path, rng_image):
    arr = rng_image(6, 10)
    arr[:, :3] = 255  # a white band on the left of the stored pixels
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # display rotated 90 degrees clockwise
    exif[MAKE] = "sdx4-test-camera"
    exif[DATETIME] = "2026:01:02 03:04:05"
    Image.fromarray(arr, "RGB").save(path, exif=exif, quality=95)


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp", ".tif"])
def test_exif_is_kept_with_the_orientation_reset_to_1_since_it_was_applied(tmp_path, rng_image, suffix):
    _rotated_jpeg(tmp_path / "cam.jpg", rng_image)
    out = tmp_path / f"out{suffix}"
    assert cli.main(["upscale", str(tmp_path / "cam.jpg"), "--method", "nearest", "-q", "-o", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size == (24, 40)  # 6x10 stored, shown as 10 high x 6 wide, x4
        exif = im.getexif()
        assert exif[MAKE] == "sdx4-test-camera" and exif[DATETIME] == "2026:01:02 03:04:05"
        assert exif[ORIENTATION] == 1  # a viewer must not rotate it a second time
        assert np.asarray(im.convert("L"))[:4].min() > 200  # the white band is now on top
    if suffix == ".png":
        assert read_metadata(out)["exif"] is True


def test_api_results_carry_profile_and_exif_and_pil_save_keeps_the_profile(tmp_path, rng_image):
    _rotated_jpeg(tmp_path / "cam.jpg", rng_image)
    with Image.open(tmp_path / "cam.jpg") as im:
        im.load()
        src = im.copy()
        src.info["icc_profile"] = P3
    before = src.getexif()[ORIENTATION]
    result = sdx4.upscale(src, method="bicubic")
    assert before == 6 and src.getexif()[ORIENTATION] == 6  # the caller's image is not changed
    assert result.icc_profile == P3 and result.metadata["icc_profile"] is True
    exif = Image.Exif()
    exif.load(result.exif)
    assert exif[ORIENTATION] == 1 and exif[MAKE] == "sdx4-test-camera"
    result.image.save(tmp_path / "own.png")  # PIL's own save, no sdx4 writer: it reads the profile from info
    result.image.save(tmp_path / "own_exif.png", exif=result.exif)  # EXIF it takes only as an argument
    with Image.open(tmp_path / "own.png") as out, Image.open(tmp_path / "own_exif.png") as with_exif:
        assert out.info["icc_profile"] == P3
        assert with_exif.getexif()[MAKE] == "sdx4-test-camera"


def test_an_image_without_profile_or_exif_records_neither(rng_image):
    result = sdx4.upscale(_photo(rng_image), method="bicubic")
    assert result.icc_profile is None and result.exif is None
    assert "icc_profile" not in result.metadata and "exif" not in result.metadata and "input_mode" not in result.metadata


# --- grayscale ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["nearest", "bicubic", "lanczos"])
def test_a_grayscale_input_gives_a_grayscale_output_equal_to_upscaling_the_grey_plane(rng_image, method):
    grey = Image.fromarray(rng_image(6, 8)[:, :, 0], "L")
    result = sdx4.upscale(grey, method=method)
    assert result.image.mode == "L"
    filters = {"nearest": Image.Resampling.NEAREST, "bicubic": Image.Resampling.BICUBIC,
               "lanczos": Image.Resampling.LANCZOS}
    assert np.array_equal(np.asarray(result.image), np.asarray(grey.resize((32, 24), filters[method])))
    assert [result.metadata[k] for k in ("input_mode", "color_mode", "output_mode")] == ["L", "auto", "L"]


def test_grayscale_with_alpha_gives_la_and_color_mode_rgb_gives_rgb(rng_image):
    la = Image.fromarray(rng_image(6, 8, channels=2), "LA")
    assert sdx4.upscale(la, method="bicubic").image.mode == "LA"
    rgb = sdx4.upscale(la, method="bicubic", color_mode="rgb")
    assert rgb.image.mode == "RGBA" and rgb.metadata["output_mode"] == "RGBA"
    r, g, b, _ = rgb.image.split()
    assert np.array_equal(np.asarray(r), np.asarray(b))  # grey in RGB: the planes are equal


def test_16_bit_grey_gives_an_8_bit_grey_output(tmp_path):
    a = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 1365).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    result = sdx4.upscale(tmp_path / "g16.png", method="nearest")
    assert result.image.mode == "L" and result.metadata["input_mode"] == "I;16"
    assert np.asarray(result.image)[0, 4] == round(1365 / 65535 * 255)


def test_cli_writes_grayscale_pngs_unless_color_mode_rgb(tmp_path, rng_image):
    Image.fromarray(rng_image(6, 8)[:, :, 0], "L").save(tmp_path / "g.png")
    assert cli.main(["upscale", str(tmp_path / "g.png"), "--method", "bicubic", "-q", "-o", str(tmp_path / "a.png")]) == 0
    assert cli.main(["upscale", str(tmp_path / "g.png"), "--method", "bicubic", "-q", "--color-mode", "rgb",
                     "-o", str(tmp_path / "b.png")]) == 0
    with Image.open(tmp_path / "a.png") as a, Image.open(tmp_path / "b.png") as b:
        assert a.mode == "L" and b.mode == "RGB"
        assert np.array_equal(np.asarray(a), np.asarray(b.convert("L")))
    assert read_metadata(tmp_path / "b.png")["color_mode"] == "rgb"


def test_the_sd_method_gives_grey_out_for_grey_in(tiny_model_dir, rng_image):
    up = sdx4.load(str(tiny_model_dir), device="cpu", dtype="fp32")
    grey = Image.fromarray(rng_image(8, 8)[:, :, 0], "L")
    kw = dict(steps=1, seed=3, guidance=1.0)
    auto, rgb = up(grey, **kw), up(grey, color_mode="rgb", **kw)
    assert auto.image.mode == "L" and rgb.image.mode == "RGB"
    assert np.array_equal(np.asarray(auto.image), np.asarray(rgb.image.convert("L")))  # ITU-R 601 luma
    assert auto.metadata["output_mode"] == "L"


def test_colour_inputs_stay_rgb_and_keep_their_metadata_keys(rng_image):
    result = sdx4.upscale(_photo(rng_image), method="bicubic")
    assert result.image.mode == "RGB"
    assert list(result.metadata) == ["sdx4_version", "method", "scale", "input_size", "output_size", "alpha",
                                     "alpha_method", "seconds"]


# --- animated inputs ---------------------------------------------------------------------------------------


def _frames(n=3):
    return [Image.new("RGB", (8, 6), (40 * i, 0, 0)) for i in range(n)]


@pytest.mark.parametrize("name, fmt", [("a.gif", "GIF"), ("a.webp", "WEBP"), ("a.png", "PNG")])
def test_animated_inputs_are_refused_by_the_still_image_reader_naming_the_file_frames_and_animation_api(tmp_path, name, fmt):
    first, *rest = _frames(3)
    first.save(tmp_path / name, format=fmt, save_all=True, append_images=rest, duration=100, loop=0)
    with Image.open(tmp_path / name) as im:
        assert im.n_frames == 3  # the test file really is animated
    with pytest.raises(ImageInputError, match=rf"{name}: an animated image with 3 frames; this call upscales one image: "
                       r"use sdx4\.video\.upscale_animation"):
        open_image(tmp_path / name)


def test_a_single_frame_gif_is_still_read(tmp_path):
    Image.new("RGB", (8, 6), (200, 0, 0)).save(tmp_path / "one.gif")
    assert open_image(tmp_path / "one.gif").size == (8, 6)


def test_animated_inputs_are_upscaled_frame_by_frame_by_the_cli_in_their_own_format(tmp_path, capsys):
    first, *rest = _frames(2)
    first.save(tmp_path / "anim.gif", save_all=True, append_images=rest)
    assert cli.main(["upscale", str(tmp_path / "anim.gif"), "--method", "bicubic"]) == 0
    assert "anim.gif -> " in capsys.readouterr().err
    assert not (tmp_path / "anim_x4_bicubic.png").exists()
    with Image.open(tmp_path / "anim_x4_bicubic.gif") as im:
        assert (im.format, im.n_frames, im.size) == ("GIF", 2, (32, 24))


def test_animated_uploads_become_animation_jobs_not_a_first_frame(tmp_path):
    from sdx4.service.requests import ServerSettings
    from sdx4.service.media import media_upload

    buf = io.BytesIO()
    first, *rest = _frames(4)
    first.save(buf, format="GIF", save_all=True, append_images=rest)
    media = media_upload(buf.getvalue(), "image/gif", "up.gif", sdx4.UpscaleOptions(), ServerSettings())
    assert (media.kind, media.frames, media.size, media.suffix) == ("animation", 4, (8, 6), ".gif")


def test_folder_runs_upscale_animated_inputs_frame_by_frame_into_an_animated_png(tmp_path, rng_image):
    from sdx4.batch import BatchJob, run_batch

    (tmp_path / "in").mkdir()
    first, *rest = _frames(2)
    first.save(tmp_path / "in" / "anim.gif", save_all=True, append_images=rest, duration=[80, 120], loop=0)
    _photo(rng_image).save(tmp_path / "in" / "still.png")
    job = BatchJob(tmp_path / "in", tmp_path / "out", sdx4.UpscaleOptions(method="nearest"))
    run_batch(job)
    records = {r["input"]: r for r in map(json.loads, job.manifest_path.read_text().splitlines()) if "input" in r}
    assert records["still.png"]["status"] == "ok"
    assert records["anim.gif"]["status"] == "ok", records["anim.gif"]
    assert records["anim.gif"]["outputs"] == ["anim_x4_nearest.png"]
    with Image.open(tmp_path / "out" / "anim_x4_nearest.png") as im:
        assert (im.format, im.n_frames, im.size) == ("PNG", 2, (32, 24))
        durations = []
        for i in range(2):
            im.seek(i)
            durations.append(im.info["duration"])
    assert durations == [80, 120]
    record = sdx4.read_metadata(tmp_path / "out" / "anim_x4_nearest.png")["animation"]
    assert (record["format"], record["output_format"], record["frames"]) == ("GIF", "PNG", 2)

def test_a_grey_profile_stays_with_a_grey_output_and_is_not_put_on_an_rgb_one(tmp_path, rng_image):
    assert ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(GREY_PROFILE))).strip() == (
        "sdx4 test grey gamma 2.2")
    Image.fromarray(rng_image(6, 8)[:, :, 0], "L").save(tmp_path / "g.png", icc_profile=GREY_PROFILE)
    grey, rgb = (sdx4.upscale(tmp_path / "g.png", method="bicubic", color_mode=m) for m in ("auto", "rgb"))
    assert grey.icc_profile == GREY_PROFILE and grey.metadata["icc_profile"] is True
    assert rgb.icc_profile is None and rgb.metadata["icc_profile"] is False  # recorded, not silent


# --- 16 bits ----------------------------------------------------------------------------------------------


def _grey16(tmp_path, name="g16.png"):
    a = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 1001 + 7).astype(np.uint16)  # not multiples of 257
    Image.fromarray(a).save(tmp_path / name)
    return a


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grey_keeps_its_16_bits_through_a_classical_filter(tmp_path, suffix):
    a = _grey16(tmp_path)
    out = tmp_path / f"out{suffix}"
    assert cli.main(["upscale", str(tmp_path / "g16.png"), "--method", "nearest", "--bit-depth", "16", "-q",
                     "-o", str(out)]) == 0
    with Image.open(out) as im:
        assert im.mode.startswith("I;16")
        assert np.array_equal(np.asarray(im).astype(np.uint16), np.kron(a, np.ones((4, 4), np.uint16)))


def test_16_bit_bicubic_equals_pillow_float_resize_rounded(tmp_path):
    a = _grey16(tmp_path)
    result = sdx4.upscale(tmp_path / "g16.png", method="bicubic", bit_depth=16)
    expected = Image.fromarray(a.astype(np.float32)).resize((32, 24), Image.Resampling.BICUBIC)
    expected = np.clip(np.rint(np.asarray(expected)), 0, 65535)
    assert np.array_equal(np.asarray(result.image).astype(np.float64), expected)
    assert result.metadata["bit_depth"] == 16 and result.metadata["input_mode"] == "I;16"
    assert "bit_depth" not in sdx4.upscale(tmp_path / "g16.png", method="bicubic").metadata


def test_16_bit_output_is_refused_before_work_for_jpeg_webp_and_colour(tmp_path, rng_image, capsys):
    _grey16(tmp_path)
    for suffix, fmt in ((".jpg", "JPG"), (".webp", "WEBP")):
        code = cli.main(["upscale", str(tmp_path / "g16.png"), "--method", "nearest", "--bit-depth", "16",
                         "-o", str(tmp_path / f"o{suffix}")])
        assert code == 2 and f"{fmt} holds 8 bits per channel" in capsys.readouterr().err
        assert not (tmp_path / f"o{suffix}").exists()
    _photo(rng_image).save(tmp_path / "c.png")
    assert cli.main(["upscale", str(tmp_path / "c.png"), "--method", "nearest", "--bit-depth", "16"]) == 2
    assert "c.png: a 16-bit output must be grayscale without alpha" in capsys.readouterr().err
    with pytest.raises(ImageInputError, match="must be grayscale"):
        sdx4.upscale(tmp_path / "g16.png", method="nearest", bit_depth=16, color_mode="rgb")


def test_bit_depth_is_validated():
    with pytest.raises(sdx4.OptionsError, match="bit_depth must be 8 or 16; got 12"):
        sdx4.UpscaleOptions(bit_depth=12)
    with pytest.raises(sdx4.OptionsError, match="needs scale 4") as e:
        sdx4.UpscaleOptions(bit_depth=16, scale=2)
    assert e.value.option == "bit_depth"
    assert sdx4.UpscaleOptions(bit_depth=16, scale=2, method="lanczos").bit_depth == 16


def test_the_sd_method_gives_16_bits_from_its_float_output(tiny_model_dir, tmp_path):
    a = _grey16(tmp_path)
    up = sdx4.load(str(tiny_model_dir), device="cpu", dtype="fp32")
    kw = dict(steps=1, seed=3, guidance=1.0)
    deep, flat = up(tmp_path / "g16.png", bit_depth=16, **kw), up(tmp_path / "g16.png", **kw)
    assert deep.image.mode == "I;16" and flat.image.mode == "L" and deep.image.size == (32, 24)
    d, f = np.asarray(deep.image).astype(np.float64), np.asarray(flat.image).astype(np.float64)
    assert np.abs(d / 257 - f).max() <= 1.0  # the same image, within 8-bit rounding
    assert (d % 257 != 0).mean() > 0.5  # with more than 8 bits of precision
    assert a.shape == (6, 8)
