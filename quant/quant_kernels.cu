// Quantization kernels: block Hadamard rotation of rows, fused rotate + fake-quant with the
// estimator's mask, and the masked rotation of the backward pass. Math and CPU references:
// quant/hadamard.hpp, quant/quantizer.hpp (grid arithmetic shared with the CPU, bit for bit).
//
// Two paths, both doing the butterfly's additions in the same order as hadamard_rows_cpu (so
// the rotation is exact to the bit) and accumulating sums of squares / MSE errors in fp64 like
// the CPU reference (the fast path sums each lane's few squares in fp32 first):
//  - fast (the training path: rows a multiple of 128, Hadamard block <= 128, one scale per
//    row, absmax/clip/gaussian): registers only. A warp holds 128-element chunks, 4
//    consecutive elements per lane; butterfly stages 1 and 2 run inside a lane, stages 4..64
//    across lanes by shuffles. A row is split evenly over warps (1-8 chunks each, fast_shape);
//    its statistics are a warp reduction (plus one shared-memory step when a row spans
//    several warps). One read of the input, one write of the output and the mask; the MLP's
//    activation can be applied on the way in (activation_fake_quant_rows_gpu).
//  - general (any power-of-two block up to the row, groups, per-tensor, mse): one CTA per row
//    staged in shared memory, each group's grid chosen by a team reduction (the whole CTA for
//    a per-row group, one warp per group for per-group quantization).
#include <algorithm>
#include <cfloat>
#include <type_traits>

#include "kernels/activation_functors.cuh"
#include "kernels/cuda_common.cuh"
#include "quant/hadamard.hpp"
#include "quant/int8_linear.hpp"
#include "quant/quant_gpu.hpp"

