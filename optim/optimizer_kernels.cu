#include <algorithm>
#include <cstring>

#include "kernels/block_reduce.cuh"
#include "kernels/cuda_common.cuh"
#include "optim/optimizer_kernels.hpp"

namespace qopt {

namespace {

__global__ void adamw_chunks_kernel(float* params, const float* grads, float* m, float* v, bf16* params_bf16,
                                    const int64_t* chunks, float lr, float beta1, float beta2, float eps,
                                    float decay_factor, float inv_bias1, float inv_bias2, float grad_scale) {
    const int64_t p0 = chunks[3 * blockIdx.x], s0 = chunks[3 * blockIdx.x + 1], packed = chunks[3 * blockIdx.x + 2];
    const int count = int(packed & 0xFFFFFFFF);
    const float keep = (packed >> 32) ? decay_factor : 1.0f;
    for (int i = threadIdx.x; i < count; i += blockDim.x) {
        const float g = grads[p0 + i] * grad_scale;
        const float mi = beta1 * m[s0 + i] + (1.0f - beta1) * g;
        const float vi = beta2 * v[s0 + i] + (1.0f - beta2) * g * g;
        m[s0 + i] = mi;
        v[s0 + i] = vi;
        const float updated = params[p0 + i] * keep - lr * (mi * inv_bias1) / (sqrtf(vi * inv_bias2) + eps);
        params[p0 + i] = updated;
        if (params_bf16) params_bf16[p0 + i] = __float2bfloat16(updated);
    }
}

__global__ void ns_prepare_kernel(bf16* x, float* momentum, float* partials, const float* grads,
                                  const int64_t* offsets, int64_t n, float grad_scale, float m_keep, float g_weight,
                                  float u_grad, float u_momentum) {
    const int b = blockIdx.y;
    const float* g = grads + offsets[b];
    float* mom = momentum + b * n;
    bf16* out = x + b * n;
    float sum_sq = 0;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
        const float gi = g[i] * grad_scale;
        const float mi = m_keep * mom[i] + g_weight * gi;
        mom[i] = mi;
        const bf16 u = __float2bfloat16(u_grad * gi + u_momentum * mi);
        out[i] = u;
        const float uf = __bfloat162float(u);
        sum_sq += uf * uf;
    }
    const float total = block_reduce(sum_sq, Add{});
    if (threadIdx.x == 0) partials[b * kNsPartials + blockIdx.x] = total;
}

__global__ void ns_normalize_kernel(bf16* x, const float* partials, int64_t n) {
    const int b = blockIdx.y;
    __shared__ float scale;
    if (threadIdx.x == 0) {
        float sum = 0;
        for (int p = 0; p < int(gridDim.x); ++p) sum += partials[b * kNsPartials + p];  // same grid as the prepare pass
        scale = 1.0f / (sqrtf(sum) + 1e-7f);
    }
    __syncthreads();
    bf16* out = x + b * n;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
        out[i] = __float2bfloat16(__bfloat162float(out[i]) * scale);
}

__global__ void matrix_apply_kernel(float* params, bf16* params_bf16, const bf16* o, const int64_t* offsets, int64_t n,
                                    float keep, float step_scale) {
    const int b = blockIdx.y;
    float* p = params + offsets[b];
    bf16* copy = params_bf16 ? params_bf16 + offsets[b] : nullptr;
    const bf16* ob = o + b * n;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
        const float updated = keep * p[i] - step_scale * __bfloat162float(ob[i]);
        p[i] = updated;
        if (copy) copy[i] = __float2bfloat16(updated);
    }
}

__global__ void scion_rows_kernel(float* params, const float* grads, float* momentum, bf16* params_bf16,
                                  const int64_t* tasks, float lr, float momentum_weight, bool unconstrained,
                                  float weight_decay, float grad_scale) {
    const int64_t* task = tasks + 4 * int64_t(blockIdx.x);
    const int64_t p0 = task[0], m0 = task[1];
    const int cols = int(task[2] & 0xFFFFFFFF), mode = int(task[2] >> 32);
    const uint32_t scale_bits = uint32_t(task[3] & 0xFFFFFFFF);
    const bool decay = (task[3] >> 32) != 0;
    float scale;
    memcpy(&scale, &scale_bits, sizeof scale);
    float sum_sq = 0;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        const float mi = (1.0f - momentum_weight) * momentum[m0 + i] + momentum_weight * grads[p0 + i] * grad_scale;
        momentum[m0 + i] = mi;
        sum_sq += mi * mi;
    }
    float inv_divisor = 1.0f / float(cols);  // sign
    if (mode != 0) {  // mode is the same for the whole block, so every thread reaches block_reduce
        const float total = block_reduce(sum_sq, Add{});
        inv_divisor = mode == 1 ? 1.0f / (sqrtf(total / float(cols)) + 1e-8f)
                                : 1.0f / (sqrtf(total) * sqrtf(float(cols)) + 1e-8f);
    }
    const float keep = unconstrained ? 1.0f - lr * (decay ? weight_decay : 0.0f) : 1.0f - lr;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        const float mi = momentum[m0 + i];
        const float d = mode == 0 ? (mi > 0 ? 1.0f : mi < 0 ? -1.0f : 0.0f) * inv_divisor : mi * inv_divisor;
        const float updated = keep * params[p0 + i] - lr * scale * d;
        params[p0 + i] = updated;
        if (params_bf16) params_bf16[p0 + i] = __float2bfloat16(updated);
    }
}

