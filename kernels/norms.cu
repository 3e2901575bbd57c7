// RMSNorm and LayerNorm on the GPU (math and CPU reference: kernels/norms.hpp).
// Forward and input-gradient kernels: one warp per row, fp32 accumulation.
// Parameter gradients are summed deterministically in two stages: blocks of rows write
// per-block partial sums in a fixed order, then one pass adds the blocks in order. Where the
// row fits in registers (dim <= 1024) the backward pass produces the input gradient and the
// partial sums in one read of dout and in (norm_backward_fused_kernel); elsewhere a second
// pass over them does (norm_param_partials_kernel).
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <utility>

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

// ---- Register-resident row kernels (the fast path): a warp holds its whole row in registers,
// read once with 16-byte loads (lane l takes chunks of 8 features l, l+32, ...), so each
// tensor crosses memory once. Used when dim is a multiple of 8, at most 32*8*kMaxChunks, and
// every row is 16-byte aligned; the scalar kernels above handle everything else.
template <int kMaxChunks>
__device__ __forceinline__ void load_row(float (&values)[kMaxChunks][8], const bf16* row, int n_chunks) {
    const int lane = threadIdx.x % kWarp;
#pragma unroll
    for (int k = 0; k < kMaxChunks; ++k) {
        const int c = lane + kWarp * k;
        if (c >= n_chunks) break;
        const uint4 packed = reinterpret_cast<const uint4*>(row)[c];
        const bf16* h = reinterpret_cast<const bf16*>(&packed);
#pragma unroll
        for (int j = 0; j < 8; ++j) values[k][j] = __bfloat162float(h[j]);
    }
}

template <int kMaxChunks>
__device__ __forceinline__ void store_row(bf16* row, const float (&values)[kMaxChunks][8], int n_chunks) {
    const int lane = threadIdx.x % kWarp;
#pragma unroll
    for (int k = 0; k < kMaxChunks; ++k) {
        const int c = lane + kWarp * k;
        if (c >= n_chunks) break;
        uint4 packed;
        bf16* h = reinterpret_cast<bf16*>(&packed);
#pragma unroll
        for (int j = 0; j < 8; ++j) h[j] = __float2bfloat16(values[k][j]);
        reinterpret_cast<uint4*>(row)[c] = packed;
    }
}

// The 8 fp32 parameters (norm gain or bias) of a lane's k-th chunk: two 16-byte loads.
__device__ __forceinline__ void load_params(float (&p)[8], const float* params, int k) {
    const float4* at = reinterpret_cast<const float4*>(params + (threadIdx.x % kWarp + kWarp * k) * 8);
    const float4 low = at[0], high = at[1];
    p[0] = low.x, p[1] = low.y, p[2] = low.z, p[3] = low.w, p[4] = high.x, p[5] = high.y, p[6] = high.z, p[7] = high.w;
}

// RMSNorm forward; residual (may be null, out's stride): out = residual + w x rstd.
template <int kMaxChunks>
__global__ void rmsnorm_forward_rows_kernel(Rows<bf16> out, float* rstd, Rows<const bf16> in, const bf16* residual,
                                            const float* weight, int n_rows, int dim, float eps) {
    const int row = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
    if (row >= n_rows) return;
    const int n_chunks = dim / 8, lane = threadIdx.x % kWarp;
    float x[kMaxChunks][8];
    load_row<kMaxChunks>(x, in.data + size_t(row) * in.stride, n_chunks);
    float sum_sq = 0;
#pragma unroll
    for (int k = 0; k < kMaxChunks; ++k)
        if (lane + kWarp * k < n_chunks)
#pragma unroll
            for (int j = 0; j < 8; ++j) sum_sq += x[k][j] * x[k][j];
    const float r = rsqrtf(warp_sum(sum_sq) / dim + eps);
    if (lane == 0) rstd[row] = r;
    float skip[kMaxChunks][8];
    if (residual) load_row<kMaxChunks>(skip, residual + size_t(row) * out.stride, n_chunks);
#pragma unroll
    for (int k = 0; k < kMaxChunks; ++k)
        if (lane + kWarp * k < n_chunks) {
            float w[8];
            load_params(w, weight, k);
#pragma unroll
            for (int j = 0; j < 8; ++j) x[k][j] = (residual ? skip[k][j] : 0.0f) + w[j] * x[k][j] * r;
        }
    store_row<kMaxChunks>(out.data + size_t(row) * out.stride, x, n_chunks);
}

