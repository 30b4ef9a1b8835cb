"""Reading any image Pillow reads, normalising modes, and atomic writes with metadata."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from sdx4.engine.classical import upscale_classical
from sdx4.imageio import (
    ImageInputError,
    as_loaded,
    from_array,
    normalise,
    open_image,
    read_metadata,
    save_image,
)


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((10, 20, 3), dtype=np.uint8)
    arr[:, :5] = 255  # white band on the left
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    path = tmp_path / "o.jpg"
    im.save(path, exif=exif, quality=100)
    loaded = open_image(path)
    assert loaded.size == (10, 20)  # width and height swapped
    top = np.asarray(loaded.rgb)[:3].mean()
    bottom = np.asarray(loaded.rgb)[-3:].mean()
    assert top > 200 and bottom < 50  # the left band became the top


@pytest.mark.parametrize(
    "mode, fill, expected_rgb",
    [
        ("L", 100, (100, 100, 100)),
        ("1", 1, (255, 255, 255)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("YCbCr", (76, 85, 255), None),
    ],
)
def test_modes_convert_to_rgb(mode, fill, expected_rgb):
    loaded = normalise(Image.new(mode, (4, 3), fill))
    assert loaded.rgb.mode == "RGB" and loaded.rgb.size == (4, 3) and loaded.alpha is None
    if expected_rgb:
        assert loaded.rgb.getpixel((0, 0)) == expected_rgb


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(arr).save(path)
    rgb = np.asarray(open_image(path).rgb)
    assert rgb[0, :, 0].tolist() == [0, 128, 255]


def test_palette_with_transparency_keeps_alpha():
    im = Image.new("P", (4, 4), 0)
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    im.putpixel((0, 0), 1)
    im.info["transparency"] = 0
    loaded = normalise(im)
    assert loaded.alpha.mode == "L" and loaded.alpha.size == (4, 4)
    assert loaded.alpha.getpixel((0, 0)) == 255 and loaded.alpha.getpixel((1, 1)) == 0
    assert loaded.rgb.getpixel((0, 0)) == (0, 255, 0)


def test_opaque_alpha_is_dropped_and_la_kept():
    assert normalise(Image.new("RGBA", (2, 2), (1, 2, 3, 255))).alpha is None
    la = normalise(Image.new("LA", (2, 2), (50, 10)))
    assert la.alpha.getpixel((0, 0)) == 10 and la.rgb.getpixel((0, 0)) == (50, 50, 50)


def test_float_and_uint8_arrays_agree():
    arr = np.random.RandomState(1).randint(0, 256, (5, 6, 3), dtype=np.uint8)
    a = np.asarray(from_array(arr).rgb)
    b = np.asarray(from_array(arr.astype(np.float64) / 255).rgb)
    assert np.array_equal(a, b)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "cannot decode image|not an image"),
        (b"this is not an image at all", "not an image Pillow can read"),
    ],
)
def test_garbage_files_are_named(tmp_path, data, message):
    path = tmp_path / "bad.png"
    path.write_bytes(data)
    with pytest.raises(ImageInputError, match=message) as e:
        open_image(path)
    assert str(path) in str(e.value)


def test_truncated_png_is_refused(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageInputError, match="cut.png: cannot decode image"):
        open_image(path)


def test_directory_and_missing_are_named(tmp_path):
    with pytest.raises(ImageInputError, match="is a directory"):
        open_image(tmp_path)
    with pytest.raises(ImageInputError, match="no such file"):
        open_image(tmp_path / "none.png")


def test_save_roundtrips_metadata_and_refuses_overwrite(tmp_path):
    out = tmp_path / "o.png"
    im = Image.new("RGB", (3, 3), (9, 8, 7))
    save_image(im, out, {"prompt": "x", "seed": 3})
    assert read_metadata(out) == {"prompt": "x", "seed": 3}
    with pytest.raises(ImageInputError, match="already exists \\(pass --overwrite"):
        save_image(im, out, {})
    save_image(Image.new("RGB", (3, 3), (1, 1, 1)), out, {"seed": 4}, overwrite=True)
    assert read_metadata(out) == {"seed": 4}
    assert os.listdir(tmp_path) == ["o.png"]
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    out = tmp_path / "o.png"

    def boom(self, fp, *a, **k):
        fp.write(b"partial")
        raise KeyboardInterrupt  # an interrupt in the middle of writing

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_image(Image.new("RGB", (2, 2)), out, {})
    assert os.listdir(tmp_path) == []


def test_output_suffix_and_jpeg_alpha_are_checked(tmp_path):
    with pytest.raises(ImageInputError, match="output must end in one of .png, .jpg, .jpeg, .webp"):
        save_image(Image.new("RGB", (2, 2)), tmp_path / "o.gif")
    with pytest.raises(ImageInputError, match="JPEG cannot hold the alpha channel"):
        save_image(Image.new("RGBA", (2, 2)), tmp_path / "o.jpg")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("method", ["nearest", "bilinear", "bicubic", "lanczos"])
def test_classical_methods_equal_pillow_and_are_exactly_4x(method):
    arr = np.random.RandomState(2).randint(0, 256, (7, 5, 4), dtype=np.uint8)
    out = upscale_classical(as_loaded(arr), method)
    assert out.size == (20, 28) and out.mode == "RGBA"
    flt = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1}[method]
    rgb = Image.fromarray(arr[:, :, :3]).resize((20, 28), flt)
    assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(rgb))


def test_each_output_suffix_names_the_format_pillow_writes_it_as(tmp_path):
    from sdx4.imageio import (
        ALPHA_FORMATS,
        OUTPUT_FORMATS,
        OUTPUT_SUFFIXES,
        output_format,
    )

    pillow = Image.registered_extensions()
    assert OUTPUT_SUFFIXES == (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
    assert set(ALPHA_FORMATS) == {"PNG", "WEBP", "TIFF"} and set(ALPHA_FORMATS) <= set(OUTPUT_FORMATS)
    for fmt, suffixes in OUTPUT_FORMATS.items():
        for suffix in suffixes:
            assert pillow[suffix] == fmt and output_format(f"a/b{suffix.upper()}") == fmt
            out = save_image(Image.new("RGB", (3, 2), (9, 8, 7)), tmp_path / f"o{suffix}")
            with Image.open(out) as im:
                assert im.format == fmt and im.size == (3, 2)
    with pytest.raises(ImageInputError, match=r"^o\.gif: output must end in one of \.png, .* \.bmp$"):
        output_format("o.gif")
    with pytest.raises(ImageInputError, match="BMP cannot hold the alpha channel; write .png, .webp or .tif instead"):
        save_image(Image.new("RGBA", (2, 2)), tmp_path / "a.bmp")
    assert not (tmp_path / "a.bmp").exists()
