// Causal flash attention on tensor cores (mma.sync m16n8k16, bf16 in, fp32 accumulate);
// head_dim 16, 32, 64 or 128 (the paper's presets use 64 and 128, the test presets 16 and 32).
// Math and CPU reference: kernels/attention.hpp. Scores never leave the chip: the forward
// pass keeps a running row max m and row sum l (online softmax) and saves only
//   lse[t] = log sum_s exp(scale * q_t . k_s)        (natural log, fp32, [B, H, T])
// from which the backward pass recomputes P = exp(scale * S - lse) tile by tile:
//   delta[t] = dout_t . out_t       (= rowsum(P * dP), one small kernel)
//   dS = P * (dP - delta),  dP = dout V^T
//   dV = P^T dout,  dK = scale * dS^T Q      (kernel 1: a block owns 64 keys)
//   dQ = scale * dS K                        (kernel 2: a block owns 64 queries)
// Splitting dQ from dK/dV recomputes P once more but needs no atomics, so gradients are
// bitwise reproducible.
//
// Work layout: blocks of 4 warps; each warp owns 16 rows (queries in the forward and dQ
// kernels, keys in the dK/dV kernel) and the full head dimension, so row statistics stay in
// the warp (a quad of 4 lanes shares each row). Tiles are copied to shared memory with
// cp.async (rows past the sequence end are zero-filled and masked), double-buffered so the
// next tile streams in while the current one is multiplied, and read with ldmatrix.
//
// Fragment layouts: kernels/mma.cuh. A C fragment of scores therefore turns into an A
// fragment of probabilities in registers.
#include <cfloat>
#include <cstdint>

#include "kernels/attention_tiles.cuh"
#include "kernels/cuda_common.cuh"
#include "kernels/gpu.hpp"
#include "kernels/mma.cuh"
#include "kernels/side_stream.hpp"

namespace qopt {
namespace flash {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTileRows = 64;  // rows of a block tile (16 per warp)
constexpr int kPad = 8;        // bf16 of padding per shared-memory row: ldmatrix without bank conflicts
// Copies rows first_row .. first_row+ROWS-1 (head slice of D columns) of a strided activation
// into a padded shared tile; rows at or past seq_len become zeros.
template <int ROWS, int D>
__device__ void load_tile(bf16* tile, const bf16* head_base, int stride, int first_row, int seq_len) {
    constexpr int kChunks = D / 8;  // 16-byte pieces per row
    for (int c = threadIdx.x; c < ROWS * kChunks; c += kThreads) {
        const int r = c / kChunks, col = (c % kChunks) * 8;
        const bool valid = first_row + r < seq_len;
        const bf16* source = head_base + size_t(valid ? first_row + r : 0) * stride + col;
        cp_async_16(tile + r * (D + kPad) + col, source, valid);
    }
}

// acc (16 x N) += A (16 x K, row-major in shared memory at a) * B^T, B (N x K) row-major at b.
template <int K, int N>
__device__ __forceinline__ void warp_mma_abt(float acc[][4], const bf16* a, int a_pitch, const bf16* b, int b_pitch) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int ks = 0; ks < K / 16; ++ks) {
        uint32_t a_fragment[4];
        ldmatrix_x4(a_fragment, a + (lane % 16) * a_pitch + ks * 16 + (lane / 16) * 8);
#pragma unroll
        for (int np = 0; np < N / 16; ++np) {
            uint32_t b_fragment[4];
            ldmatrix_x4(b_fragment, b + (np * 16 + (lane / 16) * 8 + lane % 8) * b_pitch + ks * 16 + ((lane / 8) % 2) * 8);
            mma_16x8x16(acc[2 * np], a_fragment, b_fragment[0], b_fragment[1]);
            mma_16x8x16(acc[2 * np + 1], a_fragment, b_fragment[2], b_fragment[3]);
        }
    }
}

// A (16 x K, row-major in shared memory) as register fragments, for reuse across tiles.
template <int K>
__device__ __forceinline__ void load_a_fragments(uint32_t a[][4], const bf16* tile, int pitch) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int ks = 0; ks < K / 16; ++ks) ldmatrix_x4(a[ks], tile + (lane % 16) * pitch + ks * 16 + (lane / 16) * 8);
}

