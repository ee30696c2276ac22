#!/usr/bin/env bash
# The rows of docs/benchmarks.md, on the GPU machine (inside benchmark/device_run.sh):
# the standard workload, its ablations and the Qwen3-8B shape. Logs go to ${OUT:-.}.
set -u
export PYTHONUNBUFFERED=1
out=${OUT:-.}
cfg=${CFG_DIR:-.gpu-shared/configs}
bench() {  # name, timeout, args...
  local name=$1 t=$2; shift 2
  echo "== $name: python benchmark/offline/bench.py $*"
  timeout "$t" python benchmark/offline/bench.py "$@" 2>&1 | grep -v Warn | tee "$out/$name.log" | grep "run \|median\|ready"
}
std=(--config-json "$cfg/qwen3-0.6b.json" --dummy-weight)
bench standard 150 "${std[@]}" --repeats 3
MINISGL_DISABLE_OVERLAP_SCHEDULING=1 bench no_overlap 120 "${std[@]}" --repeats 2
bench no_graphs 120 "${std[@]}" --repeats 2 --cuda-graph-max-bs 0
bench qwen3_8b 240 --config-json "$cfg/qwen3-8b.json" --dummy-weight --repeats 3
bench attn_torch 90 "${std[@]}" --repeats 1 --attn torch --cuda-graph-max-bs 0
