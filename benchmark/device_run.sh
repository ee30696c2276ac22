#!/usr/bin/env bash
# On the GPU machine (device tool): set up the carried wheels and shared files, then run
# whatever is given, e.g.  bash benchmark/device_run.sh pytest tests/test_gpu.py -q
# Expects .gpu-wheels/ (../shared/gpu/fetch-wheels.sh + setup.sh) and .gpu-shared/ (a copy of
# ../shared/configs and ../shared/models) carried next to the tree; restores .jit-cache from
# $OUT-style split archives in .jit-carry/ when present.
set -u
source .gpu-wheels/setup.sh .gpu-wheels >/dev/null || exit 1
[ -e ../shared ] || ln -sfn "$PWD/.gpu-shared" ../shared
if [ -d .jit-carry ] && ls .jit-carry/jit.tgz.* >/dev/null 2>&1; then
  cat .jit-carry/jit.tgz.* | tar xzf - && echo "restored .jit-cache"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$@"
