// RMSNorm and LayerNorm on the GPU (math and CPU reference: kernels/norms.hpp).
// Forward and input-gradient kernels: one warp per row, fp32 accumulation.
// Parameter gradients are summed deterministically in two stages: blocks of rows write
// per-chunk partial sums in a fixed order, then one pass adds the chunks in order.
#include "kernels/cuda_common.cuh"
#include "kernels/gpu.hpp"

namespace qopt {

namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerChunk = 512;  // rows folded into one partial sum of a parameter gradient

__device__ float warp_sum(float v) {
    for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xFFFFFFFF, v, offset);
    return v;
}

// out = (residual +) w * x * rstd; residual (may be null) has out's row stride.
__global__ void rmsnorm_forward_kernel(Rows<bf16> out, float* rstd, Rows<const bf16> in, const bf16* residual,
                                       const float* weight, int n_rows, int dim, float eps) {
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
    const bf16* skip = residual ? residual + size_t(row) * out.stride : nullptr;
    for (int i = lane; i < dim; i += kWarp)
        y[i] = __float2bfloat16((skip ? __bfloat162float(skip[i]) : 0.0f) + weight[i] * __bfloat162float(x[i]) * r);
}

__global__ void rmsnorm_backward_input_kernel(Rows<bf16> din, Rows<const bf16> dout, Rows<const bf16> in,
                                              const float* weight, const float* rstd, int n_rows, int dim,
                                              bool accumulate) {
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
        const float previous = accumulate ? __bfloat162float(dx[i]) : 0.0f;
        dx[i] = __float2bfloat16(previous + r * (g - __bfloat162float(x[i]) * r * r * mean_gx));
    }
}

// With in2 (may be null) the normalised row is x = bf16(in + in2), also stored in sum_out:
// the residual add fused in front of the norm.
__global__ void layernorm_forward_kernel(bf16* out, float* mean, float* rstd, const bf16* in, const bf16* in2,
                                         bf16* sum_out, const float* weight, const float* bias, int n_rows, int dim,
                                         float eps) {
    const int row = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
    const int lane = threadIdx.x % kWarp;
    if (row >= n_rows) return;
    const bf16* x = in + size_t(row) * dim;
    const bf16* x2 = in2 ? in2 + size_t(row) * dim : nullptr;
    auto value = [&](int i) {
        return x2 ? __bfloat162float(__float2bfloat16(__bfloat162float(x[i]) + __bfloat162float(x2[i])))
                  : __bfloat162float(x[i]);
    };
    float sum = 0;
    for (int i = lane; i < dim; i += kWarp) sum += value(i);
    const float m = warp_sum(sum) / dim;
    float var = 0;
    for (int i = lane; i < dim; i += kWarp) {
        const float d = value(i) - m;
        var += d * d;
    }
    const float s = rsqrtf(warp_sum(var) / dim + eps);
    if (lane == 0) mean[row] = m, rstd[row] = s;
    bf16* y = out + size_t(row) * dim;
    bf16* sum_row = sum_out ? sum_out + size_t(row) * dim : nullptr;
    for (int i = lane; i < dim; i += kWarp) {
        const float v = value(i);
        if (sum_row) sum_row[i] = __float2bfloat16(v);
        y[i] = __float2bfloat16((v - m) * s * weight[i] + bias[i]);
    }
}

__global__ void layernorm_backward_input_kernel(bf16* din, const bf16* dout, const bf16* in, const float* weight,
                                                const float* mean, const float* rstd, int n_rows, int dim,
                                                bool accumulate) {
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
        const float previous = accumulate ? __bfloat162float(dx[i]) : 0.0f;
        dx[i] = __float2bfloat16(previous + s * (__bfloat162float(dy[i]) * weight[i] - mean_g - xh * mean_gxh));
    }
}

