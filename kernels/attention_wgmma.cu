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

// Dynamic shared memory, its start rounded up to 1024 bytes (swizzled panels must be).
__device__ __forceinline__ bf16* aligned_shared(unsigned char* bytes) {
    const uint32_t misalignment = shared_address(bytes) % 1024;
    return reinterpret_cast<bf16*>(bytes + (misalignment ? 1024 - misalignment : 0));
}

// Rows first_row .. first_row+ROWS-1 (D columns of one head) into a swizzled tile of ROWS rows
// (D/64 panels); rows at or past seq_len become zeros.
template <int ROWS, int D, int THREADS>
__device__ __forceinline__ void load_swizzled(bf16* tile, const bf16* head, int stride, int first_row, int seq_len) {
    constexpr int kChunks = D / 8;  // 16-byte pieces per row
#pragma unroll 4
    for (int c = threadIdx.x; c < ROWS * kChunks; c += THREADS) {
        const int r = c / kChunks, chunk = c % kChunks;
        const bool valid = first_row + r < seq_len;
        const bf16* source = head + size_t(valid ? first_row + r : 0) * stride + chunk * 8;
        cp_async_16(tile + (chunk / 8) * ROWS * 64 + swizzled_offset(r, chunk % 8), source, valid);
    }
}

// The current tile's copies have landed and are visible to every warpgroup's tensor cores.
__device__ __forceinline__ void tile_ready(bool next_issued) {
    wait_current_tile(next_issued);
    fence_shared_for_wgmma();
    __syncthreads();
}

// d (64 x D) (+)= A (64 x 16, registers) * B (16 x D rows ks*16.. of an MN-major tile of 64 rows).
template <int D>
__device__ __forceinline__ void wgmma_rs(float d[][4], const uint32_t a[4], const bf16* tile, int ks) {
    if constexpr (D == 64) wgmma_rs_n64(d, a, mn_major_descriptor(tile, kGroupRows, ks), 1);
    else wgmma_rs_n128(d, a, mn_major_descriptor(tile, kGroupRows, ks), 1);
}

// s (64 x 64) = rows first_row.. of the K-major tile a (panel_rows rows) times the 64 rows of
// the streamed tile b, transposed: A B^T over the D columns.
template <int D>
__device__ __forceinline__ void wgmma_abt(float s[][4], const bf16* a, int panel_rows, int first_row, const bf16* b) {
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks)
        wgmma_ss_n64(s, k_major_descriptor(a, panel_rows, first_row, ks), k_major_descriptor(b, kGroupRows, 0, ks),
                     ks > 0);
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

// ---------------------------------------------------------------- forward
template <int D, int G>
__global__ void __launch_bounds__(G * 128) forward_kernel(Rows<bf16> out, float* lse, AttentionArgs args) {
#ifdef QOPT_HOPPER_BODY
    constexpr int kBlockRows = G * kGroupRows, kBlockThreads = G * 128;
    extern __shared__ unsigned char shared_bytes[];
    bf16* q_tile = aligned_shared(shared_bytes);  // [G x 64 rows x D]
    bf16* kv_tiles = q_tile + kBlockRows * D;     // [2 buffers][K, V][64 rows x D]
    const int T = args.seq_len;
    const int n_key_tiles = (T + kGroupRows - 1) / kGroupRows;
    const int n_blocks = (T + kBlockRows - 1) / kBlockRows;
    const int first_query = (n_blocks - 1 - int(blockIdx.x)) * kBlockRows;  // longest rows first
    const int b = int(blockIdx.y) / args.n_heads, h = int(blockIdx.y) % args.n_heads;
    const int group = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const int group_first_row = first_query + group * kGroupRows;
    const bool group_active = group_first_row < T;
    const int diagonal_tile = group_first_row / kGroupRows;
    const int last_tile = min(first_query / kGroupRows + G - 1, n_key_tiles - 1);
    const bf16* k = head_base(args.k, b, h, T, D);
    const bf16* v = head_base(args.v, b, h, T, D);
    load_swizzled<kBlockRows, D, kBlockThreads>(q_tile, head_base(args.q, b, h, T, D), args.q.stride, first_query, T);
    load_kv<D, kBlockThreads>(kv_tiles, k, v, args, 0);

    const float scale_log2 = args.scale * kLog2e;  // exp(scale x) = 2^(scale log2(e) x)
    const int row0 = group_first_row + warp * 16 + lane / 4;
    float o[D / 8][4];
    zero<D>(o);
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
    for (int kt = 0; kt <= last_tile; ++kt) {
        const bool next = kt < last_tile;
        if (next) load_kv<D, kBlockThreads>(kv_tiles, k, v, args, kt + 1);
        tile_ready(next);
        if (group_active && kt <= diagonal_tile) {
            const bf16* k_tile = kv_tiles + (kt % 2) * 2 * kGroupRows * D;
            const bf16* v_tile = k_tile + kGroupRows * D;
            float s[kGroupRows / 8][4];
            wgmma_fence();
            wgmma_abt<D>(s, q_tile, kBlockRows, group * kGroupRows, k_tile);  // S = Q K^T
            wgmma_commit();
            wgmma_wait<0>();
            wgmma_pin<kGroupRows>(s);
            if (kt == diagonal_tile) mask_scores<kGroupRows>(s, row0, kt * kGroupRows, T);
            online_softmax_update<kGroupRows, D>(s, o, row_max, row_sum, scale_log2);
            uint32_t p_fragments[kGroupRows / 16][4];
            to_a_fragments<kGroupRows>(p_fragments, s);
            wgmma_fence();
#pragma unroll
            for (int ks = 0; ks < kGroupRows / 16; ++ks) wgmma_rs<D>(o, p_fragments[ks], v_tile, ks);  // O += P V
            wgmma_commit();
            wgmma_wait<0>();
            wgmma_pin<D>(o);
            wgmma_pin_fragments<kGroupRows>(p_fragments);
        }
        __syncthreads();  // this buffer is refilled next iteration
    }
    if (group_active)
        finish_forward_rows<D>(out, lse + size_t(blockIdx.y) * T, args, b, h, group_first_row + warp * 16, o,
                               row_max, row_sum, scale_log2);
#endif
}