namespace qopt {

namespace {

constexpr int kMaxCols = 32768;

using Stats = GroupStats;  // quant/quantizer.hpp

struct Params {
    int bits;
    QuantGrid grid;
    ScaleRule rule;
    int group;  // elements per group within a row (== cols for per-row)
    bool per_tensor;
    long tensor_count;  // per-tensor: rows * cols
    float clip_ratio;
    int mse_grid;
    float alpha;  // Gaussian clip multiple
    float trust;
    int block;    // Hadamard block (0: none)
    float norm;   // 1/sqrt(block), rounded as on the CPU
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void store(float* p, float x) { *p = x; }
__device__ __forceinline__ void store(bf16* p, float x) { *p = __float2bfloat16_rn(x); }


// ---------------------------------------------------------------- general path (shared memory)

// In-place butterfly stages over a staged row; all threads of the CTA take part.
__device__ void hadamard_smem(float* row, int cols, int block, float norm) {
    for (int h = 1; h < block; h *= 2) {
        for (int j = threadIdx.x; j < cols / 2; j += blockDim.x) {
            const int i = (j / h) * 2 * h + (j % h);
            const float a = row[i], b = row[i + h];
            row[i] = a + b;
            row[i + h] = a - b;
        }
        __syncthreads();
    }
    if (block > 1) {
        for (int i = threadIdx.x; i < cols; i += blockDim.x) row[i] = __fmul_rn(row[i], norm);
        __syncthreads();
    }
}

// s folded with t: the range statistics by min/max, the squares summed (t after s).
__device__ __forceinline__ void merge_into(Stats& s, const Stats& t) {
    s.absmax = fmaxf(s.absmax, t.absmax), s.lo = fminf(s.lo, t.lo), s.hi = fmaxf(s.hi, t.hi);
    s.sum_squares += t.sum_squares;
}

__device__ Stats warp_reduce(Stats s) {
    for (int offset = 16; offset > 0; offset /= 2) {
        s.absmax = fmaxf(s.absmax, __shfl_xor_sync(0xffffffffu, s.absmax, offset));
        s.lo = fminf(s.lo, __shfl_xor_sync(0xffffffffu, s.lo, offset));
        s.hi = fmaxf(s.hi, __shfl_xor_sync(0xffffffffu, s.hi, offset));
        s.sum_squares += __shfl_xor_sync(0xffffffffu, s.sum_squares, offset);
    }
    return s;
}

// A team reduces together: the whole CTA (Cta) or one warp. Every member gets the result.
template <bool Cta>
struct Team {
    Stats* scratch;  // 32 entries of shared memory (Cta only)
    __device__ int size() const { return Cta ? blockDim.x : 32; }
    __device__ int rank() const { return Cta ? threadIdx.x : threadIdx.x % 32; }
    __device__ Stats reduce(Stats s) const {
        s = warp_reduce(s);
        if (!Cta) return s;
        const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
        if (lane == 0) scratch[warp] = s;
        __syncthreads();
        if (warp == 0) {
            Stats t = lane < warps ? scratch[lane] : Stats{0.0f, FLT_MAX, -FLT_MAX, 0.0};
            t = warp_reduce(t);
            if (lane == 0) scratch[0] = t;
        }
        __syncthreads();
        const Stats result = scratch[0];
        __syncthreads();
        return result;
    }
    __device__ double sum(double x) const {
        Stats s{0.0f, FLT_MAX, -FLT_MAX, x};
        return reduce(s).sum_squares;
    }
};

__device__ Stats stats_of(const float* x, int n, int rank, int size) {
    Stats s{0.0f, FLT_MAX, -FLT_MAX, 0.0};
    for (int i = rank; i < n; i += size) {
        const float v = x[i];
        s.absmax = fmaxf(s.absmax, fabsf(v));
        s.lo = fminf(s.lo, v);
        s.hi = fmaxf(s.hi, v);
        s.sum_squares += double(v) * double(v);
    }
    return s;
}

// The group's grid by the spec's rule (the one-thread choose_grid in quant/quantizer.hpp; here
// the mse search sums each candidate's error over the team).
template <bool Cta>
__device__ GroupGrid choose_grid(const Params& p, const Team<Cta>& team, const Stats& s, long n, const float* x,
                                 int count) {
    if (p.rule != ScaleRule::Mse) return grid_from_stats(p.grid, p.bits, p.rule, p.clip_ratio, p.alpha, s, n);
    GroupGrid best = grid_at_ratio(p.grid, p.bits, s, 1.0f);
    double best_error = INFINITY;
    for (int k = p.mse_grid; k * 5 >= p.mse_grid; --k) {
        const GroupGrid g = grid_at_ratio(p.grid, p.bits, s, float(k) / float(p.mse_grid));
        double error = 0;
        for (int i = team.rank(); i < count; i += team.size()) {
            const double d = double(quant_value(g, quant_code(g, x[i]))) - double(x[i]);
            error += d * d;
        }
        error = team.sum(error);
        if (error < best_error) best_error = error, best = g;
    }
    return best;
}

// Quantizes one group of `count` staged values into out/keep.
template <bool Cta>
__device__ void quantize_group(bf16* out, uint32_t* keep, long base, const float* x, int count, const Params& p,
                               const Team<Cta>& team, const Stats* tensor_stats) {
    const Stats s = p.per_tensor ? *tensor_stats : team.reduce(stats_of(x, count, team.rank(), team.size()));
    const long n = p.per_tensor ? p.tensor_count : long(count);
    const GroupGrid g = choose_grid(p, team, s, n, x, count);
    const float threshold = keep_threshold(p.trust, s, n, g);
    for (int i = team.rank(); i < count; i += team.size()) {
        const float q = quant_value(g, quant_code(g, x[i]));
        out[i] = __float2bfloat16_rn(q);
        if (keep && (p.trust < 0 || fabsf(q - x[i]) <= threshold)) {  // words zeroed by the launcher
            const long e = base + i;
            atomicOr(&keep[(e >> 7) * 4 + (e & 3)], 1u << ((e & 127) >> 2));
        }
    }
}

// ---------------------------------------------------------------- fast path (registers)

constexpr int kChunk = 128;          // elements per warp step: 4 per lane
constexpr int kMaxChunksPerWarp = 8; // up to 32 fp32 registers per lane, and the next row's 16 raw
constexpr int kNarrowThreads = 256;  // CTA size for rows of up to 8 warps (8192 elements at 8 chunks each)
constexpr int kWideThreads = 1024;   // wider rows: up to 32 warps of 4 chunks (16384 elements)
constexpr int kWideChunksPerWarp = 4;

__device__ __forceinline__ void load4(float v[4], const float* p) {
    const float4 x = *reinterpret_cast<const float4*>(p);
    v[0] = x.x, v[1] = x.y, v[2] = x.z, v[3] = x.w;
}
__device__ __forceinline__ void load4(float v[4], const bf16* p) {
    const uint2 x = *reinterpret_cast<const uint2*>(p);
    const __nv_bfloat162 a = *reinterpret_cast<const __nv_bfloat162*>(&x.x);
    const __nv_bfloat162 b = *reinterpret_cast<const __nv_bfloat162*>(&x.y);
    v[0] = __low2float(a), v[1] = __high2float(a), v[2] = __low2float(b), v[3] = __high2float(b);
}
__device__ __forceinline__ void store4(float* p, const float v[4]) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store4(bf16* p, const float v[4]) {
    __nv_bfloat162 a = __floats2bfloat162_rn(v[0], v[1]), b = __floats2bfloat162_rn(v[2], v[3]);
    uint2 x;
    x.x = *reinterpret_cast<uint32_t*>(&a);
    x.y = *reinterpret_cast<uint32_t*>(&b);
    *reinterpret_cast<uint2*>(p) = x;
}

// The butterfly signs of a lane for the cross-lane stages h = 4 .. 64: the lower half of a pair
// keeps v + other (+1), the upper other - v (-1), one FMA with the sign, rounded like the add
// or subtract. Computed once per kernel.
struct LaneSigns {
    float of_stage[5];
    __device__ LaneSigns() {
        const int lane = threadIdx.x % 32;
#pragma unroll
        for (int s = 0; s < 5; ++s) of_stage[s] = (lane >> s) & 1 ? -1.0f : 1.0f;
    }
};

// x H_block over a 128-element chunk held 4 per lane (element 4 * lane + i); block <= 128,
// a compile-time kBlock when known (0: the runtime `block`; the stages unroll either way).
template <int kBlock>
__device__ __forceinline__ void hadamard_chunk_stages(float v[4], int block, float norm, const LaneSigns& signs) {
    if (kBlock) block = kBlock;
    if (block < 2) return;
    float a = v[0], b = v[1], c = v[2], d = v[3];
    v[0] = a + b, v[1] = a - b, v[2] = c + d, v[3] = c - d;  // h = 1
    if (block >= 4) {                                         // h = 2
        a = v[0], b = v[1], c = v[2], d = v[3];
        v[0] = a + c, v[1] = b + d, v[2] = a - c, v[3] = b - d;
    }
#pragma unroll
    for (int s = 0; s < 5; ++s) {  // h = 4 << s, across lanes 1 << s apart
        if ((4 << s) >= block) break;
#pragma unroll
        for (int i = 0; i < 4; ++i)
            v[i] = __fmaf_rn(signs.of_stage[s], v[i], __shfl_xor_sync(0xffffffffu, v[i], 1 << s));
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = __fmul_rn(v[i], norm);
}

// The chunk's rotation, with the stages fixed at compile time for the default block of 128.
__device__ __forceinline__ void hadamard_chunk(float v[4], int block, float norm, const LaneSigns& signs) {
    if (block == kChunk) hadamard_chunk_stages<kChunk>(v, block, norm, signs);
    else hadamard_chunk_stages<0>(v, block, norm, signs);
}

// No activation: the value as it is (forward: op(x, _) = x; backward: op(dout, _) = dout).
struct NoActivation {
    __device__ float operator()(float x, float) const { return x; }
};
template <typename Activation>
constexpr bool kHasActivation = !std::is_same<Activation, NoActivation>::value;

// How the register path splits a row: K = chunks_per_warp chunks (a compile-time choice that
// divides the row's chunks, so no lane idles), warps_per_row warps per row, rows_per_cta rows per
// CTA of at most 8 warps; with 4 chunks per warp a row may take up to 32 warps (a wide CTA).
// Larger K spreads the per-row work (reductions, the grid) over more elements: measured on an
// H100 (32,768 rows), 768 columns take 0.061 ms with K = 3 and 0.051 ms with K = 6; 3072 columns
// 0.211 ms with K = 4, 0.182 ms with K = 8 and 0.179 ms with K = 6, hence the order tried.
struct FastShape {
    int chunks_per_warp = 0, warps_per_row = 0, rows_per_cta = 0;
};

FastShape fast_shape(int cols) {
    const int chunks = cols / kChunk;
    for (int k : {6, 8, 4, 3, 2, 1}) {
        const int warps = chunks / k;
        if (chunks % k != 0 || !(warps <= 8 || (k == kWideChunksPerWarp && warps <= 32))) continue;
        return {k, warps, warps >= 8 ? 1 : 8 / warps};
    }
    return {};  // no split fits: the shared-memory path
}

// Which range statistics the grid reads (the sum of squares is always kept: the Gaussian rule
// and the trust bound read it): none, the absolute maximum, or [lo, hi] (asymmetric grid).
enum class RangeStats { None, Absmax, LoHi };
RangeStats range_stats(const Params& p) {
    if (p.rule == ScaleRule::Gaussian) return RangeStats::None;
    return p.grid == QuantGrid::Asymmetric ? RangeStats::LoHi : RangeStats::Absmax;
}

__device__ __forceinline__ Stats warp_reduce(Stats s, RangeStats range) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
        s.sum_squares += __shfl_xor_sync(0xffffffffu, s.sum_squares, offset);
        if (range == RangeStats::Absmax) s.absmax = fmaxf(s.absmax, __shfl_xor_sync(0xffffffffu, s.absmax, offset));
        if (range == RangeStats::LoHi) {
            s.lo = fminf(s.lo, __shfl_xor_sync(0xffffffffu, s.lo, offset));
            s.hi = fmaxf(s.hi, __shfl_xor_sync(0xffffffffu, s.hi, offset));
        }
    }
    return s;
}

// A chunk's 4 values as loaded (bf16: 8 bytes, fp32: 16), held until the row is processed.
template <typename T>
struct RawChunk;
template <>
struct RawChunk<bf16> {
    uint2 bits;
    __device__ void load(const bf16* p) { bits = *reinterpret_cast<const uint2*>(p); }
    __device__ void clear() { bits = make_uint2(0, 0); }
    __device__ void unpack(float v[4]) const { load4(v, reinterpret_cast<const bf16*>(&bits)); }
};
template <>
struct RawChunk<float> {
    float4 bits;
    __device__ void load(const float* p) { bits = *reinterpret_cast<const float4*>(p); }
    __device__ void clear() { bits = make_float4(0, 0, 0, 0); }
    __device__ void unpack(float v[4]) const { v[0] = bits.x, v[1] = bits.y, v[2] = bits.z, v[3] = bits.w; }
};

// A row's grid and mask threshold, picked by the row's first warp when several share the row.
struct RowGrid {
    GroupGrid grid;
    float threshold;
};

// Where the fast kernel's quantized rows go.
//  FakeQuantSink: the dequantized values (bf16) and the estimator's mask (may be null).
//  CodeSink: the integer codes (quant/int8_linear.hpp's integer_code: the centered grid doubled)
//  as int8 or e4m3 bytes, and one step per row — the integer layers' input.
struct FakeQuantSink {
    static constexpr bool kCodes = false;
    bf16* out;
    uint32_t* keep;
};
struct CodeSink {
    static constexpr bool kCodes = true;
    uint8_t* codes;
    float* steps;
    bool fp8, doubled;
};

// out = fake_quant(rotate(act(in))) for rows of whole chunks, one scale per row; the activation
// (the MLP down projection's input computed from its pre-activation) rounds to bf16 first, as
// the activation kernels do, so the result is bit-identical to the two passes.
// The CTA's rows_per_cta rows advance together over the tensor (grid-stride; rows past the end
// compute on zeros and store nothing, so every warp meets every barrier), and each warp loads
// its part of the next row while it rotates, reduces and quantizes the current one. The kernel
// is bound by instruction issue, so each element costs the butterfly (2 adds in the lane, 5
// shuffle + FMA stages, the norm), a square, the quantization (8 float ops), the mask test and
// a ballot; per-row work (the grid's divisions and square roots) runs once per row.
template <int K, int kMaxThreads, typename InT, typename Activation, typename Sink>
__global__ void __launch_bounds__(kMaxThreads, kNarrowThreads * (K <= 4 ? 4 : 3) / kMaxThreads)
    rotate_fake_quant_fast_kernel(Sink sink, const InT* in, long rows, int cols, int warps_per_row, Params p,
                                  RangeStats range, Activation activation) {
    __shared__ Stats partial[kMaxThreads / 32];
    __shared__ alignas(16) unsigned char row_grid_bytes[sizeof(RowGrid) * kNarrowThreads / 32];  // (GroupGrid
    RowGrid* row_grids = reinterpret_cast<RowGrid*>(row_grid_bytes);  // has initializers: no __shared__ objects)
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int rows_per_cta = blockDim.x / 32 / warps_per_row;
    const int row_in_cta = warp / warps_per_row, part = warp % warps_per_row;
    const long row_stride = long(gridDim.x) * rows_per_cta;
    const bool keep_all = p.trust < 0;
    const LaneSigns signs;
    // This warp's chunks of a row start at `part * K` chunks: K consecutive chunks per warp.
    const int lane_offset = part * K * kChunk + lane * 4;
    RawChunk<InT> next[K];
    auto load_row = [&](long r) {
#pragma unroll
        for (int k = 0; k < K; ++k) {
            if (r < rows) next[k].load(in + r * cols + lane_offset + k * kChunk);
            else next[k].clear();
        }
    };
    long first = long(blockIdx.x) * rows_per_cta;
    load_row(first + row_in_cta);
    for (; first < rows; first += row_stride) {
        const long r = first + row_in_cta;
        float v[K][4];
#pragma unroll
        for (int k = 0; k < K; ++k) next[k].unpack(v[k]);
        load_row(r + row_stride);
        if (kHasActivation<Activation>) {
#pragma unroll
            for (int k = 0; k < K; ++k)
#pragma unroll
                for (int i = 0; i < 4; ++i) v[k][i] = __bfloat162float(__float2bfloat16(activation(v[k][i], 0.0f)));
        }
#pragma unroll
        for (int k = 0; k < K; ++k) hadamard_chunk(v[k], p.block, p.norm, signs);
        // Statistics (zeros from rows past the end change none of them that the grid reads:
        // an asymmetric range always contains 0).
        Stats s{0.0f, FLT_MAX, -FLT_MAX, 0.0};
        float lane_squares = 0;  // a lane's <= 16 squares in fp32, then fp64 across lanes
#pragma unroll
        for (int k = 0; k < K; ++k)
#pragma unroll
            for (int i = 0; i < 4; ++i) lane_squares = __fmaf_rn(v[k][i], v[k][i], lane_squares);
        if (range == RangeStats::Absmax) {
#pragma unroll
            for (int k = 0; k < K; ++k)
#pragma unroll
                for (int i = 0; i < 4; ++i) s.absmax = fmaxf(s.absmax, fabsf(v[k][i]));
        } else if (range == RangeStats::LoHi) {
#pragma unroll
            for (int k = 0; k < K; ++k)
#pragma unroll
                for (int i = 0; i < 4; ++i) s.lo = fminf(s.lo, v[k][i]), s.hi = fmaxf(s.hi, v[k][i]);
        }
        s.sum_squares = double(lane_squares);
        s = warp_reduce(s, range);
        RowGrid row;
        if (warps_per_row == 1) {
            row.grid = grid_from_stats(p.grid, p.bits, p.rule, p.clip_ratio, p.alpha, s, cols);
            row.threshold = keep_threshold(p.trust, s, cols, row.grid);
        } else {
            if (lane == 0) partial[warp] = s;
            __syncthreads();
            if (part == 0) {  // the row's first warp folds the parts in order and picks the grid
                Stats total{0.0f, FLT_MAX, -FLT_MAX, 0.0};
                for (int w = 0; w < warps_per_row; ++w) merge_into(total, partial[warp + w]);
                row.grid = grid_from_stats(p.grid, p.bits, p.rule, p.clip_ratio, p.alpha, total, cols);
                row.threshold = keep_threshold(p.trust, total, cols, row.grid);
                if (lane == 0) row_grids[row_in_cta] = row;
            }
            __syncthreads();
            row = row_grids[row_in_cta];
        }
        if (r >= rows) continue;
        if constexpr (Sink::kCodes) {
            if (part == 0 && lane == 0) sink.steps[r] = integer_step(row.grid.step, sink.doubled);
#pragma unroll
            for (int k = 0; k < K; ++k) {
                uint32_t word = 0;  // this lane's 4 codes of the chunk, one byte each
#pragma unroll
                for (int i = 0; i < 4; ++i)
                    word |= uint32_t(integer_code_byte(integer_code(int(quant_code_float(row.grid, v[k][i])), sink.doubled),
                                                       sink.fp8))
                            << (8 * i);
                *reinterpret_cast<uint32_t*>(sink.codes + r * cols + lane_offset + k * kChunk) = word;
            }
        } else {
#pragma unroll
            for (int k = 0; k < K; ++k) {
                float q[4];
                uint32_t words[4];  // the chunk's 4 mask words (element 4 * lane + i: word i, bit lane)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    q[i] = quant_value(row.grid, quant_code_float(row.grid, v[k][i]));
                    words[i] = __ballot_sync(0xffffffffu, keep_all || fabsf(q[i] - v[k][i]) <= row.threshold);
                }
                const long at = r * cols + lane_offset + k * kChunk;
                store4(sink.out + at, q);
                if (sink.keep && lane == 0)
                    *reinterpret_cast<uint4*>(sink.keep + (at / kChunk) * 4) =
                        make_uint4(words[0], words[1], words[2], words[3]);
            }
        }
    }
}

// out = act'(pre) * ((grad * keep) H) per 128-chunk, written or accumulated; one warp per chunk,
// grid-stride. pre is read only with an activation functor.
template <typename T, typename Activation = NoActivation>
__global__ void masked_hadamard_fast_kernel(T* out, const T* grad, const uint32_t* keep, long chunks, int block,
                                            float norm, bool accumulate, const T* pre = nullptr,
                                            Activation activation = {}) {
    const int lane = threadIdx.x % 32;
    const LaneSigns signs;
    const long warps = long(gridDim.x) * blockDim.x / 32;
    for (long chunk = (long(blockIdx.x) * blockDim.x + threadIdx.x) / 32; chunk < chunks; chunk += warps) {
        const long at = chunk * kChunk + lane * 4;
        float v[4];
        load4(v, grad + at);
        if (keep) {
            const uint4 words = *reinterpret_cast<const uint4*>(keep + chunk * 4);
            const uint32_t word[4] = {words.x, words.y, words.z, words.w};
#pragma unroll
            for (int i = 0; i < 4; ++i)
                if (!((word[i] >> lane) & 1u)) v[i] = 0.0f;
        }
        hadamard_chunk(v, block, norm, signs);
        if (kHasActivation<Activation>) {
            float x[4];
            load4(x, pre + at);
#pragma unroll
            for (int i = 0; i < 4; ++i) v[i] = activation(v[i], x[i]);
        }
        if (accumulate) {
            float old[4];
            load4(old, out + at);
#pragma unroll
            for (int i = 0; i < 4; ++i) v[i] = old[i] + v[i];
        }
        store4(out + at, v);
    }
}

// ---------------------------------------------------------------- general path, continued

template <typename InT>
__device__ void stage_row(float* row, const InT* in, int cols) {
    for (int i = threadIdx.x; i < cols; i += blockDim.x) row[i] = to_float(in[i]);
    __syncthreads();
}

template <typename InT>
__global__ void rotate_fake_quant_kernel(bf16* out, uint32_t* keep, const InT* in, int cols, Params p,
                                         const Stats* tensor_stats) {
    extern __shared__ float row[];
    __shared__ Stats scratch[32];
    const long r = blockIdx.x;
    stage_row(row, in + r * cols, cols);
    hadamard_smem(row, cols, p.block, p.norm);
    bf16* out_row = out + r * cols;
    if (p.group == cols) {
        quantize_group(out_row, keep, r * cols, row, cols, p, Team<true>{scratch}, tensor_stats);
    } else {
        const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
        for (int g0 = warp * p.group; g0 < cols; g0 += warps * p.group)
            quantize_group(out_row + g0, keep, r * cols + g0, row + g0, p.group, p, Team<false>{nullptr},
                           tensor_stats);
    }
}

// Per-tensor statistics, stage 1: one Stats per row of the rotated tensor.
template <typename InT>
__global__ void row_stats_kernel(Stats* row_stats, const InT* in, int cols, Params p) {
    extern __shared__ float row[];
    __shared__ Stats scratch[32];
    const long r = blockIdx.x;
    stage_row(row, in + r * cols, cols);
    hadamard_smem(row, cols, p.block, p.norm);
    const Team<true> team{scratch};
    const Stats s = team.reduce(stats_of(row, cols, team.rank(), team.size()));
    if (threadIdx.x == 0) row_stats[r] = s;
}

// Stage 2: one CTA folds the rows' Stats into row_stats[rows].
__global__ void fold_stats_kernel(Stats* row_stats, long rows) {
    __shared__ Stats scratch[32];
    Stats s{0.0f, FLT_MAX, -FLT_MAX, 0.0};
    for (long r = threadIdx.x; r < rows; r += blockDim.x) merge_into(s, row_stats[r]);
    s = Team<true>{scratch}.reduce(s);
    if (threadIdx.x == 0) row_stats[rows] = s;
}

template <typename T>
__global__ void hadamard_kernel(T* data, int cols, int block, float norm) {
    extern __shared__ float row[];
    T* data_row = data + long(blockIdx.x) * cols;
    stage_row(row, data_row, cols);
    hadamard_smem(row, cols, block, norm);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) store(data_row + i, row[i]);
}

