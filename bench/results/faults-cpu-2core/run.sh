#!/usr/bin/env bash
# Real-engine fault run: `pdserve serve` (Ray Serve, direct ingress, embedded tiny model,
# config.yaml: 1 prefill + 2 decodes), then one fault at a time from bench/faults.py's long
# form, each waiting until Serve has replaced what was killed. Results: faults.txt (one
# line per fault), <fault><tag>.json (every request), serve<tag>.log.
#
#   pdmeasure bash bench/results/faults-cpu-2core/run.sh      # every fault, config.yaml
#   FAULTS="kill-prefill stop-prefill" CONFIG=config-2prefill.yaml TAG=-2prefill \
#     PROMPT_WORDS=300 MAX_TOKENS=16 CONCURRENCY=8 pdmeasure bash bench/results/faults-cpu-2core/run.sh
#   FAULTS=kill-router INGRESS=proxy pdmeasure ... run.sh        # Serve's HTTP proxy in front
# (pdmeasure holds the machine's heavy lock itself: no flock inside.)
set -u
cd "$(dirname "$0")/../../.."
OUT=bench/results/faults-cpu-2core
URL=http://127.0.0.1:8741
PY=.venv/bin/python
FAULTS=${FAULTS:-kill-decode stop-decode kill-prefill stop-prefill kill-router}
CONFIG=${CONFIG:-config.yaml}
TAG=${TAG:-}${INGRESS:+-$INGRESS}
PROMPT_WORDS=${PROMPT_WORDS:-8}   # request i's prompt: "request i " this many times
MAX_TOKENS=${MAX_TOKENS:-128}
CONCURRENCY=${CONCURRENCY:-4}
echo "== $(date -u +%FT%TZ) faults: $FAULTS config: $CONFIG ingress: ${INGRESS:-default}" \
  "prompt words: $PROMPT_WORDS max tokens: $MAX_TOKENS concurrency: $CONCURRENCY" | tee -a $OUT/faults.txt
.venv/bin/pdserve serve --config $OUT/$CONFIG ${INGRESS:+--ingress $INGRESS} > $OUT/serve$TAG.log 2>&1 &
SERVE=$!
cleanup() {
  kill -INT $SERVE 2>/dev/null
  for _ in $(seq 60); do kill -0 $SERVE 2>/dev/null || break; sleep 1; done
  kill -KILL $SERVE 2>/dev/null
}
trap cleanup EXIT
for _ in $(seq 900); do
  curl -sf $URL/health >/dev/null && break
  kill -0 $SERVE 2>/dev/null || { echo "pdserve serve exited"; tail -30 $OUT/serve$TAG.log; exit 1; }
  sleep 1
done
# /health is 200 once one instance of each role is up: wait for every configured instance,
# or the harness's "capacity back" would compare against a deployment not yet whole.
EXPECTED=$($PY -c "import yaml; c = yaml.safe_load(open('$OUT/$CONFIG')); print(sum(c[r]['num_instances'] for r in ('prefill', 'decode')))")
for _ in $(seq 300); do
  READY=$(curl -sf $URL/metrics | awk '/^pdserve_instances\{/ && /state="ready"/ {n += $2} END {print n + 0}')
  [ "$READY" -ge "$EXPECTED" ] && break
  sleep 1
done
echo "ready after ${SECONDS} s ($READY of $EXPECTED instances)" | tee -a $OUT/faults.txt
store() {  # Ray object-store use of this deployment's Ray (bench/soak.py's reading)
  $PY -c "from bench.soak import *; print(object_store_mib(gcs_address(pdserve_processes([$SERVE]))))"
}
echo "object store MiB at start: $(store)" | tee -a $OUT/faults.txt
run() {  # fault target
  $PY -m bench.faults --url $URL --fault "$1" --target "$2" --requests 60 --concurrency $CONCURRENCY \
    --timeout-s 30 --max-tokens $MAX_TOKENS --prompt-words $PROMPT_WORDS --fault-at-s 4 \
    --output $OUT/$1$TAG.json 2>&1 \
    | grep -v "^WARNING\|PDDBG" | tee -a $OUT/faults.txt
}
for fault in $FAULTS; do
  run $fault ServeReplica:pdserve:${fault#*-}
done
echo "object store MiB at the end: $(store)" | tee -a $OUT/faults.txt
echo "staged segments in /dev/shm at the end: $(ls /dev/shm | grep -c '^pdserve-kv-')" | tee -a $OUT/faults.txt
