"""The speed benchmark runs end to end on the tiny random model and writes a complete report.

No timing assertions: only that every field is there and the values are possible (positive times,
min <= median <= max, ratios consistent with the times, FLOPs counted, attention included).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sdx4.speed import prepack

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "speed.py"
CONFIGS = ("sdx4", "sdx4-fp32", "diffusers-fp32", "diffusers-bf16")
BASELINE_VERSION = "0.0.0+baseline"  # what the baseline copy's sdx4 says it is


def _run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "SDX4_CACHE": str(tmp_path / "cache"),  # the tiny model is built here, not in ~/.cache
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
    }
    cmd = [sys.executable, str(SCRIPT), "--quick", "--steps", "1", "--reps", "1", "--pause", "0", "--out", str(tmp_path / "out"), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


def _baseline_copy(tmp_path: Path) -> Path:
    """This checkout's src copied elsewhere, its version changed: a stand-in for the code before a change."""
    src = tmp_path / "before" / "src"
    shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (src / "sdx4" / "_version.py").write_text(f'__version__ = "{BASELINE_VERSION}"\n')
    return src


@pytest.mark.slow
def test_speed_benchmark_quick_report_is_complete(tmp_path: Path) -> None:
    # The default configurations and, alternating with them, sdx4 imported from another source folder.
    before = _baseline_copy(tmp_path)
    proc = _run(tmp_path, "--configs", ",".join((*CONFIGS, "sdx4-baseline")), "--baseline-src", str(before))
    check_speed_report(tmp_path / "out", proc.stdout, extra=("sdx4-baseline",))
    report = json.loads((tmp_path / "out" / "speed.json").read_text())
    configs = report["configs"]
    # Each worker imported sdx4 from its configuration's folder: the baseline from the copy, the rest from here.
    assert configs["sdx4-baseline"]["sdx4_src"] == str(before.resolve())
    assert configs["sdx4-baseline"]["sdx4_version"] == BASELINE_VERSION
    assert configs["sdx4"]["sdx4_src"] == str((ROOT / "src").resolve())
    assert configs["sdx4"]["sdx4_version"] != BASELINE_VERSION and configs["diffusers-fp32"]["sdx4_src"] is None
    assert report["settings"]["baseline_src"] == str(before.resolve())
    for name, c in configs.items():
        b = configs["sdx4-baseline"]
        assert c["time_vs_sdx4_baseline"] == round(c["wall_s"]["median"] / b["wall_s"]["median"], 3), name
        assert c["rss_vs_sdx4_baseline"] == round(c["peak_rss_mib"] / b["peak_rss_mib"], 3), name
    assert f"sdx4-baseline: sdx4 {BASELINE_VERSION} from {before.resolve()}" in proc.stdout


def _speed_module(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # speed.py imports its neighbour _proc.py
    spec = importlib.util.spec_from_file_location("speed_bench", SCRIPT)
    speed = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "speed_bench", speed)
    spec.loader.exec_module(speed)
    return speed


