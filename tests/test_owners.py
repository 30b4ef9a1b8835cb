"""One owner for each rule. File names and formats (imageio): what an upscaled image is called, and which files
are read as images, the same in the CLI, batch runs, `sdx4 evaluate` and the server. The local-path rule for
--model (model/hub.py), which batch reaches through the public API."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from PIL import Image

from sdx4.batch.job import IMAGE_SUFFIXES as BATCH_SUFFIXES
from sdx4.batch.job import output_names
from sdx4.batch.plan import discover
from sdx4.cli.upscale import output_paths
from sdx4.imageio import (
    INPUT_FORMATS,
    INPUT_SUFFIXES,
    UPLOAD_FORMATS,
    numbered_name,
    output_name,
)
from sdx4.options import MAX_SCALE, METHODS, MIN_SCALE, LoadOptions, UpscaleOptions
from sdx4.quality.evaluate import IMAGE_SUFFIXES as EVALUATE_SUFFIXES
from sdx4.quality.evaluate import list_images
from sdx4.service.requests import ServerSettings, download_name

CLASSICAL = tuple(m for m in METHODS if m != "sd")


def test_output_names_are_the_documented_ones():
    assert output_name("photo", 4) == "photo_x4.png"
    assert output_name("photo", 4, "sd") == "photo_x4.png"
    assert output_name("photo", 4, "bicubic") == "photo_x4_bicubic.png"
    assert output_name("photo", 2, "lanczos") == "photo_x2_lanczos.png"
    assert output_name("photo", 4, "sd", 0, 2) == "photo_x4_1.png"
    assert output_name("photo", 8, "sd", 1, 2) == "photo_x8_2.png"
    assert output_name("photo", 4, "bicubic", 2, 3) == "photo_x4_bicubic_3.png"
    assert output_name("a.b", 16, None, 0, 1, ".webp") == "a.b_x16.webp"
    assert numbered_name("job1", 0, 1) == "job1.png" and numbered_name("job1", 1, 2) == "job1_2.png"


@pytest.mark.parametrize("method", METHODS)
def test_every_method_scale_and_count_gets_its_own_name(method):
    pattern = re.compile(r"^photo_x(\d+)" + ("" if method == "sd" else "_" + method) + r"(_(\d+))?\.png$")
    names = set()
    for scale in range(MIN_SCALE, MAX_SCALE + 1):
        for count in (1, 2, 3):
            for index in range(count):
                name = output_name("photo", scale, method, index, count)
                m = pattern.match(name)
                assert m is not None, name
                assert int(m.group(1)) == scale
                assert m.group(3) == (None if count == 1 else str(index + 1)), name
                names.add((count, name))
    assert len(names) == (MAX_SCALE - MIN_SCALE + 1) * (1 + 2 + 3)  # none repeats


@pytest.mark.parametrize("index, count", [(-1, 2), (2, 2), (0, 0)])
def test_an_index_outside_the_images_is_refused_with_its_value(index, count):
    with pytest.raises(ValueError, match=f"got (index {index}|{count})"):
        output_name("photo", 4, "sd", index, count)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scale, count", [(4, 1), (4, 3), (2, 1), (3, 2)])
def test_cli_batch_and_server_name_outputs_alike(tmp_path, method, scale, count):
    options = UpscaleOptions(method=method, scale=scale, num_images=count)
    expected = [output_name("my_photo", scale, method, i, count) for i in range(count)]
    cli = output_paths([tmp_path / "my_photo.jpg"], None, options)
    assert cli == [[tmp_path / name for name in expected]]
    assert output_names("sub/my_photo.jpg", options) == tuple(f"sub/{name}" for name in expected)
    # The server's download names carry no method tag: the sd names for every method.
    server = [download_name("my photo.jpg", i, count, scale) for i in range(count)]
    assert server == [output_name("my_photo", scale, "sd", i, count) for i in range(count)]
    if method == "sd":
        assert server == expected


def test_cli_output_file_is_numbered_like_the_others(tmp_path):
    options = UpscaleOptions(method="bicubic", num_images=2)
    assert output_paths([tmp_path / "a.png"], str(tmp_path / "out.webp"), options) == [
        [tmp_path / "out_1.webp", tmp_path / "out_2.webp"]
    ]


def test_one_suffix_list_for_batch_and_evaluate_and_one_format_registry_for_the_server():
    assert BATCH_SUFFIXES is INPUT_SUFFIXES and EVALUATE_SUFFIXES is INPUT_SUFFIXES
    assert ServerSettings().formats is UPLOAD_FORMATS
    assert set(UPLOAD_FORMATS) <= set(INPUT_FORMATS)
    assert len(INPUT_SUFFIXES) == len(set(INPUT_SUFFIXES)) == 20
    assert all(s == s.lower() and s.startswith(".") for s in INPUT_SUFFIXES)


def test_each_input_suffix_names_the_format_pillow_reads_it_as():
    pillow = Image.registered_extensions()  # suffix -> Pillow format name
    for fmt, suffixes in INPUT_FORMATS.items():
        for suffix in suffixes:
            if suffix in pillow:  # QOI / AVIF need a newer Pillow than some have
                assert pillow[suffix] == ("DIB" if suffix == ".dib" else fmt), suffix


def test_batch_and_evaluate_pick_the_same_files_from_a_folder(tmp_path):
    names = ["a.PNG", "b.gif", "c.tga", "d.jfif", "e.webp", "notes.txt", "f.psd", "g.JP2", "h"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    images, others = discover(tmp_path, recursive=False)
    assert images == ["a.PNG", "b.gif", "c.tga", "d.jfif", "e.webp", "g.JP2"]
    assert others == ["f.psd", "h", "notes.txt"]
    assert [p.name for p in list_images(tmp_path)] == images


def test_server_refuses_a_format_outside_its_list(tmp_path):
    from sdx4.service.requests import ApiError, check_header

    buf = tmp_path / "x.tga"
    Image.new("RGB", (4, 4)).save(buf)
    with pytest.raises(ApiError) as e:
        check_header(Path(buf).read_bytes(), ServerSettings(), num_images=1)
    assert e.value.status == 415 and "PNG, JPEG, WEBP, BMP, TIFF, GIF" in e.value.detail


@pytest.mark.parametrize(
    "model, missing",
    [
        ("./no-such-model", True),
        ("/no/such/model", True),
        ("~/no-such-sdx4-model", True),
        ("a/b/no-such-model", True),  # two slashes: a path, not a Hub id
        ("no-such-model", True),  # no slash: a path too
        ("stabilityai/stable-diffusion-x4-upscaler", False),  # a Hub id: the loader decides
        ("org/name", False),
    ],
)
def test_local_model_missing_follows_the_hub_rule(model, missing):
    from sdx4.api import local_model_missing
    from sdx4.model.hub import looks_like_path

    assert local_model_missing(model) is missing
    assert looks_like_path(model) is missing  # none of these folders exist: missing = looks like a path


def test_an_existing_local_folder_is_not_missing(tmp_path, monkeypatch):
    from sdx4.api import local_model_missing

    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert local_model_missing(str(tmp_path / "org" / "name")) is False
    assert local_model_missing("org/name") is False  # looks like a Hub id, and is there anyway
    monkeypatch.setenv("HOME", str(tmp_path))
    assert local_model_missing("~/org") is False  # ~ is the user's home folder
    assert local_model_missing("~/other") is True


def test_batch_planning_refuses_a_missing_local_model_by_the_same_rule(tmp_path, monkeypatch):
    from sdx4.batch import BatchError, BatchJob, plan

    (tmp_path / "in").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "in" / "a.png")
    calls = []
    batch_plan = sys.modules["sdx4.batch.plan"]  # (the package's `plan` attribute is the function)
    monkeypatch.setattr(batch_plan, "local_model_missing", lambda m: calls.append(m) or True)
    with pytest.raises(BatchError, match="model folder 'org/name' does not exist"):
        plan(BatchJob(tmp_path / "in", tmp_path / "out", load=LoadOptions(model="org/name")))
    assert calls == ["org/name"]  # batch asks the public rule; it keeps no copy of its own