// ---------------------------------------------------------------- backward
// dK and dV of G x 64 keys (64 per warpgroup): loop over the query tiles at or after the keys.
template <int D, int G>
__global__ void __launch_bounds__(G * 128)
    backward_kv_kernel(Rows<bf16> dk, Rows<bf16> dv, Rows<const bf16> dout, const float* lse, const float* delta,
                       AttentionArgs args) {
#ifdef QOPT_HOPPER_BODY
    constexpr int kBlockRows = G * kGroupRows, kBlockThreads = G * 128;
    extern __shared__ unsigned char shared_bytes[];
    bf16* k_tile = aligned_shared(shared_bytes);         // [G x 64 rows x D]
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
    float dk_acc[D / 8][4], dv_acc[D / 8][4];
    zero<D>(dk_acc);
    zero<D>(dv_acc);
    for (int qt = first_key / kGroupRows; qt < n_query_tiles; ++qt) {
        const bool next = qt + 1 < n_query_tiles;
        if (next) load_queries(qt + 1);
        tile_ready(next);
        if (group_active && qt >= diagonal_tile) {
            const bf16* q_tile = q_dout_tiles + (qt % 2) * 2 * kGroupRows * D;
            const bf16* dout_tile = q_tile + kGroupRows * D;
            const float* lse_tile = stats + (qt % 2) * 2 * kGroupRows;
            const float* delta_tile = lse_tile + kGroupRows;
            float p[kGroupRows / 8][4], dp[kGroupRows / 8][4];  // P^T, dP^T: keys x queries
            wgmma_fence();
            wgmma_abt<D>(p, k_tile, kBlockRows, group * kGroupRows, q_tile);      // S^T = K Q^T
            wgmma_abt<D>(dp, v_tile, kBlockRows, group * kGroupRows, dout_tile);  // dP^T = V dout^T
            wgmma_commit();
            wgmma_wait<0>();
            wgmma_pin<kGroupRows>(p);
            wgmma_pin<kGroupRows>(dp);
            const bool diagonal = qt == diagonal_tile;
#pragma unroll
            for (int nt = 0; nt < kGroupRows / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int column = nt * 8 + 2 * (lane % 4) + e % 2;
                    const int key = key0 + 8 * (e / 2), query = qt * kGroupRows + column;
                    p[nt][e] = (diagonal && query < key) ? 0.0f : exp2f(p[nt][e] * scale_log2 - lse_tile[column]);
                }
            uint32_t p_fragments[kGroupRows / 16][4], ds_fragments[kGroupRows / 16][4];
            to_a_fragments<kGroupRows>(p_fragments, p);
            // dV += P^T dout runs on the tensor cores while dS^T = P^T * (dP^T - delta) is formed.
            wgmma_fence();
#pragma unroll
            for (int ks = 0; ks < kGroupRows / 16; ++ks) wgmma_rs<D>(dv_acc, p_fragments[ks], dout_tile, ks);
            wgmma_commit();
#pragma unroll
            for (int nt = 0; nt < kGroupRows / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    dp[nt][e] = p[nt][e] * (dp[nt][e] - delta_tile[nt * 8 + 2 * (lane % 4) + e % 2]);
            to_a_fragments<kGroupRows>(ds_fragments, dp);
            wgmma_fence();
#pragma unroll
            for (int ks = 0; ks < kGroupRows / 16; ++ks) wgmma_rs<D>(dk_acc, ds_fragments[ks], q_tile, ks);
            wgmma_commit();
            wgmma_wait<0>();
            wgmma_pin<D>(dv_acc);
            wgmma_pin_fragments<kGroupRows>(p_fragments);
            wgmma_pin_fragments<kGroupRows>(ds_fragments);
            wgmma_pin<D>(dk_acc);
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
__global__ void __launch_bounds__(G * 128)
    backward_q_kernel(Rows<bf16> dq, Rows<const bf16> dout, const float* lse, const float* delta, AttentionArgs args) {
#ifdef QOPT_HOPPER_BODY
    constexpr int kBlockRows = G * kGroupRows, kBlockThreads = G * 128;
    extern __shared__ unsigned char shared_bytes[];
    bf16* q_tile = aligned_shared(shared_bytes);  // [G x 64 rows x D]
    bf16* dout_tile = q_tile + kBlockRows * D;    // [G x 64 rows x D]
    bf16* kv_tiles = dout_tile + kBlockRows * D;  // [2 buffers][K, V][64 rows x D]
    const int T = args.seq_len;
    const int n_key_tiles = (T + kGroupRows - 1) / kGroupRows;
    const int n_blocks = (T + kBlockRows - 1) / kBlockRows;
    const int first_query = (n_blocks - 1 - int(blockIdx.x)) * kBlockRows;
    const int b = int(blockIdx.y) / args.n_heads, h = int(blockIdx.y) % args.n_heads;
    const int group = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const int group_first_row = first_query + group * kGroupRows;
    const bool group_active = group_first_row < T;
    const int diagonal_tile = group_first_row / kGroupRows;
    const int last_tile = min(first_query / kGroupRows + G - 1, n_key_tiles - 1);
    const bf16* k = head_base(args.k, b, h, T, D);
    const bf16* v = head_base(args.v, b, h, T, D);
    load_swizzled<kBlockRows, D, kBlockThreads>(q_tile, head_base(args.q, b, h, T, D), args.q.stride, first_query, T);
    load_swizzled<kBlockRows, D, kBlockThreads>(dout_tile, head_base(dout, b, h, T, D), dout.stride, first_query, T);
    load_kv<D, kBlockThreads>(kv_tiles, k, v, args, 0);

    const float scale_log2 = args.scale * kLog2e;
    const int row0 = group_first_row + warp * 16 + lane / 4;
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
    for (int kt = 0; kt <= last_tile; ++kt) {
        const bool next = kt < last_tile;
        if (next) load_kv<D, kBlockThreads>(kv_tiles, k, v, args, kt + 1);
        tile_ready(next);
        if (group_active && kt <= diagonal_tile) {
            const bf16* k_tile = kv_tiles + (kt % 2) * 2 * kGroupRows * D;
            const bf16* v_tile = k_tile + kGroupRows * D;
            float p[kGroupRows / 8][4], dp[kGroupRows / 8][4];
            wgmma_fence();
            wgmma_abt<D>(p, q_tile, kBlockRows, group * kGroupRows, k_tile);      // S = Q K^T
            wgmma_abt<D>(dp, dout_tile, kBlockRows, group * kGroupRows, v_tile);  // dP = dout V^T
            wgmma_commit();
            wgmma_wait<0>();
            wgmma_pin<kGroupRows>(p);
            wgmma_pin<kGroupRows>(dp);
            const bool diagonal = kt == diagonal_tile;
#pragma unroll
            for (int nt = 0; nt < kGroupRows / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int half = e / 2, row = row0 + 8 * half;
                    const int key = kt * kGroupRows + nt * 8 + 2 * (lane % 4) + e % 2;
                    const float prob = (diagonal && (key > row || key >= T))
                                           ? 0.0f
                                           : exp2f(p[nt][e] * scale_log2 - row_lse[half]);
                    p[nt][e] = prob * (dp[nt][e] - row_delta[half]);  // dS
                }
            uint32_t fragments[kGroupRows / 16][4];
            to_a_fragments<kGroupRows>(fragments, p);
            wgmma_fence();
#pragma unroll
            for (int ks = 0; ks < kGroupRows / 16; ++ks) wgmma_rs<D>(dq_acc, fragments[ks], k_tile, ks);  // dQ += dS K
            wgmma_commit();
            wgmma_wait<0>();
            wgmma_pin<D>(dq_acc);
            wgmma_pin_fragments<kGroupRows>(fragments);
        }
        __syncthreads();  // this buffer is refilled next iteration
    }
    if (group_active)
        store_rows<D>(head_base(dq, b, h, T, D), dq.stride, group_first_row + warp * 16, T, dq_acc, args.scale,
                      args.scale);
#endif
}

template <typename Kernel>
void allow_shared_bytes(Kernel kernel, size_t bytes) {
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
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
    backward_kv_kernel<D, G><<<grid, G * 128, kv_bytes, stream>>>(dk, dv, dout, lse, delta, args);
    CUDA_CHECK_LAUNCH();
    backward_q_kernel<D, G><<<grid, G * 128, q_bytes, stream>>>(dq, dout, lse, delta, args);
    CUDA_CHECK_LAUNCH();
}

#ifdef QOPT_WGMMA
// Compute capability major of the current device (asked once per device).
int device_major() {
    static int majors[64];
    int device = 0;
    CUDA_CHECK(cudaGetDevice(&device));
    if (device < 0 || device >= 64) return 0;
    if (majors[device] == 0) {
        int major = 0;
        CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
        majors[device] = major;
    }
    return majors[device];
}
#endif

}  // namespace

bool wgmma_kernels_available(int head_dim) {
#ifdef QOPT_WGMMA
    return (head_dim == 64 || head_dim == 128) && device_major() == 9;
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
