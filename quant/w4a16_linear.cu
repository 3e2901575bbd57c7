// CUDA side of quant/w4a16_linear.hpp: the packed-4-bit weight-only layer.
//
// GEMM (more than 16 input rows): a block computes a 128 x 128 tile of out (128 input rows x 128
// outputs) with 8 warps of 64 x 32, over k in steps of 32. cp.async brings each step's input tile
// (bf16, 8 KB) and packed weight tile (2 KB: a quarter of bf16's bytes) into shared memory, 3
// stages deep; each step the block dequantizes the next step's packed tile into a bf16 tile (a
// thread 16 codes: sign-extend the nibble, (code + offset) * step, round to bf16) while the warps
// multiply the current one with ldmatrix + mma.sync m16n8k16 (kernels/mma.cuh), fp32 accumulators
// in registers; one barrier per step. Per step and warp: 2 x (4 + 2) ldmatrix.x4 for 32 mma, and
// 16 codes dequantized per thread. Against cuBLASLt's bf16 GEMM (wgmma, TMA) it gives up Hopper's
// warpgroup MMA and pays the dequantization; it wins where the weights' bytes dominate.
//
// GEMV (1..16 input rows, decoding; passes of up to 4 rows): 4 warps share an output row, each
// thread streaming 16 bytes (32 codes) of packed weights per load with 4 loads in flight,
// dequantizing them the same way and dotting them with the input rows (read through the read-only
// cache); warp shuffles, then shared memory, sum the partial dots in a fixed order. Memory-bound:
// 0.5 byte per weight (+ 8 bytes per group) instead of bf16's 2; after the first pass the packed
// weights come from L2.
#include <algorithm>

#include "core/error.hpp"
#include "kernels/cuda_common.cuh"
#include "kernels/mma.cuh"
#include "quant/w4a16_linear.hpp"

