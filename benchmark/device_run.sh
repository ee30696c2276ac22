#!/usr/bin/env bash
# On the GPU machine (device tool): set up the carried wheels and shared files, then run
# whatever is given, e.g.  bash benchmark/device_run.sh python -m pytest tests/gpu/test_gpu.py -q
# Expects .gpu-wheels/ (../shared/gpu/fetch-wheels.sh + setup.sh) and .gpu-shared/ (a copy of
# ../shared/configs and ../shared/models) carried next to the tree.
# FlashInfer's JIT cache (~1.5 min of compiling on a fresh machine): restored from split
# archives in .jit-carry/ when carried, and saved to $OUT/jit.tgz.* after the command, so the
# next call can carry them back (copy them into .jit-carry/ here).
set -u
source .gpu-wheels/setup.sh .gpu-wheels >/dev/null || exit 1
[ -e ../shared ] || ln -sfn "$PWD/.gpu-shared" ../shared
# Triton's compiled kernels travel with FlashInfer's (the tests compile ~40 s of them)
export TRITON_CACHE_DIR=$PWD/.jit-cache/triton
# pip gives the freshly installed headers today's mtime, newer than the carried objects, so
# ninja would rebuild every FlashInfer module that includes them: date them back
find /tmp/site/flashinfer /tmp/site/tvm_ffi -type f -exec touch -d 2020-01-01 {} + 2>/dev/null
if [ -d .jit-carry ] && ls .jit-carry/jit.tgz.* >/dev/null 2>&1; then
  cat .jit-carry/jit.tgz.* | tar xzf - && echo "restored .jit-cache"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$@"
status=$?
if [ -n "${OUT:-}" ] && [ -d .jit-cache ]; then
  tar czf - .jit-cache | split -b 15M - "$OUT/jit.tgz."
fi
exit $status
