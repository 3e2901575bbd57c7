#!/bin/bash
# Stop 40, second call (same warm machine as device_99.sh): SOAP with and without the Cholesky
# QR's last-pass rule, alternating. The build "before" is this tree with kLastPassDeviationMax
# set to -1 (every pass's result confirmed by one more Gram matrix, as before), in a copy; then
# Shampoo once (its refresh threads). Carry as device_99.sh: bash tools/probes/device_100.sh
source "$(dirname "$0")/device_common.sh"
make -j16 > $OUT/build.txt 2>&1 || { tail -30 $OUT/build.txt; exit 1; }
rm -rf /tmp/base && cp -a . /tmp/base
sed -i 's/^constexpr double kLastPassDeviationMax = 0.5;/constexpr double kLastPassDeviationMax = -1.0;/' /tmp/base/kernels/linalg.cu
grep -c 'kLastPassDeviationMax = -1.0' /tmp/base/kernels/linalg.cu
( cd /tmp/base && make -j16 build/bin/bench > $OUT/build_base.txt 2>&1 ) || { tail -20 $OUT/build_base.txt; exit 1; }
for round in 1 2; do
  for which in new base; do
    B=build/bin/bench; [ $which = base ] && B=/tmp/base/build/bin/bench
    timeout 90 $B --config gpt2-124m:32:1024 --optimizer soap > $OUT/soap_$which$round.txt 2>&1
    echo "== soap $which round $round rc $?"; grep -E "optimizer |peak" $OUT/soap_$which$round.txt | cut -c1-400
  done
done
timeout 90 build/bin/bench --config gpt2-124m:32:1024 --optimizer shampoo > $OUT/shampoo.txt 2>&1
echo "== shampoo rc $?"; grep -E "optimizer |peak" $OUT/shampoo.txt | cut -c1-300