template <int kMaxChunks>
__global__ void rmsnorm_backward_rows_kernel(Rows<bf16> din, Rows<const bf16> dout, Rows<const bf16> in,
                                             const float* weight, const float* rstd, int n_rows, int dim,
                                             bool accumulate) {
    const int row = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
    if (row >= n_rows) return;
    const int n_chunks = dim / 8, lane = threadIdx.x % kWarp;
    float x[kMaxChunks][8], g[kMaxChunks][8];
    load_row<kMaxChunks>(x, in.data + size_t(row) * in.stride, n_chunks);
    load_row<kMaxChunks>(g, dout.data + size_t(row) * dout.stride, n_chunks);
    const float r = rstd[row];
    float dot = 0;
#pragma unroll
    for (int k = 0; k < kMaxChunks; ++k)
        if (lane + kWarp * k < n_chunks) {
            float w[8];
            load_params(w, weight, k);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                g[k][j] *= w[j];
                dot += g[k][j] * x[k][j];
            }
        }
    const float mean_gx = warp_sum(dot) / dim;
    bf16* dx_row = din.data + size_t(row) * din.stride;
    float previous[kMaxChunks][8];
    if (accumulate) load_row<kMaxChunks>(previous, dx_row, n_chunks);
#pragma unroll
    for (int k = 0; k < kMaxChunks; ++k)
        if (lane + kWarp * k < n_chunks)
#pragma unroll
            for (int j = 0; j < 8; ++j)
                g[k][j] = (accumulate ? previous[k][j] : 0.0f) + r * (g[k][j] - x[k][j] * r * r * mean_gx);
    store_row<kMaxChunks>(dx_row, g, n_chunks);
}

// LayerNorm forward; with in2 the normalised row is bf16(in + in2), stored in sum_out.
template <int kMaxChunks>
__global__ void layernorm_forward_rows_kernel(bf16* out, float* mean, float* rstd, const bf16* in, const bf16* in2,
                                              bf16* sum_out, const float* weight, const float* bias, int n_rows,
                                              int dim, float eps) {
    const int row = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
    if (row >= n_rows) return;
    const int n_chunks = dim / 8, lane = threadIdx.x % kWarp;
    float x[kMaxChunks][8];
    load_row<kMaxChunks>(x, in + size_t(row) * dim, n_chunks);
    if (in2) {
        float other[kMaxChunks][8];
        load_row<kMaxChunks>(other, in2 + size_t(row) * dim, n_chunks);
#pragma unroll
        for (int k = 0; k < kMaxChunks; ++k)
#pragma unroll
            for (int j = 0; j < 8; ++j) x[k][j] = __bfloat162float(__float2bfloat16(x[k][j] + other[k][j]));
        store_row<kMaxChunks>(sum_out + size_t(row) * dim, x, n_chunks);
    }
    float sum = 0;
#pragma unroll
    for (int k = 0; k < kMaxChunks; ++k)
        if (lane + kWarp * k < n_chunks)
#pragma unroll
            for (int j = 0; j < 8; ++j) sum += x[k][j];
    const float m = warp_sum(sum) / dim;
    float var = 0;
#pragma unroll
    for (int k = 0; k < kMaxChunks; ++k)
        if (lane + kWarp * k < n_chunks)
#pragma unroll
            for (int j = 0; j < 8; ++j) var += (x[k][j] - m) * (x[k][j] - m);
    const float s = rsqrtf(warp_sum(var) / dim + eps);
    if (lane == 0) mean[row] = m, rstd[row] = s;
#pragma unroll
    for (int k = 0; k < kMaxChunks; ++k)
        if (lane + kWarp * k < n_chunks) {
            float w[8], b[8];
            load_params(w, weight, k);
            load_params(b, bias, k);
#pragma unroll
            for (int j = 0; j < 8; ++j) x[k][j] = (x[k][j] - m) * s * w[j] + b[j];
        }
    store_row<kMaxChunks>(out + size_t(row) * dim, x, n_chunks);
}