namespace qopt {

namespace {

constexpr int kTileRows = 128;     // input rows per block tile
constexpr int kTileOutputs = 128;  // outputs per block tile
constexpr int kTileK = 32;         // k per step
constexpr int kStages = 3;         // tiles in flight
constexpr int kThreads = 256;      // 8 warps: 2 (rows) x 4 (outputs), each 64 x 32
constexpr int kGemvRows = 4;       // input rows per GEMV pass
constexpr int kGemvRowsMax = 16;   // up to this many rows take the GEMV (passes of kGemvRows)

struct PackedView {
    const uint8_t* packed;
    const float *steps, *offsets;
    int rows, cols, group_cols;
};

// Shared memory of a block: kStages input tiles and packed weight tiles in flight, and two bf16
// weight tiles (one being multiplied while the next is dequantized). Rows padded by 8 bf16 so the
// 8 rows one ldmatrix reads sit in distinct banks.
struct GemmShared {
    static constexpr int kPitch = kTileK + 8;
    bf16 input[kStages][kTileRows][kPitch];
    uint8_t packed[kStages][kTileOutputs][kTileK / 2];
    bf16 weight[2][kTileOutputs][kPitch];
};

// Nibble j (0..7) of a 32-bit word of packed codes, sign-extended from 4 bits.
__device__ __forceinline__ int nibble(uint32_t word, int j) { return int(word << (28 - 4 * j)) >> 28; }

// Codes 0..7 of `word` (columns in order) dequantized by one group's grid, as 4 bf16 pairs.
__device__ __forceinline__ uint4 dequantize_8(uint32_t word, float step, float offset) {
    uint32_t pairs[4];
#pragma unroll
    for (int p = 0; p < 4; ++p)
        pairs[p] = pack_bf16x2(mul_rn(float(nibble(word, 2 * p)) + offset, step),
                               mul_rn(float(nibble(word, 2 * p + 1)) + offset, step));
    return make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);
}

// The grid of weight row o at column k (rows past the end: zeros, their outputs are not written).
__device__ __forceinline__ void group_grid(const PackedView& w, int o, int k, float& step, float& offset) {
    step = offset = 0.0f;
    if (o >= w.rows) return;
    const size_t g = size_t(o) * (w.cols / w.group_cols) + k / w.group_cols;
    step = __ldg(w.steps + g), offset = __ldg(w.offsets + g);
}

__device__ void load_stage(GemmShared& s, int stage, const bf16* in, const PackedView& w, int n_rows,
                           int first_row, int first_output, int k0) {
    constexpr int kInputCopies = kTileK / 8, kPackedCopies = kTileK / 32;  // 16-byte copies per row
    for (int c = threadIdx.x; c < kTileRows * kInputCopies; c += kThreads) {
        const int r = c / kInputCopies, col = (c % kInputCopies) * 8;
        const bool valid = first_row + r < n_rows;
        cp_async_16(&s.input[stage][r][col], in + size_t(valid ? first_row + r : 0) * w.cols + k0 + col, valid);
    }
    for (int c = threadIdx.x; c < kTileOutputs * kPackedCopies; c += kThreads) {
        const int r = c / kPackedCopies, byte = (c % kPackedCopies) * 16;
        const bool valid = first_output + r < w.rows;
        cp_async_16(&s.packed[stage][r][byte],
                    w.packed + size_t(valid ? first_output + r : 0) * (w.cols / 2) + k0 / 2 + byte, valid);
    }
}

// A stage's packed tile into a bf16 weight tile, 16 codes (one group: group_cols is a multiple
// of 16) per thread: warp w takes rows 16w .. 16w+15, lanes 0-15 their first 16 columns and lanes
// 16-31 the next 16, so the 8 lanes of each quarter-warp store 16 bytes into 8 distinct bank
// groups (rows 80 bytes apart) — no bank conflicts.
__device__ void dequantize_stage(GemmShared& s, int stage, int buffer, const PackedView& w, int first_output,
                                 int k0) {
    static_assert(kTileK == 32 && kThreads * 16 == kTileOutputs * kTileK, "one 16-code piece per thread");
    const int lane = threadIdx.x % 32, r = (threadIdx.x / 32) * 16 + lane % 16, piece = lane / 16;
    const uint2 words = *reinterpret_cast<const uint2*>(&s.packed[stage][r][piece * 8]);
    float step, offset;
    group_grid(w, first_output + r, k0 + piece * 16, step, offset);
    uint4* destination = reinterpret_cast<uint4*>(&s.weight[buffer][r][piece * 16]);
    destination[0] = dequantize_8(words.x, step, offset);
    destination[1] = dequantize_8(words.y, step, offset);
}

// Pipeline, per k step t: wait for tile t+1's copies; one barrier (tile t+1 visible to all,
// everyone done with step t-1, so its stage and weight buffer are free); issue the copies of tile
// t+kStages-1; dequantize tile t+1 into the free weight buffer while multiplying tile t — warps
// interleave the ALU work of one with the tensor-core work of the other.
__global__ void __launch_bounds__(kThreads) w4a16_gemm_kernel(bf16* out, const bf16* in, PackedView w,
                                                               const float* bias, int n_rows) {
    extern __shared__ __align__(16) unsigned char shared_bytes[];
    auto& s = *reinterpret_cast<GemmShared*>(shared_bytes);
    const int first_output = blockIdx.x * kTileOutputs, first_row = blockIdx.y * kTileRows;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int warp_row = (warp / 4) * 64, warp_output = (warp % 4) * 32;
    const int k_steps = w.cols / kTileK;

    float acc[4][4][4] = {};  // [16-row tile][8-output tile][fragment]
    // Prologue: tiles 0 .. kStages-2 in flight, one cp.async group each (empty past the end, so
    // group counts stay fixed), tile 0 dequantized.
    for (int t = 0; t < kStages - 1; ++t) {
        if (t < k_steps) load_stage(s, t, in, w, n_rows, first_row, first_output, t * kTileK);
        cp_async_commit();
    }
    cp_async_wait<kStages - 2>();
    __syncthreads();
    dequantize_stage(s, 0, 0, w, first_output, 0);
    for (int t = 0; t < k_steps; ++t) {
        cp_async_wait<kStages - 3>();
        __syncthreads();
        const int next = t + kStages - 1;
        if (next < k_steps) load_stage(s, next % kStages, in, w, n_rows, first_row, first_output, next * kTileK);
        cp_async_commit();
        if (t + 1 < k_steps) dequantize_stage(s, (t + 1) % kStages, (t + 1) % 2, w, first_output, (t + 1) * kTileK);
        const int stage = t % kStages, buffer = t % 2;
#pragma unroll
        for (int ks = 0; ks < kTileK / 16; ++ks) {
            uint32_t a[4][4], b[2][4];
#pragma unroll
            for (int mt = 0; mt < 4; ++mt)
                ldmatrix_x4(a[mt], &s.input[stage][warp_row + mt * 16 + lane % 16][ks * 16 + (lane / 16) * 8]);
#pragma unroll
            for (int np = 0; np < 2; ++np)
                ldmatrix_x4(b[np], &s.weight[buffer][warp_output + np * 16 + (lane / 16) * 8 + lane % 8]
                                            [ks * 16 + ((lane / 8) % 2) * 8]);
#pragma unroll
            for (int mt = 0; mt < 4; ++mt)
#pragma unroll
                for (int np = 0; np < 2; ++np) {
                    mma_16x8x16(acc[mt][2 * np], a[mt], b[np][0], b[np][1]);
                    mma_16x8x16(acc[mt][2 * np + 1], a[mt], b[np][2], b[np][3]);
                }
        }
    }
    // Epilogue: + bias, round to bf16. Fragment element (half, j): row lane/4 + 8 half, output
    // 2 (lane%4) + j; the pair j = 0, 1 goes out as one 4-byte store where it can.
    const bool pair_stores = w.rows % 2 == 0 && is_aligned(out, 4);
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int n = first_row + warp_row + mt * 16 + lane / 4 + 8 * half;
            if (n >= n_rows) continue;
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                const int o = first_output + warp_output + nt * 8 + 2 * (lane % 4);
                const float v0 = acc[mt][nt][2 * half] + (bias && o < w.rows ? bias[o] : 0.0f);
                const float v1 = acc[mt][nt][2 * half + 1] + (bias && o + 1 < w.rows ? bias[o + 1] : 0.0f);
                bf16* destination = out + size_t(n) * w.rows + o;
                if (pair_stores && o + 1 < w.rows) {
                    *reinterpret_cast<uint32_t*>(destination) = pack_bf16x2(v0, v1);
                } else {
                    if (o < w.rows) destination[0] = __float2bfloat16_rn(v0);
                    if (o + 1 < w.rows) destination[1] = __float2bfloat16_rn(v1);
                }
            }
        }
}