def test_the_baseline_configuration_needs_a_checkout_s_src(tmp_path, monkeypatch, capsys) -> None:
    speed = _speed_module(monkeypatch)
    cases = [
        (["--configs", "sdx4,sdx4-baseline"], "sdx4-baseline needs --baseline-src DIR"),
        (["--configs", "sdx4", "--baseline-src", str(tmp_path)], "add sdx4-baseline to --configs"),
        (["--configs", "sdx4-baseline", "--baseline-src", str(tmp_path)], f"no sdx4 package there (expected {tmp_path}/sdx4"),
        (["--configs", "sdx4-baseline", "--baseline-src", str(ROOT / "src"), "--schedulers"], "leave sdx4-baseline out"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            speed.parse_args(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err, argv
    args = speed.parse_args(["--configs", "sdx4,sdx4-baseline", "--baseline-src", str(ROOT / "src")])
    assert args.configs == ["sdx4", "sdx4-baseline"] and args.baseline_src == (ROOT / "src").resolve()
    other = tmp_path / "src"
    assert speed.source_for("sdx4-baseline", other) == other
    assert speed.source_for("sdx4", other) == speed.source_for("diffusers-fp32", None) == ROOT / "src"


def check_speed_report(out: Path, stdout: str, extra: tuple[str, ...] = ()) -> None:
    report = json.loads((out / "speed.json").read_text())
    table = (out / "speed.md").read_text()
    assert table in stdout  # the table is printed as well as written

    assert report["settings"] == {
        **report["settings"],
        "model_kind": "tiny",
        "input_size": [64, 64],
        "output_size": [256, 256],
        "steps": 1,
        "reps": 1,
        "guidance": 9.0,
        "quick": True,
    }
    m = report["machine"]
    assert m["logical_cpus"] >= 1 and m["torch_threads"] >= 1
    assert set(m["cpuinfo_flags"]) >= {"avx512_bf16", "amx_bf16"}
    assert isinstance(m["native_bf16"], bool) and isinstance(m["mkldnn_bf16_supported"], bool)
    for dtype in ("fp32", "bf16"):
        peak = report["peak"][dtype]
        assert peak["matmul_n"] == 512 and len(peak["samples"]) == 2  # before and after the single rep
        assert _positive(peak["matmul_gflops"]) and _positive(peak["conv3x3_gflops"])
        assert peak["matmul_gflops"] == max(smp["matmul"] for smp in peak["samples"])
        assert peak["gflops"] == max(peak["matmul_gflops"], peak["conv3x3_gflops"])

    assert list(report["configs"]) == [*CONFIGS, *extra]
    for name, c in report["configs"].items():
        assert len(c["runs"]) == 1, name
        run = c["runs"][0]
        assert run["output_size"] == [256, 256], name
        assert run["unet_calls"] == 1, name  # 1 step with guidance 9: one batched (CFG) UNet call
        assert 0 < run["cpu_share"] <= 1.5 and run["loadavg_1min"] >= 0, (name, run)
        assert abs(c["cpu_share"]["median"] - run["cpu_share"]) <= 1e-3, name  # both rounded in the report
        w = c["wall_s"]
        assert _positive(w["min"]) and w["min"] <= w["median"] <= w["max"], (name, w)
        st = c["stages_s"]
        for stage in ("load", "text_encoding", "denoising", "decoding", "unet_forward_total"):
            assert _positive(st[stage]), (name, stage, st)
        # The stages are consecutive parts of the call: they cannot add up to more than the wall time.
        assert st["text_encoding"] + st["denoising"] + st["decoding"] <= w["median"] + 1e-3, (name, st, w)
        assert st["unet_forward_total"] <= st["denoising"] + 1e-3, (name, st)
        assert _positive(c["import_s"]) and _positive(c["load_s"])
        assert c["peak_rss_mib"] >= c["peak_rss_load_mib"] >= c["rss_after_load_mib"] > 50, name
        # sdx4's CPU UNet runs on packed oneDNN weights (sdx4.prepack); diffusers' as eager PyTorch has them
        assert (c["prepacked_layers"] > 0) is (name.startswith("sdx4") and prepack.available()), (name, c["prepacked_layers"])
        f = c["flops"]
        assert f["unet"] > 0 and f["vae_decoder"] > 0, (name, f)
        # sdx4's low-memory load encodes the default prompts before the UNet is loaded: no text encoder in the call.
        assert (f["text_encoder"] > 0) is name.startswith("diffusers"), (name, f)
        # Every FLOP is attributed to one of the three models, and attention is no longer counted as 0.
        assert f["unet"] + f["text_encoder"] + f["vae_decoder"] == f["total"], (name, f)
        assert 0 < f["cpu_flash_attention"] < f["total"], (name, f)
        assert c["unet_tflop_per_step"] == round(f["unet"] / 1e12, 4), name
        # sdx4 computes the cross-attention keys and values in the first call only (kvcache); diffusers in each
        if name.startswith("sdx4"):
            assert 0.9 * f["unet"] < f["unet_later_call"] < f["unet"], (name, f)
        else:
            assert f["unet_later_call"] == f["unet"], (name, f)
        assert _positive(c["denoising_gflops"]) and _positive(c["unet_forward_gflops"])
        assert c["peak_gflops"] == report["peak"][c["peak_dtype"]]["gflops"]
        # fraction_of_peak = achieved / peak (both rounded in the report: GFLOP/s to 0.1, the fraction to 0.001).
        assert abs(c["fraction_of_peak"] * c["peak_gflops"] - c["denoising_gflops"]) <= 0.051 + 0.0005 * c["peak_gflops"]
        mm_peak = report["peak"][c["peak_dtype"]]["matmul_gflops"]  # the measure: against the matmul peak
        assert abs(c["fraction_of_matmul_peak"] * mm_peak - c["denoising_gflops"]) <= 0.051 + 0.0005 * mm_peak
        for base in ("fp32", "bf16"):
            ref = report["configs"][f"diffusers-{base}"]
            assert c[f"time_vs_diffusers_{base}"] == round(w["median"] / ref["wall_s"]["median"], 3), (name, base)
            assert c[f"rss_vs_diffusers_{base}"] == round(c["peak_rss_mib"] / ref["peak_rss_mib"], 3), (name, base)
        assert f"| {name} |" in table

    # Same architecture, same work in the VAE (the text encoder's share depends on caching); in the UNet
    # sdx4 runs the guidance pair's text-free prefix once (guidance_prefix): less work, the same for its configs.
    unet = {name: c["flops"]["unet"] for name, c in report["configs"].items()}
    assert unet["sdx4"] == unet["sdx4-fp32"] == unet.get("sdx4-baseline", unet["sdx4"]), unet
    assert unet["diffusers-fp32"] == unet["diffusers-bf16"], unet
    assert 0.85 < unet["sdx4"] / unet["diffusers-fp32"] < 0.99, unet
    assert len({c["flops"]["vae_decoder"] for c in report["configs"].values()}) == 1
    assert report["configs"]["diffusers-fp32"]["dtypes"] == {"unet": "fp32", "text_encoder": "fp32", "vae": "fp32"}
    assert report["configs"]["diffusers-bf16"]["dtypes"]["unet"] == "bf16"
    assert report["configs"]["sdx4-fp32"]["dtypes"] == {"unet": "fp32", "text_encoder": "fp32", "vae": "fp32"}
    auto = report["configs"]["sdx4"]["dtypes"]
    decided = report["machine"]["sdx4_auto_dtype"]  # flags, then bf16 measured against fp32 (kept per machine)
    assert auto["vae"] == "fp32" and auto["unet"] == decided["unet_dtype"], (auto, decided)
    assert decided["dtype_reason"].startswith(decided["unet_dtype"] + ":"), decided
    if not report["machine"]["sdx4_bf16_flags"]:
        assert auto["unet"] == "fp32"
    assert report["configs"]["diffusers-fp32"]["time_vs_diffusers_fp32"] == 1.0
    targets = {t["target"]: t for t in report["targets"]}
    assert len(targets) == 8 and all(isinstance(t["met"], bool) for t in targets.values())
    st = report["startup"]
    for cmd in ("help", "bicubic_512"):
        assert _positive(st[cmd]["median"]) and isinstance(st[cmd]["imports_torch"], bool), (cmd, st)
    assert st["bicubic_512"]["output_size"] == [2048, 2048]
    assert "Start-up" in table


@pytest.mark.slow
def test_scheduler_benchmark_quick(tmp_path: Path) -> None:
    _run(tmp_path, "--schedulers")
    report = json.loads((tmp_path / "out" / "schedulers.json").read_text())
    table = (tmp_path / "out" / "schedulers.md").read_text()
    from sdx4.options import UpscaleOptions

    if "scheduler" not in {f.name for f in dataclasses.fields(UpscaleOptions)}:
        # sdx4 without schedulers: the benchmark says so instead of timing DDIM four times.
        assert "no `scheduler` field" in report["skipped"] and "Skipped" in table
        return
    assert "skipped" not in report
    assert set(report["schedulers"]) == {"ddim", "dpmpp-2m", "euler", "unipc"}
    classes = set()
    for name, r in report["schedulers"].items():
        assert r["steps"] == 1 and len(r["runs"]) == 1, name  # --quick caps steps at --steps
        assert _positive(r["wall_s"]["median"]) and _positive(r["s_per_step"]), name
        assert r["unet_calls"] >= 1, name
        classes.add(r["scheduler_class"])
        assert f"| {name} |" in table
    assert len(classes) == 4, classes  # each name really selected a different scheduler class
