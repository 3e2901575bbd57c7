// The fp32 -> bf16 cast of master weights on the GPU; CPU reference in kernels/elementwise.hpp.
#include "kernels/cuda_common.cuh"
#include "kernels/gpu.hpp"

namespace qopt {

namespace {

__global__ void to_bf16_kernel(bf16* out, const float* in, size_t n) {
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
        out[i] = __float2bfloat16(in[i]);
}

}  // namespace

void to_bf16_gpu(bf16* out, const float* in, size_t n, cudaStream_t stream) {
    to_bf16_kernel<<<grid_for(n), 256, 0, stream>>>(out, in, n);
    CUDA_CHECK_LAUNCH();
}

}  // namespace qopt