dim3 group_grid(int64_t n, int count) {
    const int64_t blocks = (n + 255) / 256;
    return dim3(unsigned(blocks < kNsPartials ? blocks : kNsPartials), unsigned(count));
}

}  // namespace

void adamw_chunks_gpu(float* params, const float* grads, float* m, float* v, bf16* params_bf16, const int64_t* chunks,
                      int n_chunks, float lr, float beta1, float beta2, float eps, float weight_decay, long step,
                      float grad_scale, cudaStream_t stream) {
    if (n_chunks == 0) return;
    const double inv_bias1 = 1.0 / (1.0 - std::pow(double(beta1), double(step)));
    const double inv_bias2 = 1.0 / (1.0 - std::pow(double(beta2), double(step)));
    adamw_chunks_kernel<<<n_chunks, 256, 0, stream>>>(params, grads, m, v, params_bf16, chunks, lr, beta1, beta2, eps,
                                                      1.0f - lr * weight_decay, float(inv_bias1), float(inv_bias2),
                                                      grad_scale);
    CUDA_CHECK_LAUNCH();
}

void ns_prepare_gpu(bf16* x, float* momentum, float* partials, const float* grads, const int64_t* offsets, int count,
                    int64_t n, float grad_scale, float m_keep, float g_weight, float u_grad, float u_momentum,
                    cudaStream_t stream) {
    // Both passes use the same grid: the normaliser reads the gridDim.x partials written here.
    const dim3 grid = group_grid(n, count);
    ns_prepare_kernel<<<grid, 256, 0, stream>>>(x, momentum, partials, grads, offsets, n, grad_scale, m_keep, g_weight,
                                                u_grad, u_momentum);
    CUDA_CHECK_LAUNCH();
    ns_normalize_kernel<<<grid, 256, 0, stream>>>(x, partials, n);
    CUDA_CHECK_LAUNCH();
}

void newton_schulz_gram_gpu(bf16* a_out, const bf16* x, int count, int rows, int cols, cudaStream_t stream) {
    const int s = std::min(rows, cols);
    const int64_t n = int64_t(rows) * cols, ss = int64_t(s) * s;
    if (rows <= cols)
        batched_matmul_gpu(a_out, nullptr, x, false, x, true, rows, rows, cols, 1.0f, 0.0f, count, n, n, ss, stream);
    else
        batched_matmul_gpu(a_out, nullptr, x, true, x, false, cols, cols, rows, 1.0f, 0.0f, count, n, n, ss, stream);
}

void newton_schulz_polynomial_gpu(bf16* p_out, const bf16* a_in, int count, int s, float b, float c,
                                  cudaStream_t stream) {
    const int64_t ss = int64_t(s) * s;
    batched_matmul_gpu(p_out, a_in, a_in, false, a_in, false, s, s, s, c, b, count, ss, ss, ss, stream);
}

void newton_schulz_product_back_gpu(bf16* x2, const bf16* x, const bf16* p, int count, int rows, int cols, float a,
                                    cudaStream_t stream) {
    const int s = std::min(rows, cols);
    const int64_t n = int64_t(rows) * cols, ss = int64_t(s) * s;
    if (rows <= cols)
        batched_matmul_gpu(x2, x, p, false, x, false, rows, cols, rows, 1.0f, a, count, ss, n, n, stream);
    else
        batched_matmul_gpu(x2, x, x, false, p, false, rows, cols, cols, 1.0f, a, count, n, ss, n, stream);
}

bf16* newton_schulz_batched_gpu(bf16* x, bf16* x2, bf16* a_scratch, bf16* p_scratch, int count, int rows, int cols,
                                int steps, float a, float b, float c, cudaStream_t stream) {
    for (int it = 0; it < steps; ++it) {
        newton_schulz_gram_gpu(a_scratch, x, count, rows, cols, stream);
        newton_schulz_polynomial_gpu(p_scratch, a_scratch, count, std::min(rows, cols), b, c, stream);
        newton_schulz_product_back_gpu(x2, x, p_scratch, count, rows, cols, a, stream);
        std::swap(x, x2);
    }
    return x;
}

void matrix_apply_gpu(float* params, bf16* params_bf16, const bf16* o, const int64_t* offsets, int count, int64_t n,
                      float keep, float step_scale, cudaStream_t stream) {
    matrix_apply_kernel<<<group_grid(n, count), 256, 0, stream>>>(params, params_bf16, o, offsets, n, keep, step_scale);
    CUDA_CHECK_LAUNCH();
}

void scion_rows_gpu(float* params, const float* grads, float* momentum, bf16* params_bf16, const int64_t* tasks,
                    int n_tasks, float lr, float momentum_weight, bool unconstrained, float weight_decay,
                    float grad_scale, cudaStream_t stream) {
    if (n_tasks == 0) return;
    scion_rows_kernel<<<n_tasks, 128, 0, stream>>>(params, grads, momentum, params_bf16, tasks, lr, momentum_weight,
                                                   unconstrained, weight_decay, grad_scale);
    CUDA_CHECK_LAUNCH();
}

}  // namespace qopt