// acc (16 x N) += A (16 x K, register fragments) * B^T, B (N x K) row-major at b.
template <int K, int N>
__device__ __forceinline__ void warp_mma_rbt(float acc[][4], const uint32_t a[][4], const bf16* b, int b_pitch) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int ks = 0; ks < K / 16; ++ks)
#pragma unroll
        for (int np = 0; np < N / 16; ++np) {
            uint32_t b_fragment[4];
            ldmatrix_x4(b_fragment, b + (np * 16 + (lane / 16) * 8 + lane % 8) * b_pitch + ks * 16 + ((lane / 8) % 2) * 8);
            mma_16x8x16(acc[2 * np], a[ks], b_fragment[0], b_fragment[1]);
            mma_16x8x16(acc[2 * np + 1], a[ks], b_fragment[2], b_fragment[3]);
        }
}

// The warp's own 16-row operands stay in registers across the loop when they fit (head_dim
// up to 64 in the dQ kernel, which holds more accumulators; the dK/dV kernel has no room):
// fewer shared-memory reads.
template <int D>
constexpr bool kRowsInRegisters = D <= 64;

// acc (16 x N) += A (16 x K, bf16 fragments in registers) * B, B (K x N) row-major at b.
template <int K, int N>
__device__ __forceinline__ void warp_mma_rb(float acc[][4], const uint32_t a[][4], const bf16* b, int b_pitch) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int ks = 0; ks < K / 16; ++ks) {
#pragma unroll
        for (int np = 0; np < N / 16; ++np) {
            uint32_t b_fragment[4];
            ldmatrix_x4_trans(b_fragment, b + (ks * 16 + lane % 16) * b_pitch + np * 16 + (lane / 16) * 8);
            mma_16x8x16(acc[2 * np], a[ks], b_fragment[0], b_fragment[1]);
            mma_16x8x16(acc[2 * np + 1], a[ks], b_fragment[2], b_fragment[3]);
        }
    }
}

// Key tile kt and its value tile into buffer kt % 2 of kv_tiles ([2][K, V][64 rows][D + pad]),
// as one cp.async group.
template <int D>
__device__ void load_kv_tiles(bf16* kv_tiles, const bf16* k, const bf16* v, const AttentionArgs& args, int kt) {
    constexpr int P = D + kPad;
    bf16* buffer = kv_tiles + (kt % 2) * 2 * kTileRows * P;
    load_tile<kTileRows, D>(buffer, k, args.k.stride, kt * kTileRows, args.seq_len);
    load_tile<kTileRows, D>(buffer + kTileRows * P, v, args.v.stride, kt * kTileRows, args.seq_len);
    cp_async_commit();
}

