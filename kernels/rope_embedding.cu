// RoPE and token/position embeddings on the GPU. Math and CPU references: kernels/rope.hpp
// and kernels/embedding.hpp.
//
// RoPE uses a cos/sin table computed on the host in double (rope_angles), so the GPU
// rotates by exactly the reference's angles.
//
// The embedding backward is deterministic without atomics: the host groups the batch's
// positions by token id (TokenBuckets, positions in ascending order); one block per distinct
// token sums that token's gradient rows in that order.
#include <cstdint>

#include "kernels/cuda_common.cuh"
#include "kernels/gpu.hpp"

namespace qopt {

namespace {

__global__ void rope_kernel(bf16* out, const bf16* in, const float* cos_table, const float* sin_table, int n_rows,
                            int seq_len, int n_heads, int head_dim, float direction) {
    const int half = head_dim / 2;
    const size_t pairs = size_t(n_rows) * n_heads * half;
    for (size_t p = blockIdx.x * size_t(blockDim.x) + threadIdx.x; p < pairs; p += size_t(gridDim.x) * blockDim.x) {
        const int i = int(p % half);
        const size_t row_head = p / half;
        const int row = int(row_head / n_heads), head = int(row_head % n_heads);
        const int t = row % seq_len;
        const size_t at = size_t(row) * n_heads * head_dim + size_t(head) * head_dim + 2 * i;
        const float c = cos_table[t * half + i], s = direction * sin_table[t * half + i];
        const float x0 = __bfloat162float(in[at]), x1 = __bfloat162float(in[at + 1]);
        out[at] = __float2bfloat16(x0 * c - x1 * s);
        out[at + 1] = __float2bfloat16(x0 * s + x1 * c);
    }
}

// The same rotation, 8 features (4 pairs) per step with 16-byte loads: for head_dim a multiple
// of 8, a chunk never straddles heads and its 4 angles are consecutive in the tables.
__global__ void rope_chunks_kernel(bf16* out, const bf16* in, const float* cos_table, const float* sin_table,
                                   int n_rows, int seq_len, int n_heads, int head_dim, float direction) {
    const int half = head_dim / 2, chunks_per_row = n_heads * head_dim / 8;
    const size_t chunks = size_t(n_rows) * chunks_per_row;
    for (size_t c = blockIdx.x * size_t(blockDim.x) + threadIdx.x; c < chunks; c += size_t(gridDim.x) * blockDim.x) {
        const int row = int(c / chunks_per_row);
        const int first_pair = (int(c % chunks_per_row) * 8 % head_dim) / 2;
        const int t = row % seq_len;
        const float4 cosines = *reinterpret_cast<const float4*>(cos_table + t * half + first_pair);
        const float4 sines = *reinterpret_cast<const float4*>(sin_table + t * half + first_pair);
        const float cs[4] = {cosines.x, cosines.y, cosines.z, cosines.w};
        const float sn[4] = {sines.x, sines.y, sines.z, sines.w};
        const uint4 packed = reinterpret_cast<const uint4*>(in)[c];
        const bf16* x = reinterpret_cast<const bf16*>(&packed);
        uint4 result;
        bf16* y = reinterpret_cast<bf16*>(&result);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const float x0 = __bfloat162float(x[2 * k]), x1 = __bfloat162float(x[2 * k + 1]), s = direction * sn[k];
            y[2 * k] = __float2bfloat16(x0 * cs[k] - x1 * s);
            y[2 * k + 1] = __float2bfloat16(x0 * s + x1 * cs[k]);
        }
        reinterpret_cast<uint4*>(out)[c] = result;
    }
}

void launch_rope(bf16* out, const bf16* in, const float* cos_table, const float* sin_table, int n_rows, int seq_len,
                 int n_heads, int head_dim, float direction, cudaStream_t stream) {
    if (head_dim % 8 == 0 && is_aligned(out, 16) && is_aligned(in, 16) && is_aligned(cos_table, 16) &&
        is_aligned(sin_table, 16)) {
        rope_chunks_kernel<<<grid_for(size_t(n_rows) * n_heads * head_dim / 8), 256, 0, stream>>>(
            out, in, cos_table, sin_table, n_rows, seq_len, n_heads, head_dim, direction);
    } else {
        rope_kernel<<<grid_for(size_t(n_rows) * n_heads * head_dim / 2), 256, 0, stream>>>(
            out, in, cos_table, sin_table, n_rows, seq_len, n_heads, head_dim, direction);
    }
    CUDA_CHECK_LAUNCH();
}

__global__ void embedding_forward_kernel(bf16* out, const int* tokens, const bf16* embed, const bf16* pos_embed,
                                         int n_rows, int seq_len, int dim) {
    const size_t total = size_t(n_rows) * dim;
    for (size_t e = blockIdx.x * size_t(blockDim.x) + threadIdx.x; e < total; e += size_t(gridDim.x) * blockDim.x) {
        const int row = int(e / dim), c = int(e % dim);
        float v = __bfloat162float(embed[size_t(tokens[row]) * dim + c]);
        if (pos_embed) v += __bfloat162float(pos_embed[size_t(row % seq_len) * dim + c]);
        out[e] = __float2bfloat16(v);
    }
}

// Block b: distinct token bucket_tokens[b]; threads stride over channels.
__global__ void embedding_backward_kernel(float* d_embed, const bf16* dout, const int* bucket_tokens,
                                          const int* bucket_offsets, const int* bucket_positions, int dim) {
    const int bucket = blockIdx.x;
    const int first = bucket_offsets[bucket], last = bucket_offsets[bucket + 1];
    float* target = d_embed + size_t(bucket_tokens[bucket]) * dim;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        float acc = 0;
        for (int k = first; k < last; ++k) acc += __bfloat162float(dout[size_t(bucket_positions[k]) * dim + c]);
        target[c] += acc;
    }
}

