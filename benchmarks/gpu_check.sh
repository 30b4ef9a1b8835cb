#!/usr/bin/env bash
# Everything sdx4 checks on a CUDA GPU, in ONE command, offline, in under 8 minutes (docs/gpu.md).
#
#   bash benchmarks/gpu_check.sh                       # on a machine with a CUDA GPU (run from the repo root)
#   bash benchmarks/gpu_check.sh --dry-run             # print the commands, run nothing
#   bash benchmarks/gpu_check.sh --device cpu --quick  # the same plumbing on a CPU with the tiny model (a smoke test)
#
# Before (on a machine WITH network), carry the Python packages as wheels in .whl/ (the GPU machine has a CUDA
# torch and no network; torch itself is not carried):
#   pip wheel --no-deps . -w .whl
#   pip download -d .whl "diffusers==0.42.1" "transformers>=4.40" "safetensors>=0.4" "accelerate>=0.30" \
#       "huggingface_hub>=0.23" tqdm pytest          # numpy and pillow too if the machine lacks them
# This script then installs them with `pip install --no-index --find-links .whl`.
#
# Parts, with the expected time on one H100 (estimates: no GPU has run this yet):
#   install   wheels from .whl                                                     ~30 s
#   model     full-size random model (python -m sdx4.random_model DIR --size full) ~60 s, in the background
#   tests     pytest -m cuda tests/test_models.py tests/test_fp16_path.py (tiny model) ~40 s
#   parity    sdx4 vs diffusers on cuda, full model, 64 px, 10 steps, fp32 and fp16 ~40 s
#   speed-64  sdx4 vs diffusers fp16, 20 steps, 2 reps, eager and torch.compile     ~150 s (compiling ~60 s each)
#   speed-128, speed-256  the same, eager only                                     ~45 s each
# Each part has a time limit; a failing part is reported and the others still run; the script exits 1 if any
# part failed. Results: $OUT (or ./gpu-out): tests.xml, parity.json, speed-<px>/speed.json, summary.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${OUT:-$ROOT/gpu-out}"
WHEELS="${WHEELS:-$ROOT/.whl}"
PY="${PYTHON:-$(command -v python || command -v python3)}"
DEVICE=cuda
QUICK=0
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --quick) QUICK=1 ;;
    --device) DEVICE="${2:?--device needs cpu or cuda}"; shift ;;
    --device=*) DEVICE="${1#--device=}" ;;
    -h|--help) sed -n '2,27p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$DEVICE" in cpu|cuda) ;; *) echo "gpu_check.sh: --device must be cpu or cuda; got $DEVICE" >&2; exit 2 ;; esac

if [ "$QUICK" = 1 ]; then
  SIZE=tiny; STEPS=1; REPS=1; SIZES="64"; QUICK_FLAG="--quick"; PARITY_ARGS="--quick"
  SPEED_LIMIT=900
else
  SIZE=full; STEPS=20; REPS=2; SIZES="64 128 256"; QUICK_FLAG=""; PARITY_ARGS="--size 64 --steps 10"
  SPEED_LIMIT=240
fi
MODEL="${SDX4_GPU_MODEL:-${TMPDIR:-/tmp}/sdx4-gpu-check-model-$SIZE}"
export HF_HUB_OFFLINE=1
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's sdx4, whatever is installed
export SDX4_CACHE="${SDX4_CACHE:-${TMPDIR:-/tmp}/sdx4-gpu-check-cache}"

declare -a NAMES=() STATUS=() SECS=()

# part NAME LIMIT_S COMMAND...: run (or print) one part; record its status; never stop the script.
part() {
  local name="$1" limit="$2"; shift 2
  echo "+ [$name, limit ${limit}s] $*" >&2
  if [ "$DRY" = 1 ]; then return 0; fi
  local t0=$SECONDS rc=0
  timeout --kill-after=10 "$limit" "$@" || rc=$?
  NAMES+=("$name"); SECS+=("$((SECONDS - t0))")
  if [ "$rc" = 0 ]; then STATUS+=("ok"); elif [ "$rc" = 124 ]; then STATUS+=("TIMEOUT"); else STATUS+=("FAILED (exit $rc)"); fi
  [ "$rc" = 0 ] || echo "!!! part $name failed (exit $rc)" >&2
}

[ "$DRY" = 1 ] || mkdir -p "$OUT_DIR"