template <typename T>
__global__ void masked_hadamard_kernel(T* out, const T* grad, const uint32_t* keep, int cols, int block, float norm,
                                       bool accumulate) {
    extern __shared__ float row[];
    const long base = long(blockIdx.x) * cols;
    for (int i = threadIdx.x; i < cols; i += blockDim.x)
        row[i] = (keep && !keep_mask_bit(keep, size_t(base + i))) ? 0.0f : to_float(grad[base + i]);
    __syncthreads();
    hadamard_smem(row, cols, block, norm);
    for (int i = threadIdx.x; i < cols; i += blockDim.x)
        store(out + base + i, accumulate ? to_float(out[base + i]) + row[i] : row[i]);
}

int threads_for(int cols) { return cols >= 4096 ? 512 : (cols >= 512 ? 256 : 128); }

// Shared memory above the default 48 KB needs the kernel's opt-in.
template <typename Kernel>
size_t row_smem(Kernel kernel, int cols) {
    const size_t bytes = size_t(cols) * sizeof(float);
    if (bytes > 48 * 1024)
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(kMaxCols * sizeof(float))));
    return bytes;
}

void check_shape(long rows, int cols, int block, const char* what) {
    QOPT_CHECK(cols > 0 && cols <= kMaxCols, what, ": rows of ", cols, " elements (1..", kMaxCols, " supported)");
    QOPT_CHECK(rows >= 0 && rows < (1L << 31), what, ": ", rows, " rows is out of range");
    QOPT_CHECK(block == 0 || (is_power_of_two(block) && cols % block == 0), what, ": Hadamard block ", block,
               " is not a power of two dividing ", cols);
}

