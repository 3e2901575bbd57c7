// Pieces shared by the two families of causal flash-attention kernels: the portable ones on
// mma.sync (kernels/attention.cu, any GPU from sm_80) and the Hopper ones on wgmma
// (kernels/attention_wgmma.cu, sm_90a). Both hold a tile of scores in the same register layout
// (the C fragment of kernels/mma.cuh: lane l has rows l/4 and l/4 + 8 of its warp's 16, columns
// 8 nt + 2 (l%4) (+1)), so masking, the online softmax and the stores are written once here.
// Math: kernels/attention.hpp (CPU reference) and the comment at the top of attention.cu.
#pragma once
#include <cstdint>

#include "kernels/gpu.hpp"
#include "kernels/mma.cuh"

namespace qopt {
namespace flash {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct AttentionArgs {
    Rows<const bf16> q, k, v;
    int batch, seq_len, n_heads;
    float scale;  // 1 / sqrt(head_dim)
};

// Pointer to head h of batch b's first row.
template <typename T>
__device__ __forceinline__ T* head_base(Rows<T> rows, int b, int h, int seq_len, int head_dim) {
    return rows.data + size_t(b) * seq_len * rows.stride + size_t(h) * head_dim;
}

// Double buffering: before computing on tile i, issue the copy of tile i+1 (if any) into the
// other buffer, then wait only for tile i's group.
__device__ __forceinline__ void wait_current_tile(bool next_issued) {
    if (next_issued) cp_async_wait<1>();
    else cp_async_wait<0>();
}

template <int N>
__device__ __forceinline__ void zero(float acc[][4]) {
#pragma unroll
    for (int i = 0; i < N / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
}

// A C-fragment tile (16 x N, fp32) as A fragments (16 x N, bf16) for the next product.
template <int N>
__device__ __forceinline__ void to_a_fragments(uint32_t a[][4], const float c[][4]) {
#pragma unroll
    for (int ks = 0; ks < N / 16; ++ks) {
        a[ks][0] = pack_bf16x2(c[2 * ks][0], c[2 * ks][1]);
        a[ks][1] = pack_bf16x2(c[2 * ks][2], c[2 * ks][3]);
        a[ks][2] = pack_bf16x2(c[2 * ks + 1][0], c[2 * ks + 1][1]);
        a[ks][3] = pack_bf16x2(c[2 * ks + 1][2], c[2 * ks + 1][3]);
    }
}

// 2^x by the hardware's approximate exp2 (the instruction exp2f uses), results below the
// smallest normal float flushed to zero, which spares exp2f's rescaling around it.
__device__ __forceinline__ float fast_exp2(float x) {
    float result;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(result) : "f"(x));
    return result;
}

// On the diagonal tile (keys first_key ..) of a queries x keys tile, entries whose key comes
// after the lane's rows (row0, row0 + 8) or lies past the sequence become `value` (-inf for
// scores, 0 for probabilities). Off the diagonal every key precedes every row and lies inside
// the sequence: nothing to mask there, and the kernels skip this.
template <int N>
__device__ __forceinline__ void mask_scores(float s[][4], int row0, int first_key, int seq_len, float value) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int row = row0 + 8 * (e / 2), key = first_key + nt * 8 + 2 * (lane % 4) + e % 2;
            if (key > row || key >= seq_len) s[nt][e] = value;
        }
}

// Online softmax over one tile of raw scores s = q . k: the running max m (raw units) moves to
// cover the tile, what o and row_sum accumulated under the old max is rescaled by
// 2^(scale_log2 (m_old - m_new)), and s becomes 2^(scale_log2 s - scale_log2 m) — one FFMA and
// one exp2 per score — ready to multiply V. scale_log2 = log2(e) / sqrt(head_dim).
template <int N, int D>
__device__ __forceinline__ void online_softmax_update(float s[][4], float o[][4], float row_max[2], float row_sum[2],
                                                      float scale_log2) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        float tile_max = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < N / 8; ++nt) tile_max = fmaxf(tile_max, fmaxf(s[nt][2 * half], s[nt][2 * half + 1]));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xFFFFFFFF, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xFFFFFFFF, tile_max, 2));
        const float new_max = fmaxf(row_max[half], tile_max);
        const float reference = new_max == -INFINITY ? 0.0f : new_max * scale_log2;
        const float correction = fast_exp2(row_max[half] * scale_log2 - reference);
        row_max[half] = new_max;
        float tile_sum = 0.0f;
