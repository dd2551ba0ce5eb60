#!/usr/bin/env bash
# Prometheus (and Grafana, when installed) against a local pdserve router, in one command.
#
#   deploy/observability/run.sh                    # scrape a router on 127.0.0.1:8000
#   deploy/observability/run.sh --target 127.0.0.1:8100
#   deploy/observability/run.sh --demo             # also start a router over fake workers
#                                                  # with synthetic traffic (no engine needed)
#
# Everything listens on 127.0.0.1 and lives in a temporary directory that is removed on exit
# (Ctrl-C stops everything this script started). Prometheus is the Debian package
# (`apt-get install -y prometheus`), run directly with our config, not as the system service.
# Grafana is not packaged by Debian: when neither `grafana` nor `grafana-server` is on PATH
# the script says how to get it and how to import the dashboard by hand.
set -euo pipefail

usage() {
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  cat <<EOF

Options:
  --target HOST:PORT      the pdserve router to scrape (default 127.0.0.1:8000)
  --demo                  start deploy/observability/demo.py on the target's port first
  --prometheus-port N     Prometheus web port (default 9090)
  --grafana-port N        Grafana web port (default 3000)
  --no-grafana            do not start Grafana even if it is installed
  --keep-data DIR         keep Prometheus/Grafana data in DIR instead of a temp dir
EOF
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TARGET="127.0.0.1:8000"
PROM_PORT=9090
GRAFANA_PORT=3000
DEMO=0
WITH_GRAFANA=1
DATA_DIR=""

while [[ $# -gt 0 ]]; do
  case "$1" in
    --target) TARGET="$2"; shift 2 ;;
    --demo) DEMO=1; shift ;;
    --prometheus-port) PROM_PORT="$2"; shift 2 ;;
    --grafana-port) GRAFANA_PORT="$2"; shift 2 ;;
    --no-grafana) WITH_GRAFANA=0; shift ;;
    --keep-data) DATA_DIR="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [[ ! "$TARGET" =~ ^[A-Za-z0-9._-]+:[0-9]+$ ]]; then
  echo "run.sh: --target must be HOST:PORT, got '$TARGET'" >&2; exit 2
fi

PROMETHEUS_BIN="${PROMETHEUS_BIN:-$(command -v prometheus || true)}"
if [[ -z "$PROMETHEUS_BIN" ]]; then
  echo "run.sh: prometheus is not installed. On Debian/Ubuntu: sudo apt-get install -y prometheus" >&2
  echo "        (or download it from https://prometheus.io/download/ and set PROMETHEUS_BIN)" >&2
  exit 1
fi

if [[ -z "$DATA_DIR" ]]; then
  DATA_DIR="$(mktemp -d -t pdserve-observability.XXXXXX)"
  CLEAN_DATA=1
else
  mkdir -p "$DATA_DIR"
  CLEAN_DATA=0
fi

PIDS=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  if [[ "$CLEAN_DATA" == 1 ]]; then rm -rf "$DATA_DIR"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_http() {  # wait_http URL SECONDS NAME
  local url="$1" deadline=$((SECONDS + $2))
  until curl -fsS -o /dev/null "$url" 2>/dev/null; do
    if (( SECONDS >= deadline )); then
      echo "run.sh: $3 did not answer at $url" >&2; return 1
    fi
    sleep 0.5
  done
}

# -- pdserve ------------------------------------------------------------------------------
if [[ "$DEMO" == 1 ]]; then
  PY="$ROOT/.venv/bin/python"; [[ -x "$PY" ]] || PY="$(command -v python3)"
  "$PY" "$ROOT/deploy/observability/demo.py" --host "${TARGET%:*}" --port "${TARGET##*:}" &
  PIDS+=($!)
  wait_http "http://$TARGET/metrics" 60 "the demo router"
elif ! curl -fsS -o /dev/null "http://$TARGET/metrics" 2>/dev/null; then
  echo "run.sh: nothing answers at http://$TARGET/metrics yet; Prometheus will keep trying." >&2
  echo "        Start pdserve (pdserve serve ...) or rerun with --demo." >&2
fi

# -- Prometheus ---------------------------------------------------------------------------
mkdir -p "$DATA_DIR/prometheus"
sed "s/127\.0\.0\.1:8000/$TARGET/" "$ROOT/deploy/prometheus/prometheus.yml" > "$DATA_DIR/prometheus.yml"
"$PROMETHEUS_BIN" --config.file="$DATA_DIR/prometheus.yml" \
  --storage.tsdb.path="$DATA_DIR/prometheus" \
  --web.listen-address="127.0.0.1:$PROM_PORT" \
  --log.level=warn &
