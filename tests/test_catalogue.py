"""The catalogue of bad inputs sdx4 refuses (issue 22), one table row per input.

Each row names a bad input, builds it in `tmp_path`, runs it through one front end (the `sdx4` command via
`cli.main`, an HTTP request through the app, a folder run, or a Python API call) and asserts:

- the outcome: exit code 2 for a user's mistake, 1 for a runtime failure; the HTTP status; or the exception
  type (with `.option` for an OptionsError);
- the message matches the row's regex, which names the input (file, option, field) AND the problem;
- nothing is left behind where output would go (the folder listing, temp files included, is the same
  before and after; for the server, its results folder and job store);
- no traceback ("Traceback" appears in neither stderr nor the response).

README.md's "## Reliability" section gives the number of rows per kind; `test_readme_counts_match` keeps it true.
"""

from __future__ import annotations

import errno
import io
import os
import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from server_helpers import bomb_png, png_bytes
from test_lossless_io import _grey16
from test_server_api import FAST

import sdx4
from sdx4 import cli, imageio
from sdx4.imageio import ImageInputError
from sdx4.model.errors import ModelPathError
from sdx4.options import OptionsError
from sdx4.service.app import create_app
from sdx4.service.jobs import QueueSettings
from sdx4.service.requests import ServerSettings

README = Path(__file__).resolve().parents[1] / "README.md"


# ---- how the inputs are made ------------------------------------------------------------------------


def photo(tmp: Path, name: str = "photo.png", size: tuple[int, int] = (10, 12), mode: str = "RGB") -> Path:
    path = tmp / name
    Image.new(mode, size, (200, 30, 40, 128)[: len(mode)]).save(path)
    return path