template <int kMaxChunks>
__global__ void layernorm_backward_rows_kernel(bf16* din, const bf16* dout, const bf16* in, const float* weight,
                                               const float* mean, const float* rstd, int n_rows, int dim,
                                               bool accumulate) {
    const int row = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
    if (row >= n_rows) return;
    const int n_chunks = dim / 8, lane = threadIdx.x % kWarp;
    float xh[kMaxChunks][8], g[kMaxChunks][8];
    load_row<kMaxChunks>(xh, in + size_t(row) * dim, n_chunks);
    load_row<kMaxChunks>(g, dout + size_t(row) * dim, n_chunks);
    const float m = mean[row], s = rstd[row];
    float sum_g = 0, sum_gxh = 0;
#pragma unroll
    for (int k = 0; k < kMaxChunks; ++k)
        if (lane + kWarp * k < n_chunks) {
            float w[8];
            load_params(w, weight, k);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                xh[k][j] = (xh[k][j] - m) * s;
                g[k][j] *= w[j];
                sum_g += g[k][j];
                sum_gxh += g[k][j] * xh[k][j];
            }
        }
    const float mean_g = warp_sum(sum_g) / dim, mean_gxh = warp_sum(sum_gxh) / dim;
    bf16* dx_row = din + size_t(row) * dim;
    float previous[kMaxChunks][8];
    if (accumulate) load_row<kMaxChunks>(previous, dx_row, n_chunks);
#pragma unroll
    for (int k = 0; k < kMaxChunks; ++k)
        if (lane + kWarp * k < n_chunks)
#pragma unroll
            for (int j = 0; j < 8; ++j)
                g[k][j] = (accumulate ? previous[k][j] : 0.0f) + s * (g[k][j] - mean_g - xh[k][j] * mean_gxh);
    store_row<kMaxChunks>(dx_row, g, n_chunks);
}

// Rows whose features fit the fast path: chunks of 8 per lane, 3 up to dim 768 (fewer
// registers, more resident warps), 4 up to 1024, 8 up to 2048; 0: no.
int register_chunks(int dim, std::initializer_list<std::pair<const void*, int>> rows, const float* weight,
                    const float* bias = nullptr) {
    if (dim % 8 != 0 || dim > 2048 || !is_aligned(weight, 16) || (bias && !is_aligned(bias, 16))) return 0;
    for (const auto& [data, stride] : rows)
        if (data && (!is_aligned(data, 16) || stride % 8 != 0)) return 0;
    return dim <= 3 * kWarp * 8 ? 3 : dim <= 1024 ? 4 : 8;
}

// launch(std::integral_constant<int, chunks>{}) for chunks 3, 4 or 8; false for any other.
template <typename Launch>
bool with_chunks(int chunks, Launch&& launch) {
    switch (chunks) {
        case 3: launch(std::integral_constant<int, 3>{}); return true;
        case 4: launch(std::integral_constant<int, 4>{}); return true;
        case 8: launch(std::integral_constant<int, 8>{}); return true;
        default: return false;
    }
}

// Partial parameter gradients of one chunk of kRowsPerChunk rows and 32 V columns:
//   rms:   dweight += dy * x * rstd
//   layer: dweight += dy * (x - mean) * rstd, dbias += dy
//   bias of a linear layer (no in): dbias += dy
// Block (32 x kPartialRowsY): lane x owns columns V x .. V x + V - 1 (a warp reads 32 V
// contiguous bf16 per row), row group y takes every kPartialRowsY-th row; the groups are then
// added in a fixed order in shared memory, so the result does not depend on scheduling.
constexpr int kPartialRowsY = 8;

