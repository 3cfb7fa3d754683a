#!/usr/bin/env bash
# The sampler study: FID-1k of one checkpoint for DDPM, DDIM, DPM-Solver++ 2M, UniPC and Euler at 10, 25, 50, 100
# and 250 steps (CFG 1.5, constant, 3 eps channels: DiT's FID guidance), one row per experiments/fid_sweep.py call.
#   bash experiments/sampler_study/run.sh <checkpoint> <reference .npz> <out dir> [core ...]
# One worker per core (default: cores 0 and 1), each pinned there with one thread, takes the next (sampler, steps)
# row, cheapest steps first. Rows already in <out>/results.json are skipped and a killed row resumes from its
# finished batches (fid_sweep.py, lightgen.sample), so the same command continues an interrupted study.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 3 ] || { echo "usage: $0 <checkpoint> <reference .npz> <out dir> [core ...]" >&2; exit 2; }
ckpt=$1 ref=$2 out=$3
shift 3
cores=${*:-0 1}
python=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
logs=runs/fid_sweep/$(basename "$out")/logs
mkdir -p "$logs"
queue=$logs/queue
for steps in 10 25 50 100 250; do
  for sampler in ddim dpmpp_2m unipc euler ddpm; do echo "$sampler $steps"; done
done > "$queue"

worker() {  # $1: the core
  local line
  while line=$(flock "$queue.lock" sh -c 'l=$(head -n 1 "$1"); [ -n "$l" ] && sed -i 1d "$1"; echo "$l"' _ "$queue") &&
    [ -n "$line" ]; do
    set -- "$1" $line
    echo "$(date +%T) core $1: $2 $3"
    OMP_NUM_THREADS=1 taskset -c "$1" "$python" experiments/fid_sweep.py "$ckpt" "$ref" --vary steps "$3" \
      --set sampler="$2" cfg_scale=1.5 cfg_schedule=constant --out "$out" --logx >"$logs/$2_$3.log" 2>&1 ||
      echo "$(date +%T) core $1: $2 $3 failed, see $logs/$2_$3.log"
  done
}

for core in $cores; do worker "$core" & done
wait
