// libFuzzer entry for one target (make fuzz builds one binary per target, -DQOPT_FUZZ_TARGET=name).
#include "tests/fuzz/fuzz_targets.hpp"

#ifndef QOPT_FUZZ_TARGET
#error "build with -DQOPT_FUZZ_TARGET=<target>"
#endif

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    qopt::fuzz::QOPT_FUZZ_TARGET(data, size);
    return 0;
}