// Thread per (position t, channel c): sums the batch's rows b*T + t in order of b.
__global__ void position_backward_kernel(float* d_pos, const bf16* dout, int n_rows, int seq_len, int dim) {
    const size_t total = size_t(seq_len) * dim;
    for (size_t e = blockIdx.x * size_t(blockDim.x) + threadIdx.x; e < total; e += size_t(gridDim.x) * blockDim.x) {
        const int t = int(e / dim), c = int(e % dim);
        float acc = 0;
        for (int row = t; row < n_rows; row += seq_len) acc += __bfloat162float(dout[size_t(row) * dim + c]);
        d_pos[e] += acc;
    }
}


}  // namespace

TokenBuckets build_token_buckets(const int* tokens, int n_rows, int vocab_size) {
    TokenBuckets buckets;
    std::vector<int> counts(size_t(vocab_size), 0);
    for (int n = 0; n < n_rows; ++n) ++counts[size_t(tokens[n])];
    std::vector<int> start(size_t(vocab_size), 0);
    buckets.offsets.push_back(0);
    for (int v = 0; v < vocab_size; ++v) {
        if (!counts[size_t(v)]) continue;
        start[size_t(v)] = buckets.offsets.back();
        buckets.tokens.push_back(v);
        buckets.offsets.push_back(buckets.offsets.back() + counts[size_t(v)]);
    }
    buckets.positions.resize(size_t(n_rows));
    for (int n = 0; n < n_rows; ++n) buckets.positions[size_t(start[size_t(tokens[n])]++)] = n;
    return buckets;
}

void rope_forward_gpu(bf16* out, const bf16* in, const float* cos_table, const float* sin_table, int n_rows,
                      int seq_len, int n_heads, int head_dim, cudaStream_t stream) {
    launch_rope(out, in, cos_table, sin_table, n_rows, seq_len, n_heads, head_dim, 1.0f, stream);
}

void rope_backward_gpu(bf16* din, const bf16* dout, const float* cos_table, const float* sin_table, int n_rows,
                       int seq_len, int n_heads, int head_dim, cudaStream_t stream) {
    // The inverse rotation: the same kernel with the angle negated.
    launch_rope(din, dout, cos_table, sin_table, n_rows, seq_len, n_heads, head_dim, -1.0f, stream);
}

void embedding_forward_gpu(bf16* out, const int* tokens, const bf16* embed, const bf16* pos_embed, int n_rows,
                           int seq_len, int dim, cudaStream_t stream) {
    embedding_forward_kernel<<<grid_for(size_t(n_rows) * dim), 256, 0, stream>>>(out, tokens, embed, pos_embed,
                                                                                  n_rows, seq_len, dim);
    CUDA_CHECK_LAUNCH();
}

void embedding_backward_gpu(float* d_embed, float* d_pos_embed, const bf16* dout, const int* bucket_tokens,
                            const int* bucket_offsets, const int* bucket_positions, int n_buckets, int n_rows,
                            int seq_len, int dim, cudaStream_t stream) {
    if (n_buckets > 0) {
        embedding_backward_kernel<<<n_buckets, 256, 0, stream>>>(d_embed, dout, bucket_tokens, bucket_offsets,
                                                                 bucket_positions, dim);
        CUDA_CHECK_LAUNCH();
    }
    if (d_pos_embed) {
        position_backward_kernel<<<grid_for(size_t(seq_len) * dim), 256, 0, stream>>>(d_pos_embed, dout, n_rows,
                                                                                       seq_len, dim);
        CUDA_CHECK_LAUNCH();
    }
}

}  // namespace qopt
