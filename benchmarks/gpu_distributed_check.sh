#!/usr/bin/env bash
# The NCCL path of `softtool train` / `softtool eval` on one GPU, checked against the plain one-process
# path (no launcher), in under five minutes. Ran once on an H200: benchmarks/results/gpu_distributed_check.json.
#
#   bash benchmarks/gpu_distributed_check.sh            # from the repository root, on a CUDA machine
#   MODEL=path/to/model DATA=path/to/multi30k STEPS=20 bash benchmarks/gpu_distributed_check.sh
#
# Writes $OUT/gpu_distributed_check.json (default OUT=benchmarks/results) and the logs next to it:
# torch/CUDA/NCCL versions, the GPU, the commands, their wall times, and whether the torchrun
# --nproc_per_node 1 run (NCCL process group, DDP-wrapped prompt) matched the plain run.
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
MODEL=${MODEL:-smollm2-135m}
DATA=${DATA:-../shared/data/multi30k}
STEPS=${STEPS:-20}
export DEVICE=${DEVICE:-cuda}  # DEVICE=cpu dry-runs the script itself with gloo
OUT=${OUT:-benchmarks/results}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
LOG="$OUT/gpu_distributed_check.log"
: >"$LOG"
# Works from a plain checkout too: the Python package is importable from python/ without installing
# (an installed build, with the compiled search core, is used when there is one).
if ! "$PYTHON" -c "import softtool" 2>/dev/null; then
  export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
fi

if [ ! -d "$DATA" ]; then
  # No real data here: a few line-aligned sentence pairs are enough to exercise the path.
  DATA="$WORK/data"
  mkdir -p "$DATA"
  for split in train dev; do
    for i in $(seq 1 32); do echo "A man number $i rides a bike in the park."; done >"$DATA/$split.en"
    for i in $(seq 1 32); do echo "Ein Mann Nummer $i fährt im Park Fahrrad."; done >"$DATA/$split.de"
  done
fi

step() {  # step NAME TIMEOUT CMD...: run, log, record wall time and exit status
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "$name $rc $((SECONDS - start)) $*" >>"$WORK/steps"
  echo "   exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
}

TRAIN=(train --task translation --data "$DATA" --model "$MODEL" --num-virtual-tokens 20 --max-steps "$STEPS"
  --batch-size 8 --eval-every 0 --eval-limit 16 --checkpoint-every 0 --max-length 128 --device "$DEVICE" --quiet)
EVAL=(--data "$DATA" --model "$MODEL" --limit 32 --batch-size 8 --max-new-tokens 32 --device "$DEVICE" --quiet)
TORCHRUN=("$PYTHON" -m torch.distributed.run --nproc_per_node 1 --master_addr 127.0.0.1 --master_port 29533)

step env 30 "$PYTHON" -c "import softtool, torch; print(softtool.__file__, torch.__version__, torch.version.cuda, torch.cuda.nccl.version() if torch.cuda.is_available() else None, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
step train_plain 75 "$PYTHON" -m softtool "${TRAIN[@]}" --output "$WORK/plain"
step train_nccl 75 "${TORCHRUN[@]}" -m softtool "${TRAIN[@]}" --output "$WORK/nccl"
step eval_plain 60 "$PYTHON" -m softtool eval "$WORK/plain" "${EVAL[@]}" --output "$WORK/eval_plain"
step eval_nccl 60 "${TORCHRUN[@]}" -m softtool eval "$WORK/plain" "${EVAL[@]}" --output "$WORK/eval_nccl"

"$PYTHON" - "$WORK" "$OUT/gpu_distributed_check.json" <<'EOF'
"""Compare the NCCL run with the plain run and write the record."""
import json, os, platform, shutil, subprocess, sys
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
steps = []
for line in (work / "steps").read_text().splitlines():
    name, rc, seconds, command = line.split(" ", 3)
    steps.append({"name": name, "exit": int(rc), "seconds": int(seconds), "command": command})
record = {
    "benchmark": "gpu_distributed_check",
    "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
    "machine": {"host": platform.node(), "cores": os.cpu_count(),
                "gpu": subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                                      capture_output=True, text=True).stdout.strip() if shutil.which("nvidia-smi") else None},
    "command": "bash benchmarks/gpu_distributed_check.sh",
    "device": os.environ.get("DEVICE", "cuda"),
    "steps": steps,
}


def curve(run):
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    return [(r["step"], r.get("loss"), r.get("dev_loss")) for r in map(json.loads, path.read_text().splitlines())]


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


plain, nccl = curve(work / "plain"), curve(work / "nccl")
if plain and nccl and len(plain) == len(nccl):
    diffs = [rel(x, y) for p, n in zip(plain, nccl) for x, y in zip(p[1:], n[1:]) if x is not None and y is not None]
    record["train_loss_max_rel_diff"] = max(diffs) if diffs else None
    record["train_final_loss"] = {"plain": plain[-2][1], "nccl": nccl[-2][1]}
    try:
        from safetensors.torch import load_file

        a = load_file(work / "plain" / "adapter_model.safetensors")["prompt_embeddings"]
        b = load_file(work / "nccl" / "adapter_model.safetensors")["prompt_embeddings"]
        record["prompt_max_rel_diff"] = float(((a - b).abs().max() / b.abs().max()).item())
    except Exception as exc:  # noqa: BLE001 - recorded, not fatal: the record is the point
        record["prompt_compare_error"] = str(exc)
ep, en = work / "eval_plain" / "predictions.jsonl", work / "eval_nccl" / "predictions.jsonl"
if ep.is_file() and en.is_file():
    record["eval_predictions_identical"] = ep.read_text() == en.read_text()
    mp, mn = (json.loads((p.parent / "metrics.json").read_text())["metrics"] for p in (ep, en))
    record["eval_metrics"] = {"plain": mp, "nccl": mn}
record["passed"] = (
    all(s["exit"] == 0 for s in steps)
    and record.get("train_loss_max_rel_diff") is not None
    and record["train_loss_max_rel_diff"] < 1e-4
    and record.get("eval_predictions_identical") is True
)
out.write_text(json.dumps(record, indent=2) + "\n")
print(json.dumps(record, indent=2))
EOF
