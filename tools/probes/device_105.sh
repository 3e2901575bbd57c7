#!/bin/bash
# Stop 42: the tree at HEAD after the fp32-emulation experiment was removed: the whole GPU suite,
# then the six optimizers in bench (gpt2-124m 32 x 1024, bench's defaults) and the three
# preconditioned ones with --precond-tf32. Carry ["build/deps","build/data"]:
# bash tools/probes/device_105.sh
source "$(dirname "$0")/device_common.sh"
device_build
gpu_suite 300
for opt in adamw muon scion shampoo soap psgd; do
  timeout 90 build/bin/bench --config gpt2-124m:32:1024 --optimizer $opt > $OUT/$opt.txt 2>&1
  echo "== $opt rc $?"; grep -E "optimizer " $OUT/$opt.txt | cut -c1-200
done
for opt in shampoo soap psgd; do
  timeout 90 build/bin/bench --config gpt2-124m:32:1024 --optimizer $opt --precond-tf32 > $OUT/${opt}_tf32.txt 2>&1
  echo "== $opt --precond-tf32 rc $?"; grep -E "optimizer " $OUT/${opt}_tf32.txt | cut -c1-200
done
