#!/bin/bash
# Stop 38's last call: the whole GPU suite on the session's final build, and every comparison
# with the references (the Shampoo options among them). Run from the repository root on the
# device with carry ["build/deps","build/data","build/refs"]: bash tools/probes/device_90.sh
source "$(dirname "$0")/device_common.sh"
device_build
gpu_suite 240
PYTHONUNBUFFERED=1 timeout 200 python3 tools/compare_optimizers.py --refs build/refs --device cuda --json $OUT/compare.json \
  > $OUT/compare.txt 2>&1
echo "compare rc $?"; grep -E "qopt (cpu|cuda)" $OUT/compare.txt | awk -F'->' '{print $2}' | sort | uniq -c
grep -E "^shampoo_(options|independent)" $OUT/compare.txt | cut -c1-240
timeout 90 build/bin/bench --config gpt2-124m:32:1024 --optimizer shampoo > $OUT/bench_shampoo.txt 2>&1
echo "bench rc $?"; grep -E "optimizer " $OUT/bench_shampoo.txt | cut -c1-250