// V = 2 columns (the second only if `whole`), or 4 by one 8-byte load (whole and aligned:
// param_grads checks).
template <int V>
__device__ __forceinline__ void load_columns(float out[V], const bf16* p, bool whole) {
    static_assert(V == 2 || V == 4, "2 or 4 columns per thread");
    if (V == 2) {
        out[0] = __bfloat162float(p[0]);
        out[V - 1] = whole ? __bfloat162float(p[1]) : 0.0f;
        return;
    }
    const uint2 bits = *reinterpret_cast<const uint2*>(p);
    const bf16* values = reinterpret_cast<const bf16*>(&bits);
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = __bfloat162float(values[j]);
}

// V columns per thread (2: any layout; 4: 8-byte loads where rows allow), a block of
// 32 x kPartialRowsY threads covering 32 V columns.
template <int V>
__global__ void norm_param_partials_kernel(float* partial_w, float* partial_b, Rows<const bf16> dout,
                                           Rows<const bf16> in, const float* mean, const float* rstd, int n_rows,
                                           int dim) {
    constexpr int kTile = 32 * V;
    const int column = blockIdx.x * kTile + V * threadIdx.x;
    const int chunk = blockIdx.y;
    const int first = chunk * kRowsPerChunk;
    const int last = min(n_rows, first + kRowsPerChunk);
    const bool whole = column + V <= dim;
    float acc_w[V] = {}, acc_b[V] = {};
    if (column < dim) {
#pragma unroll 4
        for (int n = first + int(threadIdx.y); n < last; n += kPartialRowsY) {
            float dy[V];
            load_columns<V>(dy, dout.data + size_t(n) * dout.stride + column, whole);
#pragma unroll
            for (int j = 0; j < V; ++j) acc_b[j] += dy[j];
            if (partial_w) {
                float x[V];
                load_columns<V>(x, in.data + size_t(n) * in.stride + column, whole);
                const float shift = mean ? mean[n] : 0.0f, scale = rstd[n];
#pragma unroll
                for (int j = 0; j < V; ++j) acc_w[j] += dy[j] * (x[j] - shift) * scale;
            }
        }
    }
    __shared__ float shared_w[kPartialRowsY][kTile], shared_b[kPartialRowsY][kTile];
#pragma unroll
    for (int j = 0; j < V; ++j)
        shared_w[threadIdx.y][V * threadIdx.x + j] = acc_w[j], shared_b[threadIdx.y][V * threadIdx.x + j] = acc_b[j];
    __syncthreads();
    if (threadIdx.y != 0) return;
    for (int j = 0; j < V; ++j) {
        const int c = V * threadIdx.x + j;
        if (blockIdx.x * kTile + c >= dim) continue;
        float sum_w = 0, sum_b = 0;
        for (int y = 0; y < kPartialRowsY; ++y) sum_w += shared_w[y][c], sum_b += shared_b[y][c];
        const size_t at = size_t(chunk) * dim + blockIdx.x * kTile + c;
        if (partial_w) partial_w[at] = sum_w;
        if (partial_b) partial_b[at] = sum_b;
    }
}

// Second stage: target[i] += sum over blocks b of partial[b, i], for up to three (target,
// partial) pairs (blockIdx.y picks one). Thread (x, y) of a 32 x kSumRowsY block adds blocks
// y, y + kSumRowsY, ... of column 32 blockIdx.x + x; the kSumRowsY sums are then added in
// order in shared memory, so the result does not depend on scheduling.
constexpr int kSumRowsY = 16;

struct ColumnSums {
    float* target[3] = {};
    const float* partial[3] = {};
};

__global__ void add_column_sums_kernel(ColumnSums sums, int n_blocks, int dim) {
    const int pair = blockIdx.y;
    const float* partial = pair == 0 ? sums.partial[0] : pair == 1 ? sums.partial[1] : sums.partial[2];
    float* target = pair == 0 ? sums.target[0] : pair == 1 ? sums.target[1] : sums.target[2];
    const int column = blockIdx.x * kWarp + threadIdx.x;
    float acc = 0;
    if (column < dim)
#pragma unroll 4
        for (int b = threadIdx.y; b < n_blocks; b += kSumRowsY) acc += partial[size_t(b) * dim + column];
    __shared__ float rows[kSumRowsY][kWarp];
    rows[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y != 0 || column >= dim) return;
    float sum = 0;
    for (int y = 0; y < kSumRowsY; ++y) sum += rows[y][threadIdx.x];
    target[column] += sum;
}

