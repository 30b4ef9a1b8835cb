"""The command line as a user runs it: outputs, metadata, exit codes and messages."""

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

import sdx4
from sdx4 import cli


@pytest.fixture
def img(tmp_path, rng_image):
    path = tmp_path / "photo.png"
    Image.fromarray(rng_image(12, 10)).save(path)
    return path


def test_help_shows_defaults():
    r = run_cli("upscale", "--help")
    assert r.returncode == 0
    out = " ".join(r.stdout.split())
    for text in ("--steps STEPS denoising steps (default: 75)", "(default: 9.0)", "(default: 20)",
                 "stabilityai/stable-diffusion-x4-upscaler", "--overwrite", "--quiet"):
        assert text in out, text


def test_sd_upscale_writes_png_with_parameters(tiny_model_dir, img, tmp_path):
    r = run_cli("upscale", str(img), "--model", str(tiny_model_dir), "--steps", "2", "--seed", "42",
                "--prompt", "a cat", "--negative-prompt", "blur", "--noise-level", "30", "--guidance", "5")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "photo_x4.png"
    assert Image.open(out).size == (40, 48)
    meta = sdx4.read_metadata(out)
    expected = {"prompt": "a cat", "negative_prompt": "blur", "seed": 42, "steps": 2, "guidance": 5.0,
                "noise_level": 30, "model": str(tiny_model_dir), "input": "photo.png"}
    assert {k: meta[k] for k in expected} == expected
    assert meta["sdx4_version"] == sdx4.__version__
    assert "seed 42" in r.stderr and "RANDOM WEIGHTS" in r.stderr
    # Not a TTY: no progress bar drawn.
    assert "step/s" not in r.stderr and "it/s" not in r.stderr


def test_existing_output_needs_overwrite(tiny_model_dir, img, tmp_path):
    out = tmp_path / "o.png"
    out.write_bytes(b"keep me")
    r = run_cli("upscale", str(img), "-o", str(out), "--method", "bicubic")
    assert r.returncode == 2
    assert f"{out}: already exists (pass --overwrite to replace it)" in r.stderr
    assert out.read_bytes() == b"keep me"
    r = run_cli("upscale", str(img), "-o", str(out), "--method", "bicubic", "--overwrite", "-q")
    assert r.returncode == 0 and r.stderr == ""
    assert Image.open(out).size == (40, 48)


def test_random_seed_is_reported_and_reproduces(tiny_model_dir, img, tmp_path):
    r = run_cli("upscale", str(img), "--model", str(tiny_model_dir), "--steps", "1", "-o", str(tmp_path / "a.png"))
    assert r.returncode == 0, r.stderr
    seed = sdx4.read_metadata(tmp_path / "a.png")["seed"]
    assert f"seed {seed}" in r.stderr
    r = run_cli("upscale", str(img), "--model", str(tiny_model_dir), "--steps", "1", "--seed", str(seed),
                "-o", str(tmp_path / "b.png"))
    assert r.returncode == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--noise-level", "351"], "--noise-level: noise_level must be in 0..350; got 351"),
        (["--steps", "0"], "--steps: steps must be in 1..500; got 0"),
        (["--guidance", "-2"], "--guidance: guidance must be in 0..100; got -2"),
    ],
)
def test_bad_options_exit_2_and_name_the_option(img, args, message):
    r = run_cli("upscale", str(img), "--method", "bicubic", *args)
    assert r.returncode == 2 and message in r.stderr


def test_bad_usage_exits_2():
    r = run_cli("upscale", "x.png", "--method", "magic")
    assert r.returncode == 2 and "invalid choice: 'magic'" in r.stderr
    r = run_cli("upscale", "x.png", "--steps", "many")
    assert r.returncode == 2 and "invalid int value: 'many'" in r.stderr


def test_bad_input_file_exits_2_names_it_and_writes_nothing(tmp_path, img):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    r = run_cli("upscale", str(img), str(bad), "--method", "bicubic")
    assert r.returncode == 2
    assert f"{bad}: not an image Pillow can read" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.png", "photo.png"]  # checked before any work


def test_wrong_model_path_exits_2(img):
    r = run_cli("upscale", str(img), "--model", "./no/such/model")
    assert r.returncode == 2 and "model folder './no/such/model' does not exist" in r.stderr