// The register path needs whole 128-element chunks, a block within one chunk and vector alignment.
template <typename T>
bool fast_path(const T* data, int cols, int block) {
    return cols % kChunk == 0 && block <= kChunk && cols / kChunk <= 32 * kMaxChunksPerWarp &&
           is_aligned(data, 4 * sizeof(T));
}
bool keep_aligned(const uint32_t* keep) { return keep == nullptr || is_aligned(keep, 16); }

float hadamard_norm(int block) { return block > 1 ? float(1.0 / std::sqrt(double(block))) : 1.0f; }

Params make_params(long rows, int cols, int block, const QuantSpec& spec, float trust) {
    spec.validate(cols);
    Params p{};
    p.bits = spec.bits;
    p.grid = spec.grid;
    p.rule = spec.rule;
    p.group = spec.granularity == Granularity::Group ? spec.group_size : cols;
    p.per_tensor = spec.granularity == Granularity::Tensor;
    p.tensor_count = rows * long(cols);
    p.clip_ratio = spec.clip_ratio;
    p.mse_grid = spec.mse_grid;
    p.alpha = spec.rule == ScaleRule::Gaussian ? gaussian_clip_multiple(spec.bits) : 0.0f;
    p.trust = trust;
    p.block = block > 1 ? block : 0;
    p.norm = hadamard_norm(block);
    return p;
}

