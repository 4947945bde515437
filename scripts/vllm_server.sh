#!/usr/bin/env bash
# One vLLM server that `softtool serve --engine vllm` can put its tasks in front of, on this machine's CPU (the
# venv of scripts/vllm_env.sh). Runs in the foreground until stopped.
#
#   scripts/vllm_server.sh MODEL_DIR PORT [extra vllm serve flags...]
#
# MODEL_DIR is a transformers folder (softtool's converted default model is ~/.cache/softtool/models/smollm2-135m,
# made by softtool.models.load_model("smollm2-135m")); nothing is downloaded (HF_HUB_OFFLINE). Environment:
#   VLLM_VENV         the venv (default .venv-vllm)
#   VLLM_CPU_CORES    cores for vLLM's OpenMP threads, e.g. 0 or 0-15 (default: all; vLLM's "auto")
#   VLLM_CPU_KVCACHE_SPACE  GiB of KV cache (default 2 here; vLLM's own default is larger)
# The flags that matter to softtool: --enable-prompt-embeds (requests arrive as embeddings), softtool's logits
# processor (softtool.serve.vllm.processor: no-repeat n-gram and repetition penalty over the prompt's ids, found on
# PYTHONPATH), --dtype float32 (what softtool decodes in on the CPU, so greedy ids match), and
# --generation-config vllm (the model folder's generation_config.json does not change the defaults).
set -euo pipefail
MODEL=${1:?usage: scripts/vllm_server.sh MODEL_DIR PORT [vllm serve flags...]}
PORT=${2:?usage: scripts/vllm_server.sh MODEL_DIR PORT [vllm serve flags...]}
shift 2
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VLLM_VENV:-$ROOT/.venv-vllm}
export VLLM_TARGET_DEVICE=cpu
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_CORES:-${VLLM_CPU_OMP_THREADS_BIND:-auto}}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
exec "$VENV/bin/vllm" serve "$MODEL" --host 127.0.0.1 --port "$PORT" \
  --enable-prompt-embeds --dtype float32 --generation-config vllm \
  --logits-processors softtool.serve.vllm.processor:SofttoolProcessor \
  --max-model-len 1024 "$@"