def test_several_inputs_load_the_model_once_and_equal_single_runs(tiny_model_dir, tmp_path, rng_image, monkeypatch, capsys):
    """batch == single: each output equals the output of that input run alone (no state between images)."""
    paths = []
    for i in range(3):
        p = tmp_path / f"in{i}.png"
        Image.fromarray(rng_image(8 + 2 * i, 8, seed=i)).save(p)
        paths.append(p)
    loads = []
    real_load = sdx4.api.load

    def counting_load(*a, **k):
        loads.append(a)
        return real_load(*a, **k)

    monkeypatch.setattr(sdx4.api, "load", counting_load)
    out_dir = tmp_path / "out"
    code = cli.main(["upscale", *map(str, paths), "--model", str(tiny_model_dir), "--steps", "2", "--seed", "7",
                     "-o", str(out_dir), "-q"])
    assert code == 0 and len(loads) == 1
    single = tmp_path / "single.png"
    code = cli.main(["upscale", str(paths[2]), "--model", str(tiny_model_dir), "--steps", "2", "--seed", "7",
                     "-o", str(single), "-q"])
    assert code == 0
    assert np.array_equal(np.asarray(Image.open(out_dir / "in2_x4.png")), np.asarray(Image.open(single)))
    assert sorted(p.name for p in out_dir.iterdir()) == ["in0_x4.png", "in1_x4.png", "in2_x4.png"]


def test_num_images_writes_numbered_outputs(tiny_model_dir, img, tmp_path):
    code = cli.main(["upscale", str(img), "--model", str(tiny_model_dir), "--steps", "1", "--seed", "1",
                     "--num-images", "2", "-o", str(tmp_path / "o.png"), "-q"])
    assert code == 0
    a, b = (np.asarray(Image.open(tmp_path / f"o_{i}.png"), dtype=int) for i in (1, 2))
    assert a.shape == b.shape == (48, 40, 3) and np.abs(a - b).mean() > 1


def test_several_inputs_need_a_folder_not_a_file(img, tmp_path):
    r = run_cli("upscale", str(img), str(img), "-o", str(tmp_path / "one.png"), "--method", "bicubic")
    assert r.returncode == 2 and "several inputs need an output folder, not a file" in r.stderr


def test_classical_method_output_name_and_size(img, tmp_path):
    r = run_cli("upscale", str(img), "--method", "lanczos")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "photo_x4_lanczos.png"
    assert Image.open(out).size == (40, 48)
    assert sdx4.read_metadata(out)["method"] == "lanczos"


def test_help_and_classical_do_not_import_torch():
    import os
    import subprocess
    import sys

    from conftest import SRC

    code = "import sys; from sdx4 import cli; cli.build_parser(); import sdx4; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.stdout.strip() == "False", r.stderr


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"sdx4 {sdx4.__version__}"


def test_a_bad_device_exits_2_with_the_load_options_message_and_writes_nothing(img, tmp_path, capsys):
    assert cli.main(["upscale", str(img), "--device", "tpu", "--dtype", "fp32"]) == 2
    assert capsys.readouterr().err == "sdx4: error: device must be auto, cpu, cuda, cuda:N or mps; got 'tpu'\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png"]
    # The classical methods load no model: their model arguments are not used, and (as always) not checked.
    assert cli.main(["upscale", str(img), "--method", "bicubic", "--device", "tpu", "-q"]) == 0


def test_load_options_from_args_reads_every_model_argument():
    from sdx4.cli import build_parser
    from sdx4.cli.args import load_options_from_args

    args = build_parser().parse_args(["upscale", "x.png", "--model", "./m", "--device", "cuda:1", "--dtype", "bf16",
                                      "--vae-dtype", "bf16", "--no-low-memory", "--compile"])
    assert load_options_from_args(args) == sdx4.LoadOptions(model="./m", device="cuda:1", dtype="bf16", vae_dtype="bf16",
                                                            low_memory=False, compile=True)
    assert load_options_from_args(build_parser().parse_args(["upscale", "x.png"])) == sdx4.LoadOptions()


def test_max_job_cost_refuses_an_image_over_it_before_any_denoising(tiny_model_dir, img, tmp_path, capsys, monkeypatch):
    """The service's cost limit on the command line: checked after the model loads, before any UNet call."""
    import sdx4.engine.loop as loop

    monkeypatch.setattr(loop, "upscale_tensor", lambda *a, **k: pytest.fail("denoised an image over --max-job-cost"))
    w, h = Image.open(img).size
    base = ["upscale", str(img), "--model", str(tiny_model_dir), "--steps", "10", "-o", str(tmp_path / "o.png"), "-q"]
    assert cli.main([*base, "--max-job-cost", "0.001"]) == 2
    err = capsys.readouterr().err
    assert f"--max-job-cost: this job ({w}x{h}) costs " in err and "over the limit of 0.001" in err
    assert not (tmp_path / "o.png").exists()
    assert cli.main([*base, "--max-job-cost", "-1"]) == 2
    assert "--max-job-cost must be a positive number of megapixel-steps; got -1" in capsys.readouterr().err
    folder = tmp_path / "in"
    folder.mkdir()
    Image.open(img).save(folder / "a.png")
    assert cli.main(["upscale", str(folder), "-o", str(tmp_path / "out"), "--method", "bicubic", "--max-job-cost", "5"]) == 2
    assert "--max-job-cost applies to image INPUTs" in capsys.readouterr().err
