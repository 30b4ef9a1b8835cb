"""`sdx4 upscale`: everything about the output is checked before the model loads (issue 22, item 5).

The format comes from -o's suffix; an input with alpha cannot go to JPEG/BMP; the output folder takes a file
and has room; stdin, stdout, pipes and FIFOs are read once. Every mistake exits 2 with `sdx4: error: ...`, no
traceback, nothing written and no folder left behind.
"""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import SRC
from PIL import Image

import sdx4
from sdx4 import cli, imageio
from sdx4.imageio import (
    ImageInputError,
    ImageOutputError,
    max_output_bytes,
    read_limited,
    save_image,
)


@pytest.fixture
def img(tmp_path, rng_image):
    path = tmp_path / "photo.png"
    Image.fromarray(rng_image(12, 10)).save(path)
    return path


@pytest.fixture
def rgba(tmp_path, rng_image):
    arr = rng_image(12, 10, channels=4)
    arr[0, 0, 3] = 0  # one transparent pixel: the alpha is kept
    path = tmp_path / "logo.png"
    Image.fromarray(arr, "RGBA").save(path)
    return path


@pytest.fixture
def no_model(monkeypatch):
    """The model must not load: any call to sdx4.load fails the test."""

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(sdx4.api, "load", refuse)


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def run(argv, stdin=None, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, "-m", "sdx4", *argv], input=stdin, capture_output=True, env=env,
                          cwd=cwd, timeout=120, check=False)


@pytest.mark.parametrize("suffix, fmt", [(".png", "PNG"), (".JPG", "JPEG"), (".jpeg", "JPEG"), (".webp", "WEBP"),
                                         (".tif", "TIFF"), (".TIFF", "TIFF"), (".bmp", "BMP")])
def test_the_output_suffix_chooses_the_format(img, tmp_path, suffix, fmt):
    out = tmp_path / f"out{suffix}"
    assert cli.main(["upscale", str(img), "-o", str(out), "--method", "bicubic", "-q"]) == 0
    with Image.open(out) as im:
        assert im.format == fmt and im.size == (40, 48) and out.is_file()
    if fmt in ("PNG", "WEBP", "TIFF", "BMP"):  # lossless: the bicubic upscale bit for bit
        expected = Image.open(img).resize((40, 48), Image.Resampling.BICUBIC)
        assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(expected))