// ---------------------------------------------------------------- forward
template <int D>
__global__ void __launch_bounds__(kThreads) attention_forward_kernel(Rows<bf16> out, float* lse, AttentionArgs args) {
    extern __shared__ __align__(16) unsigned char shared_bytes[];
    constexpr int P = D + kPad;
    bf16* q_tile = reinterpret_cast<bf16*>(shared_bytes);
    bf16* kv_tiles = q_tile + kTileRows * P;  // [2 buffers][K, V][64 rows][P]
    const int T = args.seq_len;
    const int n_tiles = (T + kTileRows - 1) / kTileRows;
    const int q_tile_index = n_tiles - 1 - int(blockIdx.x);  // longest rows first
    const int b = int(blockIdx.y) / args.n_heads, h = int(blockIdx.y) % args.n_heads;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int first_query = q_tile_index * kTileRows;
    const bf16* q = head_base(args.q, b, h, T, D);
    const bf16* k = head_base(args.k, b, h, T, D);
    const bf16* v = head_base(args.v, b, h, T, D);
    auto load_kv = [&](int kt) { load_kv_tiles<D>(kv_tiles, k, v, args, kt); };
    load_tile<kTileRows, D>(q_tile, q, args.q.stride, first_query, T);
    load_kv(0);

    const float scale_log2 = args.scale * kLog2e;  // scores in log2 units: exp(x) = exp2(x log2 e)
    const int row0 = first_query + warp * 16 + lane / 4;  // this lane's rows: row0 and row0 + 8
    float o[D / 8][4];
    zero<D>(o);
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
    for (int kt = 0; kt <= q_tile_index; ++kt) {
        const bool next = kt < q_tile_index;
        if (next) load_kv(kt + 1);  // the other buffer: everyone finished with it last iteration
        wait_current_tile(next);
        __syncthreads();
        const bf16* k_tile = kv_tiles + (kt % 2) * 2 * kTileRows * P;
        const bf16* v_tile = k_tile + kTileRows * P;

        float s[kTileRows / 8][4];
        zero<kTileRows>(s);
        warp_mma_abt<D, kTileRows>(s, q_tile + warp * 16 * P, P, k_tile, P);
        if (kt == q_tile_index) mask_scores<kTileRows>(s, row0, kt * kTileRows, T, -INFINITY);
        online_softmax_update<kTileRows, D>(s, o, row_max, row_sum, scale_log2);
        uint32_t p_fragments[kTileRows / 16][4];
        to_a_fragments<kTileRows>(p_fragments, s);
        warp_mma_rb<kTileRows, D>(o, p_fragments, v_tile, P);
        __syncthreads();  // this buffer is refilled next iteration
    }
    finish_forward_rows<D>(out, lse + size_t(blockIdx.y) * T, args, b, h, first_query + warp * 16, o, row_max,
                           row_sum, scale_log2);
}

// ---------------------------------------------------------------- backward
// delta[bh, t] = dout[t] . out[t] over the head's columns. A thread takes 8 features (one
// 16-byte load from each tensor); the head_dim/8 threads of a (row, head) add by shuffles.
__global__ void attention_delta_kernel(float* delta, Rows<const bf16> dout, Rows<const bf16> out, int n_rows,
                                       int seq_len, int n_heads, int head_dim) {
    const int per_head = head_dim / 8;
    const size_t t = blockIdx.x * size_t(blockDim.x) + threadIdx.x;
    const size_t row_head = t / per_head;
    const int c = int(t % per_head);
    const bool valid = row_head < size_t(n_rows) * n_heads;
    const int row = int(row_head / n_heads), h = int(row_head % n_heads);
    float dot = 0.0f;
    if (valid) {
        const uint4 g = *reinterpret_cast<const uint4*>(dout.data + size_t(row) * dout.stride + h * head_dim + c * 8);
        const uint4 o = *reinterpret_cast<const uint4*>(out.data + size_t(row) * out.stride + h * head_dim + c * 8);
        const bf16* gv = reinterpret_cast<const bf16*>(&g);
        const bf16* ov = reinterpret_cast<const bf16*>(&o);
#pragma unroll
        for (int j = 0; j < 8; ++j) dot += __bfloat162float(gv[j]) * __bfloat162float(ov[j]);
    }
    for (int offset = per_head / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xFFFFFFFF, dot, offset, per_head);
    const int b = row / seq_len, position = row % seq_len;
    if (valid && c == 0) delta[(size_t(b) * n_heads + h) * seq_len + position] = dot;
}

