#!/bin/bash
# Stop 34: apply tools/probes/eigen_slices.patch here first (git apply), then run from the repository
# root on the device: bash tools/probes/device_82.sh (carry build/deps and build/data). It builds, runs
# the probes, the GPU tests (also with 3 slices), and the bench A/B of slices and stream priority.
set -u
export OMP_NUM_THREADS=16
( time make -j16 ) > $OUT/build.txt 2>&1 || { tail -30 $OUT/build.txt; exit 1; }
tail -3 $OUT/build.txt
nvcc -O2 -std=c++20 -arch=sm_90 -o /tmp/probe3 tools/probes/syev_threads_probe.cu -lcusolver && timeout 120 /tmp/probe3 > $OUT/probe3.txt 2>&1
cat $OUT/probe3.txt
nvcc -O2 -std=c++20 -arch=sm_90 -o /tmp/probe2 tools/probes/overlap_probe2.cu -lcublas -lcusolver && timeout 120 /tmp/probe2 > $OUT/probe2.txt 2>&1
cat $OUT/probe2.txt
timeout 300 build/bin/tests -tc='GPU*' > $OUT/gpu_tests.txt 2>&1; echo "tests rc $?"
grep -E 'ERROR|FAILED' $OUT/gpu_tests.txt | head -20
tail -4 $OUT/gpu_tests.txt
QOPT_EIGEN_SLICES=3 timeout 200 build/bin/tests -tc='GPU Shampoo*,GPU dense linear*' > $OUT/gpu_tests_slices.txt 2>&1; echo "slice tests rc $?"
grep -E 'ERROR|FAILED' $OUT/gpu_tests_slices.txt | head -10; tail -3 $OUT/gpu_tests_slices.txt
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
