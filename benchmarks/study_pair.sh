#!/usr/bin/env bash
# Up to two benchmarks/study.py commands side by side, each pinned to its own core with one thread, e.g.
#   ../shared/bin/one-at-a-time bash benchmarks/study_pair.sh "length --run n5" "length --run n100"
# Each command's output goes to runs/study/logs/<its arguments>.log (appended). Exits 1 when either failed, 2 when
# not given one or two commands.
set -u
if [ $# -lt 1 ] || [ $# -gt 2 ]; then  # one core each: a third would ask for a core this machine may not have
  echo "usage: study_pair.sh \"STUDY ARGS\" [\"STUDY ARGS\"]" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
logs=${STUDY_LOGS:-runs/study/logs}
mkdir -p "$logs"
pids=()
core=0
for args in "$@"; do
  log="$logs/$(echo "$args" | tr -c 'A-Za-z0-9.=\n-' '_').log"
  echo "$(date '+%F %T') core $core: study.py $args" >>"$log"
  # shellcheck disable=SC2086  # $args is the command's own word list
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 taskset -c "$core" "$py" benchmarks/study.py $args --threads 1 --quiet >>"$log" 2>&1 &
  pids+=($!)
  core=$((core + 1))
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
exit $rc
