// Causal flash attention for Hopper: the same algorithm, tiles and numerics as the portable
// kernels of kernels/attention.cu (read that file's header first), with every product on
// warpgroup MMAs (kernels/wgmma.cuh) instead of per-warp mma.sync. The tensor cores read K, V,
// Q and dout straight from shared memory, so the ldmatrix traffic through registers that bounds
// the portable kernels on an H100 is gone; probabilities and dS stay in registers as the A
// operand of the second product, exactly as there.
//
// Work layout: a block of G warpgroups (G = 2 forward, 1 backward; see kForwardGroups) shares
// the tiles streamed through shared memory; each warpgroup owns 64 rows (queries in the forward
// and dQ kernels, keys in the dK/dV kernel), a warp 16 of them, as in the portable kernels.
// Streamed tiles hold 64 rows.
// Shared tiles use the 128-byte swizzle of wgmma.cuh, filled by cp.async (rows past the end
// zero-filled), double-buffered.
//
// Causality per warpgroup: its rows r0 .. r0+63 (r0 a multiple of 64) need key tiles up to
// r0 / 64 (the diagonal tile, masked); in the dK/dV kernel its keys need query tiles from
// r0 / 64 on. A warpgroup whose rows all lie past the sequence sits the loop out.
#include <cstdint>

#include "kernels/attention_tiles.cuh"
#include "kernels/cuda_common.cuh"
#include "kernels/wgmma.cuh"