// The register path: whole chunks split evenly over warps, one scale per row, not mse, aligned vectors.
template <typename InT>
bool fast_fake_quant(const bf16* out, const uint32_t* keep, const InT* in, int cols, int block, const Params& p) {
    return fast_path(in, cols, block) && fast_shape(cols).chunks_per_warp > 0 && keep_aligned(keep) &&
           is_aligned(out, 8) && !p.per_tensor && p.group == cols && p.rule != ScaleRule::Mse;
}

template <int K, int kMaxThreads, typename InT, typename Activation, typename Sink>
void launch_fast_fake_quant_kernel(Sink sink, const InT* in, long rows, int cols, const Params& p,
                                   Activation activation, cudaStream_t stream) {
    const FastShape f = fast_shape(cols);
    const int threads = 32 * f.warps_per_row * f.rows_per_cta;
    auto kernel = rotate_fake_quant_fast_kernel<K, kMaxThreads, InT, Activation, Sink>;
    // Enough CTAs to fill the GPU once, each striding over its rows; CTAs per SM asked once per
    // CTA size of this instantiation (the launches are on the training path's hot loop).
    static int ctas_per_sm[kMaxThreads / 32 + 1] = {};
    int& per_sm = ctas_per_sm[threads / 32];
    if (per_sm == 0) {
        CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
        per_sm = std::max(per_sm, 1);
    }
    const long needed = (rows + f.rows_per_cta - 1) / f.rows_per_cta;
    const unsigned ctas = unsigned(std::max(1L, std::min(needed, long(current_device_sm_count()) * per_sm)));
    kernel<<<ctas, threads, 0, stream>>>(sink, in, rows, cols, f.warps_per_row, p, range_stats(p), activation);
    CUDA_CHECK_LAUNCH();
}

