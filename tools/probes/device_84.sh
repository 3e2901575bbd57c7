#!/bin/bash
# The speed half (stop 34's device_82.sh, less its tests, which device_83.sh ran on the same warm
# machine): the syev-threads and overlap probes, then Shampoo's refresh with the eigendecomposition
# batch in 1/2/4 host-thread slices (eigen_slices.patch applied), stream priority with a refresh
# lag, and PSGD at its update-probability floor. Run from the repository root on the device.
source "$(dirname "$0")/device_common.sh"
make -j16 > $OUT/build2.txt 2>&1 || { tail -30 $OUT/build2.txt; exit 1; }
nvcc -O2 -std=c++20 -arch=sm_90 -o /tmp/probe3 tools/probes/syev_threads_probe.cu -lcusolver && timeout 100 /tmp/probe3 > $OUT/probe3.txt 2>&1
cat $OUT/probe3.txt
nvcc -O2 -std=c++20 -arch=sm_90 -o /tmp/probe2 tools/probes/overlap_probe2.cu -lcublas -lcusolver && timeout 100 /tmp/probe2 > $OUT/probe2.txt 2>&1
cat $OUT/probe2.txt
B="build/bin/bench --config gpt2-124m:32:1024"
for sl in 1 2 4; do
  QOPT_EIGEN_SLICES=$sl $B --optimizer shampoo > $OUT/b.txt 2>&1
  echo "lag 0 slices $sl"; grep -E 'optimizer|fwd' $OUT/b.txt | cut -c1-420
done
for extra in "" "--precond-tf32"; do
  for cfg in "0 1" "1 1" "1 4"; do
    set -- $cfg
    QOPT_REFRESH_PRIORITY=$1 QOPT_EIGEN_SLICES=$2 $B --optimizer shampoo --shampoo-refresh-lag 9 $extra > $OUT/b.txt 2>&1
    echo "lag 9 prio $1 slices $2 $extra"; grep -E 'optimizer|fwd' $OUT/b.txt | cut -c1-420
  done
done
for extra in "" "--precond-tf32"; do
  $B --optimizer psgd --psgd-update-prob-max 0.03 --steps 100 $extra > $OUT/p.txt 2>&1
  echo "psgd floor $extra"; grep -E 'optimizer|tok/s' $OUT/p.txt | cut -c1-420
done
