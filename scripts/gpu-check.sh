#!/usr/bin/env bash
# The CUDA/NCCL paths in one go, on a machine with one or more NVIDIA GPUs (about 5 minutes on one H100):
# the codecs on the GPU (round-trip errors, times, same result as on CPU), one group through `torchx run` on
# the GPU (an NCCL world of one) blocking fp32 vs Streaming DiLoCo with int8 syncs, and one group with FSDP2
# over every GPU. Prints tables and writes benchmarks/results/gpu_check.json (see docs/gpus.md).
#
#   make install && scripts/gpu-check.sh                # on the GPU machine
#   scripts/gpu-check.sh --device cpu --model nano      # the same checks on CPU, to try the script
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
exec python benchmarks/gpu_check.py "$@"
