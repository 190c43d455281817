#!/usr/bin/env bash
# The GPU checks of the inference-speed work, prepared to run in one call on a lent GPU machine
# (whose image has CUDA PyTorch but neither min-dalle nor a few of our pure-Python dependencies).
#
#   bash benchmarks/gpu_check.sh wheels   # here, with network: builds .whl/ (git-ignored)
#   bash benchmarks/gpu_check.sh run      # there, with .whl carried: CUDA tests, bench_generate mini
#                                         # and Mega (~10 min on an H200; --steps 32 extrapolated), then
#                                         # bench_load at mini's shape (its load-cuda step: host memory)
#
# `run` writes the merged benchmarks/results/bench_generate.json and the logs to $OUT (or ./gpu-out).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(min-dalle==0.4.11 wordninja==2.0.0 emoji ftfy wcwidth unidecode
  huggingface_hub==2.4.0 httpx2 httpcore2 h11 anyio sniffio idna truststore certifi hf-xet click)

case "${1:-}" in
wheels)
  # Pure-Python (and wcwidth's abi3 x86-64) wheels: they install on the GPU machine's Python 3.12.
  rm -rf .whl && mkdir -p .whl
  python3 -m pip wheel -q --no-deps -w .whl "${WHEELS[@]}"
  ls .whl
  ;;
run)
  out=${OUT:-gpu-out}
  mkdir -p "$out"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
  # The CUDA-only tests (CUDA graph replay against eager steps), then the figures.
  python3 -m pytest -q -p no:cacheprovider tests/models/test_bart.py -k "cuda" 2>&1 | tee "$out/tests.log"
  python3 benchmarks/bench_generate.py --device cuda --shape mini --steps 32 --work /tmp/bench \
    2>&1 | tee "$out/mini.log"
  python3 benchmarks/bench_generate.py --device cuda --shape mega --steps 32 --work /tmp/bench \
    2>&1 | tee "$out/mega.log"
  python3 benchmarks/bench_load.py --shape mini --work /tmp/bench-load 2>&1 | tee "$out/load.log"
  cp benchmarks/results/bench_generate.json benchmarks/results/bench_load.json "$out/"
  ;;
*)
  echo "usage: $0 wheels|run" >&2
  exit 2
  ;;
esac