void add_column_sums(const ColumnSums& sums, int n_pairs, int n_blocks, int dim, cudaStream_t stream) {
    if (n_pairs == 0) return;
    add_column_sums_kernel<<<dim3((dim + kWarp - 1) / kWarp, n_pairs), dim3(kWarp, kSumRowsY), 0, stream>>>(
        sums, n_blocks, dim);
    CUDA_CHECK_LAUNCH();
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
    const dim3 block(32, kPartialRowsY);
    // Vector loads where every row start is aligned for them.
    auto rows_allow = [&](int v) {
        auto fits = [&](Rows<const bf16> rows) {
            return rows.data == nullptr || (is_aligned(rows.data, v * sizeof(bf16)) && rows.stride % v == 0);
        };
        return dim % v == 0 && fits(dout) && fits(in);
    };
    // 8-byte loads: gpt2-124m's 73 launches per step take 3.10 ms instead of 3.19 with 4-byte
    // loads (H100, ncu; 16-byte loads: 3.33 ms, too few blocks for 132 SMs), ~2.5 TB/s.
    if (rows_allow(4))
        norm_param_partials_kernel<4><<<dim3((dim + 127) / 128, n_chunks), block, 0, stream>>>(
            partial_w, partial_b, dout, in, mean, rstd, n_rows, dim);
    else
        norm_param_partials_kernel<2><<<dim3((dim + 63) / 64, n_chunks), block, 0, stream>>>(
            partial_w, partial_b, dout, in, mean, rstd, n_rows, dim);
    CUDA_CHECK_LAUNCH();
    ColumnSums sums;
    int n_pairs = 0;
    if (dweight) sums.target[n_pairs] = dweight, sums.partial[n_pairs++] = partial_w;
    if (dbias) sums.target[n_pairs] = dbias, sums.partial[n_pairs++] = partial_b;
    add_column_sums(sums, n_pairs, n_chunks, dim, stream);
}

// ---- Backward pass in one read (dim <= 1024, the register path's rows): a block of
// kFusedWarps warps owns kFusedRowsPerBlock consecutive rows, warp w rows w, w + kFusedWarps,
// ... in that order. Per row it writes the input gradient (as the row kernels above) and adds
// into its own shared-memory slice:
//   dweight += dy * x_hat         (x_hat = (x - mean) rstd for LayerNorm, x rstd for RMSNorm)
//   dbias   += dy                 (LayerNorm)
//   dbranch += bf16(din)          (optional: the column sums of the updated din, i.e. the
//                                  gradient of the bias of the linear layer whose output was
//                                  added into the stream din is the gradient of)
// The slices are added over warps in order into one partial row per block, and the blocks in
// order by add_column_sums: deterministic. Shared layout per warp and quantity: feature
// 8 c + j at j * n_chunks + c, so a warp's lanes touch consecutive words (no bank conflicts).
constexpr int kFusedWarps = 8;
constexpr int kFusedRowsPerBlock = 128;  // gpt2-124m, B x T = 32768: 256 blocks, one wave at 2 per SM

struct NormBackwardRows {
    Rows<bf16> din;
    Rows<const bf16> dout, in;
    const float* weight;
    const float* mean;  // null: RMSNorm
    const float* rstd;
    int n_rows, dim;
    bool accumulate;
};

__device__ __forceinline__ void add_to_slice(float* slice, int n_chunks, int chunk, const float (&v)[8]) {
#pragma unroll
    for (int j = 0; j < 8; ++j) slice[j * n_chunks + chunk] += v[j];
}

