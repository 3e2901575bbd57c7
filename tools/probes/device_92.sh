#!/bin/bash
# Stop 38: coupled inverse Newton roots (Distributed Shampoo's CoupledNewtonConfig) against the
# eigendecomposition, measured. Run from the repository root on the device with carry
# ["build/deps","build/data"]: bash tools/probes/device_92.sh
source "$(dirname "$0")/device_common.sh"
( time make -j16 build/bin/bench build/bin/tests ) > $OUT/build.txt 2>&1 || { tail -30 $OUT/build.txt; exit 1; }
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout 60 build/bin/tests -tc='GPU coupled*,Coupled*' > $OUT/tests.txt 2>&1; echo "tests rc $?"
  grep -E 'ERROR|FAILED' $OUT/tests.txt | head; tail -3 $OUT/tests.txt
fi
timeout 150 build/bin/bench --inverse-roots --attention-only > $OUT/roots.txt 2>&1; echo "roots rc $?"
grep -E "inverse 4th|ceiling" $OUT/roots.txt
