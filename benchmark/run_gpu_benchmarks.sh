#!/usr/bin/env bash
# The rows of docs/benchmarks.md, on the GPU machine (inside benchmark/device_run.sh):
# the standard workload, its ablations and the Qwen3-8B shape. Logs go to ${OUT:-.}.
set -u
export PYTHONUNBUFFERED=1
out=${OUT:-.}
cfg=${CFG_DIR:-.gpu-shared/configs}
bench() {  # name, timeout, args...
  local name=$1 t=$2; shift 2
  echo "== $(date +%T) $name: python benchmark/offline/bench.py $*"
  timeout "$t" python benchmark/offline/bench.py "$@" 2>&1 | grep -v Warn | tee "$out/$name.log" | grep "run \|median\|ready"
}
std=(--config-json "$cfg/qwen3-0.6b.json" --dummy-weight)
bench standard 150 "${std[@]}" --repeats 3
MINISGL_DECODE_SORT=0 bench admission_order 60 "${std[@]}" --repeats 2
MINISGL_DISABLE_KERNELS=1 bench no_kernels 60 "${std[@]}" --repeats 2
MINISGL_DISABLE_OVERLAP_SCHEDULING=1 bench no_overlap 60 "${std[@]}" --repeats 2
bench no_graphs 70 "${std[@]}" --repeats 2 --cuda-graph-max-bs 0
bench qwen3_8b 200 --config-json "$cfg/qwen3-8b.json" --dummy-weight --repeats 3
bench attn_torch 60 "${std[@]}" --repeats 1 --attn torch --cuda-graph-max-bs 0
echo "== $(date +%T) done"