// Quantities: 0 dweight, 1 dbias (LayerNorm), 2 dbranch (optional); partial[q] null when off.
template <int kMaxChunks>
__global__ void __launch_bounds__(kFusedWarps * kWarp, 2)
    norm_backward_fused_kernel(NormBackwardRows a, float* partial_w, float* partial_b, float* partial_branch) {
    extern __shared__ float slices[];  // [quantity in use][kFusedWarps][dim]
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    const int dim = a.dim, n_chunks = dim / 8;
    // This warp's slice of each quantity in use (null when off).
    int used = 0;
    auto slice_of = [&](const float* partial) {
        return partial ? slices + size_t(used++ * kFusedWarps + warp) * dim : nullptr;
    };
    float* const slice_w = slice_of(partial_w);
    float* const slice_b = slice_of(partial_b);
    float* const slice_branch = slice_of(partial_branch);
    for (float* slice : {slice_w, slice_b, slice_branch})
        if (slice)
            for (int i = lane; i < dim; i += kWarp) slice[i] = 0.0f;
    __syncwarp();  // the lanes then add into words others zeroed

    const int first = blockIdx.x * kFusedRowsPerBlock, last = min(a.n_rows, first + kFusedRowsPerBlock);
    for (int row = first + warp; row < last; row += kFusedWarps) {
        float x[kMaxChunks][8], g[kMaxChunks][8];
        load_row<kMaxChunks>(x, a.in.data + size_t(row) * a.in.stride, n_chunks);
        load_row<kMaxChunks>(g, a.dout.data + size_t(row) * a.dout.stride, n_chunks);
        const float m = a.mean ? a.mean[row] : 0.0f, s = a.rstd[row];
        float sum_g = 0, sum_gxh = 0;
#pragma unroll
        for (int k = 0; k < kMaxChunks; ++k) {
            const int c = lane + kWarp * k;
            if (c >= n_chunks) break;
            float w[8], xh[8];
            load_params(w, a.weight, k);
#pragma unroll
            for (int j = 0; j < 8; ++j) xh[j] = (x[k][j] - m) * s;
            if (slice_w) {
                float dw[8];
#pragma unroll
                for (int j = 0; j < 8; ++j) dw[j] = g[k][j] * xh[j];
                add_to_slice(slice_w, n_chunks, c, dw);
            }
            if (slice_b) add_to_slice(slice_b, n_chunks, c, g[k]);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                g[k][j] *= w[j];
                sum_g += g[k][j];
                sum_gxh += g[k][j] * (a.mean ? xh[j] : x[k][j]);
            }
        }
        bf16* dx_row = a.din.data + size_t(row) * a.din.stride;
        float previous[kMaxChunks][8];
        if (a.accumulate) load_row<kMaxChunks>(previous, dx_row, n_chunks);
        // LayerNorm: dx = s (g - mean(g) - x_hat mean(g x_hat)); RMSNorm: dx = s (g - x s^2 mean(g x)).
        const float mean_g = a.mean ? warp_sum(sum_g) / dim : 0.0f, mean_gxh = warp_sum(sum_gxh) / dim;
#pragma unroll
        for (int k = 0; k < kMaxChunks; ++k) {
            const int c = lane + kWarp * k;
            if (c >= n_chunks) break;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const float correction = a.mean ? mean_g + (x[k][j] - m) * s * mean_gxh : x[k][j] * s * s * mean_gxh;
                g[k][j] = (a.accumulate ? previous[k][j] : 0.0f) + s * (g[k][j] - correction);
                g[k][j] = __bfloat162float(__float2bfloat16(g[k][j]));  // as stored
            }
            if (slice_branch) add_to_slice(slice_branch, n_chunks, c, g[k]);
        }
        store_row<kMaxChunks>(dx_row, g, n_chunks);
    }
    __syncthreads();
    // One partial row per block and quantity: the warps' slices added in warp order.
    auto reduce = [&](const float* own_slice, float* partial) {
        if (!own_slice) return;
        const float* first_slice = own_slice - size_t(warp) * dim;
        for (int column = threadIdx.x; column < dim; column += blockDim.x) {
            const int at = (column % 8) * n_chunks + column / 8;
            float sum = 0;
            for (int w = 0; w < kFusedWarps; ++w) sum += first_slice[size_t(w) * dim + at];
            partial[size_t(blockIdx.x) * dim + column] = sum;
        }
    };
    reduce(slice_w, partial_w);
    reduce(slice_b, partial_b);
    reduce(slice_branch, partial_branch);
}

