// W8A8's product with its scales in the epilogue, on Hopper's int8 tensor cores (wgmma
// .s32.s8.s8, kernels/wgmma.cuh):
//     out[n, o] = bf16( float(sum_i in[n, i] * weight[o, i]) * in_steps[n] * w_steps[o] + bias[o] )
// with each multiplication and the addition rounded on its own — the CPU reference
// int8_matmul_cpu + dequantize_product_cpu, and the two-pass GPU path (cuBLASLt int32 product,
// then dequantize_product_gpu), bit for bit. cuBLASLt's int8 kernels take no per-row x
// per-column scale vectors (and their float outputs exist only as int8), so without this kernel
// the int32 product (4 bytes per output) goes to memory and a second pass reads it back.
//
// Work layout: a block of two warpgroups computes a 128 x 256 tile of out (64 token rows per
// warpgroup, all 256 output channels: one m64n256k32 wgmma per 32 of the contraction, 128 int32
// accumulators per thread). The contraction streams through shared memory in stages of 128
// (one 128-byte swizzled panel per row of both operands, 48 KB), kStages deep, filled by
// cp.async from all 256 threads (rows past the ends and columns past in_dim zero-filled);
// blocks walk the output channels fastest, so the blocks that share input rows run together and
// read them from L2. Only where the build targets sm_90a (QOPT_WGMMA) and in_dim is a multiple of
// 16 (16-byte copies); elsewhere int8_scaled_matmul_gpu returns false and callers take the
// two-pass path.
#include <cstdint>

#include "kernels/cuda_common.cuh"
#include "kernels/wgmma.cuh"
#include "quant/int8_linear.hpp"

namespace qopt {
namespace {

constexpr int kTileRows = 128;   // token rows per block: 64 per warpgroup
constexpr int kTileCols = 256;   // output channels per block (the wgmma's N)
constexpr int kTileDepth = 128;  // int8 elements of the contraction per stage: one swizzled panel
constexpr int kStages = 4;
constexpr int kThreads = 256;
constexpr int kStageBytes = (kTileRows + kTileCols) * kTileDepth;
// A tile's scales: its output channels' steps and biases, its rows' steps (fp32).
constexpr int kScaleFloats = 2 * kTileCols + kTileRows;
// Tile t's scales load with its first stage, kStages - 2 stages ahead: with one stage per tile
// (in_dim <= 128) that is during the epilogue of tile t - 2, so three tiles' scales are kept.
constexpr int kScaleBuffers = 3;
// Stages, scales, and room to align the start to 1024 bytes.
constexpr size_t kSharedBytes =
    size_t(kStages) * kStageBytes + size_t(kScaleBuffers) * kScaleFloats * sizeof(float) + 1024;

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// Columns k0 .. k0+127 of rows first_row .. first_row+ROWS-1 of a row-major int8 matrix [n_rows,
// depth] into a swizzled tile (kernels/wgmma.cuh's panel layout, bytes for elements): thread t
// copies 16-byte chunk t % 8 of every 32nd row from t / 8, so its swizzle is fixed. Rows at or
// past n_rows and chunks at or past depth (a multiple of 16) are zero-filled.
template <int ROWS>
__device__ __forceinline__ void load_tile(uint8_t* tile, const int8_t* matrix, int n_rows, int depth, int first_row,
                                          int k0) {
    constexpr int kRowsPerPass = kThreads / 8;
    const int chunk = int(threadIdx.x) % 8, r0 = int(threadIdx.x) / 8;
    const bool chunk_valid = k0 + 16 * chunk < depth;
    uint8_t* destination = tile + r0 * 128 + 16 * (chunk ^ (r0 & 7));
    const int8_t* source = matrix + size_t(first_row + r0) * depth + k0 + 16 * chunk;
#pragma unroll
    for (int pass = 0; pass < ROWS / kRowsPerPass; ++pass) {
        const bool valid = chunk_valid && first_row + r0 + pass * kRowsPerPass < n_rows;
        cp_async_16(destination + pass * kRowsPerPass * 128,
                    valid ? source + size_t(pass) * kRowsPerPass * depth : matrix, valid);
    }
}

// The scales of the tile at (first_row, first_col) into shared memory: w_steps, bias (zeros
// where null or past out_dim), in_steps (zeros past n_rows).
__device__ __forceinline__ void load_scales(float* scales, const float* in_steps, const float* w_steps,
                                            const float* bias, int n_rows, int out_dim, int first_row, int first_col) {
    const int t = int(threadIdx.x);
    static_assert(kThreads == kTileCols && kTileRows <= kThreads, "one scale of each kind per thread");
    const bool column_valid = first_col + t < out_dim;
    cp_async_4(scales + t, column_valid ? w_steps + first_col + t : w_steps, column_valid);
    cp_async_4(scales + kTileCols + t, column_valid && bias ? bias + first_col + t : w_steps, column_valid && bias);
    if (t < kTileRows) {
        const bool row_valid = first_row + t < n_rows;
        cp_async_4(scales + 2 * kTileCols + t, row_valid ? in_steps + first_row + t : in_steps, row_valid);
    }
}

// Epilogue of one tile: thread (warp, lane) holds rows 16 warp + lane/4 (+8) of its warpgroup's
// 64 and columns 8 i + 2 (lane % 4) (+1) of the 256 (kernels/wgmma.cuh's accumulator layout).
// Each output is the exact integer sum scaled as dequantize_product_cpu does: two multiplications
// and the bias's addition, each rounded on its own (with_bias: a null bias adds nothing, not +0,
// so -0 stays -0).
__device__ __forceinline__ void store_scaled(bf16* out, const int32_t sums[32][4], const float* scales, bool with_bias,
                                             int n_rows, int out_dim, int first_row, int first_col) {
    const int group = int(threadIdx.x) / 128, warp = (int(threadIdx.x) / 32) % 4, lane = int(threadIdx.x) % 32;
    const int tile_row = group * 64 + warp * 16 + lane / 4, row = first_row + tile_row;
    const float* tile_w_steps = scales;
    const float* tile_bias = scales + kTileCols;
    const float in_step[2] = {scales[2 * kTileCols + tile_row], scales[2 * kTileCols + tile_row + 8]};
    // Interior tiles (every column there, pairs 4-byte aligned) store bf16 pairs unchecked.
    const bool full_width = first_col + kTileCols <= out_dim && out_dim % 2 == 0;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        if (row + 8 * half >= n_rows) continue;
        bf16* out_row = out + size_t(row + 8 * half) * out_dim + first_col;
#pragma unroll
        for (int i = 0; i < 32; ++i) {
            const int column = 8 * i + 2 * (lane % 4);  // within the tile
            float value[2];
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const float sum = __int2float_rn(sums[i][2 * half + e]);
                const float scaled = __fmul_rn(__fmul_rn(sum, in_step[half]), tile_w_steps[column + e]);
                value[e] = with_bias ? __fadd_rn(scaled, tile_bias[column + e]) : scaled;
            }
            if (full_width) {
                *reinterpret_cast<__nv_bfloat162*>(out_row + column) = __floats2bfloat162_rn(value[0], value[1]);
            } else {
                if (first_col + column < out_dim) out_row[column] = __float2bfloat16_rn(value[0]);
                if (first_col + column + 1 < out_dim) out_row[column + 1] = __float2bfloat16_rn(value[1]);
            }
        }
    }
}

