# What the device scripts in this folder share; each sources it first (from the repository root
# on the device, $OUT set by the device tool): unset variables are errors, OpenMP gets the
# machine's 16 cores, and the GPU's name opens the output.
set -u
export OMP_NUM_THREADS=16
nvidia-smi --query-gpu=name --format=csv,noheader

# The tree's `make -j16`, timed, into $OUT/build.txt; a failed build ends the script with its tail.
device_build() {
  ( time make -j16 ) > $OUT/build.txt 2>&1 || { tail -30 $OUT/build.txt; exit 1; }
  tail -3 $OUT/build.txt
}

# The GPU* test cases, given at most $1 seconds, into $OUT/gpu_tests.txt; the exit status, the
# failures and doctest's summary echoed.
gpu_suite() {
  timeout "$1" build/bin/tests -tc='GPU*' > $OUT/gpu_tests.txt 2>&1; echo "GPU tests rc $?"
  grep -E 'ERROR|FAILED' $OUT/gpu_tests.txt | head -20; tail -3 $OUT/gpu_tests.txt
}