#pragma unroll
        for (int nt = 0; nt < N / 8; ++nt) {
            s[nt][2 * half] = fast_exp2(fmaf(s[nt][2 * half], scale_log2, -reference));
            s[nt][2 * half + 1] = fast_exp2(fmaf(s[nt][2 * half + 1], scale_log2, -reference));
            tile_sum += s[nt][2 * half] + s[nt][2 * half + 1];
        }
        row_sum[half] = row_sum[half] * correction + tile_sum;
#pragma unroll
        for (int nt = 0; nt < D / 8; ++nt) o[nt][2 * half] *= correction, o[nt][2 * half + 1] *= correction;
    }
}

// Writes a warp's 16 x D fp32 tile (rows first_row + l/4 (+8)) times `scale` as bf16.
template <int D>
__device__ __forceinline__ void store_rows(bf16* head, int stride, int first_row, int seq_len, const float acc[][4],
                                           float scale0, float scale1) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = first_row + lane / 4 + 8 * half;
        if (row >= seq_len) continue;
        const float scale = half ? scale1 : scale0;
        bf16* out = head + size_t(row) * stride + 2 * (lane % 4);
#pragma unroll
        for (int nt = 0; nt < D / 8; ++nt)
            *reinterpret_cast<uint32_t*>(out + nt * 8) =
                pack_bf16x2(acc[nt][2 * half] * scale, acc[nt][2 * half + 1] * scale);
    }
}

// End of the forward pass for a warp's 16 rows (first_row ..): the row sums are completed
// across the quad, lse = ln(sum) + scale max (natural log) saved, out = o / sum stored.
template <int D>
__device__ __forceinline__ void finish_forward_rows(Rows<bf16> out, float* lse_bh, const AttentionArgs& args, int b,
                                                    int h, int first_row, const float o[][4], const float row_max[2],
                                                    const float row_sum[2], float scale_log2) {
    const int lane = threadIdx.x % 32, T = args.seq_len;
    float inverse[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        float total = row_sum[half];
        total += __shfl_xor_sync(0xFFFFFFFF, total, 1);
        total += __shfl_xor_sync(0xFFFFFFFF, total, 2);
        inverse[half] = 1.0f / total;
        const int row = first_row + lane / 4 + 8 * half;
        if (lane % 4 == 0 && row < T) lse_bh[row] = (row_max[half] * scale_log2 + log2f(total)) * kLn2;
    }
    store_rows<D>(head_base(out, b, h, T, D), out.stride, first_row, T, o, inverse[0], inverse[1]);
}

// The backward's dK/dV and dQ kernels read the same inputs and write disjoint outputs: the dQ
// kernel runs on a second stream beside `stream`, so each fills the SMs the other's last wave
// leaves idle. fork_side_stream makes that stream (one per device, created once) wait for all
// work issued on `stream` and returns it; join_side_stream makes `stream` wait for it.
cudaStream_t fork_side_stream(cudaStream_t stream);
void join_side_stream(cudaStream_t stream);

// The Hopper kernels (kernels/attention_wgmma.cu), for head_dim 64 and 128. Available when the
// build targets sm_90a (the Makefile then defines QOPT_WGMMA) and the GPU is an sm_90 one.
bool wgmma_kernels_available(int head_dim);
void attention_forward_wgmma(Rows<bf16> out, float* lse, const AttentionArgs& args, int head_dim,
                             cudaStream_t stream);
void attention_backward_wgmma(Rows<bf16> dq, Rows<bf16> dk, Rows<bf16> dv, Rows<const bf16> dout, const float* lse,
                              const float* delta, const AttentionArgs& args, int head_dim, cudaStream_t stream);

}  // namespace flash
}  // namespace qopt