// dK and dV of 64 keys: loop over the query tiles at or after the keys (causality).
template <int D, int BQ>
__global__ void __launch_bounds__(kThreads)
    attention_backward_kv_kernel(Rows<bf16> dk, Rows<bf16> dv, Rows<const bf16> dout, const float* lse,
                                 const float* delta, AttentionArgs args) {
    extern __shared__ __align__(16) unsigned char shared_bytes[];
    constexpr int P = D + kPad;
    bf16* k_tile = reinterpret_cast<bf16*>(shared_bytes);
    bf16* v_tile = k_tile + kTileRows * P;
    bf16* q_dout_tiles = v_tile + kTileRows * P;  // [2 buffers][Q, dout][BQ rows][P]
    float* stats = reinterpret_cast<float*>(q_dout_tiles + 4 * BQ * P);  // [2 buffers][lse, delta][BQ]
    const int T = args.seq_len;
    const int key_tile_index = int(blockIdx.x);  // the first keys see the most queries: launched first
    const int b = int(blockIdx.y) / args.n_heads, h = int(blockIdx.y) % args.n_heads;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int first_key = key_tile_index * kTileRows;
    const bf16* q = head_base(args.q, b, h, T, D);
    const bf16* g = head_base(dout, b, h, T, D);
    const float* lse_bh = lse + size_t(blockIdx.y) * T;
    const float* delta_bh = delta + size_t(blockIdx.y) * T;
    // Query tile qt goes to buffer qt % 2; its lse and delta are plain stores (visible after
    // the barrier that precedes its use).
    auto load_queries = [&](int qt) {
        const int first_query = qt * BQ;
        bf16* buffer = q_dout_tiles + (qt % 2) * 2 * BQ * P;
        load_tile<BQ, D>(buffer, q, args.q.stride, first_query, T);
        load_tile<BQ, D>(buffer + BQ * P, g, dout.stride, first_query, T);
        cp_async_commit();
        float* lse_tile = stats + (qt % 2) * 2 * BQ;
        for (int i = threadIdx.x; i < BQ; i += kThreads) {
            const bool valid = first_query + i < T;
            lse_tile[i] = valid ? lse_bh[first_query + i] * kLog2e : INFINITY;
            lse_tile[BQ + i] = valid ? delta_bh[first_query + i] : 0.0f;
        }
    };
    load_tile<kTileRows, D>(k_tile, head_base(args.k, b, h, T, D), args.k.stride, first_key, T);
    load_tile<kTileRows, D>(v_tile, head_base(args.v, b, h, T, D), args.v.stride, first_key, T);
    const int n_query_tiles = (T + BQ - 1) / BQ;
    load_queries(first_key / BQ);  // commits K and V with the first query tile

    const float scale_log2 = args.scale * kLog2e;
    const int key0 = first_key + warp * 16 + lane / 4;  // this lane's keys: key0 and key0 + 8
    float dk_acc[D / 8][4], dv_acc[D / 8][4];
    zero<D>(dk_acc);
    zero<D>(dv_acc);
    for (int qt = first_key / BQ; qt < n_query_tiles; ++qt) {
        const bool next = qt + 1 < n_query_tiles;
        if (next) load_queries(qt + 1);
        wait_current_tile(next);
        __syncthreads();
        const int first_query = qt * BQ;
        const bf16* q_tile = q_dout_tiles + (qt % 2) * 2 * BQ * P;
        const bf16* dout_tile = q_tile + BQ * P;
        const float* lse_tile = stats + (qt % 2) * 2 * BQ;
        const float* delta_tile = lse_tile + BQ;

        // P^T (keys x queries) = exp(scale K Q^T - lse), zero where the query precedes the key.
        float p[BQ / 8][4];
        zero<BQ>(p);
        warp_mma_abt<D, BQ>(p, k_tile + warp * 16 * P, P, q_tile, P);
#pragma unroll
        for (int nt = 0; nt < BQ / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = key0 + 8 * (e / 2), column = nt * 8 + 2 * (lane % 4) + e % 2;
                const int query = first_query + column;
                p[nt][e] = (query < key || key >= T) ? 0.0f : fast_exp2(p[nt][e] * scale_log2 - lse_tile[column]);
            }
        uint32_t fragments[BQ / 16][4];
        to_a_fragments<BQ>(fragments, p);
        warp_mma_rb<BQ, D>(dv_acc, fragments, dout_tile, P);  // dV += P^T dout

        float dp[BQ / 8][4];  // dP^T = V dout^T
        zero<BQ>(dp);
        warp_mma_abt<D, BQ>(dp, v_tile + warp * 16 * P, P, dout_tile, P);
#pragma unroll
        for (int nt = 0; nt < BQ / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) p[nt][e] *= dp[nt][e] - delta_tile[nt * 8 + 2 * (lane % 4) + e % 2];
        to_a_fragments<BQ>(fragments, p);
        warp_mma_rb<BQ, D>(dk_acc, fragments, q_tile, P);  // dK += dS^T Q (scaled at the end)
        __syncthreads();  // this buffer is refilled next iteration
    }
    store_rows<D>(head_base(dk, b, h, T, D), dk.stride, first_key + warp * 16, T, dk_acc, args.scale, args.scale);
    store_rows<D>(head_base(dv, b, h, T, D), dv.stride, first_key + warp * 16, T, dv_acc, 1.0f, 1.0f);
}