def truncated_png(tmp: Path) -> Path:
    full = photo(tmp, "whole.png", (40, 40)).read_bytes()
    (tmp / "whole.png").unlink()
    path = tmp / "cut.png"
    path.write_bytes(full[: len(full) // 2])
    return path


def animated_gif(tmp: Path) -> Path:
    first, *rest = [Image.new("RGB", (8, 6), (40 * i, 0, 0)) for i in range(3)]
    first.save(tmp / "anim.gif", save_all=True, append_images=rest, duration=100, loop=0)
    return tmp / "anim.gif"


def animated_gif_bytes() -> bytes:
    buf = io.BytesIO()
    first, *rest = [Image.new("RGB", (8, 6), (40 * i, 0, 0)) for i in range(3)]
    first.save(buf, format="GIF", save_all=True, append_images=rest)
    return buf.getvalue()


def text_file(tmp: Path) -> Path:
    path = tmp / "notes.png"
    path.write_text("this is not an image\n")
    return path


def grey16(tmp: Path) -> Path:
    _grey16(tmp)  # test_lossless_io: a 16-bit grey PNG
    return tmp / "g16.png"


def model_missing_parts(tmp: Path) -> Path:
    folder = tmp / "half-model"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionUpscalePipeline"}')
    return folder


def folder_of_images(tmp: Path) -> Path:
    src = tmp / "in"
    src.mkdir()
    photo(src, "a.png")
    photo(src, "b.png")
    return src


def little_disk_space(mp: pytest.MonkeyPatch) -> None:
    real = imageio.write.shutil.disk_usage
    mp.setattr(imageio.write.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))


def disk_turns_read_only(mp: pytest.MonkeyPatch) -> None:
    def readonly(*a: Any, **k: Any) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    mp.setattr(imageio.write.os, "replace", readonly)  # after the checks, while writing


# ---- the rows ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cli:
    """`sdx4 ARGV` run in tmp_path; `argv(tmp)` builds the files and returns the arguments."""

    name: str
    argv: Callable[[Path], list[str]]
    code: int
    message: str
    stdin: bytes | None = None
    kind: str = "cli"
    patch: Callable[[pytest.MonkeyPatch], None] | None = None  # a failure of the machine, not of the input


@dataclass(frozen=True)
class Http:
    """A request through the app built with `settings`; `send(client)` makes it."""

    name: str
    send: Callable[[TestClient], Any]
    status: int
    message: str
    settings: dict[str, Any] = field(default_factory=dict)
    kind: str = "server"


@dataclass(frozen=True)
class Api:
    """A Python API call: `make(tmp)` builds the input, `call(input)` makes the call."""

    name: str
    make: Callable[[Path], Any]
    call: Callable[[Any], Any]
    error: type[Exception]
    message: str
    option: str | None = None
    kind: str = "api"


def bicubic(*argv: str) -> list[str]:
    return ["upscale", *argv, "--method", "bicubic"]


def sd(tmp: Path, *argv: str) -> list[str]:
    """An SD-method run whose model folder does not exist: the row's mistake must be reported first."""
    return ["upscale", str(photo(tmp)), "-o", str(tmp / "o.png"), *argv, "--model", str(tmp / "no-model")]


CLI_ROWS = [
    Cli("missing input file", lambda t: bicubic(str(t / "nope.png")), 2, r"nope\.png: no such file"),
    Cli("not an image", lambda t: bicubic(str(text_file(t))), 2, r"notes\.png: not an image"),
    Cli("truncated PNG", lambda t: bicubic(str(truncated_png(t))), 2, r"cut\.png: cannot decode image \(image file is truncated\)"),
    Cli("animated GIF to a JPEG output", lambda t: bicubic(str(animated_gif(t)), "-o", str(t / "out.jpg")), 2,
        r"out\.jpg: an animation's output must end in one of \.gif, \.webp, \.png, \.apng, \.mp4, \.webm"),
    Cli("unknown output suffix", lambda t: bicubic(str(photo(t)), "-o", str(t / "out.tfi")), 2, r"out\.tfi: output must end in one of \.png, \.jpg"),
    Cli("alpha input to JPEG", lambda t: bicubic(str(photo(t, "logo.png", mode="RGBA")), "-o", str(t / "out.jpg")), 2,
        r"logo\.png has an alpha channel .*JPEG cannot hold, so it cannot be written to .*out\.jpg"),
    Cli("16-bit output to JPEG", lambda t: bicubic(str(grey16(t)), "-o", str(t / "out.jpg"), "--bit-depth", "16"), 2,
        r"out\.jpg: JPG holds 8 bits per channel; a 16-bit output needs \.png or \.tif"),
    Cli("output exists without --overwrite", lambda t: bicubic(str(photo(t)), "-o", str(photo(t, "taken.png"))), 2,
        r"taken\.png: already exists \(pass --overwrite"),
    Cli("several inputs with -o FILE", lambda t: bicubic(str(photo(t)), str(photo(t, "b.png")), "-o", str(t / "o.png")), 2,
        r"-o .*o\.png: several inputs need an output folder, not a file"),
    Cli("--steps 0", lambda t: sd(t, "--steps", "0"), 2, r"--steps: steps must be in 1\.\.500; got 0"),
    Cli("--noise-level 400", lambda t: sd(t, "--noise-level", "400"), 2, r"--noise-level: noise_level must be in 0\.\.350; got 400"),
    Cli("--guidance -1", lambda t: sd(t, "--guidance", "-1"), 2, r"--guidance: guidance must be in 0\.\.100; got -1"),
    Cli("--scale 1", lambda t: bicubic(str(photo(t)), "--scale", "1"), 2, r"--scale: scale must be in \(1, 16\] \(above 1, at most 16\); got 1"),
    Cli("--tile-size 3", lambda t: sd(t, "--tile-size", "3"), 2, r"--tile-size: tile_size must be in 8\.\.4096; got 3"),
    Cli("--max-memory 6bananas", lambda t: sd(t, "--max-memory", "6bananas"), 2, r"--max-memory: max_memory must be a size such as 6GiB.*; got '6bananas'"),
    Cli("--scheduler nope (argparse)", lambda t: sd(t, "--scheduler", "nope"), 2, r"--scheduler: invalid choice: 'nope'"),
    Cli("--device tpu", lambda t: sd(t, "--device", "tpu"), 2, r"device must be auto, cpu, cuda, cuda:N or mps; got 'tpu'"),
    Cli("model folder that does not exist", lambda t: sd(t), 2, r"model folder '.*no-model' does not exist"),
    Cli("model folder missing parts",
        lambda t: ["upscale", str(photo(t)), "-o", str(t / "o.png"), "--model", str(model_missing_parts(t))], 2,
        r"model folder '.*half-model' is not in diffusers layout: missing unet, vae"),
    Cli("a folder nobody can write in (/proc)", lambda t: bicubic(str(photo(t)), "-o", "/proc/o.png"), 2,
        r"/proc: cannot write in the output folder"),
    Cli("too little disk space", lambda t: bicubic(str(photo(t)), "-o", str(t / "new") + "/"), 2,
        r"new: 1000 bytes free on its disk, the output\(s\) may need up to .*; free some space", patch=little_disk_space),
    Cli("the disk turns read-only while writing (runtime failure)", lambda t: bicubic(str(photo(t)), "-o", str(t / "o.png")), 1,
        r"o\.png: cannot write the output \(Read-only file system\)", patch=disk_turns_read_only),
    Cli("--num-images 0", lambda t: sd(t, "--num-images", "0"), 2, r"--num-images: num_images must be in 1\.\.16; got 0"),
    Cli("--seed -1", lambda t: sd(t, "--seed", "-1"), 2, r"--seed: seed must be in 0\.\.\d+; got -1"),
    Cli("stdin without -o", lambda t: bicubic("-"), 2, r"-: an image read from stdin needs -o FILE", stdin=b"x"),
    Cli("-o - with two inputs", lambda t: bicubic(str(photo(t)), str(photo(t, "b.png")), "-o", "-"), 2,
        r"-o -: several inputs need an output folder, not a file"),
]

BATCH_ROWS = [
    Cli("folder input with -o a file name",
        lambda t: bicubic(str(folder_of_images(t)), "-o", str(t / "out.png")), 2,
        r"-o .*out\.png: a folder INPUT writes a folder of outputs", kind="batch"),
    Cli("missing --prompts file",
        lambda t: bicubic(str(folder_of_images(t)), "-o", str(t / "out"), "--prompts", str(t / "missing.csv")), 2,
        r"missing\.csv: prompt mapping file not found", kind="batch"),
    Cli("prompts CSV without a prompt column",
        lambda t: (t.joinpath("p.csv").write_text("path,words\na.png,x\n"),
                   bicubic(str(folder_of_images(t)), "-o", str(t / "out"), "--prompts", str(t / "p.csv")))[1], 2,
        r"p\.csv: CSV header must have columns path,prompt.*missing prompt", kind="batch"),
    Cli("prompts JSONL line that is not JSON",
        lambda t: (t.joinpath("p.jsonl").write_text('{"path": "a.png", "prompt": "x"}\n{oops\n'),
                   bicubic(str(folder_of_images(t)), "-o", str(t / "out"), "--prompts", str(t / "p.jsonl")))[1], 2,
        r"p\.jsonl line 2: not valid JSON", kind="batch"),
    Cli("prompts JSONL line without a prompt",
        lambda t: (t.joinpath("q.jsonl").write_text('{"path": "a.png"}\n'),
                   bicubic(str(folder_of_images(t)), "-o", str(t / "out"), "--prompts", str(t / "q.jsonl")))[1], 2,
        r'q\.jsonl line 1: needs "path" and "prompt"', kind="batch"),
    Cli("prompts file that is neither CSV nor JSONL",
        lambda t: (t.joinpath("p.txt").write_text("a.png,x\n"),
                   bicubic(str(folder_of_images(t)), "-o", str(t / "out"), "--prompts", str(t / "p.txt")))[1], 2,
        r"p\.txt: prompt mapping must be a \.csv or \.jsonl file; got \.txt", kind="batch"),
    Cli("prompts for a path that matches no image",
        lambda t: (t.joinpath("r.jsonl").write_text('{"path": "zzz.png", "prompt": "x"}\n'),
                   bicubic(str(folder_of_images(t)), "-o", str(t / "out"), "--prompts", str(t / "r.jsonl")))[1], 2,
        r"r\.jsonl: 1 path\(s\) match no image under .*in.*'zzz\.png'", kind="batch"),
]


def post(data: dict[str, str] | None = None, image: bytes | None = None, ctype: str = "image/png", **kw: Any):
    def send(c: TestClient) -> Any:
        files = {"image": ("cat.png", png_bytes() if image is None else image, ctype)}
        return c.post("/v1/jobs", files=files, data=FAST if data is None else data, **kw)

    return send


SERVER_ROWS = [
    Http("wrong Host header", lambda c: c.get("/v1/info", headers={"Host": "evil.example"}), 400, r"Host 'evil\.example' is not this server's"),
    Http("foreign Origin", post(headers={"Origin": "http://evil.example"}), 403, r"cross-site request refused: Origin 'http://evil\.example' is not this server's"),
    Http("missing API key", post(), 401, r"missing or wrong API key", settings={"api_key": "s3cret"}),
    Http("upload too large", post(image=b"\x89PNG" + bytes(5000)), 413, r"upload is over the limit of 4000 bytes",
         settings={"max_upload_bytes": 4000}),
    Http("not an image", post(image=b"this is not an image at all"), 415, r"cat\.png: not a supported image; send one of PNG, JPEG"),
    Http("empty upload", post(image=b""), 422, r"cat\.png: empty file \(0 bytes\)"),
    Http("truncated PNG upload", post(image=png_bytes()[:60]), 422, r"cat\.png: .*cannot decode the image"),
    Http("video upload to a server without --allow-video", post(image=bytes(64), ctype="video/mp4"), 415,
         r"cat\.png: a video; this server does not take videos \(start it with sdx4 serve --allow-video\)"),
    Http("animated GIF over max_video_frames", post(image=animated_gif_bytes()), 413,
         r"cat\.png: 3 frames is over the limit of 2 frames", settings={"max_video_frames": 2}),
    Http("upload whose content type is not an image", post(ctype="text/plain"), 415,
         r"content type 'text/plain' is not an image"),
    Http("unknown form field", post({"steps": "2", "stepz": "2"}), 422, r"unknown field 'stepz'"),
    Http("too many pixels", post(image=bomb_png(2000, 1000)), 413,
         r"cat\.png: 2000x1000 = 2000000 pixels is over the input limit of 1048576 pixels"),
    Http("a side over max_side", post(image=png_bytes((5000, 1))), 413, r"cat\.png: 5000x1 has a side over the limit of 4096"),
    Http("aspect over max_aspect", post(image=png_bytes((170, 10))), 422,
         r"cat\.png: 170x10 has an aspect ratio of 17, over the limit of 16"),
    Http("job over max_job_cost", post({"steps": "40", "guidance": "9"}, image=png_bytes((256, 256))), 413,
         r"cat\.png: this job \(256x256\) costs [0-9.]+ megapixel-steps, over the limit of 1 ", settings={"max_job_cost": 1.0}),
    Http("bad option value in the form", post({"steps": "0"}), 422, r"steps must be in 1\.\.500; got 0"),
    Http("unknown job id", lambda c: c.get("/v1/jobs/nope"), 404, r"no job 'nope' \(unknown, deleted or expired\)"),
    Http("GET /v1/jobs?limit=0", lambda c: c.get("/v1/jobs", params={"limit": "0"}), 422,
         r"limit must be an integer in 1\.\.100; got '0'"),
]

API_ROWS = [
    Api("UpscaleOptions(steps=0)", lambda t: 0, lambda v: sdx4.UpscaleOptions(steps=v), OptionsError, r"steps must be in 1\.\.500; got 0",
        option="steps"),
    Api("LoadOptions(device='tpu')", lambda t: "tpu", lambda v: sdx4.LoadOptions(device=v), OptionsError,
        r"device must be auto, cpu, cuda, cuda:N or mps; got 'tpu'",
        option="device"),
    Api("upscale(not an image)", text_file, lambda p: sdx4.upscale(p, method="bicubic"), ImageInputError,
        r"notes\.png: not an image Pillow can read"),
    Api("upscale(an animated GIF)", animated_gif, lambda p: sdx4.upscale(p, method="bicubic"), ImageInputError,
        r"anim\.gif: an animated image with 3 frames"),
    Api("UpscaleOptions(method='magic')", lambda t: "magic", lambda v: sdx4.UpscaleOptions(method=v), OptionsError,
        r"method must be one of sd, nearest, .*; got 'magic'", option="method"),
    Api("upscale(method='sd') without a model", photo, lambda p: sdx4.upscale(p, method="sd"), OptionsError,
        r"method 'sd' needs the model: use sdx4\.load\(\)", option="method"),
    Api("load(a folder that does not exist)", lambda t: str(t / "no-model"), sdx4.load, ModelPathError,
        r"model folder '.*no-model' does not exist"),
    Api("upscale(a missing file)", lambda t: t / "nope.png", lambda p: sdx4.upscale(p, method="bicubic"), ImageInputError,
        r"nope\.png: no such file"),
]

ROWS = [*CLI_ROWS, *BATCH_ROWS, *SERVER_ROWS, *API_ROWS]

# The field each server row's JSON names ("field": null for the rest: the API key, an unknown job).
SERVER_FIELDS = {"wrong Host header": "host", "foreign Origin": "origin", "upload too large": "image",
                 "empty upload": "image", "truncated PNG upload": "image", "video upload to a server without --allow-video": "image",
                 "animated GIF over max_video_frames": "image",
                 "upload whose content type is not an image": "image", "unknown form field": "stepz",
                 "not an image": "image", "too many pixels": "image", "a side over max_side": "image",
                 "aspect over max_aspect": "image", "job over max_job_cost": "image",
                 "bad option value in the form": "steps", "GET /v1/jobs?limit=0": "limit"}


def listing(folder: Path) -> list[str]:
    """Every path under folder, hidden and temp files included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# ---- the tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("row", [*CLI_ROWS, *BATCH_ROWS], ids=lambda r: r.name)
def test_cli_refuses(row: Cli, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    if row.patch is not None:
        row.patch(monkeypatch)
    if row.stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(row.stdin)))
    argv = row.argv(tmp_path)
    before = listing(tmp_path)
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    assert code == row.code, (argv, err)
    assert re.search(row.message, err), err
    assert "Traceback" not in err and "Traceback" not in out
    assert listing(tmp_path) == before


@pytest.fixture(scope="module")
def upscaler(tiny_upscaler):  # conftest.py: the tiny random model (it has .cost, for max_job_cost)
    return tiny_upscaler


@pytest.mark.parametrize("row", SERVER_ROWS, ids=lambda r: r.name)
def test_server_refuses(row: Http, upscaler, tmp_path: Path) -> None:
    results = tmp_path / "results"
    app = create_app(upscaler, ServerSettings(queue=QueueSettings(results_dir=str(results)), **row.settings))
    with TestClient(app, base_url="http://localhost") as c:
        before = listing(results)
        r = row.send(c)
        assert r.status_code == row.status, r.text
        assert re.search(row.message, r.json()["detail"]), r.text
        assert r.json()["field"] == SERVER_FIELDS.get(row.name), r.text
        assert "Traceback" not in r.text
        assert c.get("/health").json()["jobs"]["submitted"] == 0  # nothing was queued
        assert listing(results) == before


@pytest.mark.parametrize("row", API_ROWS, ids=lambda r: r.name)
def test_api_refuses(row: Api, tmp_path: Path) -> None:
    made = row.make(tmp_path)
    before = listing(tmp_path)
    with pytest.raises(row.error, match=row.message) as e:
        row.call(made)
    assert type(e.value) is row.error  # not merely a subclass
    if row.option is not None:
        assert e.value.option == row.option
    assert listing(tmp_path) == before


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write in any folder")
def test_cli_refuses_an_unwritable_output_folder(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert cli.main(bicubic(str(photo(tmp_path)), "-o", str(folder / "o.png"))) == 2
        err = capsys.readouterr().err
        assert f"{folder}: cannot write in the output folder (Permission denied)" in err and "Traceback" not in err
        assert listing(folder) == []
    finally:
        folder.chmod(0o755)


def test_readme_counts_match() -> None:
    counts = Counter(row.kind for row in ROWS)
    section = README.read_text().split("## Reliability", 1)[1].split("\n## ", 1)[0]
    found = re.findall(r"(\d+) (cli|server|api|batch)\b", section, flags=re.IGNORECASE)
    said = {kind.lower(): int(n) for n, kind in found}
    assert said == dict(counts), (said, counts)
    total = re.search(r"lists (\d+) bad inputs", section)
    assert total and int(total.group(1)) == len(ROWS)
