// GELU (tanh) and ReLU^2 on the GPU; math and CPU reference in kernels/activations.hpp.
// Elementwise, fp32 math on bf16 values; the backward kernels write din (no accumulation).
#include "kernels/cuda_common.cuh"
#include "kernels/gpu.hpp"

namespace qopt {

namespace {

constexpr float kGeluK = 0.7978845608028654f;  // sqrt(2 / pi)

__global__ void gelu_forward_kernel(bf16* out, const bf16* in, size_t n) {
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
        const float x = __bfloat162float(in[i]);
        out[i] = __float2bfloat16(0.5f * x * (1.0f + tanhf(kGeluK * (x + 0.044715f * x * x * x))));
    }
}

__global__ void gelu_backward_kernel(bf16* din, const bf16* dout, const bf16* in, size_t n) {
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
        const float x = __bfloat162float(in[i]);
        const float t = tanhf(kGeluK * (x + 0.044715f * x * x * x));
        const float grad = 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * kGeluK * (1.0f + 3.0f * 0.044715f * x * x);
        din[i] = __float2bfloat16(__bfloat162float(dout[i]) * grad);
    }
}

__global__ void relu2_forward_kernel(bf16* out, const bf16* in, size_t n) {
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
        const float r = fmaxf(__bfloat162float(in[i]), 0.0f);
        out[i] = __float2bfloat16(r * r);
    }
}

__global__ void relu2_backward_kernel(bf16* din, const bf16* dout, const bf16* in, size_t n) {
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
        din[i] = __float2bfloat16(__bfloat162float(dout[i]) * 2.0f * fmaxf(__bfloat162float(in[i]), 0.0f));
}


}  // namespace

void gelu_forward_gpu(bf16* out, const bf16* in, size_t n, cudaStream_t stream) {
    gelu_forward_kernel<<<grid_for(n), 256, 0, stream>>>(out, in, n);
    CUDA_CHECK_LAUNCH();
}
void gelu_backward_gpu(bf16* din, const bf16* dout, const bf16* in, size_t n, cudaStream_t stream) {
    gelu_backward_kernel<<<grid_for(n), 256, 0, stream>>>(din, dout, in, n);
    CUDA_CHECK_LAUNCH();
}
void relu2_forward_gpu(bf16* out, const bf16* in, size_t n, cudaStream_t stream) {
    relu2_forward_kernel<<<grid_for(n), 256, 0, stream>>>(out, in, n);
    CUDA_CHECK_LAUNCH();
}
void relu2_backward_gpu(bf16* din, const bf16* dout, const bf16* in, size_t n, cudaStream_t stream) {
    relu2_backward_kernel<<<grid_for(n), 256, 0, stream>>>(din, dout, in, n);
    CUDA_CHECK_LAUNCH();
}

}  // namespace qopt
