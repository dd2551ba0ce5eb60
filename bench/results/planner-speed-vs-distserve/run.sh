#!/usr/bin/env bash
# The planner's search against DistServe's, side by side on one machine (issue 16).
#
#   DISTSERVE=<checkout of LLMServe/DistServe, branch feat-add-simulator> \
#   DS_PYTHON=<a python with simpy, pandas, tqdm, matplotlib, joblib> \
#   BEFORE=<a checkout of pdserve to compare with (optional)> \
#   bash bench/results/planner-speed-vs-distserve/run.sh
#
# Run from the repository root, alone on the machine. Prints one line per search.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
shared="$root/../shared/data"
procs="${PROCS:-$(nproc)}"
py="$root/.venv/bin/python"
cases="opt13b-sharegpt-1x4 opt13b-sharegpt-2x8 opt66b-sharegpt-1x8 opt66b-humaneval-1x8"
if [ -n "${BEFORE:-}" ]; then
  echo "== before: $(git -C "$BEFORE" log --oneline -1)"
  (cd "$BEFORE" && "$py" -m bench.planner_speed $cases)
fi
echo "== now: $(git -C "$root" log --oneline -1)"
(cd "$root" && "$py" -m bench.planner_speed $cases && "$py" -m bench.planner_speed --exhaustive $cases)
echo "== DistServe (its runtime benchmark's settings, $procs processes)"
(cd "$DISTSERVE" && PYTHONPATH="$DISTSERVE" "$DS_PYTHON" "$here/distserve_search.py" 2 8 "$procs" "$shared/sharegpt_opt_lengths.csv")
(cd "$DISTSERVE" && PYTHONPATH="$DISTSERVE" "$DS_PYTHON" "$here/distserve_search.py" 1 4 "$procs" "$shared/sharegpt_opt_lengths.csv")
echo "== now, 2x8 again"
(cd "$root" && "$py" -m bench.planner_speed opt13b-sharegpt-2x8)
