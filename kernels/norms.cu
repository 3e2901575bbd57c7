// RMSNorm and LayerNorm on the GPU (math and CPU reference: kernels/norms.hpp).
// Forward and input-gradient kernels: one warp per row, fp32 accumulation.
// Parameter gradients are summed deterministically in two stages: blocks of rows write
// per-chunk partial sums in a fixed order, then one pass adds the chunks in order.
#include "kernels/cuda_common.cuh"
#include "kernels/gpu.hpp"

namespace qopt {

namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerChunk = 64;  // rows folded into one partial sum of a parameter gradient

__device__ float warp_sum(float v) {
    for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xFFFFFFFF, v, offset);
    return v;
}

__global__ void rmsnorm_forward_kernel(Rows<bf16> out, float* rstd, Rows<const bf16> in, const float* weight,
                                       int n_rows, int dim, float eps) {
    const int row = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
    const int lane = threadIdx.x % kWarp;
    if (row >= n_rows) return;
    const bf16* x = in.data + size_t(row) * in.stride;
    float sum_sq = 0;
    for (int i = lane; i < dim; i += kWarp) {
        const float v = __bfloat162float(x[i]);
        sum_sq += v * v;
    }
    const float r = rsqrtf(warp_sum(sum_sq) / dim + eps);
    if (lane == 0) rstd[row] = r;
    bf16* y = out.data + size_t(row) * out.stride;
    for (int i = lane; i < dim; i += kWarp) y[i] = __float2bfloat16(weight[i] * __bfloat162float(x[i]) * r);
}

__global__ void rmsnorm_backward_input_kernel(Rows<bf16> din, Rows<const bf16> dout, Rows<const bf16> in,
                                              const float* weight, const float* rstd, int n_rows, int dim) {
    const int row = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
    const int lane = threadIdx.x % kWarp;
    if (row >= n_rows) return;
    const bf16* x = in.data + size_t(row) * in.stride;
    const bf16* dy = dout.data + size_t(row) * dout.stride;
    const float r = rstd[row];
    float dot = 0;
    for (int i = lane; i < dim; i += kWarp) dot += __bfloat162float(dy[i]) * weight[i] * __bfloat162float(x[i]);
    const float mean_gx = warp_sum(dot) / dim;
    bf16* dx = din.data + size_t(row) * din.stride;
    for (int i = lane; i < dim; i += kWarp) {
        const float g = __bfloat162float(dy[i]) * weight[i];
        dx[i] = __float2bfloat16(r * (g - __bfloat162float(x[i]) * r * r * mean_gx));
    }
}

__global__ void layernorm_forward_kernel(bf16* out, float* mean, float* rstd, const bf16* in, const float* weight,
                                         const float* bias, int n_rows, int dim, float eps) {
    const int row = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
    const int lane = threadIdx.x % kWarp;
    if (row >= n_rows) return;
    const bf16* x = in + size_t(row) * dim;
    float sum = 0;
    for (int i = lane; i < dim; i += kWarp) sum += __bfloat162float(x[i]);
    const float m = warp_sum(sum) / dim;
    float var = 0;
    for (int i = lane; i < dim; i += kWarp) {
        const float d = __bfloat162float(x[i]) - m;
        var += d * d;
    }
    const float s = rsqrtf(warp_sum(var) / dim + eps);
    if (lane == 0) mean[row] = m, rstd[row] = s;
    bf16* y = out + size_t(row) * dim;
    for (int i = lane; i < dim; i += kWarp)
        y[i] = __float2bfloat16((__bfloat162float(x[i]) - m) * s * weight[i] + bias[i]);
}

__global__ void layernorm_backward_input_kernel(bf16* din, const bf16* dout, const bf16* in, const float* weight,
                                                const float* mean, const float* rstd, int n_rows, int dim) {
    const int row = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
    const int lane = threadIdx.x % kWarp;
    if (row >= n_rows) return;
    const bf16* x = in + size_t(row) * dim;
    const bf16* dy = dout + size_t(row) * dim;
    const float m = mean[row], s = rstd[row];
    float sum_g = 0, sum_gxh = 0;
    for (int i = lane; i < dim; i += kWarp) {
        const float g = __bfloat162float(dy[i]) * weight[i];
        sum_g += g;
        sum_gxh += g * (__bfloat162float(x[i]) - m) * s;
    }
    const float mean_g = warp_sum(sum_g) / dim, mean_gxh = warp_sum(sum_gxh) / dim;
    bf16* dx = din + size_t(row) * dim;
    for (int i = lane; i < dim; i += kWarp) {
        const float xh = (__bfloat162float(x[i]) - m) * s;
        dx[i] = __float2bfloat16(s * (__bfloat162float(dy[i]) * weight[i] - mean_g - xh * mean_gxh));
    }
}

// Partial parameter gradients of one chunk of rows: thread = feature.
//   rms:   dweight += dy * x * rstd
//   layer: dweight += dy * (x - mean) * rstd, dbias += dy
//   bias of a linear layer (no in): dbias += dy
__global__ void norm_param_partials_kernel(float* partial_w, float* partial_b, Rows<const bf16> dout,
                                           Rows<const bf16> in, const float* mean, const float* rstd, int n_rows,
                                           int dim) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const int chunk = blockIdx.y;
    if (i >= dim) return;
    const int first = chunk * kRowsPerChunk;
    const int last = min(n_rows, first + kRowsPerChunk);
    float acc_w = 0, acc_b = 0;
