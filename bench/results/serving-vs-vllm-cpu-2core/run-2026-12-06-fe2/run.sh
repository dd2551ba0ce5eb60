#!/bin/bash
cd "$(dirname "$0")/../../../.."; source .venv/bin/activate
OUT=bench/results/serving-vs-vllm-cpu-2core/run-2026-12-06-fe2
mkdir -p $OUT
echo "start $(date -u +%FT%TZ) loadavg $(cut -d' ' -f1-3 /proc/loadavg) nproc $(nproc)" | tee "$OUT/machine.txt"
git rev-parse HEAD >> "$OUT/machine.txt"
pkill -f VLLM 2>/dev/null
python -m bench.cli compare --client vllm --peer-config bench/configs/small-colocated.yaml \
  --target vllm=vllm \
  --target pdserve-disagg-fe=bench/configs/small-disaggregated-fe.yaml \
  --target pdserve-disagg-fe-nice=bench/configs/small-disaggregated-fe-nice.yaml \
  --input-dist uniform --input-min 512 --input-max 1536 --output-len 64 \
  --rates 0.5 1 2 --full-sweep --bisect-steps 0 \
  --num-requests 100 --duration-s 20 --num-warmup 2 --seed 0 \
  --slo-ttft-s 1.5 --slo-tpot-s 0.06 --attainment-target 0.9 --no-progress \
  --output-dir "$OUT/small-512-1536" 2>&1 | grep -v -E "nanobind|leaked|^ - |refleaks|Writing model" | tee "$OUT/small-512-1536.txt"
python -m bench.slo_sweep "$OUT/small-512-1536/comparison.json" --ttft 0.5 1 1.5 2 3 \
    --tpot 0.02 0.03 0.05 0.075 0.1 > "$OUT/small-512-1536-slo-sweep.txt"
python -m bench.rejudge "$OUT/small-512-1536/comparison.json" --compact "$OUT/small-512-1536/comparison-compact.json" > /dev/null
echo "end $(date -u +%FT%TZ) loadavg $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/machine.txt"