// dQ of 64 queries: loop over the key tiles up to the diagonal.
template <int D>
__global__ void __launch_bounds__(kThreads)
    attention_backward_q_kernel(Rows<bf16> dq, Rows<const bf16> dout, const float* lse, const float* delta,
                                AttentionArgs args) {
    extern __shared__ __align__(16) unsigned char shared_bytes[];
    constexpr int P = D + kPad;
    bf16* q_tile = reinterpret_cast<bf16*>(shared_bytes);
    bf16* dout_tile = q_tile + kTileRows * P;
    bf16* kv_tiles = dout_tile + kTileRows * P;  // [2 buffers][K, V][64 rows][P]
    const int T = args.seq_len;
    const int n_tiles = (T + kTileRows - 1) / kTileRows;
    const int q_tile_index = n_tiles - 1 - int(blockIdx.x);
    const int b = int(blockIdx.y) / args.n_heads, h = int(blockIdx.y) % args.n_heads;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int first_query = q_tile_index * kTileRows;
    const bf16* k = head_base(args.k, b, h, T, D);
    const bf16* v = head_base(args.v, b, h, T, D);
    auto load_kv = [&](int kt) { load_kv_tiles<D>(kv_tiles, k, v, args, kt); };
    load_tile<kTileRows, D>(q_tile, head_base(args.q, b, h, T, D), args.q.stride, first_query, T);
    load_tile<kTileRows, D>(dout_tile, head_base(dout, b, h, T, D), dout.stride, first_query, T);
    load_kv(0);

    const float scale_log2 = args.scale * kLog2e;
    const int row0 = first_query + warp * 16 + lane / 4;
    float row_lse[2], row_delta[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = row0 + 8 * half;
        const bool valid = row < T;
        row_lse[half] = valid ? lse[size_t(blockIdx.y) * T + row] * kLog2e : INFINITY;
        row_delta[half] = valid ? delta[size_t(blockIdx.y) * T + row] : 0.0f;
    }
    float dq_acc[D / 8][4];
    zero<D>(dq_acc);
    uint32_t q_fragments[kRowsInRegisters<D> ? D / 16 : 1][4], dout_fragments[kRowsInRegisters<D> ? D / 16 : 1][4];
    for (int kt = 0; kt <= q_tile_index; ++kt) {
        const bool next = kt < q_tile_index;
        if (next) load_kv(kt + 1);
        wait_current_tile(next);
        __syncthreads();
        const bf16* k_tile = kv_tiles + (kt % 2) * 2 * kTileRows * P;
        const bf16* v_tile = k_tile + kTileRows * P;

        constexpr bool kRegisters = kRowsInRegisters<D>;
        if (kRegisters && kt == 0) {
            load_a_fragments<D>(q_fragments, q_tile + warp * 16 * P, P);
            load_a_fragments<D>(dout_fragments, dout_tile + warp * 16 * P, P);
        }
        float p[kTileRows / 8][4], dp[kTileRows / 8][4];
        zero<kTileRows>(p);
        zero<kTileRows>(dp);
        if constexpr (kRegisters) {
            warp_mma_rbt<D, kTileRows>(p, q_fragments, k_tile, P);      // S = Q K^T
            warp_mma_rbt<D, kTileRows>(dp, dout_fragments, v_tile, P);  // dP = dout V^T
        } else {
            warp_mma_abt<D, kTileRows>(p, q_tile + warp * 16 * P, P, k_tile, P);
            warp_mma_abt<D, kTileRows>(dp, dout_tile + warp * 16 * P, P, v_tile, P);
        }
        const bool diagonal = kt == q_tile_index;
#pragma unroll
        for (int nt = 0; nt < kTileRows / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int half = e / 2, row = row0 + 8 * half, key = kt * kTileRows + nt * 8 + 2 * (lane % 4) + e % 2;
                const float prob =
                    (diagonal && (key > row || key >= T)) ? 0.0f : fast_exp2(p[nt][e] * scale_log2 - row_lse[half]);
                p[nt][e] = prob * (dp[nt][e] - row_delta[half]);  // dS
            }
        uint32_t fragments[kTileRows / 16][4];
        to_a_fragments<kTileRows>(fragments, p);
        warp_mma_rb<kTileRows, D>(dq_acc, fragments, k_tile, P);  // dQ += dS K
        __syncthreads();  // this buffer is refilled next iteration
    }
    store_rows<D>(head_base(dq, b, h, T, D), dq.stride, first_query + warp * 16, T, dq_acc, args.scale, args.scale);
}