#pragma unroll 4
    for (int n = first; n < last; ++n) {
        const float dy = __bfloat162float(dout.data[size_t(n) * dout.stride + i]);
        if (partial_w) {
            const float centered = __bfloat162float(in.data[size_t(n) * in.stride + i]) - (mean ? mean[n] : 0.0f);
            acc_w += dy * centered * rstd[n];
        }
        acc_b += dy;
    }
    if (partial_w) partial_w[size_t(chunk) * dim + i] = acc_w;
    if (partial_b) partial_b[size_t(chunk) * dim + i] = acc_b;
}

__global__ void sum_partials_kernel(float* target, const float* partials, int n_chunks, int dim) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= dim) return;
    float acc = 0;
    for (int c = 0; c < n_chunks; ++c) acc += partials[size_t(c) * dim + i];
    target[i] += acc;
}

// Scratch for partial sums, grown on demand (one per process; launches on one stream).
float* partials_scratch(size_t count) {
    static DeviceBuffer<float> scratch;
    if (scratch.size() < count) scratch.resize(count);
    return scratch.data();
}

void param_grads(float* dweight, float* dbias, Rows<const bf16> dout, Rows<const bf16> in, const float* mean,
                 const float* rstd, int n_rows, int dim, cudaStream_t stream) {
    const int n_chunks = (n_rows + kRowsPerChunk - 1) / kRowsPerChunk;
    float* scratch = partials_scratch(size_t(2) * n_chunks * dim);
    float* partial_w = dweight ? scratch : nullptr;
    float* partial_b = dbias ? scratch + size_t(n_chunks) * dim : nullptr;
    const int threads = 128;
    dim3 grid((dim + threads - 1) / threads, n_chunks);
    norm_param_partials_kernel<<<grid, threads, 0, stream>>>(partial_w, partial_b, dout, in, mean, rstd, n_rows, dim);
    CUDA_CHECK_LAUNCH();
    const int blocks = (dim + threads - 1) / threads;
    if (dweight) {
        sum_partials_kernel<<<blocks, threads, 0, stream>>>(dweight, partial_w, n_chunks, dim);
        CUDA_CHECK_LAUNCH();
    }
    if (dbias) {
        sum_partials_kernel<<<blocks, threads, 0, stream>>>(dbias, partial_b, n_chunks, dim);
        CUDA_CHECK_LAUNCH();
    }
}

constexpr int kRowsPerBlock = 8;  // warps per block in the row kernels
int row_blocks(int n_rows) { return (n_rows + kRowsPerBlock - 1) / kRowsPerBlock; }

}  // namespace

void rmsnorm_forward_gpu(Rows<bf16> out, float* rstd, Rows<const bf16> in, const float* weight, int n_rows, int dim,
                         float eps, cudaStream_t stream) {
    rmsnorm_forward_kernel<<<row_blocks(n_rows), kRowsPerBlock * kWarp, 0, stream>>>(out, rstd, in, weight, n_rows,
                                                                                     dim, eps);
    CUDA_CHECK_LAUNCH();
}

void rmsnorm_backward_gpu(Rows<bf16> din, float* dweight, Rows<const bf16> dout, Rows<const bf16> in,
                          const float* weight, const float* rstd, int n_rows, int dim, cudaStream_t stream) {
    rmsnorm_backward_input_kernel<<<row_blocks(n_rows), kRowsPerBlock * kWarp, 0, stream>>>(din, dout, in, weight,
                                                                                            rstd, n_rows, dim);
    CUDA_CHECK_LAUNCH();
    param_grads(dweight, nullptr, dout, in, nullptr, rstd, n_rows, dim, stream);
}

void matmul_backward_bias_gpu(float* dbias, const bf16* dout, int n_rows, int out_dim, cudaStream_t stream) {
    param_grads(nullptr, dbias, Rows<const bf16>{dout, out_dim}, Rows<const bf16>{nullptr, 0}, nullptr, nullptr, n_rows,
                out_dim, stream);
}

void layernorm_forward_gpu(bf16* out, float* mean, float* rstd, const bf16* in, const float* weight, const float* bias,
                           int n_rows, int dim, float eps, cudaStream_t stream) {
    layernorm_forward_kernel<<<row_blocks(n_rows), kRowsPerBlock * kWarp, 0, stream>>>(out, mean, rstd, in, weight,
                                                                                       bias, n_rows, dim, eps);
    CUDA_CHECK_LAUNCH();
}

void layernorm_backward_gpu(bf16* din, float* dweight, float* dbias, const bf16* dout, const bf16* in,
                            const float* weight, const float* mean, const float* rstd, int n_rows, int dim,
                            cudaStream_t stream) {
    layernorm_backward_input_kernel<<<row_blocks(n_rows), kRowsPerBlock * kWarp, 0, stream>>>(din, dout, in, weight,
                                                                                              mean, rstd, n_rows, dim);
    CUDA_CHECK_LAUNCH();
    param_grads(dweight, dbias, Rows<const bf16>{dout, dim}, Rows<const bf16>{in, dim}, mean, rstd, n_rows, dim, stream);
}

}  // namespace qopt
