#!/bin/bash
# Stop 38: Muon's and Scion's shape groups each on a stream of their own (and the element-wise
# AdamW/Scion launches beside them). Run from the repository root on the device with carry
# ["build/deps","build/data"]: bash tools/probes/device_87.sh
# It builds, runs the GPU suite, times the Newton-Schulz products (bench --newton-schulz), then
# builds bench again in a copy with the previous gpu_optimizer.{hpp,cpp} (every group on the
# default stream; fill tools/probes/base87/ first, untracked, with `git show
# 1dc048e:optim/gpu_optimizer.cpp` and .hpp) and times AdamW, Muon and Scion alternately on both.
set -u
export OMP_NUM_THREADS=16
nvidia-smi --query-gpu=name --format=csv,noheader
( time make -j16 ) > $OUT/build.txt 2>&1 || { tail -30 $OUT/build.txt; exit 1; }
tail -3 $OUT/build.txt
timeout 240 build/bin/tests -tc='GPU*' > $OUT/gpu_tests.txt 2>&1; echo "GPU tests rc $?"
grep -E 'ERROR|FAILED' $OUT/gpu_tests.txt | head -20; tail -3 $OUT/gpu_tests.txt
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
