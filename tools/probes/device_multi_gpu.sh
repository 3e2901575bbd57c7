#!/bin/bash
# Issue 7's runs, for the first session that `status` lends a kind of two or more GPUs (e.g.
# nvidia-h200-x2). From the repository root on the device, carry ["build/deps", "build/data"]:
#   bash tools/probes/device_multi_gpu.sh
# It builds; runs the GPU data-parallel tests (the NCCL-between-two-GPUs case runs only there);
# then trains gpt2-124m and olmo2-350m, 32 x 1024 tokens per step, on 1 GPU and on 2 (NCCL), per
# optimizer, and prints the mean whole-step tokens/s over steps 6..N of each (train's own step
# lines: data loading, forward, backward, the collectives and the optimizer step all included).
# Bar (issue 7): 2 GPUs >= 1.85x one for AdamW, >= 1.7x for the matrix optimizers.
source "$(dirname "$0")/device_common.sh"
export NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=memory.total --format=csv,noheader
device_build
timeout 300 build/bin/tests -tc='GPU ZeRO*,GPU data*,GPU NCCL*,GPU overlapped*' > $OUT/gpu_dp_tests.txt 2>&1
echo "GPU data-parallel tests rc $?"
grep -E 'ERROR|FAILED|against one|skipped:' $OUT/gpu_dp_tests.txt | cut -c1-200 | head -40
tail -3 $OUT/gpu_dp_tests.txt
STEPS=${STEPS:-30}
mean_rate() {  # mean tok/s of the step lines after the fifth
  grep -E '^step ' | awk -F'|' '{n++; if (n > 5) { split($5, a, " "); s += a[1]; c++ } } END { if (c) printf "%.0f", s / c; else printf "n/a" }'
}
for preset in gpt2-124m olmo2-350m; do
  for opt in adamw muon scion shampoo soap psgd; do
    run="build/bin/train --device cuda --preset $preset --optimizer $opt --batch-size 32 --seq-len 1024 --steps $STEPS --val-batches 1 --log-every 1"
    one=$(timeout 280 $run --out-dir /tmp/one_${preset}_$opt 2>&1 | tee $OUT/last_one.txt | mean_rate)
    two=$(timeout 280 $run --nproc 2 --out-dir /tmp/two_${preset}_$opt 2>&1 | tee $OUT/last_two.txt | mean_rate)
    echo "$preset $opt: 1 GPU $one tok/s, 2 GPUs $two tok/s" \
      "($(python3 -c "print(f'{$two / $one:.2f}x')" 2>/dev/null || echo '?'))"
    grep -E 'data parallel: per step|collectives' $OUT/last_two.txt | head -2
    if [ $opt = adamw ]; then  # what overlapping the reduction with the backward pass gains
      plain=$(timeout 280 $run --nproc 2 --overlap-reduction false --out-dir /tmp/plain_${preset} 2>&1 | mean_rate)
      echo "$preset adamw, 2 GPUs, reduction after the backward pass: $plain tok/s"
    fi
  done
done
