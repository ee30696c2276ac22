#!/usr/bin/env bash
# Issue 8's online sweep: one synthetic trace replayed at several request rates against a
# minisgl server with the radix cache and again with --cache naive, then one plot.
#   benchmark/online/run_sweep.sh MODEL_DIR OUT_DIR [N] [RATES...] [-- extra server flags]
# e.g. (GPU, dummy Qwen3-0.6B): run_sweep.sh /tmp/qwen3-0.6b results 1000 32 64 128 -- --dummy-weight
# A config-only directory first needs a tokenizer for streamed text: dummy_tokenizer.py DIR.
set -euo pipefail
model=$1 out=$2 n=${3:-1000}
shift $(( $# < 3 ? $# : 3 ))
rates=() flags=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do rates+=("$1"); shift; done
[ $# -gt 0 ] && shift && flags=("$@")
[ ${#rates[@]} -gt 0 ] || rates=(8 16 32)
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
python "$here/trace.py" generate -o "$out/trace.jsonl" -n "$n" --rate 1 ${TRACE_FLAGS:-}
port=${PORT:-30123}
for cache in radix naive; do
  python -m minisgl --model "$model" --port "$port" --cache "$cache" "${flags[@]}" > "$out/server_$cache.log" 2>&1 &
  pid=$!
  for _ in $(seq 600); do curl -sf "http://127.0.0.1:$port/health" > /dev/null && break; sleep 1; done
  for rate in "${rates[@]}"; do
    python "$here/bench_serving.py" --base-url "http://127.0.0.1:$port/v1" --trace "$out/trace.jsonl" \
      -n "$n" --rate "$rate" --label "$cache" --json "$out/${cache}_r${rate}.json" ${BENCH_FLAGS:-} | tail -n 12
  done
  kill -TERM "$pid"; wait "$pid" || true
done
python "$here/../plot.py" "$out"/*_r*.json -o "$out/sweep.png"
echo "results and plot in $out"