// The instantiation for the row's split (fast_shape: K = 1, 2, 3, 4, 6 or 8 chunks per warp;
// 4 in a wide CTA).
template <typename InT, typename Activation, typename Sink>
void launch_fast_fake_quant(Sink sink, const InT* in, long rows, int cols, const Params& p, Activation activation,
                            cudaStream_t stream) {
    const FastShape f = fast_shape(cols);
    static_assert(kMaxChunksPerWarp == 8, "one instantiation per chunks_per_warp below");
    if (f.warps_per_row > 8)
        return launch_fast_fake_quant_kernel<kWideChunksPerWarp, kWideThreads>(sink, in, rows, cols, p, activation,
                                                                              stream);
    switch (f.chunks_per_warp) {
        case 8: return launch_fast_fake_quant_kernel<8, kNarrowThreads>(sink, in, rows, cols, p, activation, stream);
        case 6: return launch_fast_fake_quant_kernel<6, kNarrowThreads>(sink, in, rows, cols, p, activation, stream);
        case 4: return launch_fast_fake_quant_kernel<4, kNarrowThreads>(sink, in, rows, cols, p, activation, stream);
        case 3: return launch_fast_fake_quant_kernel<3, kNarrowThreads>(sink, in, rows, cols, p, activation, stream);
        case 2: return launch_fast_fake_quant_kernel<2, kNarrowThreads>(sink, in, rows, cols, p, activation, stream);
        default: return launch_fast_fake_quant_kernel<1, kNarrowThreads>(sink, in, rows, cols, p, activation, stream);
    }
}

