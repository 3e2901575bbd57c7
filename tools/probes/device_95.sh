#!/bin/bash
# Stop 39, third call: the lagged refresh (--shampoo-refresh-lag) decomposes its sizes at once
# too (decompose_sizes forks them from its side stream). Builds, runs the whole GPU suite, then
# builds bench again in a copy with the files of 5b19b55 (tools/probes/base93/, untracked, as
# device_94.sh) and times Shampoo at lag 9 and at lag 0 on both, alternating. Run from the
# repository root on the device with carry ["build/deps","build/data","build/refs"].
source "$(dirname "$0")/device_common.sh"
device_build
gpu_suite 240
rm -rf /tmp/base && cp -a . /tmp/base
cp tools/probes/base93/gpu_shampoo.cpp tools/probes/base93/preconditioner_kernels.cu /tmp/base/optim/
cp tools/probes/base93/side_stream.* tools/probes/base93/attention.cu /tmp/base/kernels/
touch /tmp/base/optim/gpu_shampoo.cpp /tmp/base/optim/preconditioner_kernels.cu /tmp/base/kernels/side_stream.* /tmp/base/kernels/attention.cu
( cd /tmp/base && make -j16 build/bin/bench > $OUT/build_base.txt 2>&1 ) || { tail -20 $OUT/build_base.txt; exit 1; }
for round in 1 2; do
  for which in new base; do
    B=build/bin/bench; [ $which = base ] && B=/tmp/base/build/bin/bench
    timeout 80 $B --config gpt2-124m:32:1024 --optimizer shampoo --shampoo-refresh-lag 9 > $OUT/lag_$which$round.txt 2>&1
    echo "== lag 9 $which round $round rc $?"; grep -E "optimizer |peak" $OUT/lag_$which$round.txt | cut -c1-260
  done
done
timeout 80 build/bin/bench --config gpt2-124m:32:1024 --optimizer shampoo > $OUT/lag0_new.txt 2>&1
echo "== lag 0 new rc $?"; grep -E "optimizer |peak" $OUT/lag0_new.txt | cut -c1-260
