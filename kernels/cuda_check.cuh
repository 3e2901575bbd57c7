// Error checking for every CUDA runtime call and kernel launch: a failure becomes a
// qopt::Error naming the call, the file and line, so binaries print one line and exit.
#pragma once
#include <cuda_runtime.h>

#include "core/error.hpp"

#define CUDA_CHECK(call)                                                                              \
    do {                                                                                              \
        cudaError_t status_ = (call);                                                                 \
        if (status_ != cudaSuccess)                                                                   \
            ::qopt::fail("CUDA error ", cudaGetErrorString(status_), " in ", #call, " at ", __FILE__, \
                         ":", __LINE__);                                                              \
    } while (0)

// After a kernel launch: catches bad launch configurations at once.
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())