if compgen -G "$WHEELS/*.whl" > /dev/null; then
  part install 300 "$PY" -m pip install --no-index --find-links "$WHEELS" "$WHEELS"/*.whl  # torch: the machine's own
else
  echo "(no wheels in $WHEELS: using the installed packages)" >&2
fi
if [ "$DEVICE" = cuda ] && [ "$DRY" = 0 ]; then
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "torch sees no CUDA GPU: run with --device cpu --quick off a GPU")'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
fi

# The model builds in the background while the tests run on the tiny one.
echo "+ [model] $PY -m sdx4.random_model $MODEL --size $SIZE" >&2
if [ "$DRY" = 0 ]; then
  if [ -f "$MODEL/model_index.json" ]; then
    MODEL_PID=""
  else
    rm -rf "$MODEL"
    "$PY" -m sdx4.random_model "$MODEL" --size "$SIZE" > "$OUT_DIR/model.log" 2>&1 &
    MODEL_PID=$!
  fi
fi

part tests 300 "$PY" -m pytest -q -p no:cacheprovider -m cuda "$ROOT/tests/test_models.py" "$ROOT/tests/test_fp16_path.py" \
  --junitxml "$OUT_DIR/tests.xml"

if [ "$DRY" = 0 ] && [ -n "${MODEL_PID:-}" ]; then
  t0=$SECONDS; rc=0; wait "$MODEL_PID" || rc=$?
  NAMES+=("model"); SECS+=("$((SECONDS - t0))s waited")
  if [ "$rc" = 0 ]; then STATUS+=("ok"); else STATUS+=("FAILED (exit $rc)"); cat "$OUT_DIR/model.log" >&2; fi
fi

part parity 300 "$PY" "$ROOT/benchmarks/gpu_parity.py" --model "$MODEL" --device "$DEVICE" $PARITY_ARGS --out "$OUT_DIR"

for px in $SIZES; do
  configs="sdx4-fp16,diffusers-fp16"
  limit=$SPEED_LIMIT
  if [ "$px" = 64 ] && [ "$QUICK" = 0 ]; then configs="$configs,sdx4-fp16-compile,diffusers-fp16-compile"; limit=$((SPEED_LIMIT + 120)); fi
  part "speed-$px" "$limit" "$PY" "$ROOT/benchmarks/speed.py" --device "$DEVICE" $QUICK_FLAG --model "$MODEL" --size "$px" \
    --steps "$STEPS" --reps "$REPS" --pause 0 --configs "$configs" --out "$OUT_DIR/speed-$px"
done

[ "$DRY" = 1 ] && exit 0

{
  echo "## sdx4 GPU check ($DEVICE, model $SIZE, $(date -u '+%Y-%m-%d %H:%M UTC'))"
  echo
  echo "| part | status | seconds |"
  echo "|---|---|---|"
  for i in "${!NAMES[@]}"; do echo "| ${NAMES[$i]} | ${STATUS[$i]} | ${SECS[$i]} |"; done
  echo
  "$PY" - "$OUT_DIR" <<'EOF' || echo "(no numbers: the parts above failed)"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
p = out / "parity.json"
if p.is_file():
    r = json.loads(p.read_text())
    print(f"Parity with diffusers ({r['device']}, {r['input_size'][0]} px, {r['steps']} steps):")
    for x in r["results"]:
        print(f"- {x['dtype']}: max {x['max_abs']:.0f}/255, mean {x['mean_abs']:.3f}/255 "
              f"(tolerance max {x['tolerance']['max']:.0f}, mean {x['tolerance']['mean']:.1f}): {'ok' if x['ok'] else 'NOT MET'}")
    print()
rows = []
for f in sorted(out.glob("speed-*/speed.json"), key=lambda f: int(f.parent.name.split("-")[1])):
    rep = json.loads(f.read_text())
    for name, c in rep["configs"].items():
        rows.append((rep["settings"]["input_size"][0], name, c["wall_s"]["median"], c.get("time_vs_diffusers_fp16"),
                     c["stages_s"]["denoising"], c["stages_s"]["decoding"], c.get("peak_gpu_mib"), c.get("first_call_s")))
if rows:
    print("| input px | config | wall s (median) | vs diffusers fp16 | denoise s | decode s | peak GPU GiB | warm-up call s |")
    print("|---|---|---|---|---|---|---|---|")
    for px, name, wall, ratio, den, dec, gpu, first in rows:
        r = "-" if ratio is None else f"{ratio:.2f}x"
        g = "-" if gpu is None else f"{gpu / 1024:.2f}"
        print(f"| {px} | {name} | {wall:.3f} | {r} | {den:.3f} | {dec:.3f} | {g} | {first} |")
EOF
} | tee "$OUT_DIR/summary.md"

for s in "${STATUS[@]}"; do
  if [ "$s" != ok ]; then echo "gpu_check.sh: some parts FAILED (see above and $OUT_DIR)" >&2; exit 1; fi
done
echo "gpu_check.sh: all parts ok; results in $OUT_DIR" >&2
