#!/bin/bash
# Stop 39: SOAP's and Shampoo's QR-path sorts on the GPU (orders_per_matrix_gpu) instead of a
# download, a host sort and an upload per factor group at every refresh. Builds, runs the whole
# GPU suite, then builds bench again in a copy with the files before (tools/probes/base98/,
# untracked: `git show <commit before>:<file>` for optim/preconditioner_kernels.{cu,hpp},
# optim/gpu_soap.cpp, optim/gpu_shampoo.cpp) and times SOAP alternately on both. Run from the
# repository root on the device with carry ["build/deps","build/data"].
source "$(dirname "$0")/device_common.sh"
device_build
gpu_suite 240
rm -rf /tmp/base && cp -a . /tmp/base && cp tools/probes/base98/preconditioner_kernels.* tools/probes/base98/gpu_*.cpp /tmp/base/optim/
touch /tmp/base/optim/preconditioner_kernels.* /tmp/base/optim/gpu_soap.cpp /tmp/base/optim/gpu_shampoo.cpp
( cd /tmp/base && make -j16 build/bin/bench > $OUT/build_base.txt 2>&1 ) || { tail -20 $OUT/build_base.txt; exit 1; }
for round in 1 2; do
  for which in new base; do
    B=build/bin/bench; [ $which = base ] && B=/tmp/base/build/bin/bench
    timeout 80 $B --config gpt2-124m:32:1024 --optimizer soap > $OUT/soap_$which$round.txt 2>&1
    echo "== soap $which round $round rc $?"; grep -E "optimizer |peak" $OUT/soap_$which$round.txt | cut -c1-260
  done
done
