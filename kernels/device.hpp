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

// The current GPU (GPU 0 unless use_cuda_device chose another).
CudaDeviceInfo query_cuda_device();
// How many GPUs this process sees (0 without a driver).
int cuda_device_count();
// Makes GPU `index` this thread's current device; throws naming the index and the count.
void use_cuda_device(int index);

// The current GPU's free and total memory now (cudaMemGetInfo; the CUDA context is created first).
struct GpuMemory {
    size_t free = 0, total = 0;
};
GpuMemory gpu_memory();

// "1.23 GB" (decimal, as memory reports print sizes).
std::string gigabytes(size_t bytes);

}  // namespace qopt
