#!/bin/bash
# What the stream relay (ray.stream_relay) costs: one colocated tiny-model instance with
# and without it, plain vLLM (default binding) as the anchor; same client (vllm bench
# serve), seed 0, 512 prompt / 64 output tokens. Alone on the machine:
#   pdmeasure bash bench/results/stream-relay-cpu-2core/run.sh        (~12 min)
set -euo pipefail
OUT=${OUT:-bench/results/stream-relay-cpu-2core}
PY=${PY:-.venv/bin/python}
echo "start $(date -u +%FT%TZ) $(git rev-parse HEAD) loadavg $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$OUT/machine.txt"
common=(--client vllm --target vllm=vllm
  --target pdserve-colocated-1=bench/configs/tiny-colocated-1.yaml
  --target pdserve-colocated-1-relay=bench/configs/tiny-colocated-1-relay.yaml
  --input-len 512 --output-len 64 --full-sweep --bisect-steps 0 --num-warmup 2 --seed 0
  --slo-ttft-s 1 --slo-tpot-s 0.05 --attainment-target 0.9 --no-progress)
# Low load: per-request and per-token overhead.
$PY -m bench.cli compare "${common[@]}" --rates 1 --num-requests 60 --duration-s 60 \
  --output-dir "$OUT/lowload" 2>&1 | grep -v -E "nanobind|leaked|^ - |refleaks" | tee "$OUT/lowload.txt"
# Load: 16 and 32 req/s.
$PY -m bench.cli compare "${common[@]}" --rates 16 32 --num-requests 600 --duration-s 15 \
  --output-dir "$OUT/load" 2>&1 | grep -v -E "nanobind|leaked|^ - |refleaks" | tee "$OUT/load.txt"
echo "end $(date -u +%FT%TZ)" | tee -a "$OUT/machine.txt"
for run in lowload load; do  # every request's TTFT/e2e/lengths, per-token gaps dropped
  $PY -m bench.rejudge "$OUT/$run/comparison.json" --compact "$OUT/$run/comparison-compact.json" > /dev/null
done
