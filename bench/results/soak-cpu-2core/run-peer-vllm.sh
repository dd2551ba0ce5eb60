#!/usr/bin/env bash
# The peer under the soak's load: plain vLLM's OpenAI server (default core binding: engine on
# one core, front end and engine-core loop on the other) on the embedded tiny model, KV 1 GiB,
# bench.soak with 4 closed-loop clients, 64-word prompts, 32 output tokens, sampled each minute.
#   pdmeasure bash bench/results/soak-cpu-2core/run-peer-vllm.sh
#   PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 TAG=-tcmalloc pdmeasure bash ...
set -u
cd "$(dirname "$0")/../../.."
OUT=bench/results/soak-cpu-2core
TAG=${TAG:-}
MODEL=$(.venv/bin/python -c "from cluster.tiny_model import ensure_tiny_model; print(ensure_tiny_model('tiny'))")
LD_PRELOAD=${PRELOAD:-} VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python -m vllm.entrypoints.openai.api_server \
  --model "$MODEL" --served-model-name pdserve-tiny --host 127.0.0.1 --port 8799 --max-model-len 2048 \
  --max-num-seqs 64 > $OUT/peer-vllm.log 2>&1 &
SRV=$!
trap 'kill -INT $SRV; sleep 5; kill -KILL $SRV 2>/dev/null' EXIT
for _ in $(seq 300); do curl -sf http://127.0.0.1:8799/health >/dev/null && break; sleep 1; done
.venv/bin/python -m bench.soak --url http://127.0.0.1:8799 --minutes ${MINUTES:-6} --interval-s 60 --concurrency 4 \
  --max-tokens 32 --pid $SRV --settle-s 5 --output $OUT/soak-peer-vllm$TAG.json 2>&1 | grep -v "^WARNING" \
  | tee $OUT/soak-peer-vllm$TAG.txt