#endif

// Persistent: block b computes tiles b, b + gridDim.x, ... (output channels fastest), and its
// stages run on across tiles — (tile, k-stage) pairs are one sequence, so the next tile's first
// stages load during a tile's epilogue.
__global__ void __launch_bounds__(kThreads, 1)
    int8_scaled_gemm_kernel(bf16* out, const int8_t* in, const int8_t* weight, const float* in_steps,
                            const float* w_steps, const float* bias, int n_rows, int in_dim, int out_dim) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ unsigned char shared_bytes[];
    uint8_t* stages = aligned_shared<uint8_t>(shared_bytes);  // per stage: input tile, then weight tile
    float* scales = reinterpret_cast<float*>(stages + kStages * kStageBytes);  // [kScaleBuffers][kScaleFloats]
    const int group = int(threadIdx.x) / 128;
    const int k_tiles = (in_dim + kTileDepth - 1) / kTileDepth;
    const int col_tiles = (out_dim + kTileCols - 1) / kTileCols;
    const int n_tiles = col_tiles * ((n_rows + kTileRows - 1) / kTileRows);
    const int my_tiles = (n_tiles - int(blockIdx.x) + int(gridDim.x) - 1) / int(gridDim.x);
    const int iterations = my_tiles * k_tiles;
    // Stage i: k-stage i % k_tiles of the block's tile i / k_tiles, whose scales come with its
    // first stage.
    auto load_stage = [&](int i) {
        const int t = i / k_tiles, tile = int(blockIdx.x) + t * int(gridDim.x), k0 = (i % k_tiles) * kTileDepth;
        const int first_row = (tile / col_tiles) * kTileRows, first_col = (tile % col_tiles) * kTileCols;
        uint8_t* input_tile = stages + (i % kStages) * kStageBytes;
        load_tile<kTileRows>(input_tile, in, n_rows, in_dim, first_row, k0);
        load_tile<kTileCols>(input_tile + kTileRows * kTileDepth, weight, out_dim, in_dim, first_col, k0);
        if (k0 == 0)
            load_scales(scales + (t % kScaleBuffers) * kScaleFloats, in_steps, w_steps, bias, n_rows, out_dim,
                        first_row, first_col);
    };
    // kLookahead stages in flight ahead of the one in use; one commit group per stage (empty
    // ones too), so that "all but kLookahead - 1 groups landed" means "stage i landed".
    constexpr int kLookahead = kStages - 2;