// Partial parameter gradients of one chunk of kRowsPerChunk rows and 64 columns:
//   rms:   dweight += dy * x * rstd
//   layer: dweight += dy * (x - mean) * rstd, dbias += dy
//   bias of a linear layer (no in): dbias += dy
// Block (32 x kPartialRowsY): lane x owns columns 2x, 2x+1 (a warp reads 128 contiguous bytes
// per row), row group y takes every kPartialRowsY-th row; the groups are then added in a fixed
// order in shared memory, so the result does not depend on scheduling.
constexpr int kPartialRowsY = 8;

__global__ void norm_param_partials_kernel(float* partial_w, float* partial_b, Rows<const bf16> dout,
                                           Rows<const bf16> in, const float* mean, const float* rstd, int n_rows,
                                           int dim) {
    const int column = blockIdx.x * 64 + 2 * threadIdx.x;
    const int chunk = blockIdx.y;
    const int first = chunk * kRowsPerChunk;
    const int last = min(n_rows, first + kRowsPerChunk);
    const bool has_second = column + 1 < dim;
    float acc_w[2] = {0, 0}, acc_b[2] = {0, 0};
    if (column < dim) {
#pragma unroll 4
        for (int n = first + int(threadIdx.y); n < last; n += kPartialRowsY) {
            const bf16* dy_row = dout.data + size_t(n) * dout.stride + column;
            const float dy0 = __bfloat162float(dy_row[0]), dy1 = has_second ? __bfloat162float(dy_row[1]) : 0.0f;
            acc_b[0] += dy0, acc_b[1] += dy1;
            if (partial_w) {
                const bf16* x_row = in.data + size_t(n) * in.stride + column;
                const float shift = mean ? mean[n] : 0.0f, scale = rstd[n];
                acc_w[0] += dy0 * (__bfloat162float(x_row[0]) - shift) * scale;
                if (has_second) acc_w[1] += dy1 * (__bfloat162float(x_row[1]) - shift) * scale;
            }
        }
    }
    __shared__ float shared_w[kPartialRowsY][64], shared_b[kPartialRowsY][64];
    shared_w[threadIdx.y][2 * threadIdx.x] = acc_w[0], shared_w[threadIdx.y][2 * threadIdx.x + 1] = acc_w[1];
    shared_b[threadIdx.y][2 * threadIdx.x] = acc_b[0], shared_b[threadIdx.y][2 * threadIdx.x + 1] = acc_b[1];
    __syncthreads();
    if (threadIdx.y != 0) return;
    for (int k = 0; k < 2; ++k) {
        const int c = 2 * threadIdx.x + k;
        if (blockIdx.x * 64 + c >= dim) continue;
        float sum_w = 0, sum_b = 0;
        for (int y = 0; y < kPartialRowsY; ++y) sum_w += shared_w[y][c], sum_b += shared_b[y][c];
        const size_t at = size_t(chunk) * dim + blockIdx.x * 64 + c;
        if (partial_w) partial_w[at] = sum_w;
        if (partial_b) partial_b[at] = sum_b;
    }
}

// target_w[i] += sum over chunks of partial_w[chunk, i] (in chunk order); same for b.
__global__ void sum_partials_kernel(float* target_w, const float* partial_w, float* target_b, const float* partial_b,
                                    int n_chunks, int dim) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= dim) return;
    if (target_w) {
        float acc = 0;
        for (int c = 0; c < n_chunks; ++c) acc += partial_w[size_t(c) * dim + i];
        target_w[i] += acc;
    }
    if (target_b) {
        float acc = 0;
        for (int c = 0; c < n_chunks; ++c) acc += partial_b[size_t(c) * dim + i];
        target_b[i] += acc;
    }
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
    const dim3 grid((dim + 63) / 64, n_chunks), block(32, kPartialRowsY);
    norm_param_partials_kernel<<<grid, block, 0, stream>>>(partial_w, partial_b, dout, in, mean, rstd, n_rows, dim);
    CUDA_CHECK_LAUNCH();
    const int threads = 128;
    sum_partials_kernel<<<(dim + threads - 1) / threads, threads, 0, stream>>>(dweight, partial_w, dbias, partial_b,
                                                                               n_chunks, dim);
    CUDA_CHECK_LAUNCH();
}

