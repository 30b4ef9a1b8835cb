"""Batch folders: discovery, manifest, resume after SIGKILL/SIGINT, seeds, prompts (tiny random model)."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _batch_util import (
    PYTHON,
    STEPS,
    child_env,
    make_folder,
    pixels,
    records,
    stable,
    temp_files,
    tiny_model,
    write_image,
)
from PIL import Image

import sdx4
from sdx4 import LoadOptions, UpscaleOptions
from sdx4.batch import Manifest, run_batch, run_pipeline
from sdx4.batch.job import BatchError, BatchItem, BatchJob, image_seed, output_names
from sdx4.batch.plan import discover, plan, read_manifest, read_prompt_mapping
from sdx4.cli import main


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def upscaler(model: Path) -> sdx4.Upscaler:
    return sdx4.load(str(model), device="cpu", dtype="fp32")


def job(src: Path, out: Path, model: Path, **opts: object) -> BatchJob:
    recursive = bool(opts.pop("recursive", True))
    prompts = opts.pop("prompts_file", None)
    options = UpscaleOptions(steps=STEPS, **opts)  # type: ignore[arg-type]
    return BatchJob(
        src, out, options, load=LoadOptions(model=str(model), device="cpu", dtype="fp32"), recursive=recursive,
        prompts_file=prompts,
    )


def cli(src: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return [
        "upscale", str(src), "-o", str(out), "--model", str(model), "--device", "cpu", "--dtype", "fp32",
        "--steps", str(STEPS), *extra,
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Pure pieces
# ---------------------------------------------------------------------------------------------------


def test_image_seed_is_sha256_of_base_seed_and_relative_path() -> None:
    expected = int.from_bytes(hashlib.sha256(b"7:sub/a.png").digest()[:4], "big")
    assert image_seed(7, "sub/a.png") == expected
    assert 0 <= expected < 2**32
    assert image_seed(7, "sub/b.png") != expected
    assert image_seed(8, "sub/a.png") != expected
    assert image_seed(7, "a.png") != expected  # the folder is part of the identity


def test_output_names_mirror_the_tree_and_tag_the_method() -> None:
    assert output_names("sub/deep/a.jpg", UpscaleOptions()) == ("sub/deep/a_x4.png",)
    assert output_names("a.png", UpscaleOptions(method="lanczos")) == ("a_x4_lanczos.png",)
    assert output_names("s/a.webp", UpscaleOptions(num_images=2)) == ("s/a_x4_1.png", "s/a_x4_2.png")


def test_discover_images_others_sidecars_hidden_and_output_inside_input(tmp_path: Path) -> None:
    src = make_folder(tmp_path / "in", ["b.png", "a.JPG", "sub/c.png", "sub/deep/d.webp"], ["bad.png"], ["notes.txt"])
    (src / "a.txt").write_text("sidecar of a.JPG")
    (src / ".hidden.png").write_bytes(b"x")
    write_image(src / ".git" / "e.png", 1)
    write_image(src / "out" / "old_x4.png", 2)  # the output folder inside the input folder
    images, others = discover(src, recursive=True, exclude=src / "out")
    assert images == ["a.JPG", "b.png", "bad.png", "sub/c.png", "sub/deep/d.webp"]
    assert others == ["notes.txt"]
    images, others = discover(src, recursive=False)
    assert images == ["a.JPG", "b.png", "bad.png"]


# ---------------------------------------------------------------------------------------------------
# Prompt mappings and sidecars
# ---------------------------------------------------------------------------------------------------


def test_prompt_mapping_csv_and_jsonl(tmp_path: Path) -> None:
    csv_file = tmp_path / "p.csv"
    csv_file.write_text('path,prompt,negative_prompt\nsub/a.png,"a cat, sitting",blurry\nb.png,a dog,\n')
    assert read_prompt_mapping(csv_file) == {"sub/a.png": ("a cat, sitting", "blurry"), "b.png": ("a dog", None)}
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(
        '{"path": "sub/a.png", "prompt": "a cat", "negative_prompt": "blurry"}\n\n{"path": "b.png", "prompt": "a dog"}\n'
    )
    assert read_prompt_mapping(jsonl) == {"sub/a.png": ("a cat", "blurry"), "b.png": ("a dog", None)}


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("p.csv", "file,prompt\na.png,x\n", "missing path"),
        ("p.csv", "path,prompt,colour\na.png,x,red\n", "unknown CSV column(s) colour"),
        ("p.csv", "path,prompt\na.png,x,extra\n", "line 2: expected 2 fields"),
        ("p.csv", "path,prompt\na.png,x\na.png,y\n", "line 3: a.png is listed twice"),
        ("p.jsonl", '{"path": "a.png", "prompt": "x"}\n{"path": "b.png", "prompt": \n', "line 2: not valid JSON"),
        ("p.jsonl", '["a.png", "x"]\n', "line 1: expected a JSON object, got list"),
        ("p.jsonl", '{"path": "a.png"}\n', 'line 1: needs "path" and "prompt"'),
        ("p.jsonl", '{"path": "a.png", "prompt": 3}\n', "line 1: prompt must be a string; got 3"),
        ("p.yaml", "a.png: x\n", "must be a .csv or .jsonl file; got .yaml"),
    ],
)
def test_malformed_prompt_mapping_is_named(tmp_path: Path, name: str, content: str, message: str) -> None:
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(BatchError) as e:
        read_prompt_mapping(f)
    assert str(f) in str(e.value)
    assert message in str(e.value)


def test_bad_mapping_fails_before_any_work_starts(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = make_folder(tmp_path / "in", ["a.png", "sub/b.png"])
    out = tmp_path / "out"
    # A model that does not exist: if the error came after loading, the message would be the model's.
    no_model = tmp_path / "no-such-model"
    missing = tmp_path / "missing.csv"
    assert main(cli(src, out, no_model, "--recursive", "--prompts", str(missing))) == 2
    assert f"{missing}: prompt mapping file not found" in capsys.readouterr().err
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"path": "b.png", "prompt": "x"}\n')  # relative to the wrong folder: it is sub/b.png
    assert main(cli(src, out, no_model, "--recursive", "--prompts", str(wrong))) == 2
    err = capsys.readouterr().err
    assert f"{wrong}: 1 path(s) match no image under {src}" in err and "'b.png'" in err
    assert not out.exists()  # nothing was written, not even the manifest
    # With a good mapping, the missing model is the next thing reported, still before any work.
    assert main(cli(src, out, no_model, "--recursive")) == 2
    assert f"model folder '{no_model}' does not exist" in capsys.readouterr().err
    assert not out.exists()


def test_prompts_from_mapping_then_sidecar_then_option(tmp_path: Path, model: Path, upscaler: sdx4.Upscaler) -> None:
    src = make_folder(tmp_path / "in", ["a.png", "b.png", "sub/c.png"])
    (src / "a.txt").write_text("  a sidecar cat\n")
    (src / "b.txt").write_text("b sidecar (overridden by the mapping)")
    mapping = tmp_path / "p.csv"
    mapping.write_text("path,prompt,negative_prompt\nb.png,a mapped dog,ugly\n")
    out = tmp_path / "out"
    j = job(src, out, model, prompt="the default", negative_prompt="neg", seed=3, prompts_file=mapping)
    summary = run_batch(j, upscaler=upscaler)
    assert sorted(summary.ok) == ["a.png", "b.png", "sub/c.png"] and summary.exit_code == 0
    got = {
        r["input"]: (r["params"]["prompt"], r["params"]["negative_prompt"], r["prompt_source"]) for r in records(out)
    }
    assert got == {
        "a.png": ("a sidecar cat", "neg", "sidecar"),
        "b.png": ("a mapped dog", "ugly", "mapping"),
        "sub/c.png": ("the default", "neg", "option"),
    }
    # The prompt really reached the model: same seed, other prompt -> other pixels.
    seed = image_seed(3, "a.png")
    direct = upscaler(
        src / "a.png", UpscaleOptions(steps=STEPS, prompt="a sidecar cat", negative_prompt="neg", seed=seed)
    )
    assert np.array_equal(pixels(out / "a_x4.png"), np.asarray(direct.image.convert("RGBA")))
    other = upscaler(src / "a.png", UpscaleOptions(steps=STEPS, prompt="the default", negative_prompt="neg", seed=seed))
    assert not np.array_equal(pixels(out / "a_x4.png"), np.asarray(other.image.convert("RGBA")))


def test_all_prompts_are_encoded_before_the_first_image(tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDX4_CACHE", str(tmp_path / "cache"))  # a first start: "" is encoded at load, not read
    src = make_folder(tmp_path / "in", ["a.png", "b.png", "c.png"])
    (src / "a.txt").write_text("a cat")
    mapping = tmp_path / "p.jsonl"
    mapping.write_text('{"path": "b.png", "prompt": "a dog", "negative_prompt": "ugly"}\n')
    low = sdx4.load(str(model), device="cpu", dtype="fp32", low_memory=True)
    summary = run_batch(job(src, tmp_path / "out", model, prompt="", negative_prompt="neg", seed=1, prompts_file=mapping), upscaler=low)
    assert sorted(summary.ok) == ["a.png", "b.png", "c.png"]
    # "" was encoded at load; "neg", "a cat", "ugly", "a dog" in one go by one reload of the encoder.
    assert (low.prompt_cache.encoder_runs, low.prompt_cache.encoder_loads) == (5, 1)
    assert low.components.text_encoder is None


# ---------------------------------------------------------------------------------------------------
# A whole folder through the CLI: mirrored outputs, complete manifest, bad files, resume
# ---------------------------------------------------------------------------------------------------


def test_folder_run_mirrors_reports_and_resumes(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = ["a.png", "b.jpg", "sub/c.png", "sub/deep/d.png"]
    src = make_folder(tmp_path / "in", good, corrupt=["sub/broken.png"], text=["readme.md"])
    out = tmp_path / "out"
    assert main(cli(src, out, model, "--recursive", "--seed", "11")) == 1  # one image failed
    err = capsys.readouterr().err
    assert "failed: sub/broken.png: not an image Pillow can read" in err
    assert "skipped (not an image): readme.md" in err
    for rel in good:
        name = rel.rsplit(".", 1)[0] + "_x4.png"
        with Image.open(out / name) as im:
            assert im.size == (80, 64)
    recs = records(out)
    by_input = {r["input"]: r for r in recs}
    assert sorted(by_input) == sorted([*good, "sub/broken.png", "readme.md"]) and len(recs) == 6
    assert by_input["readme.md"]["status"] == "skipped"
    broken = by_input["sub/broken.png"]
    assert broken["status"] == "failed" and broken["outputs"] == [] and "not an image" in broken["error"]
    d = by_input["sub/deep/d.png"]
    assert d["status"] == "ok" and d["error"] is None and d["outputs"] == ["sub/deep/d_x4.png"]
    assert d["seed"] == image_seed(11, "sub/deep/d.png") and d["base_seed"] == 11
    assert d["params"] == {**UpscaleOptions(steps=STEPS, seed=d["seed"]).to_dict(), "model": str(model)}
    assert d["input_size"] == [20, 16] and d["output_size"] == [80, 64] and d["random_weights"] is True
    assert {"read", "upscale", "write", "finished_at"} <= set(d["timings"])
    meta = sdx4.read_metadata(out / "sub/deep/d_x4.png")
    assert meta["input"] == "sub/deep/d.png" and meta["seed"] == d["seed"]
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*_x4.png")}

    # Rerun: nothing redone (the broken file is tried again), the text file is not listed twice.
    assert main(cli(src, out, model, "--recursive", "--seed", "11")) == 1
    new = records(out)[len(recs) :]
    assert [(r["input"], r["status"]) for r in new] == [("sub/broken.png", "failed")]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*_x4.png")} == mtimes

    # A changed parameter for one image (its sidecar prompt) redoes that image only.
    (src / "sub" / "c.txt").write_text("a new prompt")
    (src / "sub" / "broken.png").unlink()
    assert main(cli(src, out, model, "--recursive", "--seed", "11")) == 0
    new = records(out)[len(recs) + 1 :]
    assert [(r["input"], r["status"], r["params"]["prompt"]) for r in new] == [("sub/c.png", "ok", "a new prompt")]
    assert (out / "sub/c_x4.png").stat().st_mtime_ns != mtimes[out / "sub/c_x4.png"]

    # A deleted output is redone even though its record says ok.
    (out / "a_x4.png").unlink()
    assert main(cli(src, out, model, "--recursive", "--seed", "11")) == 0
    assert [r["input"] for r in records(out)[len(recs) + 2 :]] == ["a.png"]
    assert temp_files(out) == []


def test_without_recursive_subfolders_are_left_alone(tmp_path: Path, model: Path) -> None:
    src = make_folder(tmp_path / "in", ["a.png", "sub/c.png"])
    out = tmp_path / "out"
    assert main(cli(src, out, model, "--method", "bicubic", "-q")) == 0
    assert [r["input"] for r in records(out)] == ["a.png"]
    assert (out / "a_x4_bicubic.png").exists() and not (out / "sub").exists()
    assert records(out)[0]["params"]["model"] is None  # classical: no model involved


def test_cli_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_folder(tmp_path / "in", ["a.png"])
    assert main(["upscale", str(src), "--method", "bicubic"]) == 2
    assert "a folder INPUT needs an output folder: -o OUTDIR" in capsys.readouterr().err
    assert main(["upscale", str(src / "a.png"), "--recursive", "--method", "bicubic"]) == 2
    assert "--recursive only applies when INPUT is a folder" in capsys.readouterr().err
    assert main(["upscale", str(src), str(src / "a.png"), "-o", str(tmp_path / "o"), "--method", "bicubic"]) == 2
    assert "a folder must be the only INPUT" in capsys.readouterr().err
    assert main(["upscale", str(src), "-o", str(tmp_path / "o"), "--workers", "2", "--method", "bicubic"]) == 2
    assert "need --engine ray" in capsys.readouterr().err
    assert main(["upscale", str(src), "-o", str(src), "--method", "bicubic"]) == 2
    assert "must differ from the input folder" in capsys.readouterr().err
    assert main(["upscale", str(src), "-o", str(tmp_path / "o"), "--overwrite", "--method", "bicubic"]) == 2
    assert "--overwrite does not apply to a folder INPUT" in capsys.readouterr().err


def test_two_inputs_writing_one_output_is_refused_before_work(tmp_path: Path, model: Path) -> None:
    src = make_folder(tmp_path / "in", ["a.png", "a.jpg"])
    with pytest.raises(BatchError, match=r"a\.jpg and .*a\.png would both write .*a_x4\.png"):
        plan(job(src, tmp_path / "out", model))


# ---------------------------------------------------------------------------------------------------
# Seeds: same image, same result, whatever the order, the sharding or the resume
# ---------------------------------------------------------------------------------------------------


def test_same_bytes_from_any_order_and_sharding(tmp_path: Path, model: Path, upscaler: sdx4.Upscaler) -> None:
    good = ["a.png", "b.png", "sub/c.png", "sub/d.png"]
    full = make_folder(tmp_path / "full", good)
    out_full = tmp_path / "out_full"
    run_batch(job(full, out_full, model, seed=5), upscaler=upscaler, order=lambda items: reversed(items))
    assert [r["input"] for r in records(out_full)] == list(reversed(good))

    # Shard 1: a folder holding half the images; shard 2: the rest arrives later (resume into one OUTDIR).
    part = tmp_path / "part"
    for rel in ["sub/d.png", "a.png"]:
        (part / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(full / rel, part / rel)
    out_part = tmp_path / "out_part"
    run_batch(job(part, out_part, model, seed=5), upscaler=upscaler)
    for rel in ["b.png", "sub/c.png"]:
        shutil.copy(full / rel, part / rel)
    summary = run_batch(job(part, out_part, model, seed=5), upscaler=upscaler)
    assert sorted(summary.ok) == ["b.png", "sub/c.png"] and summary.already_done == 2

    a = {r["input"]: stable(r) for r in records(out_full)}
    b = {r["input"]: stable(r) for r in records(out_part)}
    assert a == b
    for rel in good:
        name = rel.replace(".png", "_x4.png")
        assert np.array_equal(pixels(out_full / name), pixels(out_part / name)), rel
    # Different images really differ (the check above is not comparing noise-free constants).
    assert not np.array_equal(pixels(out_full / "a_x4.png"), pixels(out_full / "b_x4.png"))


def test_without_seed_the_run_seed_is_drawn_once_and_reused_on_resume(
    tmp_path: Path, model: Path, upscaler: sdx4.Upscaler
) -> None:
    src = make_folder(tmp_path / "in", ["a.png"])
    out = tmp_path / "out"
    first = run_batch(job(src, out, model), upscaler=upscaler)
    write_image(src / "b.png", 7)
    second = run_batch(job(src, out, model), upscaler=upscaler)
    assert second.base_seed == first.base_seed and second.ok == ["b.png"] and second.already_done == 1
    recs = records(out)
    assert [r["base_seed"] for r in recs] == [first.base_seed] * 2
    assert [r["seed"] for r in recs] == [image_seed(first.base_seed, "a.png"), image_seed(first.base_seed, "b.png")]
    # An explicit, different --seed changes every image's parameters: all redone.
    third = run_batch(job(src, out, model, seed=(first.base_seed + 1) % 2**32), upscaler=upscaler)
    assert sorted(third.ok) == ["a.png", "b.png"]


# ---------------------------------------------------------------------------------------------------
# Kill the run midway (SIGKILL, SIGINT), then resume
# ---------------------------------------------------------------------------------------------------


def _ok_inputs(out: Path) -> list[str]:
    if not (out / "sdx4-manifest.jsonl").exists():
        return []
    lines = (out / "sdx4-manifest.jsonl").read_text().splitlines()
    result = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written right now
        if rec["status"] == "ok":
            result.append(rec["input"])
    return result


#: guidance 1 (one UNet pass per step) keeps these runs short; 60 steps (~1 s per image on 2 cores) leave
#: the parent seconds to send its signal after the first image before the child could finish them all
#: (at 2 steps, 0.3 s per image, a busy machine once let the child finish first).
KILL_STEPS = 60
KILL_ARGS = ("--recursive", "--seed", "21", "--guidance", "1", "--steps", str(KILL_STEPS))


def _start_and_stop(src: Path, out: Path, model: Path, sig: int) -> tuple[subprocess.Popen[bytes], list[str]]:
    cmd = [PYTHON, "-m", "sdx4", *cli(src, out, model, *KILL_ARGS)]
    child = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not _ok_inputs(out):
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            raise AssertionError(f"child ended or stalled before any image: {child.communicate()[1].decode()[-2000:]}")
        time.sleep(0.05)
    child.send_signal(sig)
    child.wait(timeout=60)
    return child, _ok_inputs(out)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_killed_run_resumes_without_redoing_anything(
    tmp_path: Path, model: Path, upscaler: sdx4.Upscaler, sig: int
) -> None:
    good = [f"{d}img{i}.png" for i in range(4) for d in ("", "sub/")]  # 8 images
    src = make_folder(tmp_path / "in", good, corrupt=["zz_bad.png"])
    out = tmp_path / "out"
    child, done_before = _start_and_stop(src, out, model, sig)
    if sig == signal.SIGINT:
        assert child.returncode == 130, child.stderr.read().decode()[-2000:] if child.stderr else ""
        assert temp_files(out) == []  # an interrupt cleans up its own temp file
    else:
        assert child.returncode == -signal.SIGKILL
        # What a SIGKILL in the middle of writing leaves behind: a temp file and a torn manifest line.
        (out / f".{Path(good[-1]).stem}_x4.png.k1ll3d_x.tmp").write_bytes(b"\x89PNG half")
        with open(out / "sdx4-manifest.jsonl", "ab") as f:
            f.write(b'{"input": "img3.png", "status": "o')
    assert 1 <= len(done_before) < len(good), "the run was not stopped midway"
    n_before = len(read_manifest(out / "sdx4-manifest.jsonl"))

    assert main(cli(src, out, model, *KILL_ARGS, "-q")) == 1  # zz_bad.png fails
    recs = records(out)  # every line is JSON again: the torn one was cut off
    rerun_ok = [r["input"] for r in recs[n_before:] if r["status"] == "ok"]
    assert sorted(rerun_ok) == sorted(set(good) - set(done_before))  # the rest, and nothing twice
    assert sorted(r["input"] for r in recs if r["status"] == "ok") == sorted(good)
    assert temp_files(out) == []
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == sorted(
        g.replace(".png", "_x4.png") for g in good
    )
    # Outputs from before and after the stop are the same as an uninterrupted run would give.
    for rel in (done_before[0], rerun_ok[0]):
        opts = UpscaleOptions(steps=KILL_STEPS, guidance=1.0, seed=image_seed(21, rel))
        expected = np.asarray(upscaler(src / rel, opts).image.convert("RGBA"))
        assert np.array_equal(pixels(out / rel.replace(".png", "_x4.png")), expected), rel


# ---------------------------------------------------------------------------------------------------
# The manifest file and the pipeline stages
# ---------------------------------------------------------------------------------------------------


def test_manifest_cuts_a_torn_tail_rejects_edits_and_locks(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"input": "a.png", "status": "ok"}\n{"input": "b.p')
    assert read_manifest(path) == [{"input": "a.png", "status": "ok"}]
    with Manifest(path) as m:
        with pytest.raises(BatchError, match="another sdx4 run is writing to this folder"):
            Manifest(path)
        m.append({"input": "c.png", "status": "failed"})
    assert path.read_text().splitlines() == [
        '{"input": "a.png", "status": "ok"}',
        '{"input": "c.png", "status": "failed"}',
    ]
    path.write_text('{"input": "a.png", "status": "ok"}\nnot json\n{"input": "c.png", "status": "ok"}\n')
    with pytest.raises(BatchError, match=r"m\.jsonl line 2: not a valid manifest record"):
        read_manifest(path)


def _items(names: list[str], method: str = "nearest") -> list[BatchItem]:
    """Items whose prompt is their name (so the fake upscaler below can pick which ones fail)."""
    opts = [UpscaleOptions(method=method, seed=1, prompt=n) for n in names]  # type: ignore[arg-type]
    return [BatchItem(n, output_names(n, o), o, "option", 1, None) for n, o in zip(names, opts)]


class _FailingUpscaler:
    """Stands in for the model: fails on chosen images with an error or an interrupt."""

    def __init__(self, fail: dict[str, BaseException]) -> None:
        self.fail = fail

    def encode_prompts(self, prompts: list[str]) -> None:
        self.encoded = list(prompts)

    def __call__(self, image: object, options: UpscaleOptions) -> sdx4.UpscaleResult:
        key = options.prompt
        if key in self.fail:
            raise self.fail[key]
        return sdx4.upscale(image, options.replace(method="nearest"))


def test_pipeline_records_a_failing_image_and_keeps_going(tmp_path: Path) -> None:
    src = make_folder(tmp_path / "in", ["a.png", "b.png", "c.png"])
    items = _items(["a.png", "b.png", "c.png"], method="sd")
    got: list[dict[str, object]] = []
    run_pipeline(
        items, _FailingUpscaler({"b.png": RuntimeError("CUDA out of memory")}), src, tmp_path / "out", got.append
    )
    assert [(r["input"], r["status"]) for r in got] == [("a.png", "ok"), ("b.png", "failed"), ("c.png", "ok")]
    assert got[1]["error"] == "b.png: RuntimeError: CUDA out of memory"
    assert (tmp_path / "out" / "c_x4.png").exists() and not (tmp_path / "out" / "b_x4.png").exists()


def test_pipeline_interrupt_writes_what_was_done_then_propagates(tmp_path: Path) -> None:
    names = [f"{i}.png" for i in range(6)]
    src = make_folder(tmp_path / "in", names)
    items = _items(names, method="sd")
    got: list[dict[str, object]] = []
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(items, _FailingUpscaler({"3.png": KeyboardInterrupt()}), src, tmp_path / "out", got.append)
    assert [r["input"] for r in got] == ["0.png", "1.png", "2.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0_x4.png", "1_x4.png", "2_x4.png"]


def test_pipeline_writer_failure_stops_the_run(tmp_path: Path) -> None:
    names = [f"{i}.png" for i in range(5)]
    src = make_folder(tmp_path / "in", names)

    def broken_sink(record: dict[str, object]) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        run_pipeline(_items(names), None, src, tmp_path / "out", broken_sink)


def test_ray_engine_without_ray_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    src = make_folder(tmp_path / "in", ["a.png"])
    assert main(["upscale", str(src), "-o", str(tmp_path / "out"), "--engine", "ray", "--method", "bicubic"]) == 1
    assert "pip install sdx4[ray]" in capsys.readouterr().err