#pragma unroll
    for (int i = 0; i < kLookahead; ++i) {
        if (i < iterations) load_stage(i);
        cp_async_commit();
    }
    const uint64_t input_rows = k_major_tile(stages + group * 64 * kTileDepth);  // this warpgroup's 64 rows
    const uint64_t weight_rows = k_major_tile(stages + kTileRows * kTileDepth);
    int32_t sums[32][4];
    for (int t = 0, i = 0; t < my_tiles; ++t) {
        for (int kt = 0; kt < k_tiles; ++kt, ++i) {
            cp_async_wait<kLookahead - 1>();
            fence_shared_for_wgmma();
            // Stage i landed for every thread, and every warpgroup finished its products of
            // stage i-2 (waited for below), whose buffer (= that of stage i + kLookahead) is
            // refilled now.
            __syncthreads();
            if (i + kLookahead < iterations) load_stage(i + kLookahead);
            cp_async_commit();
            const uint32_t stage = uint32_t(i % kStages) * kStageBytes;
            wgmma_fence();
#pragma unroll
            for (int ks = 0; ks < kTileDepth / 32; ++ks)
                wgmma_ss_s8_n256(sums, k_major_step(advance(input_rows, stage), kTileRows, ks),
                                 k_major_step(advance(weight_rows, stage), kTileCols, ks), kt > 0 || ks > 0);
            wgmma_commit();
            wgmma_wait<1>();  // stage i-1's products done; stage i's run on
        }
        wgmma_wait<0>();
        wgmma_pin<256>(sums);
        const int tile = int(blockIdx.x) + t * int(gridDim.x);
        // This tile's scales landed with its first stage, which every thread has waited for.
        store_scaled(out, sums, scales + (t % kScaleBuffers) * kScaleFloats, bias != nullptr, n_rows, out_dim,
                     (tile / col_tiles) * kTileRows, (tile % col_tiles) * kTileCols);
    }
#endif
}

}  // namespace

bool int8_scaled_matmul_available(int in_dim) {
#ifdef QOPT_WGMMA
    return in_dim > 0 && in_dim % 16 == 0 && current_device_major() == 9;
#else
    (void)in_dim;
    return false;
#endif
}

bool int8_scaled_matmul_gpu(bf16* out, const int8_t* in, const int8_t* weight, const float* in_steps,
                            const float* w_steps, const float* bias, int n_rows, int in_dim, int out_dim,
                            cudaStream_t stream) {
    if (!int8_scaled_matmul_available(in_dim) || !is_aligned(in, 16) || !is_aligned(weight, 16)) return false;
    QOPT_CHECK(n_rows >= 0 && out_dim >= 0, "int8 scaled matmul: negative size ", n_rows, " x ", out_dim);
    QOPT_CHECK(in_dim < 133000, "int8 scaled matmul: in_dim ", in_dim, " could overflow the int32 sums");
    const long row_tiles = (long(n_rows) + kTileRows - 1) / kTileRows;
    const long stages = row_tiles * ((out_dim + kTileCols - 1) / kTileCols) * ((in_dim + kTileDepth - 1) / kTileDepth);
    QOPT_CHECK(stages < (1L << 31), "int8 scaled matmul: ", n_rows, " x ", in_dim, " x ", out_dim, " has too many tiles");
    if (n_rows == 0 || out_dim == 0) return true;
    static bool configured = false;
    if (!configured) allow_shared_bytes(int8_scaled_gemm_kernel, kSharedBytes), configured = true;
    const long tiles = row_tiles * ((out_dim + kTileCols - 1) / kTileCols);
    const long sm_count = current_device_sm_count();
    const unsigned grid = unsigned(tiles < sm_count ? tiles : sm_count);
    int8_scaled_gemm_kernel<<<grid, kThreads, kSharedBytes, stream>>>(out, in, weight, in_steps, w_steps, bias, n_rows,
                                                                       in_dim, out_dim);
    CUDA_CHECK_LAUNCH();
    return true;
}

}  // namespace qopt
