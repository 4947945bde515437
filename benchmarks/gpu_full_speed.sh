#!/usr/bin/env bash
# Issue 30's GPU measurement in the two calls of the GPU kit (../shared/gpu/README.md): at most 8 minutes of commands
# (the steps' time limits add up to 480 s) plus the kit's setup, from the repository root with
# `source /tmp/gpukit/env.sh` done and $OUT set:
#
#   ../shared/gpu/make-kit                                            # here, once (no device time)
#   call 1 (carry .gpu-kit/1): bash .gpu-kit/1/device-setup.sh && source /tmp/gpukit/env.sh && bash benchmarks/gpu_full_speed.sh torch
#   call 2 (carry .gpu-kit/2): bash .gpu-kit/2/device-join.sh && source /tmp/gpukit/env.sh && bash benchmarks/gpu_full_speed.sh onnx
#
# torch (at most 200 s): the new `cuda` tests of the PyTorch backend (captured prefill buckets, the captured beam
#        step), then profile_static_step.py on the torch row with an untrained 100-token prompt: per-step device
#        time, kernels per step and per layer, once per torch.compile mode (its default and
#        max-autotune-no-cudagraphs, each under softtool's own CUDA graph capture), and one row's prefill exact
#        against bucketed (captured).
# onnx (at most 280 s): what GroupQueryAttention takes on the CUDA provider (gqa_chunk_probe.py, fp16), the `cuda`
#        tests of the ONNX backend (the gqa form's text-only prefill, its buckets and beams on the CUDA provider),
#        `softtool bench` with hf-static, torch and onnx at 16 slots and at batch 1 with an untrained 100-token
#        prompt (time to first token: ttft_s; bucketed prefill), then profile_static_step.py on the onnx row (gqa
#        form: device time, kernels per step, the prefill).
# Each step has its own time limit; a step that fails or times out is logged and the rest go on (the profiles write
# their JSON after every row, so a cut one keeps what it finished). The random model
# decodes every row to --max-new-tokens in every backend, so tokens/s compares the engines on identical work.
set -uo pipefail
cd "$(dirname "$0")/.."
phase=${1:?usage: gpu_full_speed.sh torch|onnx}
case "$phase" in torch | onnx) ;; *) echo "unknown phase $phase (torch or onnx)" >&2; exit 2 ;; esac
OUT=${OUT:-benchmarks/results}
LIMIT16=${LIMIT16:-48}
LIMIT1=${LIMIT1:-12}
export PYTHONUNBUFFERED=1 SOFTTOOL_TOKENIZER=$MODEL TOKENIZERS_PARALLELISM=false

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log its exit status and wall time
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$@"
  echo "== $name: exit $? after $((SECONDS - start)) s"
}

profile=(python3 benchmarks/profile_static_step.py --model "$MODEL" --device cuda --virtual-tokens 100 --kernels
  --prefill --repeats 100)
bench=(python3 -m softtool bench --device cuda --dtype float16 --model "$MODEL" --data "$DATA" --threads 4 --no-isolate
  --export-verify-steps 8 --num-virtual-tokens 100 --backends hf-static,torch,onnx --prefill buckets)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
git log -1 --format='commit %H' 2>/dev/null || true
case "$phase" in
  torch)
    step cuda-tests-torch 50 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda_graphs.py \
      -k "torch and (prefill or beam)" 2>&1 | tee "$OUT/cuda_tests_full_speed_torch.log"
    step profile-torch 150 "${profile[@]}" --backends torch --compile-modes default,max-autotune-no-cudagraphs \
      --output "$OUT/profile_static_step_p100_torch_cuda.json"
    ;;
  onnx)
    step gqa-probe 15 python3 benchmarks/gqa_chunk_probe.py --provider cuda --output "$OUT/gqa_chunk_probe_cuda.json"
    step cuda-tests-onnx 45 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda_graphs.py -k onnx \
      2>&1 | tee "$OUT/cuda_tests_full_speed_onnx.log"
    step batch16 130 "${bench[@]}" --config benchmarks/configs/translation.json --limit "$LIMIT16" \
      --output "$OUT/bench_translation_p100_cuda.json"
    step batch1 55 "${bench[@]}" --config benchmarks/configs/translation_b1.json --limit "$LIMIT1" \
      --output "$OUT/bench_translation_p100_b1_cuda.json"
    step profile-onnx 35 "${profile[@]}" --backends onnx --output "$OUT/profile_static_step_p100_onnx_cuda.json"
    ;;
esac
