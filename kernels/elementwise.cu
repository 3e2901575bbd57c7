// Elementwise helpers on the GPU; CPU references in kernels/elementwise.hpp.
#include <cstdint>

#include "kernels/cuda_common.cuh"
#include "kernels/gpu.hpp"

namespace qopt {

namespace {

// Two bf16 per thread step where alignment allows: these kernels are pure bandwidth.
__global__ void add_kernel(bf16* out, const bf16* a, const bf16* b, size_t n) {
    const size_t pairs = n / 2;
    const auto* a2 = reinterpret_cast<const __nv_bfloat162*>(a);
    const auto* b2 = reinterpret_cast<const __nv_bfloat162*>(b);
    auto* out2 = reinterpret_cast<__nv_bfloat162*>(out);
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < pairs; i += size_t(gridDim.x) * blockDim.x) {
        const float2 x = __bfloat1622float2(a2[i]), y = __bfloat1622float2(b2[i]);
        out2[i] = __floats2bfloat162_rn(x.x + y.x, x.y + y.y);
    }
    if (n % 2 && blockIdx.x == 0 && threadIdx.x == 0)
        out[n - 1] = __float2bfloat16(__bfloat162float(a[n - 1]) + __bfloat162float(b[n - 1]));
}

__global__ void to_bf16_kernel(bf16* out, const float* in, size_t n) {
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
        out[i] = __float2bfloat16(in[i]);
}

bool aligned4(const void* p) { return reinterpret_cast<uintptr_t>(p) % 4 == 0; }

}  // namespace

void add_gpu(bf16* out, const bf16* a, const bf16* b, size_t n, cudaStream_t stream) {
    QOPT_CHECK(aligned4(out) && aligned4(a) && aligned4(b), "add_gpu: buffers must be 4-byte aligned");
    add_kernel<<<grid_for(n / 2 + 1), 256, 0, stream>>>(out, a, b, n);
    CUDA_CHECK_LAUNCH();
}

void to_bf16_gpu(bf16* out, const float* in, size_t n, cudaStream_t stream) {
    to_bf16_kernel<<<grid_for(n), 256, 0, stream>>>(out, in, n);
    CUDA_CHECK_LAUNCH();
}

}  // namespace qopt
