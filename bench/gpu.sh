#!/usr/bin/env bash
# The GPU benchmark, in one command: on one GPU, fine-tune a 1.1B LLaMA-architecture model
# (random weights, no hub) with train.py and the original README's flags, padded vs
# padding-free vs packing, sdpa vs flash-attention and with and without Liger where installed;
# print tokens/s, peak GPU memory and MFU; then run the original FSDP command under torchrun
# on every GPU. Within 10 minutes (stopped at GPU_BENCH_TIMEOUT seconds, default 580).
#
#   bash bench/gpu.sh                # on a GPU machine
#   bash bench/gpu.sh --dry_run      # the same code on CPU with a tiny model (the test suite runs it)
#
# Python: $PYTHON, else ./.venv/bin/python, else python3 (it needs torch and requirements.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec timeout "${GPU_BENCH_TIMEOUT:-580}" "$PYTHON" -m bench.gpu_bench "$@"
