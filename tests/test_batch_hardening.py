"""Folder runs never go wrong quietly: any file name, changed inputs, earlier output folders, entries
that cannot be read (issue 22, item 6). Classical method only: no model, fast."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest
from _batch_util import PYTHON, child_env, make_folder, pixels, records, write_image

import sdx4
from sdx4 import UpscaleOptions
from sdx4.batch import run_batch
from sdx4.batch.items import read_item
from sdx4.batch.job import (
    ESCAPED_KEY,
    BatchError,
    BatchItem,
    BatchJob,
    image_seed,
    is_escaped,
    real_name,
    record_input,
    shown_name,
)
from sdx4.batch.plan import plan, scan
from sdx4.cli import main

CAFE = os.fsdecode(b"caf\xe9.png")  # a Latin-1 name: not valid UTF-8 (Python gives the byte as a surrogate)


def cli(src: Path, out: Path, *extra: str) -> list[str]:
    return ["upscale", str(src), "-o", str(out), "--method", "bicubic", "--seed", "3", *extra]


def bicubic_job(src: Path, out: Path, recursive: bool = True) -> BatchJob:
    return BatchJob(src, out, UpscaleOptions(method="bicubic", seed=3), recursive=recursive)


def write_bytes_named(folder: Path, name: bytes, seed: int) -> Path:
    """An image under a bytes name (any name the OS allows)."""
    path = Path(os.fsdecode(os.fsencode(folder) + b"/" + name))
    return write_image(path, seed)


def manifest_lines(out: Path) -> list[dict]:
    """The manifest read strictly: every line must be valid UTF-8 and valid JSON."""
    raw = (out / "sdx4-manifest.jsonl").read_bytes()
    return [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------
# 1. Any file name the OS allows
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "a.png",
        "sub/ü€.png",
        "back\\slash.png",  # valid UTF-8: shown as is
        "caf\\xe9.png",  # valid UTF-8 that LOOKS like an escape: shown as is, not escaped
        CAFE,
        os.fsdecode(b"d\xff\xfe/x\\y\xe9.png"),  # undecodable bytes and a backslash in one name
    ],
)
def test_shown_names_are_valid_utf8_and_round_trip(name: str) -> None:
    shown = shown_name(name)
    shown.encode("utf-8")  # raises on a surrogate
    assert real_name(shown, is_escaped(name)) == name
    if not is_escaped(name):
        assert shown == name  # names that are valid UTF-8 keep their form (and old manifests their meaning)


def test_escaped_and_literal_names_never_collide() -> None:
    assert shown_name(CAFE) == "caf\\xe9.png" == shown_name("caf\\xe9.png")
    # The same text, told apart by the record's flag:
    assert real_name("caf\\xe9.png", True) == CAFE and real_name("caf\\xe9.png", False) == "caf\\xe9.png"
    assert record_input({"input": "caf\\xe9.png", ESCAPED_KEY: True}) == CAFE
    assert record_input({"input": "caf\\xe9.png"}) == "caf\\xe9.png"


def test_a_name_that_is_not_utf8_is_upscaled_and_recorded_in_valid_utf8_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = make_folder(tmp_path / "in", ["a.png"])
    write_bytes_named(src, b"caf\xe9.png", seed=1)
    (src / "sub").mkdir()
    write_bytes_named(src / "sub", b"\xff.png", seed=2)
    out = tmp_path / "out"
    assert main(cli(src, out, "--recursive")) == 0
    err = capsys.readouterr().err
    assert "caf\\xe9.png -> caf\\xe9_x4_bicubic.png" in err and "sub/\\xff.png -> sub/\\xff_x4_bicubic.png" in err
    by_input = {r["input"]: r for r in manifest_lines(out)}
    assert sorted(by_input) == ["a.png", "caf\\xe9.png", "sub/\\xff.png"]
    cafe = by_input["caf\\xe9.png"]
    assert cafe["status"] == "ok" and cafe[ESCAPED_KEY] is True and cafe["outputs"] == ["caf\\xe9_x4_bicubic.png"]
    assert ESCAPED_KEY not in by_input["a.png"]
    assert record_input(cafe) == CAFE
    # The seed hashes the name's bytes (as image_seed does for any name; docs/batch.md "Seeds").
    assert cafe["seed"] == int.from_bytes(hashlib.sha256(b"3:caf\xe9.png").digest()[:4], "big") == image_seed(3, CAFE)
    written = Path(os.fsdecode(os.fsencode(out) + b"/caf\xe9_x4_bicubic.png"))
    assert pixels(written).shape == (64, 80, 4)
    assert sdx4.read_metadata(written)["input"] == "caf\\xe9.png"
    # Resume knows it: nothing to redo.
    assert main(cli(src, out, "--recursive")) == 0
    assert "3 already done, 0 to do" in capsys.readouterr().err
    assert len(manifest_lines(out)) == 3


def test_a_corrupt_file_with_such_a_name_fails_with_a_readable_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = make_folder(tmp_path / "in", ["a.png"])
    Path(os.fsdecode(os.fsencode(src) + b"/bad\xe9.png")).write_bytes(b"not a png")
    out = tmp_path / "out"
    assert main(cli(src, out)) == 1
    assert "failed: bad\\xe9.png: not an image Pillow can read" in capsys.readouterr().err
    bad = [r for r in manifest_lines(out) if r["status"] == "failed"]
    assert [(r["input"], r["error"]) for r in bad] == [
        ("bad\\xe9.png", "bad\\xe9.png: not an image Pillow can read (unknown or corrupt format)")
    ]


# ---------------------------------------------------------------------------------------------------
# 2. An input changed since its record is redone; a touched one is not
# ---------------------------------------------------------------------------------------------------


def test_records_stamp_the_input_and_a_replaced_input_is_redone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = make_folder(tmp_path / "in", ["a.png", "b.png"])
    out = tmp_path / "out"
    assert main(cli(src, out)) == 0
    capsys.readouterr()
    rec = {r["input"]: r for r in manifest_lines(out)}["a.png"]
    st = (src / "a.png").stat()
    assert rec["input_bytes"] == st.st_size and rec["timings"]["input_mtime_ns"] == st.st_mtime_ns
    assert rec["input_sha256"] == hashlib.sha256((src / "a.png").read_bytes()).hexdigest()
    old = pixels(out / "a_x4_bicubic.png")

    # a.png replaced by another picture; b.png only touched (same bytes, new mtime).
    write_image(src / "a.png", seed=999)
    os.utime(src / "a.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    os.utime(src / "b.png", ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    assert main(cli(src, out)) == 0
    err = capsys.readouterr().err
    assert "1 already done, 1 to do" in err and "a.png: changed since its last run" in err
    new = manifest_lines(out)[2:]
    assert [(r["input"], r["status"]) for r in new] == [("a.png", "ok")]
    assert new[0]["input_sha256"] == hashlib.sha256((src / "a.png").read_bytes()).hexdigest()
    assert not (pixels(out / "a_x4_bicubic.png") == old).all()  # the stale output was replaced

    # Same size, same mtime as recorded, but other bytes: not looked at (that is what the stamp is for).
    assert main(cli(src, out)) == 0
    assert len(manifest_lines(out)) == 3


def test_an_input_replaced_by_one_of_the_same_size_is_redone(tmp_path: Path) -> None:
    src = make_folder(tmp_path / "in", ["a.png"])
    out = tmp_path / "out"
    run_batch(bicubic_job(src, out))
    data = bytearray((src / "a.png").read_bytes())
    data[-20] ^= 0xFF  # flip one byte of the IDAT stream's tail: same size, other bytes
    (src / "a.png").write_bytes(bytes(data))
    p = plan(bicubic_job(src, out))
    assert [i.input for i in p.todo] == ["a.png"] and p.changed == ("a.png",)


def test_an_old_manifest_without_stamps_counts_as_done(tmp_path: Path) -> None:
    src = make_folder(tmp_path / "in", ["a.png"])
    out = tmp_path / "out"
    run_batch(bicubic_job(src, out))
    lines = manifest_lines(out)
    for r in lines:
        for key in ("input_bytes", "input_sha256"):
            r.pop(key)
        r["timings"].pop("input_mtime_ns")
    (out / "sdx4-manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    write_image(src / "a.png", seed=999)
    assert plan(bicubic_job(src, out)).todo == ()  # as before stamps existed (documented)


def test_a_record_from_before_an_option_existed_counts_as_done_with_its_default(tmp_path: Path) -> None:
    """Options added later (color_mode, bit_depth) are missing from old records: their defaults stand in."""
    src = make_folder(tmp_path / "in", ["a.png", "b.png"])
    out = tmp_path / "out"
    run_batch(bicubic_job(src, out))
    lines = manifest_lines(out)
    for r in lines:
        for key in ("color_mode", "bit_depth"):
            r["params"].pop(key)
    (out / "sdx4-manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert plan(bicubic_job(src, out)).todo == ()
    lines[0]["params"]["scale"] = 2  # a recorded value that differs is still a change
    (out / "sdx4-manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert [i.input for i in plan(bicubic_job(src, out)).todo] == [lines[0]["input"]]


# ---------------------------------------------------------------------------------------------------
# 3. Output folders of earlier runs inside the input tree are never read
# ---------------------------------------------------------------------------------------------------


def test_output_folders_of_earlier_runs_are_never_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_folder(tmp_path / "in", ["a.png", "sub/b.png"])
    assert main(cli(src, src / "a_x4", "--recursive")) == 0  # an output folder inside the input folder
    assert main(cli(src, src / "sub" / "again", "--recursive")) == 0  # another run, another OUTDIR
    err = capsys.readouterr().err
    assert "skipped (the output folder of an earlier sdx4 run, it holds sdx4-manifest.jsonl): a_x4/" in err
    again = manifest_lines(src / "sub" / "again")
    assert sorted(r["input"] for r in again if r["status"] == "ok") == ["a.png", "sub/b.png"]
    assert [(r["input"], r["status"]) for r in again if r["status"] == "skipped"] == [("a_x4/", "skipped")]
    assert not [p for p in src.rglob("*_x4_bicubic_x4_bicubic.png")]
    # Listed once: a resume does not record it again.
    assert main(cli(src, src / "sub" / "again", "--recursive")) == 0
    assert len(manifest_lines(src / "sub" / "again")) == len(again)
    # The input folder itself may be an earlier output folder: upscaling it again is a normal job.
    assert main(cli(src / "a_x4", tmp_path / "x16")) == 0
    assert [r["input"] for r in manifest_lines(tmp_path / "x16") if r["status"] == "ok"] == ["a_x4_bicubic.png"]


# ---------------------------------------------------------------------------------------------------
# 4. Dangling symlinks, FIFOs, sockets, unreadable files and folders: listed, never opened, never fatal
# ---------------------------------------------------------------------------------------------------


def test_special_entries_are_listed_as_skipped_and_never_opened(tmp_path: Path) -> None:
    src = make_folder(tmp_path / "in", ["a.png"])
    (src / "gone.png").symlink_to(src / "nowhere.png")
    (src / "loop.png").symlink_to(src / "loop.png")
    os.mkfifo(src / "pipe.png")  # opening it for reading would block until a writer comes: never
    sock = socket.socket(socket.AF_UNIX)
    short = Path(f"/tmp/sdx4-sock-{os.getpid()}")  # AF_UNIX paths are limited to ~108 bytes
    short.mkdir(exist_ok=True)
    sock.bind(str(short / "s.png"))
    (src / "sock.png").symlink_to(short / "s.png")
    (src / "linked").symlink_to(src, target_is_directory=True)  # would be a loop if followed
    out = tmp_path / "out"
    try:
        # In a child process with a timeout: a hang would otherwise stop the test run.
        proc = subprocess.run(
            [PYTHON, "-m", "sdx4", *cli(src, out, "--recursive")],
            env=child_env(), capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip
    finally:
        sock.close()
        (short / "s.png").unlink()
        short.rmdir()
    assert proc.returncode == 0, proc.stderr
    assert "1 image(s) in" in proc.stderr and "5 path(s) not read" in proc.stderr
    skipped = {r["input"]: r["error"] for r in manifest_lines(out) if r["status"] == "skipped"}
    assert skipped == {
        "gone.png": "gone.png: a dangling symlink, its target does not exist",
        "linked/": "linked/: a link to a folder; not followed",
        "loop.png": "loop.png: cannot stat it: Too many levels of symbolic links",
        "pipe.png": "pipe.png: a FIFO, not a regular file",
        "sock.png": "sock.png: a socket, not a regular file",
    }
    for rel, error in skipped.items():
        assert f"  skipped ({error.split(': ', 1)[1]}): {rel}" in proc.stderr
    assert [r["input"] for r in records(out) if r["status"] == "ok"] == ["a.png"]


def test_reading_a_fifo_that_replaced_an_image_fails_at_once(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "x.png")  # appeared after planning (planning never lists a FIFO as an image)
    item = BatchItem("x.png", ("x_x4.png",), UpscaleOptions(method="bicubic"), "option", 0, None)
    result = []
    t = threading.Thread(target=lambda: result.append(read_item(item, tmp_path)), daemon=True)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive(), "read_item blocked on a FIFO"
    assert result[0].error == "x.png: not a regular file (a FIFO)"


def test_unreadable_files_and_folders_are_listed_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_folder(tmp_path / "in", ["a.png", "locked.png", "sub/b.png", "closed/c.png"])
    # Root reads everything, so the OS's answers are simulated: no read permission on locked.png,
    # and closed/ cannot be listed.
    real_access, real_scandir = os.access, os.scandir
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p).name != "locked.png" and real_access(p, mode))

    def scandir(path):  # type: ignore[no-untyped-def]
        if Path(path).name in ("closed", "in_locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    found = scan(src, recursive=True)
    assert found.images == ["a.png", "sub/b.png"]
    assert found.not_read == [
        ("closed/", "cannot list the folder: Permission denied"),
        ("locked.png", "permission denied"),
    ]
    locked_root = tmp_path / "in_locked"
    locked_root.mkdir()
    with pytest.raises(BatchError, match=r"in_locked: cannot list the folder: Permission denied"):
        scan(locked_root, recursive=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_a_file_without_read_permission_is_skipped_with_the_reason(tmp_path: Path) -> None:
    src = make_folder(tmp_path / "in", ["a.png", "locked.png"])
    (src / "locked.png").chmod(0)
    summary = run_batch(bicubic_job(src, tmp_path / "out"))
    assert summary.ok == ["a.png"] and summary.not_read == [("locked.png", "permission denied")]


def test_the_manifest_stays_valid_utf8_whatever_a_message_holds(tmp_path: Path) -> None:
    from sdx4.batch import Manifest

    with Manifest(tmp_path / "m.jsonl") as m:  # e.g. an OS error message quoting an undecodable path
        m.append({"input": "a.png", "status": "failed", "error": f"a.png: cannot write output (/x/{CAFE})"})
    assert manifest_lines_at(tmp_path / "m.jsonl") == [
        {"input": "a.png", "status": "failed", "error": "a.png: cannot write output (/x/caf\\xe9.png)"}
    ]


def manifest_lines_at(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().decode("utf-8").splitlines()]
