#!/bin/bash
# The correctness half of the next device session (stop 35; the speed half is device_84.sh, which
# can follow on the same warm machine). Before the call: `git apply tools/probes/eigen_slices.patch`
# if its slices are to be tested too, and fill build/refs with the references' own files (muon.py,
# scion.py, soap.py, kron.py and the distributed_shampoo/ package; see tools/compare_optimizers.py).
# Run from the repository root on the device with carry ["build/deps", "build/data", "build/refs"]:
#   bash tools/probes/device_83.sh
# It builds, runs every GPU test case (then the Shampoo and linear-algebra ones with 3 slices when
# the patch is in), and compares all optimizers with their references on the CPU and the GPU,
# SOAP's max_precond_dim and merge_dims settings included (CPU only in qopt so far).
source "$(dirname "$0")/device_common.sh"
device_build
timeout 300 build/bin/tests -tc='GPU*' > $OUT/gpu_tests.txt 2>&1; echo "GPU tests rc $?"
grep -E 'ERROR|FAILED' $OUT/gpu_tests.txt | head -20
tail -4 $OUT/gpu_tests.txt
if grep -q QOPT_EIGEN_SLICES kernels/linalg.cu; then
  QOPT_EIGEN_SLICES=3 timeout 80 build/bin/tests -tc='GPU Shampoo*,GPU dense linear*' > $OUT/gpu_tests_slices.txt 2>&1
  echo "slice tests rc $?"; grep -E 'ERROR|FAILED' $OUT/gpu_tests_slices.txt | head -10; tail -3 $OUT/gpu_tests_slices.txt
fi
if [ -d build/refs ]; then
  PYTHONUNBUFFERED=1 timeout 170 python3 tools/compare_optimizers.py --refs build/refs --device cuda --json $OUT/compare.json \
    > $OUT/compare.txt 2>&1
  echo "compare rc $?"; cut -c1-300 $OUT/compare.txt | tail -30
else
  echo "no build/refs: the comparison with the references was not run"
fi
