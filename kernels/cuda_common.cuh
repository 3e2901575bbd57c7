// Shared by the .cu files: error checking for every CUDA runtime call and kernel launch (a
// failure becomes a qopt::Error naming the call, file and line, so binaries print one line
// and exit), and the grid size of grid-stride elementwise kernels.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "core/error.hpp"

// A failed call's error is also cleared (cudaGetLastError), so that a caught error — e.g. an
// allocation refused by a size check's test — is not reported again by the next launch's check.
#define CUDA_CHECK(call)                                                                              \
    do {                                                                                              \
        cudaError_t status_ = (call);                                                                 \
        if (status_ != cudaSuccess) {                                                                 \
            (void)cudaGetLastError();                                                                 \
            ::qopt::fail("CUDA error ", cudaGetErrorString(status_), " in ", #call, " at ", __FILE__, \
                         ":", __LINE__);                                                              \
        }                                                                                             \
    } while (0)

// After a kernel launch: catches bad launch configurations at once.
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())

namespace qopt {

// Whether p sits on a `bytes` boundary (vector loads and stores of 4 or 16 bytes need it).
__host__ __device__ inline bool is_aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Blocks of `threads` for a grid-stride loop over n elements: enough to cover n, capped at
// 32 blocks per multiprocessor of an H100 (132) so each thread handles several elements.
inline unsigned grid_for(size_t n, unsigned threads = 256) {
    const size_t blocks = (n + threads - 1) / threads;
    const size_t cap = size_t(132) * 32;
    return unsigned(blocks == 0 ? 1 : (blocks < cap ? blocks : cap));
}

// Lets `kernel` use `bytes` of dynamic shared memory (above the 48 KB default).
template <typename Kernel>
void allow_shared_bytes(Kernel kernel, size_t bytes) {
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

// Compute capability major of the current device (asked once per device): 9 selects the
// Hopper-only (wgmma) kernels where the build has them.
int current_device_major();
// Its multiprocessor count (asked once per device): persistent and grid-stride launches size
// their grids by it.
int current_device_sm_count();

}  // namespace qopt
