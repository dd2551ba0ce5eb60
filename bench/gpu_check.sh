#!/usr/bin/env bash
# The GPU check of issue 15, in one run: GPU-marked tests, the vLLM-free harness on CUDA, the
# device-path benchmark, and the targets judged from them, all written as JSON.
#
#   bench/gpu_check.sh [OUT_DIR]        (default: $OUT, else ./gpu_check_out)
#
# Needs torch with CUDA (NCCL cases need two GPUs), numpy and msgspec; pytest and pydantic
# are used when present (without them the pytest step is skipped and says so). No vLLM, no
# Ray. Takes about 3-6 minutes on one GPU. Result: OUT_DIR/gpu_check.json.
#
# Without CUDA (or with DRY_RUN=1) it is a dry run of the same steps on the CPU: the GPU
# tests skip, the harness runs over gloo with host tensors, the benchmark on host tensors;
# gpu_check.json then says "measured": false and judges no GPU target.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "${DRY_RUN:-0}" != 1 ] && "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  DEVICE=cuda
else
  DEVICE=cpu
  echo "gpu_check: no CUDA device (or DRY_RUN=1): dry run on the CPU, GPU targets NOT measured"
fi
echo "$DEVICE" > "$OUT_DIR/device.txt"

"$PY" - > "$OUT_DIR/env.json" <<'PYEOF'
import importlib.util, json, platform
mods = {m: importlib.util.find_spec(m) is not None
        for m in ("torch", "numpy", "msgspec", "pydantic", "pytest", "triton", "cupy", "vllm", "ray")}
info = {"python": platform.python_version(), "modules": mods}
if mods["torch"]:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda,
                cuda_available=torch.cuda.is_available(), device_count=torch.cuda.device_count(),
                devices=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                nccl=".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None)
print(json.dumps(info))
PYEOF
cat "$OUT_DIR/env.json"; echo

if "$PY" -c "import pytest, pydantic, msgspec" 2>/dev/null; then
  timeout 240 "$PY" -m pytest -q -m gpu -k "not harness" -rA -p no:cacheprovider \
    tests/kvtransfer/test_kv_device_path.py tests/kvtransfer/test_kv_cuda_ipc.py \
    tests/kvtransfer/test_kv_device_connector_gpu.py \
    --junitxml="$OUT_DIR/gpu_tests.xml" > "$OUT_DIR/gpu_tests.log" 2>&1
  echo $? > "$OUT_DIR/gpu_tests.rc"
else
  echo "skipped: pytest, pydantic or msgspec missing" > "$OUT_DIR/gpu_tests.log"; echo 99 > "$OUT_DIR/gpu_tests.rc"
fi
tail -5 "$OUT_DIR/gpu_tests.log"

timeout 300 "$PY" -m kvtransfer.harness --device "$DEVICE" --json "$OUT_DIR/harness.json" \
  > "$OUT_DIR/harness.log" 2>&1
echo $? > "$OUT_DIR/harness.rc"; cat "$OUT_DIR/harness.log" | head -40

CPU_FLAG=""; [ "$DEVICE" = cpu ] && CPU_FLAG="--cpu"
timeout 300 "$PY" -m bench.transfer_bench --device-path $CPU_FLAG --json "$OUT_DIR/device_bench.json" \
  > "$OUT_DIR/device_bench.log" 2>&1
echo $? > "$OUT_DIR/device_bench.rc"; tail -15 "$OUT_DIR/device_bench.log"

"$PY" - "$OUT_DIR" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    p = out / name
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None
device = (out / "device.txt").read_text().strip()
rc = {n: (out / f"{n}.rc").read_text().strip() for n in ("gpu_tests", "harness", "device_bench")
      if (out / f"{n}.rc").exists()}
harness, bench = load("harness.json"), load("device_bench.json")
targets = {}
if harness:
    targets["block_exact_every_case"] = all(c["block_exact"] for c in harness["harness"])
    targets["harness_cases"] = {c["case"]: c["block_exact"] for c in harness["harness"]}
if bench and bench.get("device") == "cuda":
    big = [r for r in bench["bandwidth"] if r["size_bytes"] >= 16 << 20 and "ipc_x_d2d" in r]
    targets["cuda_ipc_x_d2d_at_16MiB_and_up"] = {r["size_bytes"] >> 20: round(r["ipc_x_d2d"], 3) for r in big}
    targets["cuda_ipc_ge_90pct_of_d2d"] = bool(big) and all(r["ipc_x_d2d"] >= 0.9 for r in big)
    o = bench["overlap"]
    targets["transfer_hidden_share"] = o["transfer_hidden_share"]
    targets["hidden_ge_90pct"] = o["transfer_hidden_share"] >= 0.9
    targets["ttft_added_share"] = o["ttft_added_share"]
    targets["ttft_added_le_5pct"] = o["ttft_added_share"] <= 0.05
measured = device == "cuda" and bool(bench) and bench.get("device") == "cuda"
result = {"env": load("env.json"), "device": device, "measured": measured,
          "note": None if measured else "dry run on the CPU: the GPU targets were not measured",
          "rc": rc, "targets": targets, "harness": harness, "device_bench": bench}
(out / "gpu_check.json").write_text(json.dumps(result, indent=2))
print(json.dumps({"device": device, "measured": measured, "rc": rc, "targets": targets}, indent=2))
PYEOF
