// Quantization kernels: block Hadamard rotation of rows, fused rotate + fake-quant with the
// estimator's mask, and the masked rotation of the backward pass. Math and CPU references:
// quant/hadamard.hpp, quant/quantizer.hpp (grid arithmetic shared with the CPU, bit for bit).
//
// One CTA per row: the row is staged in shared memory as fp32, rotated there by the butterfly
// stages (the same additions in the same order as hadamard_rows_cpu, so the rotation is
// exact to the bit), then each group's grid is chosen by a team reduction (the whole CTA for
// a per-row group, one warp per group for per-group quantization) and the row written back.
// Sums of squares and MSE errors accumulate in fp64 like the CPU reference.
#include <cfloat>

#include "kernels/cuda_common.cuh"
#include "quant/hadamard.hpp"
#include "quant/quant_gpu.hpp"

namespace qopt {

namespace {

constexpr int kMaxCols = 32768;

struct Stats {
    float absmax, lo, hi;
    double sum_squares;
};

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

__device__ GroupGrid grid_at_ratio(const Params& p, const Stats& s, float ratio) {
    if (p.grid == QuantGrid::Asymmetric) return make_grid(p.grid, p.bits, mul_rn(ratio, s.lo), mul_rn(ratio, s.hi));
    return make_grid(p.grid, p.bits, -mul_rn(ratio, s.absmax), mul_rn(ratio, s.absmax));
}

__device__ float rms_of(const Stats& s, long n) { return float(sqrt(s.sum_squares / double(n))); }

// The group's grid by the spec's rule (mirrors choose_grid in quant/quantizer.cpp).
template <bool Cta>
__device__ GroupGrid choose_grid(const Params& p, const Team<Cta>& team, const Stats& s, long n, const float* x,
                                 int count) {
    switch (p.rule) {
        case ScaleRule::Absmax: return grid_at_ratio(p, s, 1.0f);
        case ScaleRule::Clip: return grid_at_ratio(p, s, p.clip_ratio);
        case ScaleRule::Gaussian: {
            const float range = mul_rn(p.alpha, rms_of(s, n)) + 1e-8f;
            return make_grid(p.grid, p.bits, -range, range);
        }
        case ScaleRule::Mse: {
            GroupGrid best = grid_at_ratio(p, s, 1.0f);
            double best_error = INFINITY;
            for (int k = p.mse_grid; k * 5 >= p.mse_grid; --k) {
                const GroupGrid g = grid_at_ratio(p, s, float(k) / float(p.mse_grid));
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
    }
    return grid_at_ratio(p, s, 1.0f);
}

// Quantizes one group of `count` staged values into out/keep.
template <bool Cta>
__device__ void quantize_group(bf16* out, uint8_t* keep, const float* x, int count, const Params& p,
                               const Team<Cta>& team, const Stats* tensor_stats) {
    const Stats s = p.per_tensor ? *tensor_stats : team.reduce(stats_of(x, count, team.rank(), team.size()));
    const long n = p.per_tensor ? p.tensor_count : long(count);
    const GroupGrid g = choose_grid(p, team, s, n, x, count);
    const float threshold = p.trust > 0 ? mul_rn(p.trust, rms_of(s, n)) : mul_rn(mul_rn(0.5f, g.step), 1.0001f);
    for (int i = team.rank(); i < count; i += team.size()) {
        const float q = quant_value(g, quant_code(g, x[i]));
        out[i] = __float2bfloat16_rn(q);
        if (keep) keep[i] = uint8_t(p.trust < 0 || fabsf(q - x[i]) <= threshold);
    }
}

template <typename InT>
__device__ void stage_row(float* row, const InT* in, int cols) {
    for (int i = threadIdx.x; i < cols; i += blockDim.x) row[i] = to_float(in[i]);
    __syncthreads();
}

template <typename InT>
__global__ void rotate_fake_quant_kernel(bf16* out, uint8_t* keep, const InT* in, int cols, Params p,
                                         const Stats* tensor_stats) {
    extern __shared__ float row[];
    __shared__ Stats scratch[32];
    const long r = blockIdx.x;
    stage_row(row, in + r * cols, cols);
    hadamard_smem(row, cols, p.block, p.norm);
    bf16* out_row = out + r * cols;
    uint8_t* keep_row = keep ? keep + r * cols : nullptr;
    if (p.group == cols) {
        quantize_group(out_row, keep_row, row, cols, p, Team<true>{scratch}, tensor_stats);
    } else {
        const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
        for (int g0 = warp * p.group; g0 < cols; g0 += warps * p.group)
            quantize_group(out_row + g0, keep_row ? keep_row + g0 : nullptr, row + g0, p.group, p, Team<false>{nullptr},
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
    for (long r = threadIdx.x; r < rows; r += blockDim.x) {
        const Stats t = row_stats[r];
        s.absmax = fmaxf(s.absmax, t.absmax), s.lo = fminf(s.lo, t.lo), s.hi = fmaxf(s.hi, t.hi);
        s.sum_squares += t.sum_squares;
    }
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
__global__ void masked_hadamard_kernel(T* out, const T* grad, const uint8_t* keep, int cols, int block, float norm,
                                       bool accumulate) {
    extern __shared__ float row[];
    const long base = long(blockIdx.x) * cols;
    for (int i = threadIdx.x; i < cols; i += blockDim.x)
        row[i] = (keep && !keep[base + i]) ? 0.0f : to_float(grad[base + i]);
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

template <typename InT>
void rotate_fake_quant(bf16* out, uint8_t* keep, const InT* in, long rows, int cols, int block, const QuantSpec& spec,
                       float trust, double* scratch, cudaStream_t stream) {
    check_shape(rows, cols, block, "fake-quant");
    QOPT_CHECK(spec.enabled(), "rotate_fake_quant_rows_gpu needs a quantizing spec (bits 2..8)");
    if (rows == 0) return;
    const Params p = make_params(rows, cols, block, spec, trust);
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
    rotate_fake_quant_kernel<InT><<<unsigned(rows), threads, row_smem(rotate_fake_quant_kernel<InT>, cols), stream>>>(
        out, keep, in, cols, p, stats);
    CUDA_CHECK_LAUNCH();
}

template <typename T>
void hadamard_rows(T* data, long rows, int cols, int block, cudaStream_t stream) {
    check_shape(rows, cols, block, "Hadamard");
    if (rows == 0 || block <= 1) return;
    hadamard_kernel<T><<<unsigned(rows), threads_for(cols), row_smem(hadamard_kernel<T>, cols), stream>>>(
        data, cols, block, hadamard_norm(block));
    CUDA_CHECK_LAUNCH();
}

template <typename T>
void masked_hadamard(T* out, const T* grad, const uint8_t* keep, long rows, int cols, int block, bool accumulate,
                     cudaStream_t stream) {
    check_shape(rows, cols, block, "masked Hadamard");
    if (rows == 0) return;
    masked_hadamard_kernel<T><<<unsigned(rows), threads_for(cols), row_smem(masked_hadamard_kernel<T>, cols),
                                stream>>>(out, grad, keep, cols, block > 1 ? block : 0, hadamard_norm(block),
                                          accumulate);
    CUDA_CHECK_LAUNCH();
}

}  // namespace

void hadamard_rows_gpu(float* data, long rows, int cols, int block, cudaStream_t stream) {
    hadamard_rows(data, rows, cols, block, stream);
}
void hadamard_rows_gpu(bf16* data, long rows, int cols, int block, cudaStream_t stream) {
    hadamard_rows(data, rows, cols, block, stream);
}
void rotate_fake_quant_rows_gpu(bf16* out, uint8_t* keep, const bf16* in, long rows, int cols, int hadamard_block,
                                const QuantSpec& spec, float trust, double* scratch, cudaStream_t stream) {
    rotate_fake_quant(out, keep, in, rows, cols, hadamard_block, spec, trust, scratch, stream);
}
void rotate_fake_quant_rows_gpu(bf16* out, uint8_t* keep, const float* in, long rows, int cols, int hadamard_block,
                                const QuantSpec& spec, float trust, double* scratch, cudaStream_t stream) {
    rotate_fake_quant(out, keep, in, rows, cols, hadamard_block, spec, trust, scratch, stream);
}
void masked_hadamard_rows_gpu(bf16* out, const bf16* grad, const uint8_t* keep, long rows, int cols,
                              int hadamard_block, bool accumulate, cudaStream_t stream) {
    masked_hadamard(out, grad, keep, rows, cols, hadamard_block, accumulate, stream);
}
void masked_hadamard_rows_gpu(float* out, const float* grad, const uint8_t* keep, long rows, int cols,
                              int hadamard_block, bool accumulate, cudaStream_t stream) {
    masked_hadamard(out, grad, keep, rows, cols, hadamard_block, accumulate, stream);
}

}  // namespace qopt