void launch_gemm(bf16* out, const bf16* in, const PackedView& w, const float* bias, int n_rows, cudaStream_t stream) {
    constexpr size_t kShared = sizeof(GemmShared);
    static bool configured = false;  // the opt-in above 48 KB, once
    if (!configured) {
        CUDA_CHECK(cudaFuncSetAttribute(w4a16_gemm_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(kShared)));
        configured = true;
    }
    const dim3 grid((w.rows + kTileOutputs - 1) / kTileOutputs, (n_rows + kTileRows - 1) / kTileRows);
    w4a16_gemm_kernel<<<grid, kThreads, kShared, stream>>>(out, in, w, bias, n_rows);
}

constexpr int kGemvWarpsPerRow = 4;  // warps sharing one output row (its k range interleaved)
constexpr int kGemvRowsPerBlock = 2;

template <int ROWS>
__global__ void __launch_bounds__(32 * kGemvWarpsPerRow * kGemvRowsPerBlock)
    w4a16_gemv_kernel(bf16* out, const bf16* in, PackedView w, const float* bias) {
    constexpr int kRowThreads = 32 * kGemvWarpsPerRow;
    __shared__ float partial[kGemvRowsPerBlock][kGemvWarpsPerRow][ROWS];
    const int row_in_block = threadIdx.x / kRowThreads, thread_in_row = threadIdx.x % kRowThreads;
    const int o = blockIdx.x * kGemvRowsPerBlock + row_in_block, lane = threadIdx.x % 32;
    const bool active = o < w.rows;
    const uint4* codes = reinterpret_cast<const uint4*>(w.packed + size_t(active ? o : 0) * (w.cols / 2));
    float sum[ROWS] = {};
    const int chunks = active ? w.cols / 32 : 0;  // 32 codes (16 bytes) each: columns 32 chunk .. +31
    // kLoads chunks per thread in flight before any is used: enough bytes in flight to stream HBM.
    constexpr int kLoads = 4;
    for (int base = thread_in_row; base < chunks; base += kRowThreads * kLoads) {
        uint4 packed[kLoads];
#pragma unroll
        for (int u = 0; u < kLoads; ++u)
            packed[u] = base + kRowThreads * u < chunks ? __ldg(codes + base + kRowThreads * u) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int u = 0; u < kLoads; ++u) {
            const int chunk = base + kRowThreads * u;
            if (chunk >= chunks) break;
            const uint32_t words[4] = {packed[u].x, packed[u].y, packed[u].z, packed[u].w};
#pragma unroll
            for (int half = 0; half < 2; ++half) {  // 16 columns share one group
                const int k = chunk * 32 + half * 16;
                float step, offset;
                group_grid(w, o, k, step, offset);
                const uint4 weight[2] = {dequantize_8(words[2 * half], step, offset),
                                         dequantize_8(words[2 * half + 1], step, offset)};
                const __nv_bfloat162* weight_pairs = reinterpret_cast<const __nv_bfloat162*>(weight);
#pragma unroll
                for (int n = 0; n < ROWS; ++n) {
                    const uint4* row = reinterpret_cast<const uint4*>(in + size_t(n) * w.cols + k);
                    const uint4 x[2] = {__ldg(row), __ldg(row + 1)};
                    const __nv_bfloat162* x_pairs = reinterpret_cast<const __nv_bfloat162*>(x);
#pragma unroll
                    for (int p = 0; p < 8; ++p) {
                        const float2 a = __bfloat1622float2(x_pairs[p]), b = __bfloat1622float2(weight_pairs[p]);
                        sum[n] = fmaf(a.x, b.x, fmaf(a.y, b.y, sum[n]));
                    }
                }
            }
        }
    }
    // Sum over the warp, then over the row's warps (fixed order: deterministic).