// Query rows per step of the dK/dV kernel (a compile-time knob: -DQOPT_KV_QUERY_TILE=32).
#ifndef QOPT_KV_QUERY_TILE
#define QOPT_KV_QUERY_TILE 64
#endif
template <int D>
constexpr int backward_query_tile() {
    return D <= 64 ? QOPT_KV_QUERY_TILE : 32;  // keeps dK, dV accumulators and a tile of P in registers
}

void check_rows(const void* data, int stride, const char* what) {
    QOPT_CHECK(is_aligned(data, 16) && stride % 8 == 0, "attention: ", what,
               " must be 16-byte aligned with a row stride that is a multiple of 8 (got stride ", stride, ")");
}

AttentionArgs make_args(Rows<const bf16> q, Rows<const bf16> k, Rows<const bf16> v, int batch, int seq_len,
                        int n_heads, int head_dim) {
    QOPT_CHECK(head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128,
               "attention kernels support head_dim 16, 32, 64 or 128, not ", head_dim);
    QOPT_CHECK(batch > 0 && seq_len > 0 && n_heads > 0, "attention: empty shape");
    QOPT_CHECK(size_t(batch) * n_heads <= 65535, "attention: batch x heads ", size_t(batch) * n_heads,
               " exceeds the grid limit 65535");
    check_rows(q.data, q.stride, "q");
    check_rows(k.data, k.stride, "k");
    check_rows(v.data, v.stride, "v");
    return AttentionArgs{q, k, v, batch, seq_len, n_heads, 1.0f / sqrtf(float(head_dim))};
}

template <int D>
void forward_for(Rows<bf16> out, float* lse, const AttentionArgs& args, cudaStream_t stream) {
    const size_t bytes = size_t(5) * kTileRows * (D + kPad) * sizeof(bf16);  // Q + 2 x (K, V)
    static bool configured = false;
    if (!configured) allow_shared_bytes(attention_forward_kernel<D>, bytes), configured = true;
    const dim3 grid((args.seq_len + kTileRows - 1) / kTileRows, args.batch * args.n_heads);
    attention_forward_kernel<D><<<grid, kThreads, bytes, stream>>>(out, lse, args);
    CUDA_CHECK_LAUNCH();
}

template <int D>
void backward_for(Rows<bf16> dq, Rows<bf16> dk, Rows<bf16> dv, Rows<const bf16> dout, const float* lse,
                  const float* delta, const AttentionArgs& args, cudaStream_t stream) {
    constexpr int BQ = backward_query_tile<D>();
    // K, V + 2 x (Q, dout) and 2 x (lse, delta);  Q, dout + 2 x (K, V)
    const size_t kv_bytes = size_t(2 * kTileRows + 4 * BQ) * (D + kPad) * sizeof(bf16) + 4 * BQ * sizeof(float);
    const size_t q_bytes = size_t(6) * kTileRows * (D + kPad) * sizeof(bf16);
    static bool configured = false;
    if (!configured) {
        allow_shared_bytes(attention_backward_kv_kernel<D, BQ>, kv_bytes);
        allow_shared_bytes(attention_backward_q_kernel<D>, q_bytes);
        configured = true;
    }
    const int n_tiles = (args.seq_len + kTileRows - 1) / kTileRows;
    const dim3 grid(n_tiles, args.batch * args.n_heads);
    cudaStream_t side = fork_side_stream(stream);
    attention_backward_kv_kernel<D, BQ><<<grid, kThreads, kv_bytes, stream>>>(dk, dv, dout, lse, delta, args);
    CUDA_CHECK_LAUNCH();
    attention_backward_q_kernel<D><<<grid, kThreads, q_bytes, side>>>(dq, dout, lse, delta, args);
    CUDA_CHECK_LAUNCH();
    join_side_stream(stream);
}

}  // namespace

