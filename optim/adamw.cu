// Fused AdamW step on the GPU: one pass over parameters, gradients and both moments.
// Same update as adamw_update_cpu (optim/adamw.hpp); grad_scale multiplies the gradient
// first (global-norm clipping folded in). With param_copy it also writes the bf16 copy of
// the updated weights that the next forward pass computes with. Bias corrections are computed on the host in
// double and passed as reciprocals.
#include "kernels/cuda_common.cuh"
#include "kernels/gpu.hpp"

#include <cmath>

namespace qopt {

namespace {

__global__ void adamw_kernel(float* param, const float* grad, float* m, float* v, size_t n, float lr, float beta1,
                             float beta2, float eps, float decay_factor, float inv_bias1, float inv_bias2,
                             float grad_scale, bf16* param_copy) {
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
        const float g = grad[i] * grad_scale;
        const float mi = beta1 * m[i] + (1.0f - beta1) * g;
        const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        const float updated = param[i] * decay_factor - lr * (mi * inv_bias1) / (sqrtf(vi * inv_bias2) + eps);
        param[i] = updated;
        if (param_copy) param_copy[i] = __float2bfloat16(updated);
    }
}

}  // namespace

void adamw_update_gpu(float* param, const float* grad, float* m, float* v, size_t n, float lr, float beta1,
                      float beta2, float eps, float weight_decay, long step, float grad_scale, bf16* param_copy,
                      cudaStream_t stream) {
    if (n == 0) return;
    const double inv_bias1 = 1.0 / (1.0 - std::pow(double(beta1), double(step)));
    const double inv_bias2 = 1.0 / (1.0 - std::pow(double(beta2), double(step)));
    adamw_kernel<<<grid_for(n), 256, 0, stream>>>(param, grad, m, v, n, lr, beta1, beta2, eps,
                                           1.0f - lr * weight_decay, float(inv_bias1), float(inv_bias2), grad_scale,
                                                  param_copy);
    CUDA_CHECK_LAUNCH();
}

}  // namespace qopt