template <typename InT>
void rotate_fake_quant(bf16* out, uint32_t* keep, const InT* in, long rows, int cols, int block, const QuantSpec& spec,
                       float trust, double* scratch, cudaStream_t stream) {
    check_shape(rows, cols, block, "fake-quant");
    QOPT_CHECK(spec.enabled(), "rotate_fake_quant_rows_gpu needs a quantizing spec (bits 2..8)");
    if (rows == 0) return;
    const Params p = make_params(rows, cols, block, spec, trust);
    if (fast_fake_quant(out, keep, in, cols, block, p))
        return launch_fast_fake_quant(FakeQuantSink{out, keep}, in, rows, cols, p, NoActivation{}, stream);
    Stats* stats = nullptr;
    const int threads = threads_for(cols);
    if (p.per_tensor) {
        QOPT_CHECK(spec.rule != ScaleRule::Mse, "per-tensor quantization with the mse rule is CPU-only");
        QOPT_CHECK(scratch, "per-tensor fake-quant needs a scratch buffer of (rows + 1) * 4 doubles");
        static_assert(sizeof(Stats) <= 4 * sizeof(double), "Stats must fit four doubles");
        stats = reinterpret_cast<Stats*>(scratch);
        row_stats_kernel<InT><<<unsigned(rows), threads, row_smem(row_stats_kernel<InT>, cols), stream>>>(stats, in,
                                                                                                         cols, p);
        CUDA_CHECK_LAUNCH();
        fold_stats_kernel<<<1, 1024, 0, stream>>>(stats, rows);
        CUDA_CHECK_LAUNCH();
        stats += rows;
    }
    if (keep) CUDA_CHECK(cudaMemsetAsync(keep, 0, keep_mask_words(size_t(rows) * cols) * sizeof(uint32_t), stream));
    rotate_fake_quant_kernel<InT><<<unsigned(rows), threads, row_smem(rotate_fake_quant_kernel<InT>, cols), stream>>>(
        out, keep, in, cols, p, stats);
    CUDA_CHECK_LAUNCH();
}

// One grid-stride launch of the register path of the masked rotation.
template <typename T, typename Activation>
void launch_fast_masked_hadamard(T* out, const T* grad, const uint32_t* keep, long rows, int cols, int block,
                                 bool accumulate, const T* pre, Activation activation, cudaStream_t stream) {
    const long chunks = rows * cols / kChunk;
    const unsigned ctas = unsigned(std::min<long>((chunks + 7) / 8, long(current_device_sm_count()) * 16));
    masked_hadamard_fast_kernel<<<ctas, 256, 0, stream>>>(out, grad, keep, chunks, block > 1 ? block : 0,
                                                          hadamard_norm(block), accumulate, pre, activation);
    CUDA_CHECK_LAUNCH();
}

template <typename T>
void masked_hadamard(T* out, const T* grad, const uint32_t* keep, long rows, int cols, int block, bool accumulate,
                     cudaStream_t stream) {
    check_shape(rows, cols, block, "masked Hadamard");
    if (rows == 0) return;
    if (fast_path(grad, cols, block) && fast_path(out, cols, block) && keep_aligned(keep))
        return launch_fast_masked_hadamard(out, grad, keep, rows, cols, block, accumulate, static_cast<const T*>(nullptr),
                                           NoActivation{}, stream);
    masked_hadamard_kernel<T><<<unsigned(rows), threads_for(cols), row_smem(masked_hadamard_kernel<T>, cols),
                                stream>>>(out, grad, keep, cols, block > 1 ? block : 0, hadamard_norm(block),
                                          accumulate);
    CUDA_CHECK_LAUNCH();
}

