#!/usr/bin/env bash
# Ten-minute soak under Ray Serve (the default runtime; the first soak ran --runtime actors):
# bench/soak.py against `pdserve serve --config config-serve.yaml`, sampling every process
# under it (driver, Ray's GCS and raylet, every Serve replica, vLLM engine cores) each
# minute, and the Ray object store. Results: soak-serve<TAG>.txt, soak-serve<TAG>.json.
#
#   pdmeasure bash bench/results/soak-cpu-2core/run-serve.sh
#   MINUTES=20 CONFIG=config-serve-relay.yaml TAG=-relay-20min pdmeasure bash .../run-serve.sh
set -u
cd "$(dirname "$0")/../../.."
OUT=bench/results/soak-cpu-2core
URL=http://127.0.0.1:8743
MINUTES=${MINUTES:-10}
CONFIG=${CONFIG:-config-serve.yaml}
TAG=${TAG:-}
.venv/bin/pdserve serve --config $OUT/$CONFIG > $OUT/serve.log 2>&1 &
SERVE=$!
cleanup() {
  kill -INT $SERVE 2>/dev/null
  for _ in $(seq 60); do kill -0 $SERVE 2>/dev/null || break; sleep 1; done
  kill -KILL $SERVE 2>/dev/null
}
trap cleanup EXIT
for _ in $(seq 900); do
  curl -sf $URL/health >/dev/null && break
  kill -0 $SERVE 2>/dev/null || { echo "pdserve serve exited"; tail -30 $OUT/serve.log; exit 1; }
  sleep 1
done
echo "== $(date -u +%FT%TZ) ready after ${SECONDS} s" | tee $OUT/soak-serve$TAG.txt
.venv/bin/python -m bench.soak --url $URL --minutes $MINUTES --interval-s 60 --concurrency 4 \
  --max-tokens 32 --pid $SERVE --settle-s 10 --output $OUT/soak-serve$TAG.json --check 2>&1 \
  | grep -v "^WARNING\|authentication_token_setup" | tee -a $OUT/soak-serve$TAG.txt
echo "soak rc ${PIPESTATUS[0]}" | tee -a $OUT/soak-serve$TAG.txt
cleanup
sleep 2
echo "after shutdown: pdserve-kv segments in /dev/shm: $(ls /dev/shm | grep -c '^pdserve-kv-')," \
  "pdserve/Ray processes left: $(pgrep -fc 'ray::|raylet|gcs_server|VLLM' || true)" | tee -a $OUT/soak-serve$TAG.txt
