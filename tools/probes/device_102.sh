#!/bin/bash
# Stop 40: the Cholesky QR's factorization and solve by blocks of 256 over the whole list
# (batched DGEMMs) from 512^2, against cuSOLVER's potrf(Batched) and cuBLAS's trsmBatched. Builds,
# runs the whole GPU suite, then SOAP alternately on this build and on a copy built with
# kBlockedCholeskyMin out of reach (the path before). Carry ["build/deps","build/data","build/refs"]:
# bash tools/probes/device_102.sh
source "$(dirname "$0")/device_common.sh"
device_build
rm -rf /tmp/base && cp -a . /tmp/base
sed -i 's/^constexpr int kBlockedCholeskyMin = 512;/constexpr int kBlockedCholeskyMin = 1 << 30;/' /tmp/base/kernels/linalg.cu
grep -c 'kBlockedCholeskyMin = 1 << 30' /tmp/base/kernels/linalg.cu
( cd /tmp/base && make -j16 build/bin/bench > $OUT/build_base.txt 2>&1 ) &
gpu_suite 240
grep -E 'n 600' $OUT/gpu_tests.txt | head -12 | cut -c1-200
wait
for round in 1 2; do
  for which in new base; do
    B=build/bin/bench; [ $which = base ] && B=/tmp/base/build/bin/bench
    timeout 90 $B --config gpt2-124m:32:1024 --optimizer soap > $OUT/soap_$which$round.txt 2>&1
    echo "== soap $which round $round rc $?"; grep -E "optimizer " $OUT/soap_$which$round.txt | cut -c1-170
  done
done
timeout 90 build/bin/bench --config gpt2-124m:32:1024 --optimizer shampoo --shampoo-eigen-method qr > $OUT/shampoo_qr.txt 2>&1
echo "== shampoo qr rc $?"; grep -E "optimizer " $OUT/shampoo_qr.txt | cut -c1-170
