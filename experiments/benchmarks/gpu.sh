#!/usr/bin/env bash
# One GPU, five methods: training and sampling images/s, peak memory and MFU of DiT-XL/2, MDTv2-XL/2, DiffiT-XL/2,
# MaskGIT-base and VQ-Diffusion at batch 32 and 256 per GPU, bf16 autocast (experiments/benchmarks/gpu.py).
# Writes experiments/benchmarks/gpu_cuda.{json,md} (meant to finish within 5 minutes; not timed yet: no GPU was lent).
# Extra arguments go to gpu.py, e.g. `bash experiments/benchmarks/gpu.sh --models dit_xl --batches 32`.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PYTHON" experiments/benchmarks/gpu.py --out experiments/benchmarks "$@"
