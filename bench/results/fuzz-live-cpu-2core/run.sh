#!/usr/bin/env bash
# schemathesis against a live deployment of real engines (Ray Serve, embedded tiny model):
# every operation of the router's OpenAPI schema, all checks but positive_data_acceptance
# (as in tests/router/test_fuzz.py: rules JSON Schema cannot state make a correct 400 look
# like a refused valid request), fixed seed, deterministic generation, bounded examples.
# Then: the server healthy and answering, nothing in flight, no staged KV left, and every
# response's status tallied from the HAR report (status.json, statuses.txt).
#
#   pdmeasure bash bench/results/fuzz-live-cpu-2core/run.sh
set -u
cd "$(dirname "$0")/../../.."
OUT=bench/results/fuzz-live-cpu-2core
URL=http://127.0.0.1:8742
EXAMPLES=${EXAMPLES:-50}
HAR=$(mktemp /tmp/pdserve-fuzz-XXXXXX.har)
.venv/bin/pdserve serve --config $OUT/config.yaml > $OUT/serve.log 2>&1 &
SERVE=$!
cleanup() {
  kill -INT $SERVE 2>/dev/null
  for _ in $(seq 60); do kill -0 $SERVE 2>/dev/null || break; sleep 1; done
  kill -KILL $SERVE 2>/dev/null
  rm -f $HAR
}
trap cleanup EXIT
for _ in $(seq 900); do
  curl -sf $URL/health >/dev/null && break
  kill -0 $SERVE 2>/dev/null || { echo "pdserve serve exited"; tail -30 $OUT/serve.log; exit 1; }
  sleep 1
done
echo "== $(date -u +%FT%TZ) ready after ${SECONDS} s; examples per operation: $EXAMPLES" | tee $OUT/run.txt
START=$SECONDS
timeout 600 .venv/bin/st run $URL/openapi.json --checks all --exclude-checks positive_data_acceptance \
  --max-examples $EXAMPLES --seed 12 --generation-deterministic --request-timeout 60 \
  --no-color --report har --report-har-path $HAR 2>&1 | tail -60 | tee -a $OUT/run.txt
echo "schemathesis exit: ${PIPESTATUS[0]}, $((SECONDS - START)) s" | tee -a $OUT/run.txt
.venv/bin/python - "$HAR" $URL <<'PY' | tee -a $OUT/run.txt
import collections, json, sys, httpx
har, url = sys.argv[1], sys.argv[2]
entries = json.load(open(har))["log"]["entries"]
by = collections.Counter()
for e in entries:
    path = "/" + e["request"]["url"].split("/", 3)[3].split("?")[0]
    path = "/v1/requests/{id}/trace" if path.startswith("/v1/requests/") else path
    by[(e["request"]["method"], path, e["response"]["status"])] += 1
print("cases (HTTP requests sent):", sum(by.values()))
print("5xx:", sum(n for (m, p, s), n in by.items() if s >= 500))
for (m, p, s), n in sorted(by.items()):
    print(f"  {m} {p} {s} x{n}")
json.dump([{"method": m, "path": p, "status": s, "count": n} for (m, p, s), n in sorted(by.items())],
          open(sys.argv[0] if False else "bench/results/fuzz-live-cpu-2core/statuses.json", "w"), indent=1)
h = httpx.get(url + "/health").status_code
r = httpx.post(url + "/v1/completions", json={"model": "pdserve-tiny", "prompt": "still fine",
                                              "max_tokens": 3}, timeout=60)
d = httpx.get(url + "/dashboard/data").json()
print("afterwards: /health", h, "| a completion", r.status_code, r.json().get("usage"),
      "| in flight", d["num_in_flight"], "| engine KV use",
      {p["instance_id"]: p["kv_cache_usage"] for p in d["pool"]})
PY
echo "== reachable: positive cases with the unstated rules repaired, so they reach the engines" | tee -a $OUT/run.txt
START=$SECONDS
PDSERVE_FUZZ_URL=$URL PDSERVE_FUZZ_EXAMPLES=${REACHABLE_EXAMPLES:-100} timeout 400 .venv/bin/python -m pytest \
  bench/fuzz_live.py -q -s -p no:cacheprovider 2>&1 | grep -v "^WARNING" | tail -8 | tee -a $OUT/run.txt
echo "reachable run: $((SECONDS - START)) s" | tee -a $OUT/run.txt
.venv/bin/python - $URL <<'PY' | tee -a $OUT/run.txt
import sys, httpx
url = sys.argv[1]
d = httpx.get(url + "/dashboard/data").json()
print("after both: /health", httpx.get(url + "/health").status_code, "| in flight", d["num_in_flight"],
      "| engine KV use", {p["instance_id"]: p["kv_cache_usage"] for p in d["pool"]},
      "| requests by outcome", d["totals"]["requests_by_outcome"])
PY
echo "staged segments in /dev/shm: $(ls /dev/shm | grep -c '^pdserve-kv-')" | tee -a $OUT/run.txt
