#!/bin/bash
# Stop 39: SOAP's and Shampoo's QR-path sorts on the GPU (orders_per_matrix_gpu) instead of a
# download, a host sort and an upload per factor group at every refresh. Builds, runs the whole
# GPU suite, then builds bench again in a copy with the files before (tools/probes/base98/,
# untracked: `git show <commit before>:<file>` for optim/preconditioner_kernels.{cu,hpp},
# optim/gpu_soap.cpp, optim/gpu_shampoo.cpp) and times SOAP alternately on both. Run from the
# repository root on the device with carry ["build/deps","build/data"].
set -u
export OMP_NUM_THREADS=16
nvidia-smi --query-gpu=name --format=csv,noheader
( time make -j16 ) > $OUT/build.txt 2>&1 || { tail -30 $OUT/build.txt; exit 1; }
tail -3 $OUT/build.txt
timeout 240 build/bin/tests -tc='GPU*' > $OUT/gpu_tests.txt 2>&1; echo "GPU tests rc $?"
grep -E 'ERROR|FAILED' $OUT/gpu_tests.txt | head -20; tail -3 $OUT/gpu_tests.txt
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
