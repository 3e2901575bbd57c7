// GELU (tanh) and ReLU^2 on the GPU; math and CPU reference in kernels/activations.hpp.
// Elementwise, fp32 math on bf16 values; the backward kernels write din (no accumulation).
#include <cstdint>

#include "kernels/activation_functors.cuh"
#include "kernels/cuda_common.cuh"
#include "kernels/gpu.hpp"

namespace qopt {

namespace {

// out[i] = op(a[i], b[i]) (b may be null: unary). Eight elements per step with 16-byte loads
// when every pointer allows (`vector`), element by element otherwise and for the tail.
template <typename Op>
__global__ void map_kernel(bf16* out, const bf16* a, const bf16* b, size_t n, bool vector, Op op) {
    const size_t stride = size_t(gridDim.x) * blockDim.x;
    const size_t first = blockIdx.x * size_t(blockDim.x) + threadIdx.x;
    const size_t chunks = vector ? n / 8 : 0;
    for (size_t c = first; c < chunks; c += stride) {
        const uint4 a_packed = reinterpret_cast<const uint4*>(a)[c];
        uint4 b_packed = a_packed;
        if (b) b_packed = reinterpret_cast<const uint4*>(b)[c];
        const bf16* av = reinterpret_cast<const bf16*>(&a_packed);
        const bf16* bv = reinterpret_cast<const bf16*>(&b_packed);
        uint4 result;
        bf16* rv = reinterpret_cast<bf16*>(&result);
#pragma unroll
        for (int j = 0; j < 8; ++j) rv[j] = __float2bfloat16(op(__bfloat162float(av[j]), __bfloat162float(bv[j])));
        reinterpret_cast<uint4*>(out)[c] = result;
    }
    for (size_t i = chunks * 8 + first; i < n; i += stride)
        out[i] = __float2bfloat16(op(__bfloat162float(a[i]), b ? __bfloat162float(b[i]) : 0.0f));
}

template <typename Op>
void launch_map(bf16* out, const bf16* a, const bf16* b, size_t n, cudaStream_t stream) {
    const bool vector = is_aligned(out, 16) && is_aligned(a, 16) && (!b || is_aligned(b, 16));
    map_kernel<<<grid_for(vector ? n / 8 + 1 : n), 256, 0, stream>>>(out, a, b, n, vector, Op{});
    CUDA_CHECK_LAUNCH();
}

}  // namespace

void gelu_forward_gpu(bf16* out, const bf16* in, size_t n, cudaStream_t stream) {
    launch_map<GeluForward>(out, in, nullptr, n, stream);
}
void gelu_backward_gpu(bf16* din, const bf16* dout, const bf16* in, size_t n, cudaStream_t stream) {
    launch_map<GeluBackward>(din, dout, in, n, stream);
}
void relu2_forward_gpu(bf16* out, const bf16* in, size_t n, cudaStream_t stream) {
    launch_map<Relu2Forward>(out, in, nullptr, n, stream);
}
void relu2_backward_gpu(bf16* din, const bf16* dout, const bf16* in, size_t n, cudaStream_t stream) {
    launch_map<Relu2Backward>(din, dout, in, n, stream);
}
void activation_forward_gpu(bf16* out, const bf16* in, MlpActivation activation, size_t n, cudaStream_t stream) {
    if (activation == MlpActivation::Gelu) gelu_forward_gpu(out, in, n, stream);
    else relu2_forward_gpu(out, in, n, stream);
}
void activation_backward_gpu(bf16* din, const bf16* dout, const bf16* in, MlpActivation activation, size_t n,
                             cudaStream_t stream) {
    if (activation == MlpActivation::Gelu) gelu_backward_gpu(din, dout, in, n, stream);
    else relu2_backward_gpu(din, dout, in, n, stream);
}

}  // namespace qopt
