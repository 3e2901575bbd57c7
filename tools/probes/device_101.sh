#!/bin/bash
# Stop 40: what --precond-tf32 costs in validation loss. Shampoo, SOAP and PSGD at their defaults
# on the Brown data as the README's loss table (gpt2-124m, 200 steps of 16 x 1024, warm-up 20),
# each in fp32 and with --precond-tf32 at seed 1337, and in fp32 at seed 7 (the spread between
# seeds, to judge the TF32 difference by). Carry ["build/deps","build/data","build/refs"]:
# bash tools/probes/device_101.sh
source "$(dirname "$0")/device_common.sh"
make -j16 > $OUT/build.txt 2>&1 || { tail -30 $OUT/build.txt; exit 1; }
for optimizer in shampoo soap psgd; do
  for run in "fp32 1337" "tf32 1337" "fp32 7"; do
    set -- $run
    extra=""; [ $1 = tf32 ] && extra="--precond-tf32"
    log=$OUT/${optimizer}_$1_$2.txt
    SECONDS=0
    timeout 100 build/bin/train --device cuda --preset gpt2-124m -b 16 -t 1024 --steps 200 --warmup-steps 20 \
      --optimizer $optimizer --seed $2 $extra --out-dir /tmp/run_${optimizer}_$1_$2 > $log 2>&1
    rc=$?
    echo "== $optimizer $1 seed $2 rc $rc ${SECONDS} s: $(grep -i 'val' $log | tail -1 | cut -c1-160)"
  done
done
