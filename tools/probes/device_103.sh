#!/bin/bash
# Stop 41: the warm-start eigendecomposition probe (warm_eigen_probe.cu), then the build with the
# review mends (block_reduce in the Gram deviation, Shampoo's per-factor walk as one helper), the
# whole GPU suite and Shampoo's bench. Carry ["build/deps","build/data","build/refs"]:
# bash tools/probes/device_103.sh
source "$(dirname "$0")/device_common.sh"
nvcc -O2 -std=c++20 -arch=sm_90 -o /tmp/probe_warm tools/probes/warm_eigen_probe.cu -lcusolver -lcublas && \
  timeout 150 /tmp/probe_warm > $OUT/warm_probe.txt 2>&1; echo "probe rc $?"; cat $OUT/warm_probe.txt
device_build
gpu_suite 300
timeout 90 build/bin/bench --config gpt2-124m:32:1024 --optimizer shampoo > $OUT/shampoo.txt 2>&1
echo "== shampoo rc $?"; grep -E "optimizer " $OUT/shampoo.txt | cut -c1-170