PIDS+=($!)
wait_http "http://127.0.0.1:$PROM_PORT/-/ready" 60 "Prometheus"

# -- Grafana ------------------------------------------------------------------------------
GRAFANA_URL=""
GRAFANA_BIN="$(command -v grafana || command -v grafana-server || true)"
if [[ "$WITH_GRAFANA" == 1 && -n "$GRAFANA_BIN" ]]; then
  # homepath: where Grafana's `public/` and `conf/` live (tarball dir or the distro's).
  if [[ -z "${GRAFANA_HOME:-}" ]]; then
    bin_dir="$(dirname "$(readlink -f "$GRAFANA_BIN")")"
    if [[ -d "$bin_dir/../public" ]]; then GRAFANA_HOME="$(cd "$bin_dir/.." && pwd)"
    else GRAFANA_HOME=/usr/share/grafana; fi
  fi
  mkdir -p "$DATA_DIR/grafana/logs" "$DATA_DIR/grafana/plugins"
  export PDSERVE_PROMETHEUS_ADDR="127.0.0.1:$PROM_PORT"
  export PDSERVE_GRAFANA_DASHBOARDS="$ROOT/deploy/grafana"
  export GF_PATHS_PROVISIONING="$ROOT/deploy/grafana/provisioning"
  export GF_PATHS_DATA="$DATA_DIR/grafana"
  export GF_PATHS_LOGS="$DATA_DIR/grafana/logs"
  export GF_PATHS_PLUGINS="$DATA_DIR/grafana/plugins"
  export GF_SERVER_HTTP_ADDR=127.0.0.1
  export GF_SERVER_HTTP_PORT="$GRAFANA_PORT"
  # Loopback only: anonymous viewers, no login needed to look at the dashboard.
  export GF_AUTH_ANONYMOUS_ENABLED=true
  export GF_AUTH_ANONYMOUS_ORG_ROLE=Viewer
  export GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH="$ROOT/deploy/grafana/pdserve-goodput.json"
  export GF_ANALYTICS_REPORTING_ENABLED=false GF_ANALYTICS_CHECK_FOR_UPDATES=false
  export GF_LOG_LEVEL=warn
  if [[ "$(basename "$GRAFANA_BIN")" == grafana ]]; then
    "$GRAFANA_BIN" server --homepath "$GRAFANA_HOME" > "$DATA_DIR/grafana/logs/stdout.log" 2>&1 &
  else
    "$GRAFANA_BIN" --homepath "$GRAFANA_HOME" > "$DATA_DIR/grafana/logs/stdout.log" 2>&1 &
  fi
  PIDS+=($!)
  if wait_http "http://127.0.0.1:$GRAFANA_PORT/api/health" 90 "Grafana"; then
    GRAFANA_URL="http://127.0.0.1:$GRAFANA_PORT/d/pdserve-goodput"
  else
    echo "run.sh: see $DATA_DIR/grafana/logs/stdout.log" >&2
  fi
fi

echo
echo "pdserve      http://$TARGET/dashboard   (built-in live dashboard)"
echo "             http://$TARGET/metrics"
echo "Prometheus   http://127.0.0.1:$PROM_PORT/graph?g0.expr=pdserve_goodput_requests_per_second"
if [[ -n "$GRAFANA_URL" ]]; then
  echo "Grafana      $GRAFANA_URL   (anonymous viewer; admin/admin to edit)"
elif [[ "$WITH_GRAFANA" == 1 ]]; then
  cat <<EOF
Grafana      not found on PATH (Debian does not package it). To get it:
               - tarball: https://grafana.com/grafana/download (Linux, "Standalone Linux Binaries"),
                 unpack, put its bin/ on PATH (or set GRAFANA_HOME) and rerun this script; or
               - Grafana's apt repository: https://grafana.com/docs/grafana/latest/setup-grafana/installation/debian/
             Or import the dashboard into an existing Grafana: Dashboards > New > Import >
             upload $ROOT/deploy/grafana/pdserve-goodput.json, then pick a Prometheus
             data source that points at http://127.0.0.1:$PROM_PORT.
EOF
fi
echo "Data in $DATA_DIR$([[ "$CLEAN_DATA" == 1 ]] && echo ' (removed on exit)'). Ctrl-C stops everything."

# Stay up until interrupted or until one of our processes exits.
wait -n "${PIDS[@]}"
echo "run.sh: a process exited; stopping the rest." >&2
