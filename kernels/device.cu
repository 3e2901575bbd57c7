#include <cuda_runtime.h>

#include <cstdio>
#include <string>

#include "kernels/cuda_common.cuh"
#include "kernels/device.hpp"

namespace qopt {

CudaDeviceInfo query_cuda_device() {
    CudaDeviceInfo info;
    int count = 0;
    cudaError_t status = cudaGetDeviceCount(&count);
    if (status != cudaSuccess || count == 0) {
        if (status == cudaSuccess || status == cudaErrorNoDevice)
            info.problem = "no CUDA GPU found";
        else if (status == cudaErrorInsufficientDriver)
            info.problem = "no CUDA GPU usable: no NVIDIA driver, or one older than this CUDA runtime";
        else
            info.problem = std::string("no usable CUDA GPU (") + cudaGetErrorString(status) + ")";
        cudaGetLastError();
        return info;
    }
    int device = 0;
    cudaGetDevice(&device);
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
        info.problem = "cannot read the properties of GPU " + std::to_string(device);
        return info;
    }
    char text[512];
    std::snprintf(text, sizeof text, "%s (sm_%d%d, %d SMs, %.1f GiB)", prop.name, prop.major, prop.minor,
                  prop.multiProcessorCount, double(prop.totalGlobalMem) / (1024.0 * 1024.0 * 1024.0));
    info.description = text;
    if (prop.major < 8) {
        info.problem = info.description + " is older than sm_80; qopt's kernels need bf16 tensor cores";
        return info;
    }
    info.usable = true;
    return info;
}

int cuda_device_count() {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return count;
}

void use_cuda_device(int index) {
    const int count = cuda_device_count();
    QOPT_CHECK(index >= 0 && index < count, "GPU ", index, " does not exist: this process sees ", count, " GPU(s)");
    CUDA_CHECK(cudaSetDevice(index));
}

GpuMemory gpu_memory() {
    GpuMemory memory;
    if (cudaMemGetInfo(&memory.free, &memory.total) != cudaSuccess) cudaGetLastError();
    return memory;
}

namespace {

// A device attribute of the current device, asked once per device (the kernels' launchers call
// these on hot paths).
int cached_attribute(cudaDeviceAttr attribute, int (&per_device)[64]) {
    int device = 0;
    CUDA_CHECK(cudaGetDevice(&device));
    if (device < 0 || device >= 64) return 0;
    if (per_device[device] == 0) CUDA_CHECK(cudaDeviceGetAttribute(&per_device[device], attribute, device));
    return per_device[device];
}

}  // namespace

int current_device_major() {
    static int majors[64];
    return cached_attribute(cudaDevAttrComputeCapabilityMajor, majors);
}

int current_device_sm_count() {
    static int sm_counts[64];
    return cached_attribute(cudaDevAttrMultiProcessorCount, sm_counts);
}

std::string gigabytes(size_t bytes) {
    char text[32];
    std::snprintf(text, sizeof text, "%.2f GB", double(bytes) / 1e9);
    return text;
}

}  // namespace qopt