constexpr int kRowsPerBlock = 8;  // warps per block in the row kernels
int row_blocks(int n_rows) { return (n_rows + kRowsPerBlock - 1) / kRowsPerBlock; }

}  // namespace

void rmsnorm_forward_gpu(Rows<bf16> out, float* rstd, Rows<const bf16> in, const float* weight, int n_rows, int dim,
                         float eps, cudaStream_t stream) {
    rmsnorm_forward_kernel<<<row_blocks(n_rows), kRowsPerBlock * kWarp, 0, stream>>>(out, rstd, in, nullptr, weight,
                                                                                     n_rows, dim, eps);
    CUDA_CHECK_LAUNCH();
}

void rmsnorm_add_forward_gpu(bf16* out, float* rstd, const bf16* residual, const bf16* in, const float* weight,
                             int n_rows, int dim, float eps, cudaStream_t stream) {
    rmsnorm_forward_kernel<<<row_blocks(n_rows), kRowsPerBlock * kWarp, 0, stream>>>(
        Rows<bf16>{out, dim}, rstd, Rows<const bf16>{in, dim}, residual, weight, n_rows, dim, eps);
    CUDA_CHECK_LAUNCH();
}

void rmsnorm_backward_gpu(Rows<bf16> din, float* dweight, Rows<const bf16> dout, Rows<const bf16> in,
                          const float* weight, const float* rstd, int n_rows, int dim, cudaStream_t stream) {
    rmsnorm_backward_input_kernel<<<row_blocks(n_rows), kRowsPerBlock * kWarp, 0, stream>>>(din, dout, in, weight,
                                                                                            rstd, n_rows, dim, false);
    CUDA_CHECK_LAUNCH();
    param_grads(dweight, nullptr, dout, in, nullptr, rstd, n_rows, dim, stream);
}

void matmul_backward_bias_gpu(float* dbias, const bf16* dout, int n_rows, int out_dim, cudaStream_t stream) {
    param_grads(nullptr, dbias, Rows<const bf16>{dout, out_dim}, Rows<const bf16>{nullptr, 0}, nullptr, nullptr, n_rows,
                out_dim, stream);
}

void layernorm_forward_gpu(bf16* out, float* mean, float* rstd, const bf16* in, const float* weight, const float* bias,
                           int n_rows, int dim, float eps, cudaStream_t stream) {
    layernorm_forward_kernel<<<row_blocks(n_rows), kRowsPerBlock * kWarp, 0, stream>>>(
        out, mean, rstd, in, nullptr, nullptr, weight, bias, n_rows, dim, eps);
    CUDA_CHECK_LAUNCH();
}

void add_layernorm_forward_gpu(bf16* sum, bf16* out, float* mean, float* rstd, const bf16* a, const bf16* b,
                               const float* weight, const float* bias, int n_rows, int dim, float eps,
                               cudaStream_t stream) {
    layernorm_forward_kernel<<<row_blocks(n_rows), kRowsPerBlock * kWarp, 0, stream>>>(out, mean, rstd, a, b, sum,
                                                                                       weight, bias, n_rows, dim, eps);
    CUDA_CHECK_LAUNCH();
}

void layernorm_backward_gpu(bf16* din, float* dweight, float* dbias, const bf16* dout, const bf16* in,
                            const float* weight, const float* mean, const float* rstd, int n_rows, int dim,
                            bool accumulate, cudaStream_t stream) {
    layernorm_backward_input_kernel<<<row_blocks(n_rows), kRowsPerBlock * kWarp, 0, stream>>>(
        din, dout, in, weight, mean, rstd, n_rows, dim, accumulate);
    CUDA_CHECK_LAUNCH();
    param_grads(dweight, dbias, Rows<const bf16>{dout, dim}, Rows<const bf16>{in, dim}, mean, rstd, n_rows, dim, stream);
}

}  // namespace qopt
