#!/bin/bash
# One run of this directory's comparison: SEED=0 or SEED=1 (the two runs), OUT = where the
# results go. From the repository root, alone on the machine (~35 min):
#   SEED=1 OUT=/tmp/auto-seed1 bash bench/results/serving-vs-vllm-cpu-2core/run-2026-12-07-auto/run.sh
set -e
HERE=bench/results/serving-vs-vllm-cpu-2core/run-2026-12-07-auto
SEED=${SEED:-0}; OUT=${OUT:-/tmp/pdserve-auto-seed$SEED}
export VLLM_TARGET_DEVICE=cpu
python -m bench.cli compare --client vllm --peer-config bench/configs/small-colocated.yaml \
  --target vllm=vllm --target pdserve-in-router=bench/configs/small-colocated-1-fe-in-router.yaml \
  --target auto-disagg-fe=$HERE/configs/auto-disagg-fe.yaml \
  --target auto-colocated-2=$HERE/configs/auto-colocated-2.yaml \
  --target auto-disagg-shared=$HERE/configs/auto-disagg-shared.yaml \
  --rounds 2 --input-dist uniform --input-min 512 --input-max 1536 --output-len 64 \
  --rates 0.5 1 2 3 --full-sweep --bisect-steps 0 --num-requests 100 --duration-s 20 \
  --num-warmup 2 --seed "$SEED" --slo-ttft-s 1.5 --slo-tpot-s 0.06 --attainment-target 0.9 \
  --no-progress --output-dir "$OUT"
python -m bench.slo_sweep "$OUT/comparison.json" --ttft 0.5 1 1.5 2 3 --tpot 0.02 0.03 0.05 0.075 0.1
