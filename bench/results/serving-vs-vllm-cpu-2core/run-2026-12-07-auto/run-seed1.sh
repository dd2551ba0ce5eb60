#!/bin/bash
cd /work/main; source .venv/bin/activate; export VLLM_TARGET_DEVICE=cpu
python -m bench.cli compare --client vllm --peer-config bench/configs/small-colocated.yaml \
  --target vllm=vllm --target pdserve-in-router=bench/configs/small-colocated-1-fe-in-router.yaml \
  --target auto-disagg-fe=/tmp/s9/run/auto-disagg-fe.yaml \
  --target auto-colocated-2=/tmp/s9/run/auto-colocated-2.yaml \
  --target auto-disagg-shared=/tmp/s9/run/auto-disagg-shared.yaml \
  --rounds 2 --input-dist uniform --input-min 512 --input-max 1536 --output-len 64 \
  --rates 0.5 1 2 3 --full-sweep --bisect-steps 0 --num-requests 100 --duration-s 20 \
  --num-warmup 2 --seed 1 --slo-ttft-s 1.5 --slo-tpot-s 0.06 --attainment-target 0.9 \
  --no-progress --output-dir /tmp/s9/run2/small
python -m bench.slo_sweep /tmp/s9/run2/small/comparison.json --ttft 0.5 1 1.5 2 3 --tpot 0.02 0.03 0.05 0.075 0.1
