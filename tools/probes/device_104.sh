#!/bin/bash
# Stop 41, for the next session with a device: are fp32-accurate products on bf16 tensor cores
# faster than fp32 on a Hopper GPU? First the standalone probe (cuBLAS's BF16x9 emulation through
# cublasGemmEx and cuBLASLt, our own 6-product bf16 split, fp64 fixed-point emulation; speed and
# error against float64), then the tree with tools/probes/fp32_emulation.patch (QOPT_FP32_EMULATION=1
# turns every full-fp32 product, syrk and trsm into BF16x9): the whole GPU suite with it on (the
# GPU-vs-CPU optimizer tests judge its accuracy), then Shampoo, SOAP and PSGD alternating with the
# unpatched build. Carry ["build/deps","build/data"]: ROUNDS=1 bash tools/probes/device_104.sh (as run in
# stop 42; the patch was removed afterwards: git show 70b2672:tools/probes/fp32_emulation.patch).
source "$(dirname "$0")/device_common.sh"
nvcc -O2 -std=c++20 -arch=sm_90 -o /tmp/probe_emu tools/probes/emulated_gemm_probe.cu -lcublas -lcublasLt && \
  timeout 200 /tmp/probe_emu > $OUT/emu_probe.txt 2>&1; echo "probe rc $?"; cat $OUT/emu_probe.txt
device_build
rm -rf /tmp/emu && cp -a . /tmp/emu && ( cd /tmp/emu && git apply tools/probes/fp32_emulation.patch && \
  make -j16 > $OUT/build_emu.txt 2>&1 ) || { tail -30 $OUT/build_emu.txt; exit 1; }
( cd /tmp/emu && QOPT_FP32_EMULATION=1 timeout 300 build/bin/tests -tc='GPU*' ) > $OUT/gpu_tests_emu.txt 2>&1
echo "GPU tests with emulation rc $?"; grep -E 'ERROR|FAILED' $OUT/gpu_tests_emu.txt | head -20; tail -3 $OUT/gpu_tests_emu.txt
for round in ${ROUNDS:-1 2}; do
  for which in base emu; do
    for opt in shampoo soap psgd; do
      if [ $which = emu ]; then B="env QOPT_FP32_EMULATION=1 /tmp/emu/build/bin/bench"; else B=build/bin/bench; fi
      timeout 90 $B --config gpt2-124m:32:1024 --optimizer $opt > $OUT/${opt}_$which$round.txt 2>&1
      echo "== $opt $which round $round rc $?"; grep -E "optimizer |loss" $OUT/${opt}_$which$round.txt | cut -c1-170 | tail -3
    done
  done
done
