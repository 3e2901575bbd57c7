#!/bin/bash
# Stop 37: the factor statistics below 2048 as the upper triangle's block rows (batched GEMMs)
# instead of a dense batched GEMM. Run from the repository root on the device with carry
# ["build/deps", "build/data"]: bash tools/probes/device_85.sh
# It builds, runs the dense linear-algebra and matrix-optimizer GPU tests, times the Gram
# products (bench --linalg's "Gram product" lines) and Shampoo/SOAP/PSGD on gpt2-124m 32 x 1024,
# then rebuilds bench with the blocked path off (kBlockedGramMin past every size) and times the
# three again on the same machine: the A/B.
source "$(dirname "$0")/device_common.sh"
device_build
[ -n "${SKIP_TESTS:-}" ] || timeout 150 build/bin/tests -tc='GPU dense linear*,GPU Shampoo*,GPU SOAP*,GPU PSGD*,GPU*tf32*,GPU NCCL*,GPU overlapped*' > $OUT/tests.txt 2>&1
echo "tests rc $?"; grep -E 'ERROR|FAILED' $OUT/tests.txt | head; tail -3 $OUT/tests.txt
bench_three() {  # label
  timeout 200 build/bin/bench --config gpt2-124m:32:1024 --optimizers shampoo soap psgd ${2:-} > $OUT/bench_$1.txt 2>&1
  echo "bench $1 rc $?"; grep -iE 'optimizer step|tokens/s|fwd' $OUT/bench_$1.txt | cut -c1-220 | head -20
}
[ -n "${SKIP_TESTS:-}" ] || timeout 120 build/bin/bench --linalg --attention-only > $OUT/linalg.txt 2>&1; echo "linalg rc $?"
grep -E 'Gram product' $OUT/linalg.txt
bench_three blocked
sed -i 's/kBlockedGramMin = 512/kBlockedGramMin = 1 << 30/' optim/gpu_matrix_method.hpp
make -j16 build/bin/bench > /dev/null 2>&1 || echo "rebuild failed"
bench_three dense