namespace {
// The current device's side stream, created once and kept for the process (never destroyed: it
// may be in use until exit, after which the driver is gone).
SideStream& side_stream() {
    static SideStream* per_device[64] = {};
    int device = 0;
    CUDA_CHECK(cudaGetDevice(&device));
    QOPT_CHECK(device >= 0 && device < 64, "attention: device index ", device, " out of range");
    if (!per_device[device]) per_device[device] = new SideStream();
    return *per_device[device];
}
}  // namespace

cudaStream_t fork_side_stream(cudaStream_t stream) { return side_stream().after(stream); }

void join_side_stream(cudaStream_t stream) { side_stream().join_into(stream); }

}  // namespace flash

namespace {
AttentionKernels attention_choice = AttentionKernels::automatic;

bool use_wgmma(int head_dim) {
    return attention_choice == AttentionKernels::automatic && flash::wgmma_kernels_available(head_dim);
}
}  // namespace

void set_attention_kernels(AttentionKernels choice) { attention_choice = choice; }

const char* attention_kernels_name(int head_dim) {
    return use_wgmma(head_dim) ? "wgmma (Hopper)" : "mma.sync (portable)";
}

void attention_forward_gpu(Rows<bf16> out, float* lse, Rows<const bf16> q, Rows<const bf16> k, Rows<const bf16> v,
                           int batch, int seq_len, int n_heads, int head_dim, cudaStream_t stream) {
    using namespace flash;
    const AttentionArgs args = make_args(q, k, v, batch, seq_len, n_heads, head_dim);
    check_rows(out.data, out.stride, "out");
    if (use_wgmma(head_dim)) return attention_forward_wgmma(out, lse, args, head_dim, stream);
    switch (head_dim) {
        case 16: forward_for<16>(out, lse, args, stream); break;
        case 32: forward_for<32>(out, lse, args, stream); break;
        case 64: forward_for<64>(out, lse, args, stream); break;
        default: forward_for<128>(out, lse, args, stream); break;
    }
}

void attention_backward_gpu(Rows<bf16> dq, Rows<bf16> dk, Rows<bf16> dv, float* delta, Rows<const bf16> dout,
                            Rows<const bf16> out, const float* lse, Rows<const bf16> q, Rows<const bf16> k,
                            Rows<const bf16> v, int batch, int seq_len, int n_heads, int head_dim,
                            cudaStream_t stream) {
    using namespace flash;
    const AttentionArgs args = make_args(q, k, v, batch, seq_len, n_heads, head_dim);
    check_rows(dq.data, dq.stride, "dq");
    check_rows(dk.data, dk.stride, "dk");
    check_rows(dv.data, dv.stride, "dv");
    check_rows(dout.data, dout.stride, "dout");
    const int n_rows = batch * seq_len;
    check_rows(out.data, out.stride, "out");
    const size_t threads = size_t(n_rows) * n_heads * (head_dim / 8);
    attention_delta_kernel<<<unsigned((threads + 255) / 256), 256, 0, stream>>>(delta, dout, out, n_rows, seq_len,
                                                                                 n_heads, head_dim);
    CUDA_CHECK_LAUNCH();
    if (use_wgmma(head_dim)) return attention_backward_wgmma(dq, dk, dv, dout, lse, delta, args, head_dim, stream);
    switch (head_dim) {
        case 16: backward_for<16>(dq, dk, dv, dout, lse, delta, args, stream); break;
        case 32: backward_for<32>(dq, dk, dv, dout, lse, delta, args, stream); break;
        case 64: backward_for<64>(dq, dk, dv, dout, lse, delta, args, stream); break;
        default: backward_for<128>(dq, dk, dv, dout, lse, delta, args, stream); break;
    }
}

}  // namespace qopt
