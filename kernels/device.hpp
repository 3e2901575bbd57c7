// What GPU (if any) this process can use. The CUDA runtime is linked statically, so the
// binaries start on machines without a driver and simply report "no GPU".
#pragma once
#include <string>

namespace qopt {

struct CudaDeviceInfo {
    bool usable = false;       // present and of a supported architecture
    std::string description;   // "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs, 79.1 GiB)"
    std::string problem;       // why not usable, when !usable
};

CudaDeviceInfo query_cuda_device();

// GPU 0's free and total memory now (cudaMemGetInfo; the CUDA context is created first).
struct GpuMemory {
    size_t free = 0, total = 0;
};
GpuMemory gpu_memory();

// "1.23 GB" (decimal, as memory reports print sizes).
std::string gigabytes(size_t bytes);

}  // namespace qopt
