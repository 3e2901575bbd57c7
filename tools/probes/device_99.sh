#!/bin/bash
# Stop 40, first call: build, the whole GPU suite (Shampoo's refresh threads with the fallback
# for a thread that cannot start; the Cholesky QR's last pass without a confirming Gram matrix),
# then bench --linalg's QR lines (Gram matrices per matrix). Run from the repository root on the
# device with carry ["build/deps","build/data","build/refs"]: bash tools/probes/device_99.sh
source "$(dirname "$0")/device_common.sh"
device_build
gpu_suite 300
grep -E 'Gram matrices' $OUT/gpu_tests.txt | head -40 > $OUT/gram_messages.txt
timeout 150 build/bin/bench --linalg > $OUT/linalg.txt 2>&1; echo "linalg rc $?"
grep -E '^QR' $OUT/linalg.txt | cut -c1-250
