#!/usr/bin/env bash
# `softtool bench` on one NVIDIA GPU: the same translation workloads as on the CPU (batch 16 greedy,
# batch 1 greedy, batch 16 with 4 beams; 64 new tokens) with the torch backends in float16 on cuda,
# then the training comparison on cuda. Each step has its own time limit so the whole script stays
# under about seven minutes on an H100/H200; a step that fails or times out is logged and the rest go on.
# Backends share one process (--no-isolate): GPU peak memory is reset per backend, and a process start
# per backend would cost more than the timed work.
#
#   bash benchmarks/gpu_bench.sh                                   # from the repository root
#   ADAPTER=runs/de DATA=path/to/multi30k RESULTS=out bash benchmarks/gpu_bench.sh
#
# The onnx rows need onnxruntime-gpu (softtool[gpu]); without its CUDA provider they are reported as
# skipped with that reason, never timed on the CPU. Results: $RESULTS/bench_*_cuda.json (+ .png).
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DATA=${DATA:-../shared/data/multi30k}
RESULTS=${RESULTS:-benchmarks/results}
DTYPE=${DTYPE:-float16}
ADAPTER=${ADAPTER:-}
BACKENDS=${BACKENDS:-peft,hf,torch,onnx}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu DTYPE=float32 MODEL=tiny-model-dir dry-runs the script itself
MODEL=${MODEL:-}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1

step() {  # step NAME LIMIT_S ARGS...: one softtool bench call, its exit status and wall time logged
  local name=$1 limit=$2
  shift 2
  echo "== $name: softtool bench $*"
  local start=$SECONDS
  timeout "$limit" "$PYTHON" -m softtool bench "$@"
  echo "== $name: exit $? after $((SECONDS - start)) s"
}

[ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
COMMON=(--device "$DEVICE" --dtype "$DTYPE" --data "$DATA" --backends "$BACKENDS" --threads 4 --no-isolate)
[ -n "$ADAPTER" ] && COMMON+=(--adapter "$ADAPTER")
[ -n "$MODEL" ] && COMMON+=(--model "$MODEL")
step batch16 120 --config benchmarks/configs/translation.json "${COMMON[@]}" --repeats 2 \
  --output "$RESULTS/bench_translation_cuda.json"
step batch1 100 --config benchmarks/configs/translation_b1.json "${COMMON[@]}" \
  --output "$RESULTS/bench_translation_b1_cuda.json"
step beam4 100 --config benchmarks/configs/translation_beam4.json "${COMMON[@]}" --repeats 2 \
  --output "$RESULTS/bench_translation_beam4_cuda.json"
step train 80 --config benchmarks/configs/translation.json --train --device "$DEVICE" --data "$DATA" \
  ${MODEL:+--model "$MODEL"} --output "$RESULTS/bench_train_translation_cuda.json"
