#!/bin/bash
# Reproduces bench/results/serving-vs-vllm-cpu-2core: plain vLLM (default binding and
# both cores) vs pdserve, same cores, same client (vllm bench serve), seed 0.
# Run from the repository root with the venv active, alone on the machine
# (on the shared dev machine: flock /tmp/pdserve-heavy.lock bash <this file>). ~20 min.
set -euo pipefail
OUT=${OUT:-bench/results/serving-vs-vllm-cpu-2core}
PY=${PY:-python}
mkdir -p "$OUT"
echo "start $(date -u +%FT%TZ) loadavg $(cut -d' ' -f1-3 /proc/loadavg) nproc $(nproc)" | tee "$OUT/machine.txt"
git rev-parse HEAD >> "$OUT/machine.txt"

PARTS=${PARTS:-"tiny saturation lowload small sweep"}

if [[ " $PARTS " == *" tiny "* ]]; then
# 1. Tiny model, 512 prompt / 64 output tokens, Poisson 1, 8, 32 req/s, SLO TTFT 1 s / TPOT 50 ms.
$PY -m bench.cli compare --client vllm \
  --target vllm=vllm --target vllm-both-cores=vllm:cores=0-1 \
  --target pdserve-colocated=deploy/configs/colocated.yaml \
  --target pdserve-disagg=deploy/configs/disaggregated.yaml \
  --target pdserve-colocated-1=bench/configs/tiny-colocated-1.yaml \
  ${EXTRA_TINY_TARGETS:-} \
  --input-len 512 --output-len 64 --rates 1 8 32 --full-sweep --bisect-steps 0 \
  --num-requests 400 --duration-s 15 --num-warmup 2 --seed 0 \
  --slo-ttft-s 1 --slo-tpot-s 0.05 --attainment-target 0.9 --no-progress \
  --output-dir "$OUT/tiny-512-64" 2>&1 | grep -v -E "nanobind|leaked|^ - |refleaks" | tee "$OUT/tiny-512-64.txt"
echo "after tiny $(date -u +%FT%TZ) loadavg $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/machine.txt"
fi

if [[ " $PARTS " == *" saturation "* ]]; then
# 1b. Where each server's goodput really is: 32 req/s was met by all three.
$PY -m bench.cli compare --client vllm \
  --target vllm=vllm --target vllm-both-cores=vllm:cores=0-1 \
  --target pdserve-colocated-1=bench/configs/tiny-colocated-1.yaml \
  --input-len 512 --output-len 64 --rates 32 40 48 --full-sweep --bisect-steps 0 \
  --num-requests 600 --duration-s 15 --num-warmup 2 --seed 0 \
  --slo-ttft-s 1 --slo-tpot-s 0.05 --attainment-target 0.9 --no-progress \
  --output-dir "$OUT/tiny-saturation" 2>&1 | grep -v -E "nanobind|leaked|^ - |refleaks" | tee "$OUT/tiny-saturation.txt"
fi

if [[ " $PARTS " == *" lowload "* ]]; then
# 1c. Low load, 60 requests each: per-request and per-token overhead against vLLM.
$PY -m bench.cli compare --client vllm \
  --target vllm=vllm --target pdserve-colocated-1=bench/configs/tiny-colocated-1.yaml \
  --input-len 512 --output-len 64 --rates 1 --full-sweep --bisect-steps 0 \
  --num-requests 60 --duration-s 60 --num-warmup 2 --seed 0 \
  --slo-ttft-s 1 --slo-tpot-s 0.05 --attainment-target 0.9 --no-progress \
  --output-dir "$OUT/tiny-lowload" 2>&1 | grep -v -E "nanobind|leaked|^ - |refleaks" | tee "$OUT/tiny-lowload.txt"
fi

if [[ " $PARTS " == *" small "* ]]; then

