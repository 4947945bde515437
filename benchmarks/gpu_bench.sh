#!/usr/bin/env bash
# The whole GPU measurement in one run (about 7 minutes on an H100/H200): `softtool bench` on the same
# translation workloads as on the CPU (256 Multi30k sentences at 16 slots, 32 at batch 1, 32 with 4 beams;
# 64 new tokens) with the torch backends in float16 and ONNX Runtime on the CUDA execution provider (an fp16
# export), beside transformers' generate (hf) and its continuous batching (hf-cb); then the training
# comparison. Each step has its own time limit; a step that fails or times out is logged and the rest go on.
# Backends share one process (--no-isolate): GPU peak memory is reset per backend.
#
#   bash benchmarks/gpu_bench.sh                                   # from the repository root
#   ADAPTER=runs/de DATA=path/to/multi30k RESULTS=out bash benchmarks/gpu_bench.sh
#   ORT_GPU_WHEEL=.whl/onnxruntime_gpu-1.31.1-...whl bash benchmarks/gpu_bench.sh
#
# onnxruntime and onnxruntime-gpu install the same `onnxruntime` module. On a machine with a CUDA torch and
# the CPU onnxruntime, give ORT_GPU_WHEEL (a wheel of onnxruntime-gpu built for the machine's CUDA: 1.31.1 for
# CUDA 13): it is installed into its own folder, put first on PYTHONPATH, and the script stops unless ONNX
# Runtime then has its CUDA provider. Without a CUDA provider the onnx rows are reported as skipped with the
# reason, never timed on the CPU. Results: $RESULTS/bench_*_cuda.json (+ .png), with the provider recorded.
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DATA=${DATA:-../shared/data/multi30k}
RESULTS=${RESULTS:-benchmarks/results}
DTYPE=${DTYPE:-float16}
ADAPTER=${ADAPTER:-}
BACKENDS=${BACKENDS:-peft,hf,hf-cb,torch,onnx}
THREADS=${THREADS:-4}   # CPU threads of each bench (a dry run on a small machine: its core count)
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu DTYPE=float32 MODEL=tiny-model-dir dry-runs the script itself
MODEL=${MODEL:-}
EXTRA=${EXTRA:-}              # more `softtool bench` flags for the generation steps (a dry run: --limit 4)
TRAIN_EXTRA=${TRAIN_EXTRA:-}  # and for the training step (a dry run: --steps 1 --warmup 0)
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1

if [ -n "${ORT_GPU_WHEEL:-}" ]; then
  ORT_SITE=${ORT_SITE:-/tmp/softtool-ort-gpu}
  "$PYTHON" -m pip install -q --no-deps --no-index --target "$ORT_SITE" "$ORT_GPU_WHEEL" || exit 1
  export PYTHONPATH="$ORT_SITE${PYTHONPATH:+:$PYTHONPATH}"
  "$PYTHON" -c "import onnxruntime as ort, sys; p = ort.get_available_providers(); print('onnxruntime', ort.__version__, p); sys.exit(0 if 'CUDAExecutionProvider' in p else 'no CUDA provider in ' + ort.__file__)" || exit 1
fi

step() {  # step NAME LIMIT_S ARGS...: one softtool bench call, its exit status and wall time logged
  local name=$1 limit=$2
  shift 2
  echo "== $name: softtool bench $*"
  local start=$SECONDS
  timeout "$limit" "$PYTHON" -m softtool bench "$@"
  echo "== $name: exit $? after $((SECONDS - start)) s"
}

[ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
COMMON=(--device "$DEVICE" --dtype "$DTYPE" --data "$DATA" --backends "$BACKENDS" --threads "$THREADS" --no-isolate)
[ -n "$ADAPTER" ] && COMMON+=(--adapter "$ADAPTER")
[ -n "$MODEL" ] && COMMON+=(--model "$MODEL")
# shellcheck disable=SC2206  # EXTRA is a list of flags
COMMON+=($EXTRA)
step batch16 150 --config benchmarks/configs/translation.json "${COMMON[@]}" \
  --output "$RESULTS/bench_translation_cuda.json"
step batch1 120 --config benchmarks/configs/translation_b1.json "${COMMON[@]}" \
  --output "$RESULTS/bench_translation_b1_cuda.json"
# transformers' continuous batching has no beam search: hf-cb sits this one out (the later --backends wins).
step beam4 80 --config benchmarks/configs/translation_beam4.json "${COMMON[@]}" --backends "${BACKENDS//hf-cb,/}" \
  --output "$RESULTS/bench_translation_beam4_cuda.json"
step train 80 --config benchmarks/configs/translation.json --train --device "$DEVICE" --data "$DATA" \
  ${MODEL:+--model "$MODEL"} $TRAIN_EXTRA --output "$RESULTS/bench_train_translation_cuda.json"
