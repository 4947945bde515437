#!/usr/bin/env bash
# GPU check for `softtool export` (not run yet: the lent H200 ran the gqa export through `softtool bench`, not this). Needs an
# NVIDIA GPU and onnxruntime-gpu
# (pip install -c constraints.txt -e ".[gpu]"; then uninstall the CPU onnxruntime wheel if both are present).
# Exports SmolLM2-135M with a 20-token prompt for the CUDA EP (fp32, then fp16), checks each export against
# PyTorch on the GPU (the export's own verification: max logit diff and greedy agreement over 32 steps), and
# times greedy generation torch-on-GPU vs ONNX Runtime CUDA EP. The benchmark step is capped at 280 s.
# Results: benchmarks/results/export_smollm2_cuda.json.
#
#   bash benchmarks/gpu_check.sh       # from the repository root, on a CUDA machine
#   DEVICE=cpu DTYPES=fp32 MODEL=tiny-model-dir OUT=out.json SIZES="--batch 2 --max-new-tokens 4 --repeats 1" \
#     bash benchmarks/gpu_check.sh     # a dry run of the script itself on the CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
MODEL=${MODEL:-smollm2-135m}
DTYPES=${DTYPES:-fp32,fp16}
SIZES=${SIZES:---batch 8 --max-new-tokens 64 --repeats 3}
OUT=${OUT:-benchmarks/results/export_smollm2_cuda.json}
if [ "$DEVICE" != cpu ]; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  "$PY" - <<'PY'
import onnxruntime as ort, sys
providers = ort.get_available_providers()
print("onnxruntime", ort.__version__, providers)
if "CUDAExecutionProvider" not in providers:
    sys.exit("onnxruntime has no CUDAExecutionProvider: install onnxruntime-gpu (the gpu extra)")
PY
fi
# --strict-device semantics: the benchmark fails rather than silently measuring the CPU.
# shellcheck disable=SC2086  # SIZES is a list of flags
timeout 280 "$PY" -c "
import runpy, sys, warnings
warnings.filterwarnings('error', message='.*falling back to the CPU', category=RuntimeWarning)  # no CPU result as GPU
sys.argv = ['benchmarks/export_bench.py'] + sys.argv[1:]
runpy.run_path('benchmarks/export_bench.py', run_name='__main__')
" --device "$DEVICE" --model "$MODEL" --dtypes "$DTYPES" $SIZES --out "$OUT"
cat "$OUT"
