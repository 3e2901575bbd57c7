#!/bin/bash
# Stop 38: Muon's and Scion's shape groups each on a stream of their own (and the element-wise
# AdamW/Scion launches beside them). Run from the repository root on the device with carry
# ["build/deps","build/data"]: bash tools/probes/device_87.sh
# It builds, runs the GPU suite, times the Newton-Schulz products (bench --newton-schulz), then
# builds bench again in a copy with the previous gpu_optimizer.{hpp,cpp} (every group on the
# default stream; fill tools/probes/base87/ first, untracked, with `git show
# 1dc048e:optim/gpu_optimizer.cpp` and .hpp) and times AdamW, Muon and Scion alternately on both.
source "$(dirname "$0")/device_common.sh"
device_build
gpu_suite 240
timeout 120 build/bin/bench --newton-schulz --attention-only > $OUT/ns.txt 2>&1; echo "ns rc $?"; grep -E "Newton|ceiling" $OUT/ns.txt
rm -rf /tmp/base && cp -a . /tmp/base && cp tools/probes/base87/gpu_optimizer.* /tmp/base/optim/ && touch /tmp/base/optim/gpu_optimizer.*
( cd /tmp/base && make -j16 build/bin/bench > $OUT/build_base.txt 2>&1 ) || { tail -20 $OUT/build_base.txt; exit 1; }
for round in 1 2; do
  for which in new base; do
    B=build/bin/bench; [ $which = base ] && B=/tmp/base/build/bin/bench
    timeout 100 $B --config gpt2-124m:32:1024 --optimizers adamw muon scion > $OUT/b_$which$round.txt 2>&1
    echo "== $which round $round rc $?"; grep -E "optimizer " $OUT/b_$which$round.txt | cut -c1-250
  done
done