#pragma unroll
    for (int n = 0; n < ROWS; ++n) {
        for (int offset = 16; offset > 0; offset /= 2) sum[n] += __shfl_xor_sync(0xffffffffu, sum[n], offset);
        if (lane == 0) partial[row_in_block][thread_in_row / 32][n] = sum[n];
    }
    __syncthreads();
    if (!active || thread_in_row >= ROWS) return;
    const int n = thread_in_row;
    float total = 0.0f;
#pragma unroll
    for (int warp = 0; warp < kGemvWarpsPerRow; ++warp) total += partial[row_in_block][warp][n];
    out[size_t(n) * w.rows + o] = __float2bfloat16_rn(total + (bias ? bias[o] : 0.0f));
}

template <int ROWS>
void launch_gemv(bf16* out, const bf16* in, const PackedView& w, const float* bias, cudaStream_t stream) {
    w4a16_gemv_kernel<ROWS><<<(w.rows + kGemvRowsPerBlock - 1) / kGemvRowsPerBlock,
                              32 * kGemvWarpsPerRow * kGemvRowsPerBlock, 0, stream>>>(out, in, w, bias);
}

}  // namespace

void w4a16_linear_forward_gpu(bf16* out, const bf16* in, const DevicePackedWeights& w, const float* bias, int n_rows,
                              cudaStream_t stream) {
    QOPT_CHECK(w.cols % 32 == 0 && w.group_cols % 16 == 0 && w.cols % w.group_cols == 0,
               "w4a16 layer: ", w.rows, " x ", w.cols, " weights in groups of ", w.group_cols,
               "; needs a multiple of 32 columns and groups of a multiple of 16");
    QOPT_CHECK(w.packed.size() == size_t(w.rows) * w.cols / 2, "w4a16 layer: weights not uploaded");
    QOPT_CHECK(is_aligned(in, 16), "w4a16 layer: the input must be 16-byte aligned");
    if (n_rows <= 0 || w.rows == 0) return;
    const PackedView view{w.packed.data(), w.steps.data(), w.offsets.data(), w.rows, w.cols, w.group_cols};
    if (n_rows > kGemvRowsMax) {
        launch_gemm(out, in, view, bias, n_rows, stream);
    } else {  // passes of up to kGemvRows rows; after the first the packed weights come from L2
        for (int first = 0; first < n_rows; first += kGemvRows) {
            const bf16* rows_in = in + size_t(first) * w.cols;
            bf16* rows_out = out + size_t(first) * w.rows;
            switch (std::min(kGemvRows, n_rows - first)) {
                case 1: launch_gemv<1>(rows_out, rows_in, view, bias, stream); break;
                case 2: launch_gemv<2>(rows_out, rows_in, view, bias, stream); break;
                case 3: launch_gemv<3>(rows_out, rows_in, view, bias, stream); break;
                default: launch_gemv<kGemvRows>(rows_out, rows_in, view, bias, stream);
            }
        }
    }
    CUDA_CHECK_LAUNCH();
}

}  // namespace qopt
