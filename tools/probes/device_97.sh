#!/bin/bash
# Stop 39: one block reduction (kernels/block_reduce.cuh) for the optimizers' kernels and the
# coupled Newton roots, with a NaN case for the roots. Run from the repository root on the
# device with carry ["build/deps","build/data"]: bash tools/probes/device_97.sh
source "$(dirname "$0")/device_common.sh"
device_build
gpu_suite 240
timeout 80 build/bin/bench --config gpt2-124m:32:1024 --optimizers adamw muon > $OUT/bench.txt 2>&1
echo "bench rc $?"; grep -E "optimizer " $OUT/bench.txt | cut -c1-200