// The fused backward where the rows allow it (returns false otherwise): din written or
// accumulated, dweight / dbias / dbranch (each may be null) accumulated.
bool norm_backward_fused(const NormBackwardRows& a, float* dweight, float* dbias, float* dbranch, cudaStream_t stream) {
    const int chunks = register_chunks(a.dim, {{a.din.data, a.din.stride}, {a.dout.data, a.dout.stride},
                                               {a.in.data, a.in.stride}}, a.weight);
    if (chunks != 3 && chunks != 4) return false;
    const int n_blocks = (a.n_rows + kFusedRowsPerBlock - 1) / kFusedRowsPerBlock;
    float* targets[3] = {dweight, dbias, dbranch};
    float* partials[3] = {};
    int used = 0;
    ColumnSums sums;
    for (int q = 0; q < 3; ++q) if (targets[q]) ++used;
    float* scratch = partials_scratch(size_t(std::max(used, 1)) * n_blocks * a.dim);
    for (int q = 0, k = 0; q < 3; ++q)
        if (targets[q]) {
            partials[q] = scratch + size_t(k) * n_blocks * a.dim;
            sums.target[k] = targets[q], sums.partial[k] = partials[q];
            ++k;
        }
    // Up to 3 quantities x 8 warps x 1024 features x 4 bytes = 96 KB of shared memory.
    static const bool opted_in = [] {
        for (auto kernel : {norm_backward_fused_kernel<3>, norm_backward_fused_kernel<4>})
            CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            3 * kFusedWarps * 1024 * int(sizeof(float))));
        return true;
    }();
    (void)opted_in;
    const size_t shared = size_t(used) * kFusedWarps * a.dim * sizeof(float);
    auto kernel = chunks == 3 ? norm_backward_fused_kernel<3> : norm_backward_fused_kernel<4>;
    kernel<<<n_blocks, kFusedWarps * kWarp, shared, stream>>>(a, partials[0], partials[1], partials[2]);
    CUDA_CHECK_LAUNCH();
    add_column_sums(sums, used, n_blocks, a.dim, stream);
    return true;
}

constexpr int kRowsPerBlock = 8;  // warps per block in the row kernels
int row_blocks(int n_rows) { return (n_rows + kRowsPerBlock - 1) / kRowsPerBlock; }

}  // namespace

namespace {

void rmsnorm_forward_any(Rows<bf16> out, float* rstd, Rows<const bf16> in, const bf16* residual, const float* weight,
                         int n_rows, int dim, float eps, cudaStream_t stream) {
    const dim3 grid(row_blocks(n_rows)), block(kRowsPerBlock * kWarp);
    const int chunks =
        register_chunks(dim, {{out.data, out.stride}, {in.data, in.stride}, {residual, out.stride}}, weight);
    if (!with_chunks(chunks, [&](auto c) {
            rmsnorm_forward_rows_kernel<decltype(c)::value>
                <<<grid, block, 0, stream>>>(out, rstd, in, residual, weight, n_rows, dim, eps);
        }))
        rmsnorm_forward_kernel<<<grid, block, 0, stream>>>(out, rstd, in, residual, weight, n_rows, dim, eps);
    CUDA_CHECK_LAUNCH();
}

}  // namespace

void rmsnorm_forward_gpu(Rows<bf16> out, float* rstd, Rows<const bf16> in, const float* weight, int n_rows, int dim,
                         float eps, cudaStream_t stream) {
    rmsnorm_forward_any(out, rstd, in, nullptr, weight, n_rows, dim, eps, stream);
}

void rmsnorm_add_forward_gpu(bf16* out, float* rstd, const bf16* residual, const bf16* in, const float* weight,
                             int n_rows, int dim, float eps, cudaStream_t stream) {
    rmsnorm_forward_any(Rows<bf16>{out, dim}, rstd, Rows<const bf16>{in, dim}, residual, weight, n_rows, dim, eps,
                        stream);
}

