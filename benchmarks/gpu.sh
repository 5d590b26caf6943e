#!/usr/bin/env bash
# The GPU measurements of issue 25, in one go, into one results file:
#   1. the quickstart (`lightning-repair fit --config configs/quickstart.yaml`) on one GPU, in float32 and with
#      --trainer.precision bf16-mixed (which applies to evaluation only, never to the repair's statistics);
#   2. benchmarks/repair_cost.py on ResNet-50 at 224 px with 1024 images, every preset, then `reconstruct` with its
#      Gram products in float32 and in float64 (accumulation always float64), to check the per-device choice, and
#      `default` and `reconstruct` with their walks in channels-last, to check the per-device memory format;
#   3. a 2-GPU DDP `lightning-repair evaluate` of the quickstart's repaired model.
#
#   benchmarks/gpu.sh [--out FILE]        on a CUDA machine (results: benchmarks/results/gpu_<host>_<date>.md)
#   benchmarks/gpu.sh --smoke --out FILE  on a CPU, tiny sizes: checks that every step runs (tests/test_gpu_script.py)
#
# PYTHON (default .venv/bin/python) is the interpreter. Steps that fail are recorded in the file and the script goes on;
# its exit status is the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SMOKE=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --out) OUT="$2"; shift ;;
    *) echo "usage: benchmarks/gpu.sh [--smoke] [--out FILE]" >&2; exit 2 ;;
  esac
  shift
done
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-bench-XXXXXX")
trap 'rm -rf "$WORK"' EXIT
FAILED=0

if [ "$SMOKE" = 1 ]; then
  ACCEL=cpu; DEVICE=cpu; DDP_DEVICES=2
  OUT=${OUT:-$WORK/gpu_smoke.md}
  # a tiny synthetic stand-in for the quickstart: random weights with data-driven BN statistics
  "$PY" - "$WORK" <<'PYEOF'
import sys, torch, yaml
from lightning_repair.models import Network
torch.manual_seed(0)
model = Network(arch="resnet18", num_classes=10, in_channels=3, width=0.125).build().train()
with torch.no_grad():
    for _ in range(2):
        model(torch.randn(32, 3, 16, 16))
torch.save(model.state_dict(), f"{sys.argv[1]}/dense.pt")
config = yaml.safe_load(open("configs/quickstart.yaml"))
config["trainer"]["callbacks"] = []
config["model"]["init_args"].update(network={"arch": "resnet18", "num_classes": 10, "in_channels": 3, "width": 0.125},
                                    checkpoint=f"{sys.argv[1]}/dense.pt", rr_grid=[0.9])
config["data"] = {"dataset": "synthetic", "calibration_size": 32, "batch_size": 16, "augment": False}
yaml.safe_dump(config, open(f"{sys.argv[1]}/config.yaml", "w"))
PYEOF
  CONFIG=$WORK/config.yaml
  COST=(--archs resnet18 --image-size 16 --in-channels 3 --width 0.125 --images 16 --batch-size 8 --repeats 1)
else
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu.sh: no CUDA device (use --smoke to check the script on a CPU)" >&2
    exit 2
  fi
  ACCEL=gpu; DEVICE=cuda
  DDP_DEVICES=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
  OUT=${OUT:-benchmarks/results/gpu_$(hostname -s)_$(date -u +%Y%m%d).md}
  CONFIG=configs/quickstart.yaml
  COST=(--archs resnet50 --image-size 224 --in-channels 3 --width 1 --images 1024 --batch-size 64 --repeats 1)
fi
mkdir -p "$(dirname "$OUT")"

step() {  # step TITLE COMMAND...: run it, append its output (or its failure) to the results file
  local title=$1; shift
  echo "== $title" >&2
  {
    echo; echo "## $title"; echo; echo '```'; echo "\$ $*"
  } >> "$OUT"
  "$@" > "$WORK/step.log" 2>&1
  local status=$?
  if [ "$status" = 0 ]; then
    grep -v -e '^\s*$' "$WORK/step.log" | tail -n 40 >> "$OUT"
  else
    FAILED=$((FAILED + 1))
    { echo "FAILED (exit $status)"; tail -n 40 "$WORK/step.log"; } >> "$OUT"
  fi
  echo '```' >> "$OUT"
}

{
  echo "# benchmarks/gpu.sh$([ "$SMOKE" = 1 ] && echo ' --smoke'): $(date -u '+%Y-%m-%d %H:%M UTC'), $(hostname -s)"
  echo
  echo '```'
  "$PY" -c '
import torch
from lightning_repair.reconstruction import product_dtype
print("torch", torch.__version__, "cuda", torch.version.cuda)
for i in range(torch.cuda.device_count()):
    p, products = torch.cuda.get_device_properties(i), product_dtype(torch.device("cuda", i))
    print(f"cuda:{i} {p.name} capability {p.major}.{p.minor} {p.total_memory / 2**30:.0f} GiB Gram products {products}")
print("cpu Gram products", product_dtype(torch.device("cpu")))' || FAILED=$((FAILED + 1))
  echo '```'
} > "$OUT"

RUNS=$WORK/runs
FIT=("$PY" -m lightning_repair.cli fit --config "$CONFIG" --trainer.accelerator "$ACCEL" --trainer.devices 1
     --trainer.logger.init_args.save_dir "$RUNS" --trainer.enable_progress_bar false)
recorded() {  # what the last run's metrics.json says about its evaluation precision and its caches
  "$PY" -c 'import json, sys; m = json.load(open(sys.argv[1]))
print("metrics.json: evaluation_precision", m["evaluation_precision"], "| reused from the cache:", m["cached"],
      "| seconds:", {k: round(v, 2) for k, v in m["timings_s"].items()})' \
    "$(find "$RUNS" -name metrics.json -printf '%T@ %p\n' | sort -n | tail -n 1 | cut -d' ' -f2-)"
}
step "quickstart, float32" "${FIT[@]}"
step "quickstart, float32: recorded" recorded
step "quickstart, another sparsity, evaluation in bf16-mixed (on a GPU; the repair's statistics stay float32/64)" \
  "${FIT[@]}" --trainer.precision bf16-mixed --model.sparsity 0.9
step "quickstart, bf16-mixed: recorded" recorded
step "repair_cost.py, every preset" "$PY" benchmarks/repair_cost.py "${COST[@]}" --device "$DEVICE"
for products in float32 float64; do
  step "repair_cost.py, reconstruct, Gram products in $products" \
    "$PY" benchmarks/repair_cost.py "${COST[@]}" --device "$DEVICE" --presets reconstruct --gram-products "$products"
done
step "repair_cost.py, default and reconstruct, walks in channels_last (the default on a GPU: the models' own format)" \
  "$PY" benchmarks/repair_cost.py "${COST[@]}" --device "$DEVICE" --presets default reconstruct --walk-format channels_last
WEIGHTS=$(find "$RUNS" -name repaired.pt | sort | head -n 1)
if [ "$DDP_DEVICES" -ge 2 ]; then
  step "evaluate, 2 processes (DDP)" "$PY" -m lightning_repair.cli evaluate --config "$CONFIG" --weights "$WEIGHTS" \
    --trainer.accelerator "$ACCEL" --trainer.devices 2 --trainer.strategy ddp
else
  echo -e "\n## evaluate, 2 processes (DDP)\n\nskipped: $DDP_DEVICES GPU(s)" >> "$OUT"
fi
echo "wrote $OUT ($FAILED failed step(s))" >&2
exit "$FAILED"
