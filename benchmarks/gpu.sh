#!/usr/bin/env bash
# The benchmarks' GPU rows (`--device cuda --dtype bf16`) in one short run on a CUDA machine.
#
#   bash benchmarks/gpu.sh [STAGE ...]      # from the repository root; default: every stage
#
# Stages, each under its own time limit, in order of what matters most:
#   bigmodel   chunked vs full loss and gradient checkpointing on/off, 8x512 (issue 26)
#   train      train_step.py: floor, full fine-tuning, PEFT and lorakit q,v r=8 and all-linear r=16
#   infer      inference.py: base, PEFT, lorakit unmerged and merged
#   merge      merge_time.py
#   mixed      mixed_batch.py: lorakit single adapter vs per-row 4 and 16 adapters
#
# Environment: PYTHON (default python3), OUT (where the JSON and logs go, default runs/gpu),
# MODEL (default: the packaged smollm2-135m; where its package cannot travel, set TWIN_SRC to a
# folder made by `python benchmarks/_twin.py --pack DIR` and a random-weight twin of the same shape
# is written first: timings and memory depend on shapes, not values).
set -u
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
MODEL=${MODEL:-smollm2-135m}
if [ -n "${TWIN_SRC:-}" ]; then
  MODEL=$($PY benchmarks/_twin.py "$TWIN_SRC" "${TWIN_DST:-/tmp/smollm2-twin}" | tail -1) || exit 1
fi
# DEVICE=cpu DTYPE=fp32 EXTRA=--quick: a dry run of the same stages on a machine without a GPU.
read -r -a extra <<< "${EXTRA:-}"
COMMON=(--device "${DEVICE:-cuda}" --dtype "${DTYPE:-bf16}" --model "$MODEL" "${extra[@]}")
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(bigmodel train infer merge mixed)

stage() {  # name seconds command...
  local name=$1 limit=$2
  shift 2
  echo "=== $name ($(date -u +%T), limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$OUT/$name.log"
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
}

for s in "${stages[@]}"; do
  case $s in
    bigmodel) stage bigmodel 240 $PY benchmarks/bigmodel.py --rows loss,ckpt "${COMMON[@]}" --out "$OUT/bigmodel.json" ;;
    train) stage train 240 $PY benchmarks/train_step.py "${COMMON[@]}" --repeats 2 \
      --only floor,full,peft-qv8,lorakit-qv8,peft-all16,lorakit-all16 --out "$OUT/train_step.json" ;;
    infer) stage infer 150 $PY benchmarks/inference.py "${COMMON[@]}" --repeats 1 \
      --only base,peft-qv8,lorakit-qv8,lorakit-qv8-merged,peft-all16,lorakit-all16,lorakit-all16-merged \
      --out "$OUT/inference.json" ;;
    merge) stage merge 100 $PY benchmarks/merge_time.py "${COMMON[@]}" --repeats 1 --out "$OUT/merge_time.json" ;;
    mixed) stage mixed 120 $PY benchmarks/mixed_batch.py "${COMMON[@]}" --repeats 1 \
      --only base,lorakit-qv8-single,lorakit-qv8-mix4,lorakit-qv8-mix16 --out "$OUT/mixed_batch.json" ;;
    *) echo "unknown stage $s" ;;
  esac
done