@pytest.mark.parametrize("name", ["out.tfi", "out.txt", "out.gif", "results.v2"])
def test_an_unknown_output_suffix_exits_2_naming_the_allowed_ones(img, tmp_path, capsys, name, no_model):
    assert cli.main(["upscale", str(img), "-o", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert err == (f"sdx4: error: -o {tmp_path / name}: output must end in one of .png, .jpg, .jpeg, .webp, .tif, "
                   ".tiff, .bmp; a folder: end it with /\n")
    assert files(tmp_path) == ["photo.png"]


@pytest.mark.parametrize("name", ["out.png/", "new", "a/b/c/"])
def test_a_name_ending_in_slash_or_without_suffix_is_a_folder(img, tmp_path, name):
    assert cli.main(["upscale", str(img), "-o", str(tmp_path) + "/" + name, "--method", "bicubic", "-q"]) == 0
    folder = tmp_path / name.rstrip("/")
    assert folder.is_dir() and files(folder) == ["photo_x4_bicubic.png"]


def test_an_existing_folder_with_an_image_suffix_stays_a_folder(img, tmp_path):
    (tmp_path / "odd.png").mkdir()
    assert cli.main(["upscale", str(img), "-o", str(tmp_path / "odd.png"), "--method", "bicubic", "-q"]) == 0
    assert files(tmp_path / "odd.png") == ["photo_x4_bicubic.png"]


@pytest.mark.parametrize("suffix, fmt", [(".jpg", "JPEG"), (".bmp", "BMP")])
def test_alpha_to_a_format_without_alpha_exits_2_before_loading(rgba, tmp_path, capsys, no_model, suffix, fmt):
    out = tmp_path / f"out{suffix}"
    assert cli.main(["upscale", str(rgba), "-o", str(out), "--steps", "2"]) == 2
    assert capsys.readouterr().err == (
        f"sdx4: error: {rgba} has an alpha channel (transparency) that {fmt} cannot hold, so it cannot be written "
        f"to {out}; name the output .png, .webp or .tif instead\n"
    )
    assert files(tmp_path) == ["logo.png"]


@pytest.mark.parametrize("suffix", [".webp", ".tif", ".png"])
def test_alpha_goes_to_the_formats_that_hold_it(rgba, tmp_path, suffix):
    out = tmp_path / f"out{suffix}"
    assert cli.main(["upscale", str(rgba), "-o", str(out), "--method", "nearest", "-q"]) == 0
    with Image.open(out) as im:
        assert im.mode == "RGBA" and im.getpixel((0, 0))[3] == 0 and im.getpixel((39, 47))[3] > 0


def test_an_opaque_rgba_input_may_go_to_jpeg(tmp_path):
    src = tmp_path / "opaque.png"
    Image.new("RGBA", (6, 5), (10, 20, 30, 255)).save(src)
    assert cli.main(["upscale", str(src), "-o", str(tmp_path / "o.jpg"), "--method", "bicubic", "-q"]) == 0
    assert Image.open(tmp_path / "o.jpg").size == (24, 20)


def test_an_unwritable_folder_exits_2_naming_it_not_the_probe(img, tmp_path, capsys, monkeypatch, no_model):
    folder = tmp_path / "ro"
    folder.mkdir()

    def denied(*a, dir=None, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(Path(dir) / ".sdx4-probe-x"))

    monkeypatch.setattr(imageio.write.tempfile, "mkstemp", denied)
    assert cli.main(["upscale", str(img), "-o", str(folder / "o.png")]) == 2
    err = capsys.readouterr().err
    assert err == f"sdx4: error: {folder}: cannot write in the output folder (Permission denied)\n"
    assert files(tmp_path) == ["photo.png", "ro"]


def test_a_folder_nobody_can_write_in_is_refused_for_real(img, capsys, no_model):
    # /proc takes no new file, not even from root.
    assert cli.main(["upscale", str(img), "-o", "/proc/o.png"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdx4: error: /proc: cannot write in the output folder (") and "probe" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in read-only folders")
def test_a_read_only_folder_is_refused(img, tmp_path, capsys, no_model):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o555)
    assert cli.main(["upscale", str(img), "-o", str(folder) + "/"]) == 2
    assert f"{folder}: cannot write in the output folder (Permission denied)" in capsys.readouterr().err


def test_too_little_disk_space_exits_2_and_removes_the_folders_it_made(tmp_path, capsys, monkeypatch, rng_image,
                                                                      no_model):
    real = imageio.write.shutil.disk_usage
    monkeypatch.setattr(imageio.write.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    img = tmp_path / "photo.png"
    Image.fromarray(rng_image(400, 500)).save(img)  # RGB: 3 bytes per output pixel, +1%, +1 MiB per file
    need = max_output_bytes((500, 400), 4, 2, channels=3)
    assert need == 2 * (-(-2000 * 1600 * 3 * 101 // 100) + 2**20) and round(need / 2**20) == 20
    (tmp_path / "kept").mkdir()
    out = tmp_path / "kept" / "new" / "deeper"
    assert cli.main(["upscale", str(img), "-o", f"{out}/", "--num-images", "2"]) == 2
    assert capsys.readouterr().err == (
        f"sdx4: error: {out}: 1000 bytes free on its disk, the output(s) may need up to 20 MiB "
        "(uncompressed pixels); free some space or choose another folder with -o\n"
    )
    assert files(tmp_path) == ["kept", "photo.png"]  # new/deeper removed, kept (not ours) stays


def test_a_run_that_fails_removes_the_empty_folders_it_made_and_only_those(img, tmp_path, capsys, monkeypatch):
    def fail(*a, **k):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(sdx4.api, "upscale_classical_result", fail)
    assert cli.main(["upscale", str(img), "-o", str(tmp_path / "new" / "out"), "--method", "bicubic"]) == 1
    assert capsys.readouterr().err == "sdx4: error: [Errno 5] Input/output error\n"
    assert files(tmp_path) == ["photo.png"]


def test_a_failed_write_names_the_output_not_the_temp_file(tmp_path, monkeypatch):
    out = tmp_path / "o.png"

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(imageio.write.os, "fsync", full)
    with pytest.raises(ImageOutputError) as e:
        save_image(Image.new("RGB", (4, 4)), out, {})
    assert str(e.value) == f"{out}: cannot write the output (No space left on device)"
    assert e.value.errno == errno.ENOSPC and isinstance(e.value, OSError)
    assert os.listdir(tmp_path) == []  # the temp file is gone too


def test_a_failed_write_in_the_cli_exits_1_naming_the_output(img, tmp_path, capsys, monkeypatch):
    def readonly(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(imageio.write.os, "replace", readonly)  # the disk turned read-only after the checks
    out = tmp_path / "o.png"
    assert cli.main(["upscale", str(img), "-o", str(out), "--method", "bicubic", "-q"]) == 1
    assert capsys.readouterr().err == f"sdx4: error: {out}: cannot write the output (Read-only file system)\n"
    assert files(tmp_path) == ["photo.png"]


@pytest.mark.parametrize("channels", [3, 4])
def test_max_output_bytes_bounds_every_format(tmp_path, rng_image, channels):
    # Noise, the worst case for every compressor; the margin is checked without the 1 MiB for headers.
    arr = rng_image(600, 500, channels=channels)
    bound = max_output_bytes((100, 120), 5, channels=channels)
    assert bound == -(-600 * 500 * channels * 101 // 100) + 2**20
    for suffix in (".png", ".webp", ".tif", ".bmp", ".jpg"):
        if channels == 4 and suffix in (".bmp", ".jpg"):
            continue
        out = save_image(Image.fromarray(arr), tmp_path / f"o{suffix}", {"prompt": "x" * 1000})
        assert out.stat().st_size <= bound - 2**20 + 4096, suffix


# -- stdin, stdout, pipes and FIFOs: read once, never reopened ----------------------------------------------


def png_bytes(img: Path) -> bytes:
    return img.read_bytes()


def test_stdin_to_stdout_is_one_png_with_the_parameters(img, tmp_path):
    r = run(["upscale", "-", "-o", "-", "--method", "bicubic"], stdin=png_bytes(img))
    assert r.returncode == 0, r.stderr
    out = Image.open(io.BytesIO(r.stdout))
    assert out.format == "PNG" and out.size == (40, 48)
    expected = Image.open(img).resize((40, 48), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(out), np.asarray(expected))
    assert out.info["sdx4"] and '"input": "-"' in out.info["sdx4"] and '"method": "bicubic"' in out.info["sdx4"]
    assert b"-> stdout (40x48)" in r.stderr


def test_stdin_to_a_file_and_dev_stdin_from_a_pipe_are_read_once(img, tmp_path):
    r = run(["upscale", "-", "-o", str(tmp_path / "a.webp"), "--method", "bicubic", "-q"], stdin=png_bytes(img))
    assert r.returncode == 0 and r.stderr == b""
    r = run(["upscale", "/dev/stdin", "-o", str(tmp_path / "b.webp"), "--method", "bicubic", "-q"],
            stdin=png_bytes(img))
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.webp")), np.asarray(Image.open(tmp_path / "b.webp")))


def test_process_substitution_is_read_once(img, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SRC)}
    cmd = f'"{sys.executable}" -m sdx4 upscale <(cat "{img}") -o "{tmp_path / "o.png"}" --method bicubic -q'
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, env=env, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "o.png").size == (40, 48)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-"], "-: an image read from stdin needs -o FILE (or -o - for stdout)"),
        (["-", "-o", "outdir/"], "-: an image read from stdin needs -o FILE (or -o - for stdout)"),
        (["-", "-", "-o", "-"], "several inputs need an output folder, not a file"),
        (["-", "-o", "-", "--num-images", "2"], "-o -: stdout takes one image; --num-images 2 makes 2"),
    ],
)
def test_stdin_and_stdout_mistakes_exit_2(tmp_path, img, argv, message):
    r = run(["upscale", *argv, "--method", "bicubic"], stdin=png_bytes(img), cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == b""
    assert r.stderr.decode().startswith("sdx4: error: ") and message in r.stderr.decode()
    assert files(tmp_path) == ["photo.png"]


def test_garbage_on_stdin_exits_2_naming_stdin(tmp_path):
    r = run(["upscale", "-", "-o", str(tmp_path / "o.png"), "--method", "bicubic"], stdin=b"not an image")
    assert r.returncode == 2
    assert r.stderr.decode() == "sdx4: error: -: not an image Pillow can read (unknown or corrupt format)\n"
    r = run(["upscale", "-", "-o", str(tmp_path / "o.png"), "--method", "bicubic"], stdin=b"")
    assert r.returncode == 2 and r.stderr.decode() == "sdx4: error: -: empty (nothing was written to it)\n"
    assert files(tmp_path) == []


def test_a_stream_over_the_limit_is_refused():
    with pytest.raises(ImageInputError, match=r"^pipe: more than 1024 bytes on the stream"):
        read_limited(io.BytesIO(b"x" * 1025), "pipe", limit=1024)
    assert read_limited(io.BytesIO(b"x" * 1024), "pipe", limit=1024) == b"x" * 1024


def test_a_fifo_with_a_writer_is_read_once(img, tmp_path):
    fifo = tmp_path / "in.png"
    os.mkfifo(fifo)
    data = png_bytes(img)

    def writer():
        with open(fifo, "wb") as f:  # blocks until sdx4 opens the FIFO; a second open would hang the test
            for i in range(0, len(data), 100):
                f.write(data[i:i + 100])

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    assert cli.main(["upscale", str(fifo), "--method", "bicubic", "-q"]) == 0
    t.join(5)
    assert not t.is_alive()
    expected = Image.open(img).resize((40, 48), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "in_x4_bicubic.png")), np.asarray(expected))


def test_a_fifo_without_a_writer_is_refused_after_the_wait(tmp_path, capsys, monkeypatch, no_model):
    fifo = tmp_path / "in.png"
    os.mkfifo(fifo)
    monkeypatch.setattr(imageio.read, "STREAM_WAIT_S", 0.2)  # read_stream reads its module's constant
    assert cli.main(["upscale", str(fifo)]) == 2
    assert capsys.readouterr().err == f"sdx4: error: {fifo}: nothing was written to it in 0.2 s (a FIFO needs a writer)\n"
    assert files(tmp_path) == ["in.png"]


def test_the_model_gets_a_fifo_image_as_it_gets_the_file(tiny_model_dir, img, tmp_path):
    """A stream is decoded once and handed to the Upscaler in memory: the same output as from the file."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    data = png_bytes(img)

    def writer():
        with open(fifo, "wb") as f:
            f.write(data)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    common = ["--model", str(tiny_model_dir), "--steps", "2", "--seed", "3", "-q"]
    assert cli.main(["upscale", str(fifo), "-o", str(tmp_path / "a.png"), *common]) == 0
    assert cli.main(["upscale", str(img), "-o", str(tmp_path / "b.png"), *common]) == 0
    a, b = (np.asarray(Image.open(tmp_path / n)) for n in ("a.png", "b.png"))
    assert a.shape == (48, 40, 3) and np.array_equal(a, b)
    assert sdx4.read_metadata(tmp_path / "a.png")["input"] == "pipe.png"


@pytest.mark.parametrize("side", ["stdin", "stdout"])
def test_a_terminal_is_refused_as_stdin_or_stdout(img, tmp_path, side):
    import pty

    leader, follower = pty.openpty()
    try:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SRC)}
        argv = [sys.executable, "-m", "sdx4", "upscale", "-" if side == "stdin" else str(img), "-o",
                str(tmp_path / "o.png") if side == "stdin" else "-", "--method", "bicubic"]
        r = subprocess.run(argv, env=env, timeout=60, stderr=subprocess.PIPE, check=False,
                           **({"stdin": follower} if side == "stdin" else {"stdout": follower}))
    finally:
        os.close(follower)
        os.close(leader)
    assert r.returncode == 2
    expected = ("-: stdin is a terminal; pipe an image in" if side == "stdin"
                else "-o -: stdout is a terminal; redirect it (> out.png) or pipe it to another command")
    assert r.stderr.decode().startswith(f"sdx4: error: {expected}")
    assert files(tmp_path) == ["photo.png"]
