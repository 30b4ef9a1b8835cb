"""The C allocator: sdx4 re-executes itself with tcmalloc preloaded when the system has it (sdx4.allocator)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import SRC, run_cli
from PIL import Image

import sdx4
from sdx4.cli import build_parser, main, runs_model
from sdx4.speed import allocator
from sdx4.speed.allocator import (
    ENV,
    QUIET_ENV,
    REEXEC_MARK,
    AllocatorError,
    find_tcmalloc,
    reexec_env,
)

LIB = "libtcmalloc_minimal.so.4"
SYSTEM_TCMALLOC = find_tcmalloc()


def plan(environ: dict[str, str], found: str | None = LIB, platform: str = "linux", current: str = "system"):
    return reexec_env(environ, find=lambda: found, platform=platform, current=current)


def test_auto_preloads_the_found_tcmalloc_once_and_quietly():
    env = plan({"PATH": "/bin", "LD_PRELOAD": "libfoo.so"})
    assert env["LD_PRELOAD"] == f"{LIB}:libfoo.so"  # the user's own preloads stay, after tcmalloc
    assert env[REEXEC_MARK] == "1" and env["PATH"] == "/bin"
    assert env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == QUIET_ENV["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]
    assert plan({})["LD_PRELOAD"] == LIB
    # a user's own setting of tcmalloc's report threshold wins
    assert plan({"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "123"})["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == "123"


@pytest.mark.parametrize(
    "environ, kwargs",
    [
        ({ENV: "system"}, {}),  # opted out
        ({REEXEC_MARK: "1"}, {}),  # already re-executed: never twice, even if the preload did not take
        ({}, {"platform": "darwin"}),  # LD_PRELOAD is a Linux (glibc) thing
        ({}, {"current": "tcmalloc"}),  # this process runs on tcmalloc already (the user preloaded it)
        ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, {}),  # the user chose another allocator
        ({}, {"found": None}),  # no tcmalloc installed
    ],
)
def test_stays_on_the_current_allocator(environ, kwargs):
    assert plan(environ, **kwargs) is None


def test_an_explicit_library_path(tmp_path):
    lib = tmp_path / "libtcmalloc.so"
    lib.write_bytes(b"")
    assert plan({ENV: str(lib)}, found=None)["LD_PRELOAD"] == str(lib)
    with pytest.raises(AllocatorError, match=rf"{ENV}='/no/such/lib.so': not 'auto', 'system' or the path of a tcmalloc library"):
        plan({ENV: "/no/such/lib.so"})


def test_which_commands_run_the_model():
    p = build_parser()
    assert runs_model(p.parse_args(["upscale", "a.png"]))
    assert not runs_model(p.parse_args(["upscale", "a.png", "--method", "bicubic"]))
    assert runs_model(p.parse_args(["compare", "a.png"]))  # default methods include sd
    assert not runs_model(p.parse_args(["compare", "a.png", "--methods", "bicubic,lanczos"]))
    assert runs_model(p.parse_args(["serve"]))


def test_bad_choice_is_a_usage_error_only_where_the_model_runs(tmp_path, monkeypatch, capsys):
    src = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src)
    monkeypatch.setenv(ENV, "/no/such/lib.so")
    monkeypatch.delenv(REEXEC_MARK, raising=False)
    monkeypatch.setattr(sys, "argv", ["sdx4", "upscale", str(src), "--model", str(tmp_path / "none")])
    assert main() == 2  # checked before anything is loaded
    assert f"sdx4: error: {ENV}='/no/such/lib.so'" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["sdx4", "upscale", str(src), "--method", "bicubic", "-q"])
    assert main() == 0 and (tmp_path / "a_x4_bicubic.png").exists()  # classical: the allocator is not consulted


def test_main_called_from_python_never_reexecutes(tmp_path, monkeypatch):
    monkeypatch.setattr(allocator, "reexec_with_tcmalloc", lambda: pytest.fail("re-executed a call from Python"))
    monkeypatch.setenv(ENV, "/no/such/lib.so")  # would be a usage error if consulted
    assert main(["upscale", str(tmp_path / "missing.png"), "--model", str(tmp_path)]) == 2


def test_the_command_runs_on_the_system_allocator_when_told(tiny_model_dir, tmp_path):
    src = tmp_path / "a.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (8, 8, 3), np.uint8)).save(src)
    r = run_cli("upscale", str(src), "--model", str(tiny_model_dir), "--steps", "1", "--seed", "1", "-q",
                env={ENV: "system"})
    assert r.returncode == 0, r.stderr
    assert sdx4.read_metadata(tmp_path / "a_x4.png")["allocator"] == "system"


@pytest.mark.skipif(SYSTEM_TCMALLOC is None, reason="tcmalloc not installed (apt install libtcmalloc-minimal4)")
def test_the_command_restarts_itself_on_tcmalloc(tiny_model_dir, tmp_path):
    src = tmp_path / "a.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (8, 8, 3), np.uint8)).save(src)
    env = {k: v for k, v in os.environ.items() if k not in (ENV, REEXEC_MARK, "LD_PRELOAD")}
    env["PYTHONPATH"] = str(SRC)
    r = subprocess.run([sys.executable, "-m", "sdx4", "upscale", str(src), "--model", str(tiny_model_dir), "--steps", "1",
                        "--seed", "1", "-q"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # no "tcmalloc: large alloc" lines, no loader complaints
    meta = sdx4.read_metadata(tmp_path / "a_x4.png")
    assert meta["allocator"] == "tcmalloc"
    # and the image is the system allocator's, bit for bit
    r = run_cli("upscale", str(src), "--model", str(tiny_model_dir), "--steps", "1", "--seed", "1", "-q",
                "-o", str(tmp_path / "b.png"), env={ENV: "system"})
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a_x4.png")), np.asarray(Image.open(tmp_path / "b.png")))


@pytest.mark.skipif(SYSTEM_TCMALLOC is None, reason="tcmalloc not installed (apt install libtcmalloc-minimal4)")
def test_release_memory_uses_tcmalloc_when_preloaded():
    code = ("from sdx4.speed.allocator import active; from sdx4.engine.budget import release_memory, _RELEASE;"
            "print(active(), release_memory())")
    env = {**os.environ, "LD_PRELOAD": SYSTEM_TCMALLOC, "PYTHONPATH": str(SRC)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["tcmalloc", "True"]
    env.pop("LD_PRELOAD")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.stdout.split() == ["system", "True"]  # glibc's malloc_trim (Linux)