void rmsnorm_backward_gpu(Rows<bf16> din, float* dweight, Rows<const bf16> dout, Rows<const bf16> in,
                          const float* weight, const float* rstd, int n_rows, int dim, cudaStream_t stream) {
    if (norm_backward_fused({din, dout, in, weight, nullptr, rstd, n_rows, dim, false}, dweight, nullptr, nullptr,
                            stream))
        return;
    // Two passes: rows above 1024 features (8 chunks per lane) or off the register path.
    const dim3 grid(row_blocks(n_rows)), block(kRowsPerBlock * kWarp);
    const int chunks =
        register_chunks(dim, {{din.data, din.stride}, {dout.data, dout.stride}, {in.data, in.stride}}, weight);
    if (chunks == 8) rmsnorm_backward_rows_kernel<8><<<grid, block, 0, stream>>>(din, dout, in, weight, rstd, n_rows, dim, false);
    else rmsnorm_backward_input_kernel<<<grid, block, 0, stream>>>(din, dout, in, weight, rstd, n_rows, dim, false);
    CUDA_CHECK_LAUNCH();
    param_grads(dweight, nullptr, dout, in, nullptr, rstd, n_rows, dim, stream);
}

void matmul_backward_bias_gpu(float* dbias, const bf16* dout, int n_rows, int out_dim, cudaStream_t stream) {
    param_grads(nullptr, dbias, Rows<const bf16>{dout, out_dim}, Rows<const bf16>{nullptr, 0}, nullptr, nullptr, n_rows,
                out_dim, stream);
}

void add_layernorm_forward_gpu(bf16* sum, bf16* out, float* mean, float* rstd, const bf16* a, const bf16* b,
                               const float* weight, const float* bias, int n_rows, int dim, float eps,
                               cudaStream_t stream) {
    const dim3 grid(row_blocks(n_rows)), block(kRowsPerBlock * kWarp);
    const int chunks = register_chunks(dim, {{out, dim}, {a, dim}, {b, dim}, {sum, dim}}, weight, bias);
    if (!with_chunks(chunks, [&](auto c) {
            layernorm_forward_rows_kernel<decltype(c)::value>
                <<<grid, block, 0, stream>>>(out, mean, rstd, a, b, sum, weight, bias, n_rows, dim, eps);
        }))
        layernorm_forward_kernel<<<grid, block, 0, stream>>>(out, mean, rstd, a, b, sum, weight, bias, n_rows, dim, eps);
    CUDA_CHECK_LAUNCH();
}

void layernorm_forward_gpu(bf16* out, float* mean, float* rstd, const bf16* in, const float* weight, const float* bias,
                           int n_rows, int dim, float eps, cudaStream_t stream) {
    add_layernorm_forward_gpu(nullptr, out, mean, rstd, in, nullptr, weight, bias, n_rows, dim, eps, stream);
}

void layernorm_backward_gpu(bf16* din, float* dweight, float* dbias, const bf16* dout, const bf16* in,
                            const float* weight, const float* mean, const float* rstd, int n_rows, int dim,
                            bool accumulate, float* dbranch_bias, cudaStream_t stream) {
    if (norm_backward_fused({{din, dim}, {dout, dim}, {in, dim}, weight, mean, rstd, n_rows, dim, accumulate}, dweight,
                            dbias, dbranch_bias, stream))
        return;
    // Two passes: rows above 1024 features (8 chunks per lane) or off the register path.
    const dim3 grid(row_blocks(n_rows)), block(kRowsPerBlock * kWarp);
    const int chunks = register_chunks(dim, {{din, dim}, {dout, dim}, {in, dim}}, weight);
    if (chunks == 8)
        layernorm_backward_rows_kernel<8><<<grid, block, 0, stream>>>(din, dout, in, weight, mean, rstd, n_rows, dim, accumulate);
    else
        layernorm_backward_input_kernel<<<grid, block, 0, stream>>>(din, dout, in, weight, mean, rstd, n_rows, dim, accumulate);
    CUDA_CHECK_LAUNCH();
    param_grads(dweight, dbias, Rows<const bf16>{dout, dim}, Rows<const bf16>{in, dim}, mean, rstd, n_rows, dim, stream);
    if (dbranch_bias) matmul_backward_bias_gpu(dbranch_bias, din, n_rows, dim, stream);
}

}  // namespace qopt
