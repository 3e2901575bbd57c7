#!/bin/bash
# Stop 39, second call (same warm machine, after device_93.sh built): Shampoo's refresh with the
# factor sizes' eigendecompositions at once (each from a thread of its own onto a stream of its
# own) against one size after the other. Builds bench again in a copy with the previous
# optim/gpu_shampoo.cpp, kernels/side_stream.{hpp,cu}, kernels/attention.cu and
# optim/preconditioner_kernels.cu (fill tools/probes/base93/ first, untracked, from `git show
# 5b19b55:<file>`), then times Shampoo alternately on both (AdamW as the control).
source "$(dirname "$0")/device_common.sh"
make -j16 build/bin/bench > $OUT/build.txt 2>&1 || { tail -30 $OUT/build.txt; exit 1; }
rm -rf /tmp/base && cp -a . /tmp/base
cp tools/probes/base93/gpu_shampoo.cpp tools/probes/base93/preconditioner_kernels.cu /tmp/base/optim/
cp tools/probes/base93/side_stream.* tools/probes/base93/attention.cu /tmp/base/kernels/
touch /tmp/base/optim/gpu_shampoo.cpp /tmp/base/optim/preconditioner_kernels.cu /tmp/base/kernels/side_stream.* /tmp/base/kernels/attention.cu
( cd /tmp/base && make -j16 build/bin/bench > $OUT/build_base.txt 2>&1 ) || { tail -20 $OUT/build_base.txt; exit 1; }
for round in 1 2; do
  for which in new base; do
    B=build/bin/bench; [ $which = base ] && B=/tmp/base/build/bin/bench
    timeout 100 $B --config gpt2-124m:32:1024 --optimizers adamw shampoo > $OUT/b_$which$round.txt 2>&1
    echo "== $which round $round rc $?"; grep -E "optimizer |peak" $OUT/b_$which$round.txt | cut -c1-260
  done
done
