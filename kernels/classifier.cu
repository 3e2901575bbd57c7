// The classifier's softmax + cross-entropy + dlogits on the GPU, fused in one kernel that
// reads each row of bf16 logits twice and overwrites it with the gradient. The logits
// themselves come from matmul_forward_gpu (x · embed^T), and dx / d_embed from the two
// matmul backward calls, so the whole head never holds fp32 logits. Math and CPU reference:
// kernels/classifier.hpp (classifier_cpu).
//   loss[n] = logsumexp_{v<V} z[n, v] - z[n, target]
//   dz[n, v] = (softmax(z)[v] - [v == target]) * grad_scale  for v < V, 0 for padded columns
#include "kernels/cuda_common.cuh"
#include "kernels/gpu.hpp"

#include <cfloat>
#include <cstdint>

namespace qopt {

namespace {

constexpr int kThreads = 512;

// Block-wide reduction of (max, sum of exp relative to max) pairs, the online-softmax merge.
__device__ void merge(float& max_a, float& sum_a, float max_b, float sum_b) {
    const float m = fmaxf(max_a, max_b);
    sum_a = (max_a == -FLT_MAX ? 0.0f : sum_a * __expf(max_a - m)) + (max_b == -FLT_MAX ? 0.0f : sum_b * __expf(max_b - m));
    max_a = m;
}

// One block per row. Rows are read as 16-byte chunks of 8 logits (the padded vocabulary is a
// multiple of 8, so rows stay aligned): pass 1 folds each chunk's max and sum of exponentials
// into the running pair, pass 2 writes the gradient chunk by chunk.
__global__ void softmax_cross_entropy_kernel(float* losses, bf16* logits, const int* targets, int vocab_size,
                                             int padded_vocab_size, float grad_scale) {
    const int row = blockIdx.x;
    bf16* z = logits + size_t(row) * padded_vocab_size;
    uint4* chunks = reinterpret_cast<uint4*>(z);
    const int n_chunks = padded_vocab_size / 8;
    float local_max = -FLT_MAX, local_sum = 0.0f;
    for (int c = threadIdx.x; c < n_chunks; c += blockDim.x) {
        const uint4 packed = chunks[c];
        const bf16* values = reinterpret_cast<const bf16*>(&packed);
        float chunk_max = -FLT_MAX;
        const int valid = min(8, vocab_size - c * 8);
        for (int j = 0; j < valid; ++j) chunk_max = fmaxf(chunk_max, __bfloat162float(values[j]));
        if (valid <= 0) continue;
        float chunk_sum = 0.0f;
        for (int j = 0; j < valid; ++j) chunk_sum += __expf(__bfloat162float(values[j]) - chunk_max);
        merge(local_max, local_sum, chunk_max, chunk_sum);
    }
    for (int offset = 16; offset > 0; offset /= 2) {
        const float other_max = __shfl_xor_sync(0xFFFFFFFF, local_max, offset);
        const float other_sum = __shfl_xor_sync(0xFFFFFFFF, local_sum, offset);
        merge(local_max, local_sum, other_max, other_sum);
    }
    __shared__ float warp_max[kThreads / 32], warp_sum[kThreads / 32];
    __shared__ float log_sum;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) warp_max[warp] = local_max, warp_sum[warp] = local_sum;
    __syncthreads();
    const int target = targets[row];
    if (threadIdx.x == 0) {
        float m = -FLT_MAX, s = 0.0f;
        for (int w = 0; w < int(blockDim.x / 32); ++w) merge(m, s, warp_max[w], warp_sum[w]);
        log_sum = m + logf(s);
        losses[row] = log_sum - __bfloat162float(z[target]);
    }
    __syncthreads();
    if (grad_scale == 0.0f) return;
    const float lse = log_sum;
    for (int c = threadIdx.x; c < n_chunks; c += blockDim.x) {
        uint4 packed = chunks[c];
        bf16* values = reinterpret_cast<bf16*>(&packed);
        for (int j = 0; j < 8; ++j) {
            const int v = c * 8 + j;
            float grad = 0.0f;
            if (v < vocab_size)
                grad = (__expf(__bfloat162float(values[j]) - lse) - (v == target ? 1.0f : 0.0f)) * grad_scale;
            values[j] = __float2bfloat16(grad);
        }
        chunks[c] = packed;
    }
}

// Deterministic sum of squares: fixed-size chunks reduced in a fixed tree, then the partials
// summed in order by one block.
constexpr int kNormThreads = 256;
constexpr int kNormBlocks = 1024;

__global__ void sum_squares_partials_kernel(float* partials, const float* values, size_t n) {
    __shared__ float shared[kNormThreads];
    float acc = 0.0f;
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
        acc += values[i] * values[i];
    shared[threadIdx.x] = acc;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) partials[blockIdx.x] = shared[0];
}

__global__ void sum_partials_to_norm_kernel(float* norm, const float* partials, int n_partials) {
    __shared__ double shared[kNormThreads];
    double acc = 0.0;
    for (int i = threadIdx.x; i < n_partials; i += blockDim.x) acc += partials[i];
    shared[threadIdx.x] = acc;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) *norm = float(sqrt(shared[0]));
}

}  // namespace

void softmax_cross_entropy_gpu(float* losses, bf16* logits, const int* targets, int n_rows, int vocab_size,
                               int padded_vocab_size, float grad_scale, cudaStream_t stream) {
    QOPT_CHECK(padded_vocab_size % 8 == 0 && is_aligned(logits, 16),
               "softmax_cross_entropy_gpu: the padded vocabulary must be a multiple of 8 and logits 16-byte aligned");
    QOPT_CHECK(vocab_size <= padded_vocab_size, "softmax_cross_entropy_gpu: vocab_size above padded_vocab_size");
    softmax_cross_entropy_kernel<<<n_rows, kThreads, 0, stream>>>(losses, logits, targets, vocab_size,
                                                                  padded_vocab_size, grad_scale);
    CUDA_CHECK_LAUNCH();
}

void global_norm_gpu(float* norm, const float* values, size_t n, cudaStream_t stream) {
    static DeviceBuffer<float> partials(kNormBlocks);
    sum_squares_partials_kernel<<<kNormBlocks, kNormThreads, 0, stream>>>(partials.data(), values, n);
    CUDA_CHECK_LAUNCH();
    sum_partials_to_norm_kernel<<<1, kNormThreads, 0, stream>>>(norm, partials.data(), kNormBlocks);
    CUDA_CHECK_LAUNCH();
}

}  // namespace qopt