# 2. Small model, prompts uniform 512-1536 tokens, 64 output tokens, SLO TTFT 1.5 s / TPOT 60 ms.
$PY -m bench.cli compare --client vllm --peer-config bench/configs/small-colocated.yaml \
  --target vllm=vllm \
  --target pdserve-colocated=bench/configs/small-colocated.yaml \
  --target pdserve-disagg=bench/configs/small-disaggregated.yaml \
  --target pdserve-colocated-1=bench/configs/small-colocated-1.yaml \
  ${EXTRA_SMALL_TARGETS:-} \
  --input-dist uniform --input-min 512 --input-max 1536 --output-len 64 \
  --rates 0.5 1 2 4 --full-sweep --bisect-steps 0 \
  --num-requests 100 --duration-s 20 --num-warmup 2 --seed 0 \
  --slo-ttft-s 1.5 --slo-tpot-s 0.06 --attainment-target 0.9 --no-progress \
  --output-dir "$OUT/small-512-1536" 2>&1 | grep -v -E "nanobind|leaked|^ - |refleaks" | tee "$OUT/small-512-1536.txt"
echo "after small $(date -u +%FT%TZ) loadavg $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/machine.txt"
fi

if [[ " $PARTS " == *" rounds "* ]]; then
# 4. Targets taking turns in 3 rotated rounds, runs pooled per rate (2026-12-07): the
# machine's speed drifts, so the one-after-the-other parts above also measure the drift.
F='nanobind|leaked|^ - |refleaks'
$PY -m bench.cli compare --client vllm --target vllm=vllm \
  --target pdserve-colocated-1=bench/configs/tiny-colocated-1.yaml \
  --target pdserve-colocated-1-fe=bench/configs/tiny-colocated-1-fe.yaml \
  --rounds 3 --input-len 512 --output-len 64 --rates 1 32 48 --full-sweep --bisect-steps 0 \
  --num-requests 1000 --duration-s 20 --num-warmup 2 --seed 0 \
  --slo-ttft-s 1 --slo-tpot-s 0.05 --attainment-target 0.9 --no-progress \
  --output-dir "$OUT/tiny-rounds" 2>&1 | grep -v -E "$F" | tee "$OUT/tiny-rounds.txt"
$PY -m bench.cli compare --client vllm --peer-config bench/configs/small-colocated.yaml \
  --target vllm=vllm --target pdserve-colocated-1=bench/configs/small-colocated-1.yaml \
  --target pdserve-colocated-1-fe=bench/configs/small-colocated-1-fe.yaml \
  --target pdserve-disagg-fe=bench/configs/small-disaggregated-fe.yaml \
  --target pdserve-disagg=bench/configs/small-disaggregated.yaml \
  --rounds 3 --input-dist uniform --input-min 512 --input-max 1536 --output-len 64 \
  --rates 0.5 1 2 --full-sweep --bisect-steps 0 --num-requests 100 --duration-s 20 \
  --num-warmup 2 --seed 0 --slo-ttft-s 1.5 --slo-tpot-s 0.06 --attainment-target 0.9 \
  --no-progress --output-dir "$OUT/small-rounds" 2>&1 | grep -v -E "$F" | tee "$OUT/small-rounds.txt"
for run in tiny-rounds small-rounds; do
  $PY -m bench.slo_sweep "$OUT/$run/comparison.json" --ttft 0.5 1 1.5 2 3 \
    --tpot 0.02 0.03 0.05 0.075 0.1 > "$OUT/$run-slo-sweep.txt"
done
fi

if [[ " $PARTS " == *" sweep "* ]]; then

# 3. SLO sweep re-judged from the same per-request records.
for run in tiny-512-64 small-512-1536; do
  [ -f "$OUT/$run/comparison.json" ] || continue
  $PY -m bench.slo_sweep "$OUT/$run/comparison.json" --ttft 0.5 1 1.5 2 3 \
    --tpot 0.02 0.03 0.05 0.075 0.1 > "$OUT/$run-slo-sweep.txt"
  $PY -m bench.rejudge "$OUT/$run/comparison.json" --compact "$OUT/$run/comparison-compact.json" > /dev/null
done
fi