namespace qopt {
namespace flash {
namespace {

constexpr int kGroupRows = 64;  // rows of a warpgroup, and of a streamed tile
// Warpgroups per block, measured on an H100 (bench --attention-only, head_dim 64, T = 1024):
// the forward kernel is faster with 2 (194 vs 174 TFLOP/s: the streamed K and V tiles serve
// twice the rows), the backward kernels with 1 (166 vs 127 TFLOP/s: blocks of one warpgroup
// are independent, so one block's products overlap another's exponentials, where the two
// warpgroups of a block reach every barrier together).
constexpr int kForwardGroups = 2;
constexpr int kBackwardGroups = 1;

// The kernels' bodies (and the device helpers they use) exist only where the compiler targets
// sm_90a; other targets get empty kernels that are never launched.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define QOPT_HOPPER_BODY 1

// Rows first_row .. first_row+ROWS-1 (D columns of one head) into a swizzled tile of ROWS rows
// (D/64 panels); rows at or past seq_len become zeros. A thread copies the same 16-byte chunk
// of every kRowsPerPass-th row, so its swizzle (row % 8) and addresses are worked out once.
template <int ROWS, int D, int THREADS>
__device__ __forceinline__ void load_swizzled(bf16* tile, const bf16* head, int stride, int first_row, int seq_len) {
    constexpr int kChunks = D / 8;  // 16-byte pieces per row
    constexpr int kRowsPerPass = THREADS / kChunks;
    static_assert(THREADS % kChunks == 0 && kRowsPerPass % 8 == 0 && ROWS % kRowsPerPass == 0, "tile shape");
    const int chunk = int(threadIdx.x) % kChunks, r0 = int(threadIdx.x) / kChunks;
    bf16* destination = tile + (chunk / 8) * ROWS * 64 + swizzled_offset(r0, chunk % 8);
    const bf16* source = head + size_t(first_row + r0) * stride + chunk * 8;
#pragma unroll
    for (int pass = 0; pass < ROWS / kRowsPerPass; ++pass) {
        const bool valid = first_row + r0 + pass * kRowsPerPass < seq_len;
        const bf16* row_source = valid ? source + size_t(pass) * kRowsPerPass * stride : head;
        cp_async_16(destination + pass * kRowsPerPass * 64, row_source, valid);
    }
}

// The current tile's copies have landed and are visible to every warpgroup's tensor cores.
__device__ __forceinline__ void tile_ready(bool next_issued) {
    wait_current_tile(next_issued);
    fence_shared_for_wgmma();
    __syncthreads();
}

__device__ constexpr uint32_t stream_tile_bytes(int head_dim) { return uint32_t(kGroupRows) * head_dim * sizeof(bf16); }

// d (64 x D) (+)= A (64 x 16, registers) * B (rows 16 ks .. of a streamed tile, MN-major
// descriptor b).
template <int D>
__device__ __forceinline__ void wgmma_rs(float d[][4], const uint32_t a[4], uint64_t b, int ks) {
    if constexpr (D == 64) wgmma_rs_n64(d, a, mn_major_step(b, ks), 1);
    else wgmma_rs_n128(d, a, mn_major_step(b, ks), 1);
}

// Issues acc (64 x D) += A (64 x 64 keys or queries, bf16 fragments in registers) * B (the 64
// rows of a streamed tile, MN-major descriptor b) as one wgmma group, not waited for.
template <int D>
__device__ __forceinline__ void issue_rs_products(float acc[][4], const uint32_t a[][4], uint64_t b) {
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kGroupRows / 16; ++ks) wgmma_rs<D>(acc, a[ks], b, ks);
    wgmma_commit();
}

// Waits for every issued group; the accumulator and the A fragments it read are then free.
template <int D>
__device__ __forceinline__ void finish_rs_products(float acc[][4], uint32_t a[][4]) {
    wgmma_wait<0>();
    wgmma_pin<D>(acc);
    wgmma_pin_fragments<kGroupRows>(a);
}

// s (64 x 64) = A B^T over the D columns: A the 64 rows at descriptor a (K-major, in panels of
// a_panel_rows rows), B the 64 rows of a streamed tile (K-major descriptor b).
template <int D>
__device__ __forceinline__ void wgmma_abt(float s[][4], uint64_t a, int a_panel_rows, uint64_t b) {
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks)
        wgmma_ss_n64(s, k_major_step(a, a_panel_rows, ks), k_major_step(b, kGroupRows, ks), ks > 0);
}

// The backward kernels' two score-shaped products, waited for: s = A_s B_s^T and
// dp = A_dp B_dp^T (A: 64 rows at the descriptors in panels of a_panel_rows rows, B: streamed
// tiles) — S and dP in the dQ kernel, their transposes in the dK/dV kernel.
template <int D>
__device__ __forceinline__ void scores_and_their_gradients(float s[][4], float dp[][4], uint64_t a_s, uint64_t a_dp,
                                                           int a_panel_rows, uint64_t b_s, uint64_t b_dp) {
    wgmma_fence();
    wgmma_abt<D>(s, a_s, a_panel_rows, b_s);
    wgmma_abt<D>(dp, a_dp, a_panel_rows, b_dp);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_pin<kGroupRows>(s);
    wgmma_pin<kGroupRows>(dp);
}

// Key tile kt and its value tile into buffer kt % 2 ([2][K, V][64 rows x D]), one group.
template <int D, int THREADS>
__device__ __forceinline__ void load_kv(bf16* kv_tiles, const bf16* k, const bf16* v, const AttentionArgs& args,
                                        int kt) {
    bf16* buffer = kv_tiles + (kt % 2) * 2 * kGroupRows * D;
    load_swizzled<kGroupRows, D, THREADS>(buffer, k, args.k.stride, kt * kGroupRows, args.seq_len);
    load_swizzled<kGroupRows, D, THREADS>(buffer + kGroupRows * D, v, args.v.stride, kt * kGroupRows, args.seq_len);
    cp_async_commit();
}

#endif  // QOPT_HOPPER_BODY

// Where a block of the forward or dQ kernel sits: G x 64 query rows of head (b, h), the
// longest rows launched first; the key tiles the block streams (0 .. last_tile) and those its
// warpgroup uses (0 .. diagonal_tile, the masked one).
template <int G>
struct QueryBlock {
    int first_query, b, h, group, warp, lane, group_first_row, diagonal_tile, last_tile;
    bool group_active;  // false: the warpgroup's rows all lie past the sequence
    __device__ explicit QueryBlock(const AttentionArgs& args) {
        const int T = args.seq_len, block_rows = G * kGroupRows;
        const int n_blocks = (T + block_rows - 1) / block_rows, n_key_tiles = (T + kGroupRows - 1) / kGroupRows;
        first_query = (n_blocks - 1 - int(blockIdx.x)) * block_rows;
        b = int(blockIdx.y) / args.n_heads, h = int(blockIdx.y) % args.n_heads;
        group = int(threadIdx.x) / 128, warp = (int(threadIdx.x) / 32) % 4, lane = int(threadIdx.x) % 32;
        group_first_row = first_query + group * kGroupRows;
        group_active = group_first_row < T;
        diagonal_tile = group_first_row / kGroupRows;
        last_tile = min(first_query / kGroupRows + G - 1, n_key_tiles - 1);
    }
};

// ---------------------------------------------------------------- forward
// Registers are capped for 4 warpgroups per SM (128 per thread).
template <int D, int G>
__global__ void __launch_bounds__(G * 128, 4 / G) forward_kernel(Rows<bf16> out, float* lse, AttentionArgs args) {
#ifdef QOPT_HOPPER_BODY
    constexpr int kBlockRows = G * kGroupRows, kBlockThreads = G * 128;
    extern __shared__ unsigned char shared_bytes[];
    bf16* q_tile = aligned_shared<bf16>(shared_bytes);  // [G x 64 rows x D]
    bf16* kv_tiles = q_tile + kBlockRows * D;     // [2 buffers][K, V][64 rows x D]
    const int T = args.seq_len;
    const QueryBlock<G> at(args);
    const int b = at.b, h = at.h, group = at.group, warp = at.warp, lane = at.lane;
    const bf16* k = head_base(args.k, b, h, T, D);
    const bf16* v = head_base(args.v, b, h, T, D);
    const bf16* q = head_base(args.q, b, h, T, D);
    load_swizzled<kBlockRows, D, kBlockThreads>(q_tile, q, args.q.stride, at.first_query, T);
    load_kv<D, kBlockThreads>(kv_tiles, k, v, args, 0);

    const float scale_log2 = args.scale * kLog2e;  // exp(scale x) = 2^(scale log2(e) x)
    const int row0 = at.group_first_row + warp * 16 + lane / 4;
    constexpr uint32_t kTileBytes = stream_tile_bytes(D);
    const uint64_t q_rows = advance(k_major_tile(q_tile), group * kGroupRows * 128);  // this warpgroup's queries
    const uint64_t kv_k_major = k_major_tile(kv_tiles), kv_mn_major = mn_major_tile(kv_tiles, kGroupRows);
    float o[D / 8][4];
    zero<D>(o);
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
    for (int kt = 0; kt <= at.last_tile; ++kt) {
        const bool next = kt < at.last_tile;
        if (next) load_kv<D, kBlockThreads>(kv_tiles, k, v, args, kt + 1);
        tile_ready(next);
        if (at.group_active && kt <= at.diagonal_tile) {
            const uint32_t buffer = (kt % 2) * 2 * kTileBytes;  // K, then V
            float s[kGroupRows / 8][4];
            wgmma_fence();
            wgmma_abt<D>(s, q_rows, kBlockRows, advance(kv_k_major, buffer));  // S = Q K^T
            wgmma_commit();
            wgmma_wait<0>();
            wgmma_pin<kGroupRows>(s);
            if (kt == at.diagonal_tile) mask_scores<kGroupRows>(s, row0, kt * kGroupRows, T, -INFINITY);
            online_softmax_update<kGroupRows, D>(s, o, row_max, row_sum, scale_log2);
            uint32_t p_fragments[kGroupRows / 16][4];
            to_a_fragments<kGroupRows>(p_fragments, s);
            issue_rs_products<D>(o, p_fragments, advance(kv_mn_major, buffer + kTileBytes));  // O += P V
            finish_rs_products<D>(o, p_fragments);
        }
        __syncthreads();  // this buffer is refilled next iteration
    }
    if (at.group_active)
        finish_forward_rows<D>(out, lse + size_t(blockIdx.y) * T, args, b, h, at.group_first_row + warp * 16, o,
                               row_max, row_sum, scale_log2);
#endif
}

// ---------------------------------------------------------------- backward
// Blocks per SM the register budget is cut for (65536 registers: 3 blocks of one warpgroup at
// up to 168 registers, 4 at up to 128); more resident warpgroups hide each other's latency.
// At 3 blocks ptxas warns that the hd64 dK/dV kernel's wgmmas are serialized for want of
// registers; it is still the faster choice (H100, 2026-11-25: backward 225 / 290 TFLOP/s at
// T = 1024 / 4096 against 214 / 272 with 2 blocks and no serialization).
constexpr int kv_blocks_per_sm(int head_dim, int groups) { return groups == 1 && head_dim == 64 ? 3 : 1; }
constexpr int q_blocks_per_sm(int head_dim, int groups) { return groups == 1 ? (head_dim == 64 ? 4 : 3) : 1; }

// dK and dV of G x 64 keys (64 per warpgroup): loop over the query tiles at or after the keys.
template <int D, int G>
__global__ void __launch_bounds__(G * 128, kv_blocks_per_sm(D, G))
    backward_kv_kernel(Rows<bf16> dk, Rows<bf16> dv, Rows<const bf16> dout, const float* lse, const float* delta,
                       AttentionArgs args) {
#ifdef QOPT_HOPPER_BODY
    constexpr int kBlockRows = G * kGroupRows, kBlockThreads = G * 128;
    extern __shared__ unsigned char shared_bytes[];
    bf16* k_tile = aligned_shared<bf16>(shared_bytes);         // [G x 64 rows x D]
    bf16* v_tile = k_tile + kBlockRows * D;              // [G x 64 rows x D]
    bf16* q_dout_tiles = v_tile + kBlockRows * D;        // [2 buffers][Q, dout][64 rows x D]
    float* stats = reinterpret_cast<float*>(q_dout_tiles + 4 * kGroupRows * D);  // [2][lse, delta][64]
    const int T = args.seq_len;
    const int first_key = int(blockIdx.x) * kBlockRows;  // the first keys see the most queries: launched first
    const int b = int(blockIdx.y) / args.n_heads, h = int(blockIdx.y) % args.n_heads;
    const int group = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const int group_first_key = first_key + group * kGroupRows;
    const bool group_active = group_first_key < T;
    const int diagonal_tile = group_first_key / kGroupRows;
    const bf16* q = head_base(args.q, b, h, T, D);
    const bf16* g = head_base(dout, b, h, T, D);
    const float* lse_bh = lse + size_t(blockIdx.y) * T;
    const float* delta_bh = delta + size_t(blockIdx.y) * T;
    // Query tile qt into buffer qt % 2; its lse (log2 units) and delta by plain stores, seen
    // after the barrier of tile_ready. Queries past the end get lse = +inf: P = 0.
    auto load_queries = [&](int qt) {
        const int first_query = qt * kGroupRows;
        bf16* buffer = q_dout_tiles + (qt % 2) * 2 * kGroupRows * D;
        load_swizzled<kGroupRows, D, kBlockThreads>(buffer, q, args.q.stride, first_query, T);
        load_swizzled<kGroupRows, D, kBlockThreads>(buffer + kGroupRows * D, g, dout.stride, first_query, T);
        cp_async_commit();
        float* stats_tile = stats + (qt % 2) * 2 * kGroupRows;
        for (int i = threadIdx.x; i < kGroupRows; i += kBlockThreads) {
            const bool valid = first_query + i < T;
            stats_tile[i] = valid ? lse_bh[first_query + i] * kLog2e : INFINITY;
            stats_tile[kGroupRows + i] = valid ? delta_bh[first_query + i] : 0.0f;
        }
    };
    load_swizzled<kBlockRows, D, kBlockThreads>(k_tile, head_base(args.k, b, h, T, D), args.k.stride, first_key, T);
    load_swizzled<kBlockRows, D, kBlockThreads>(v_tile, head_base(args.v, b, h, T, D), args.v.stride, first_key, T);
    const int n_query_tiles = (T + kGroupRows - 1) / kGroupRows;
    load_queries(first_key / kGroupRows);  // commits K and V with the first query tile

    const float scale_log2 = args.scale * kLog2e;
    const int key0 = group_first_key + warp * 16 + lane / 4;  // this lane's keys: key0 and key0 + 8
    constexpr uint32_t kTileBytes = stream_tile_bytes(D);
    const uint64_t k_rows = advance(k_major_tile(k_tile), group * kGroupRows * 128);  // this warpgroup's keys
    const uint64_t v_rows = advance(k_major_tile(v_tile), group * kGroupRows * 128);
    const uint64_t stream_k_major = k_major_tile(q_dout_tiles);
    const uint64_t stream_mn_major = mn_major_tile(q_dout_tiles, kGroupRows);
    float dk_acc[D / 8][4], dv_acc[D / 8][4];
    zero<D>(dk_acc);
    zero<D>(dv_acc);
    for (int qt = first_key / kGroupRows; qt < n_query_tiles; ++qt) {
        const bool next = qt + 1 < n_query_tiles;
        if (next) load_queries(qt + 1);
        tile_ready(next);
        if (group_active && qt >= diagonal_tile) {
            const uint32_t q_bytes = (qt % 2) * 2 * kTileBytes, dout_bytes = q_bytes + kTileBytes;
            const float* lse_tile = stats + (qt % 2) * 2 * kGroupRows;
            const float* delta_tile = lse_tile + kGroupRows;
            float p[kGroupRows / 8][4], dp[kGroupRows / 8][4];  // P^T, dP^T: keys x queries
            // S^T = K Q^T, dP^T = V dout^T
            scores_and_their_gradients<D>(p, dp, k_rows, v_rows, kBlockRows, advance(stream_k_major, q_bytes),
                                          advance(stream_k_major, dout_bytes));
#pragma unroll
            for (int nt = 0; nt < kGroupRows / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    p[nt][e] = fast_exp2(fmaf(p[nt][e], scale_log2, -lse_tile[nt * 8 + 2 * (lane % 4) + e % 2]));
            if (qt == diagonal_tile)  // a query before the key sees none of it
#pragma unroll
                for (int nt = 0; nt < kGroupRows / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        if (qt * kGroupRows + nt * 8 + 2 * (lane % 4) + e % 2 < key0 + 8 * (e / 2)) p[nt][e] = 0.0f;
            uint32_t p_fragments[kGroupRows / 16][4], ds_fragments[kGroupRows / 16][4];
            to_a_fragments<kGroupRows>(p_fragments, p);
            // dV += P^T dout runs on the tensor cores while dS^T = P^T * (dP^T - delta) is formed.
            issue_rs_products<D>(dv_acc, p_fragments, advance(stream_mn_major, dout_bytes));
#pragma unroll
            for (int nt = 0; nt < kGroupRows / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    dp[nt][e] = p[nt][e] * (dp[nt][e] - delta_tile[nt * 8 + 2 * (lane % 4) + e % 2]);
            to_a_fragments<kGroupRows>(ds_fragments, dp);
            issue_rs_products<D>(dk_acc, ds_fragments, advance(stream_mn_major, q_bytes));  // dK += dS^T Q
            finish_rs_products<D>(dv_acc, p_fragments);
            finish_rs_products<D>(dk_acc, ds_fragments);
        }
        __syncthreads();  // this buffer is refilled next iteration
    }
    if (group_active) {
        const int first_row = group_first_key + warp * 16;
        store_rows<D>(head_base(dk, b, h, T, D), dk.stride, first_row, T, dk_acc, args.scale, args.scale);
        store_rows<D>(head_base(dv, b, h, T, D), dv.stride, first_row, T, dv_acc, 1.0f, 1.0f);
    }
#endif
}

// dQ of G x 64 queries (64 per warpgroup): loop over the key tiles up to the diagonal.
template <int D, int G>
__global__ void __launch_bounds__(G * 128, q_blocks_per_sm(D, G))
    backward_q_kernel(Rows<bf16> dq, Rows<const bf16> dout, const float* lse, const float* delta, AttentionArgs args) {
#ifdef QOPT_HOPPER_BODY
    constexpr int kBlockRows = G * kGroupRows, kBlockThreads = G * 128;
    extern __shared__ unsigned char shared_bytes[];
    bf16* q_tile = aligned_shared<bf16>(shared_bytes);  // [G x 64 rows x D]
    bf16* dout_tile = q_tile + kBlockRows * D;    // [G x 64 rows x D]
    bf16* kv_tiles = dout_tile + kBlockRows * D;  // [2 buffers][K, V][64 rows x D]
    const int T = args.seq_len;
    const QueryBlock<G> at(args);
    const int b = at.b, h = at.h, group = at.group, warp = at.warp, lane = at.lane;
    const bf16* k = head_base(args.k, b, h, T, D);
    const bf16* v = head_base(args.v, b, h, T, D);
    const bf16 *q = head_base(args.q, b, h, T, D), *g = head_base(dout, b, h, T, D);
    load_swizzled<kBlockRows, D, kBlockThreads>(q_tile, q, args.q.stride, at.first_query, T);
    load_swizzled<kBlockRows, D, kBlockThreads>(dout_tile, g, dout.stride, at.first_query, T);
    load_kv<D, kBlockThreads>(kv_tiles, k, v, args, 0);

    const float scale_log2 = args.scale * kLog2e;
    const int row0 = at.group_first_row + warp * 16 + lane / 4;
    float row_lse[2], row_delta[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = row0 + 8 * half;
        const bool valid = row < T;
        row_lse[half] = valid ? lse[size_t(blockIdx.y) * T + row] * kLog2e : INFINITY;
        row_delta[half] = valid ? delta[size_t(blockIdx.y) * T + row] : 0.0f;
    }
    constexpr uint32_t kTileBytes = stream_tile_bytes(D);
    const uint64_t q_rows = advance(k_major_tile(q_tile), group * kGroupRows * 128);  // this warpgroup's queries
    const uint64_t dout_rows = advance(k_major_tile(dout_tile), group * kGroupRows * 128);
    const uint64_t kv_k_major = k_major_tile(kv_tiles), kv_mn_major = mn_major_tile(kv_tiles, kGroupRows);
    float dq_acc[D / 8][4];
    zero<D>(dq_acc);
    for (int kt = 0; kt <= at.last_tile; ++kt) {
        const bool next = kt < at.last_tile;
        if (next) load_kv<D, kBlockThreads>(kv_tiles, k, v, args, kt + 1);
        tile_ready(next);
        if (at.group_active && kt <= at.diagonal_tile) {
            const uint32_t k_bytes = (kt % 2) * 2 * kTileBytes, v_bytes = k_bytes + kTileBytes;
            float p[kGroupRows / 8][4], dp[kGroupRows / 8][4];
            // S = Q K^T, dP = dout V^T
            scores_and_their_gradients<D>(p, dp, q_rows, dout_rows, kBlockRows, advance(kv_k_major, k_bytes),
                                          advance(kv_k_major, v_bytes));
#pragma unroll
            for (int nt = 0; nt < kGroupRows / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) p[nt][e] = fast_exp2(fmaf(p[nt][e], scale_log2, -row_lse[e / 2]));
            if (kt == at.diagonal_tile) mask_scores<kGroupRows>(p, row0, kt * kGroupRows, T, 0.0f);
#pragma unroll
            for (int nt = 0; nt < kGroupRows / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) p[nt][e] *= dp[nt][e] - row_delta[e / 2];  // dS
            uint32_t fragments[kGroupRows / 16][4];
            to_a_fragments<kGroupRows>(fragments, p);
            issue_rs_products<D>(dq_acc, fragments, advance(kv_mn_major, k_bytes));  // dQ += dS K
            finish_rs_products<D>(dq_acc, fragments);
        }
        __syncthreads();  // this buffer is refilled next iteration
    }
    if (at.group_active)
        store_rows<D>(head_base(dq, b, h, T, D), dq.stride, at.group_first_row + warp * 16, T, dq_acc, args.scale,
                      args.scale);
#endif
}

constexpr size_t tile_bytes(int rows, int head_dim) { return size_t(rows) * head_dim * sizeof(bf16); }

template <int D>
void forward_for(Rows<bf16> out, float* lse, const AttentionArgs& args, cudaStream_t stream) {
    // Q + 2 x (K, V), and room to align the start to 1024 bytes
    constexpr int G = kForwardGroups, kBlockRows = G * kGroupRows;
    const size_t bytes = tile_bytes(kBlockRows, D) + 4 * tile_bytes(kGroupRows, D) + 1024;
    static bool configured = false;
    if (!configured) allow_shared_bytes(forward_kernel<D, G>, bytes), configured = true;
    const dim3 grid((args.seq_len + kBlockRows - 1) / kBlockRows, args.batch * args.n_heads);
    forward_kernel<D, G><<<grid, G * 128, bytes, stream>>>(out, lse, args);
    CUDA_CHECK_LAUNCH();
}

template <int D>
void backward_for(Rows<bf16> dq, Rows<bf16> dk, Rows<bf16> dv, Rows<const bf16> dout, const float* lse,
                  const float* delta, const AttentionArgs& args, cudaStream_t stream) {
    constexpr int G = kBackwardGroups, kBlockRows = G * kGroupRows;
    // K, V + 2 x (Q, dout) + 2 x (lse, delta);  Q, dout + 2 x (K, V)
    const size_t kv_bytes =
        2 * tile_bytes(kBlockRows, D) + 4 * tile_bytes(kGroupRows, D) + 4 * kGroupRows * sizeof(float) + 1024;
    const size_t q_bytes = 2 * tile_bytes(kBlockRows, D) + 4 * tile_bytes(kGroupRows, D) + 1024;
    static bool configured = false;
    if (!configured) {
        allow_shared_bytes(backward_kv_kernel<D, G>, kv_bytes);
        allow_shared_bytes(backward_q_kernel<D, G>, q_bytes);
        configured = true;
    }
    const dim3 grid((args.seq_len + kBlockRows - 1) / kBlockRows, args.batch * args.n_heads);
    cudaStream_t side = fork_side_stream(stream);
    backward_kv_kernel<D, G><<<grid, G * 128, kv_bytes, stream>>>(dk, dv, dout, lse, delta, args);
    CUDA_CHECK_LAUNCH();
    backward_q_kernel<D, G><<<grid, G * 128, q_bytes, side>>>(dq, dout, lse, delta, args);
    CUDA_CHECK_LAUNCH();
    join_side_stream(stream);
}

}  // namespace

bool wgmma_kernels_available(int head_dim) {
#ifdef QOPT_WGMMA
    return (head_dim == 64 || head_dim == 128) && current_device_major() == 9;
#else
    (void)head_dim;
    return false;
#endif
}

void attention_forward_wgmma(Rows<bf16> out, float* lse, const AttentionArgs& args, int head_dim,
                             cudaStream_t stream) {
    if (head_dim == 64) forward_for<64>(out, lse, args, stream);
    else forward_for<128>(out, lse, args, stream);
}

void attention_backward_wgmma(Rows<bf16> dq, Rows<bf16> dk, Rows<bf16> dv, Rows<const bf16> dout, const float* lse,
                              const float* delta, const AttentionArgs& args, int head_dim, cudaStream_t stream) {
    if (head_dim == 64) backward_for<64>(dq, dk, dv, dout, lse, delta, args, stream);
    else backward_for<128>(dq, dk, dv, dout, lse, delta, args, stream);
}

}  // namespace flash
}  // namespace qopt