template <typename T>
void hadamard_rows(T* data, long rows, int cols, int block, cudaStream_t stream) {
    check_shape(rows, cols, block, "Hadamard");
    if (rows == 0 || block <= 1) return;
    if (fast_path(data, cols, block)) return masked_hadamard(data, data, nullptr, rows, cols, block, false, stream);
    hadamard_kernel<T><<<unsigned(rows), threads_for(cols), row_smem(hadamard_kernel<T>, cols), stream>>>(
        data, cols, block, hadamard_norm(block));
    CUDA_CHECK_LAUNCH();
}

}  // namespace

void activation_fake_quant_rows_gpu(bf16* out, uint32_t* keep, const bf16* pre_activation, MlpActivation activation,
                                    long rows, int cols, int hadamard_block, const QuantSpec& spec, float trust,
                                    double* scratch, cudaStream_t stream) {
    check_shape(rows, cols, hadamard_block, "fake-quant");
    QOPT_CHECK(spec.enabled(), "activation_fake_quant_rows_gpu needs a quantizing spec (bits 2..8)");
    if (rows == 0) return;
    const Params p = make_params(rows, cols, hadamard_block, spec, trust);
    if (fast_fake_quant(out, keep, pre_activation, cols, hadamard_block, p)) {
        if (activation == MlpActivation::Gelu)
            launch_fast_fake_quant(FakeQuantSink{out, keep}, pre_activation, rows, cols, p, GeluForward{}, stream);
        else
            launch_fast_fake_quant(FakeQuantSink{out, keep}, pre_activation, rows, cols, p, Relu2Forward{}, stream);
        return;
    }
    // Other shapes: the activation into out, then rotated and quantized in place.
    activation_forward_gpu(out, pre_activation, activation, size_t(rows) * cols, stream);
    rotate_fake_quant(out, keep, out, rows, cols, hadamard_block, spec, trust, scratch, stream);
}

void masked_hadamard_activation_rows_gpu(bf16* out, const bf16* grad, const uint32_t* keep, const bf16* pre_activation,
                                         MlpActivation activation, long rows, int cols, int block,
                                         cudaStream_t stream) {
    check_shape(rows, cols, block, "masked Hadamard");
    if (rows == 0) return;
    if (fast_path(grad, cols, block) && fast_path(out, cols, block) && fast_path(pre_activation, cols, block) &&
        keep_aligned(keep)) {
        if (activation == MlpActivation::Gelu)
            launch_fast_masked_hadamard(out, grad, keep, rows, cols, block, false, pre_activation, GeluBackward{},
                                        stream);
        else
            launch_fast_masked_hadamard(out, grad, keep, rows, cols, block, false, pre_activation, Relu2Backward{},
                                        stream);
        return;
    }
    // Other shapes: the two passes.
    masked_hadamard(out, grad, keep, rows, cols, block, false, stream);
    activation_backward_gpu(out, out, pre_activation, activation, size_t(rows) * cols, stream);
}

bool rotate_quantize_codes_gpu(void* codes, bool fp8, float* steps, const bf16* in, long rows, int cols,
                               int hadamard_block, const QuantSpec& spec, cudaStream_t stream) {
    check_shape(rows, cols, hadamard_block, "quantization to codes");
    QOPT_CHECK(spec.enabled(), "rotate_quantize_codes_gpu needs a quantizing spec (bits 2..8)");
    const Params p = make_params(rows, cols, hadamard_block, spec, -1.0f);
    if (!fast_fake_quant(static_cast<const bf16*>(nullptr), nullptr, in, cols, hadamard_block, p) ||
        !is_aligned(codes, 4))
        return false;
    if (rows > 0)
        launch_fast_fake_quant(CodeSink{static_cast<uint8_t*>(codes), steps, fp8, spec.grid == QuantGrid::Centered}, in,
                               rows, cols, p, NoActivation{}, stream);
    return true;
}

void hadamard_rows_gpu(float* data, long rows, int cols, int block, cudaStream_t stream) {
    hadamard_rows(data, rows, cols, block, stream);
}
void hadamard_rows_gpu(bf16* data, long rows, int cols, int block, cudaStream_t stream) {
    hadamard_rows(data, rows, cols, block, stream);
}
void rotate_fake_quant_rows_gpu(bf16* out, uint32_t* keep, const bf16* in, long rows, int cols, int hadamard_block,
                                const QuantSpec& spec, float trust, double* scratch, cudaStream_t stream) {
    rotate_fake_quant(out, keep, in, rows, cols, hadamard_block, spec, trust, scratch, stream);
}
void rotate_fake_quant_rows_gpu(bf16* out, uint32_t* keep, const float* in, long rows, int cols, int hadamard_block,
                                const QuantSpec& spec, float trust, double* scratch, cudaStream_t stream) {
    rotate_fake_quant(out, keep, in, rows, cols, hadamard_block, spec, trust, scratch, stream);
}
void masked_hadamard_rows_gpu(bf16* out, const bf16* grad, const uint32_t* keep, long rows, int cols,
                              int hadamard_block, bool accumulate, cudaStream_t stream) {
    masked_hadamard(out, grad, keep, rows, cols, hadamard_block, accumulate, stream);
}
void masked_hadamard_rows_gpu(float* out, const float* grad, const uint32_t* keep, long rows, int cols,
                              int hadamard_block, bool accumulate, cudaStream_t stream) {
    masked_hadamard(out, grad, keep, rows, cols, hadamard_block, accumulate, stream);
}

}  // namespace qopt
