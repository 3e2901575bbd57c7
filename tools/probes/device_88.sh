#!/bin/bash
# Stop 38: the README's speed table on one H100, each optimizer in a `bench` process of its own
# (so each peak memory is that optimizer's alone). Run from the repository root on the device
# with carry ["build/deps","build/data"]: bash tools/probes/device_88.sh
source "$(dirname "$0")/device_common.sh"
( time make -j16 build/bin/bench ) > $OUT/build.txt 2>&1 || { tail -30 $OUT/build.txt; exit 1; }
for opt in adamw muon scion shampoo soap psgd; do
  timeout 100 build/bin/bench --config gpt2-124m:32:1024 --optimizer $opt > $OUT/bench_$opt.txt 2>&1
  echo "== $opt rc $?"; grep -E "gpt2-124m|optimizer " $OUT/bench_$opt.txt | cut -c1-330
done
