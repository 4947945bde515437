#!/usr/bin/env bash
# The GPU checks of the decode engine on a lent GPU, in the two calls of the GPU kit (../shared/gpu/README.md),
# from the repository root, with `source /tmp/gpukit/env.sh` done (MODEL, DATA, PYTHONPATH) and $OUT set:
#
#   call 1 (carry .gpu-kit/1): bash .gpu-kit/1/device-setup.sh && source /tmp/gpukit/env.sh && bash benchmarks/gpu_kit_run.sh torch
#   call 2 (carry .gpu-kit/2): bash .gpu-kit/2/device-join.sh && source /tmp/gpukit/env.sh && bash benchmarks/gpu_kit_run.sh onnx
#
# torch: the `cuda` tests of the PyTorch backend (compiled and captured == the same step uncaptured; against
#        PyTorch's own kernels).
# onnx:  the `cuda` tests of the ONNX backend (a gqa fp16 export, captured == uncaptured), then `softtool bench`
#        with hf-static, torch and onnx in one run each at 16 slots (LIMIT16 examples) and batch 1 (LIMIT1), then
#        benchmarks/profile_static_step.py (device time against host time of one step, per bucket).
# Each step has its own time limit; a step that fails or times out is logged and the rest go on. Results land
# in $OUT (bench_translation_cuda.json, bench_translation_b1_cuda.json, their PNGs, the test logs).
set -uo pipefail
cd "$(dirname "$0")/.."
phase=${1:?usage: gpu_kit_run.sh torch|onnx}
OUT=${OUT:-benchmarks/results}
LIMIT16=${LIMIT16:-64}
LIMIT1=${LIMIT1:-16}
BACKENDS=${BACKENDS:-hf-static,torch,onnx}
export PYTHONUNBUFFERED=1 SOFTTOOL_TOKENIZER=$MODEL TOKENIZERS_PARALLELISM=false

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log its exit status and wall time
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$@"
  echo "== $name: exit $? after $((SECONDS - start)) s"
}

common=(--device cuda --dtype float16 --model "$MODEL" --data "$DATA" --threads 4 --no-isolate --export-verify-steps 8)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
git log -1 --format='commit %H' 2>/dev/null || true
case "$phase" in
  torch)
    step cuda-tests-torch 150 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda_graphs.py -k torch \
      2>&1 | tee "$OUT/cuda_tests_torch.log"
    ;;
  onnx)
    step cuda-tests-onnx 150 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda_graphs.py -k onnx \
      2>&1 | tee "$OUT/cuda_tests_onnx.log"
    step batch16 240 python3 -m softtool bench --config benchmarks/configs/translation.json "${common[@]}" \
      --backends "$BACKENDS" --limit "$LIMIT16" --output "$OUT/bench_translation_cuda.json"
    step batch1 180 python3 -m softtool bench --config benchmarks/configs/translation_b1.json "${common[@]}" \
      --backends "$BACKENDS" --limit "$LIMIT1" --output "$OUT/bench_translation_b1_cuda.json"
    step profile 120 python3 benchmarks/profile_static_step.py --model "$MODEL" --device cuda \
      --output "$OUT/profile_static_step_cuda.json"
    ;;
  *) echo "unknown phase $phase (torch or onnx)" >&2; exit 2 ;;
esac
