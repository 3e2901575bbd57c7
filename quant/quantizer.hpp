// Uniform quantizers of 2..8 bits: the spec, its grid, and the CPU reference of quantize /
// dequantize / fake-quant. The CUDA kernels (quant/quant_kernels.cu) implement the same
// arithmetic; tests compare them.
//
// A tensor [rows, cols] is cut into groups that share one grid: the whole tensor, one row
// (per output channel for weights [out, in], per token for activations [tokens, dim]), or
// `group_size` consecutive elements of a row. A group's grid is affine,
//     value(code) = (code + offset) * step,   code in [code_min, code_max],
//     code(x)     = clamp(rint(x * (1 / step) - offset), code_min, code_max)   (rint: ties to even)
// with three shapes:
//   symmetric  codes -(2^(b-1)-1) .. 2^(b-1)-1, offset 0, step = range / (2^(b-1)-1)   (has a zero)
//   asymmetric codes -2^(b-1) .. 2^(b-1)-1, step = (hi - lo) / (2^b-1) over [lo, hi], offset =
//              2^(b-1) - zero_point (the usual unsigned codes 0 .. 2^b-1 shifted to signed ones)
//   centered   QuEST's grid: codes -2^(b-1) .. 2^(b-1)-1, offset 1/2, step = 2 range / (2^b-1)
//              (2^b levels at odd multiples of step/2, no zero level)
// where `range` (the clip value) comes from the scale rule:
//   absmax     range = max |x|                     (asymmetric: lo/hi = min/max)
//   clip       range = clip_ratio * max |x|        (asymmetric: clip_ratio * min/max)
//   mse        the ratio in {1, 1 - 1/mse_grid, ..., 1/mse_grid ... } minimising sum (x - q(x))^2
//   gaussian   range = alpha_b * RMS(group) + 1e-8, alpha_b the MSE-optimal clip multiple of a
//              standard Gaussian for the centered b-bit grid (QuEST; after a Hadamard
//              transform the entries are close to Gaussian)
#pragma once
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

// Grid arithmetic is shared by the CPU reference and the CUDA kernels, with every operation
// rounded on its own (no fused multiply-add on either side: mul_rn) so both give the same bits.
#ifdef __CUDACC__
#define QOPT_HD __host__ __device__
#else
#define QOPT_HD
#endif

namespace qopt {

enum class QuantGrid { Symmetric, Asymmetric, Centered };
enum class ScaleRule { Absmax, Clip, Mse, Gaussian };
enum class Granularity { Tensor, Row, Group };

struct QuantSpec {
    int bits = 16;  // 2..8 quantize; 16: off (the tensor is left as it is)
    QuantGrid grid = QuantGrid::Symmetric;
    ScaleRule rule = ScaleRule::Absmax;
    Granularity granularity = Granularity::Row;
    int group_size = 0;       // Granularity::Group only
    float clip_ratio = 1.0f;  // ScaleRule::Clip
    int mse_grid = 100;       // ScaleRule::Mse: candidate ratios k / mse_grid, k = mse_grid .. mse_grid/5

    bool enabled() const { return bits <= 8; }
    // Elements per group for a row of `cols` (the whole tensor counts as one group of rows*cols).
    int group_cols(int cols) const { return granularity == Granularity::Group ? group_size : cols; }
    void validate(int cols = 0) const;  // throws qopt::Error; cols > 0 also checks that groups tile a row
    std::string describe() const;       // "int4 symmetric absmax per-row"
};

// QuEST's MSE-optimal Gaussian clip multiples alpha_1 .. alpha_8 for the centered grid.
float gaussian_clip_multiple(int bits);

// One group's grid.
struct GroupGrid {
    float step = 0, offset = 0;
    float inv_step = 0;  // 1 / step, rounded once: codes multiply by it (a division per element is slow on GPUs)
    int code_min = 0, code_max = 0;
};

// Parsing of the CLI words; each throws naming the accepted values.
QuantGrid parse_quant_grid(const std::string& name);
ScaleRule parse_scale_rule(const std::string& name);
Granularity parse_granularity(const std::string& name);
const char* quant_grid_name(QuantGrid grid);
const char* scale_rule_name(ScaleRule rule);
const char* granularity_name(Granularity granularity);

// A product rounded on its own: never fused with a following add into one FMA (nvcc fuses
// plain a * b + c; so may GCC with -ffp-contract=fast, its default, when -march has FMA).
QOPT_HD inline float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    volatile float product = a * b;
    return product;
#endif
}

// The grid of `bits` with clip value hi (symmetric, centered: the range is [-hi, hi]) or clip
// interval [lo, hi] (asymmetric, widened to contain 0 so that zero is exact).
QOPT_HD inline GroupGrid make_grid(QuantGrid grid, int bits, float lo, float hi) {
    const float tiny = 1e-30f;  // an all-zero group still gets a finite step
    GroupGrid g;
    const int levels = 1 << bits;
    if (grid == QuantGrid::Symmetric) {
        g.code_max = levels / 2 - 1;
        g.code_min = -g.code_max;
        g.step = fmaxf(hi, tiny) / float(g.code_max);
        g.offset = 0;
    } else if (grid == QuantGrid::Centered) {
        g.code_min = -levels / 2;
        g.code_max = levels / 2 - 1;
        g.step = mul_rn(2.0f, fmaxf(hi, tiny)) / float(levels - 1);
        g.offset = 0.5f;
    } else {
        lo = fminf(lo, 0.0f), hi = fmaxf(hi, 0.0f);
        g.code_min = -levels / 2;
        g.code_max = levels / 2 - 1;
        g.step = fmaxf(hi - lo, tiny) / float(levels - 1);
        g.offset = float(levels / 2) - rintf(-lo / g.step);  // codes shifted to signed: 2^(b-1) - zero point
    }
    g.inv_step = 1.0f / g.step;
    return g;
}
inline GroupGrid make_grid(const QuantSpec& spec, float lo, float hi) { return make_grid(spec.grid, spec.bits, lo, hi); }

// A sum rounded on its own, never reassociated with the next one (the rounding trick below
// depends on it; host compilers keep float sums in order without -ffast-math).
QOPT_HD inline float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}

// x rounded to the nearest integer, ties to even, by the adder: x + 1.5 * 2^23 has no fraction
// bits left (|x| < 2^22), so the sum is x rounded, and subtracting 1.5 * 2^23 again is exact.
// Larger |x| come back with the same sign and at least 2^22 in magnitude, beyond every code
// range, so the clamp that follows makes the code rintf's; NaN stays NaN. Two full-rate adds
// instead of the GPU's quarter-rate rounding instruction (the fake-quant kernels' inner loop).
QOPT_HD inline float round_to_code(float x) {
    constexpr float kShift = 12582912.0f;  // 1.5 * 2^23
    return add_rn(add_rn(x, kShift), -kShift);
}

// x's code on the grid, clamped to the code range, as a float (an integer value).
QOPT_HD inline float quant_code_float(const GroupGrid& g, float x) {
    const float code = round_to_code(mul_rn(x, g.inv_step) - g.offset);
    return fminf(fmaxf(code, float(g.code_min)), float(g.code_max));
}
QOPT_HD inline int quant_code(const GroupGrid& g, float x) { return int(quant_code_float(g, x)); }
QOPT_HD inline float quant_value(const GroupGrid& g, float code) { return mul_rn(code + g.offset, g.step); }

// A group's statistics: every rule but mse picks its grid from them alone.
struct GroupStats {
    float absmax, lo, hi;
    double sum_squares;
};
QOPT_HD inline float group_rms(const GroupStats& s, long n) { return float(sqrt(s.sum_squares / double(n))); }

// The grid clipping the group's range (asymmetric: its [lo, hi]) at `ratio`.
QOPT_HD inline GroupGrid grid_at_ratio(QuantGrid grid, int bits, const GroupStats& s, float ratio) {
    if (grid == QuantGrid::Asymmetric) return make_grid(grid, bits, mul_rn(ratio, s.lo), mul_rn(ratio, s.hi));
    return make_grid(grid, bits, -mul_rn(ratio, s.absmax), mul_rn(ratio, s.absmax));
}

// absmax, clip and gaussian (alpha: gaussian_clip_multiple(bits)) from the statistics of n values.
QOPT_HD inline GroupGrid grid_from_stats(QuantGrid grid, int bits, ScaleRule rule, float clip_ratio, float alpha,
                                         const GroupStats& s, long n) {
    if (rule == ScaleRule::Gaussian) {
        const float range = mul_rn(alpha, group_rms(s, n)) + 1e-8f;
        return make_grid(grid, bits, -range, range);
    }
    return grid_at_ratio(grid, bits, s, rule == ScaleRule::Clip ? clip_ratio : 1.0f);
}

// The estimator's bound on |q(x) - x| for the gradient to pass: trust * RMS, or with trust 0
// half a step, with room for the rounding of x / step (inside the clip range the error is at
// most step/2 in exact arithmetic). trust < 0 (STE) passes everything; callers test that.
QOPT_HD inline float keep_threshold(float trust, const GroupStats& s, long n, const GroupGrid& g) {
    return trust > 0 ? mul_rn(trust, group_rms(s, n)) : mul_rn(mul_rn(0.5f, g.step), 1.0001f);
}

// Statistics of n values read with a stride.
QOPT_HD inline GroupStats group_stats(const float* x, long n, long stride = 1) {
    GroupStats s{0.0f, n > 0 ? x[0] : 0.0f, n > 0 ? x[0] : 0.0f, 0.0};
    for (long i = 0; i < n; ++i) {
        const float v = x[i * stride];
        s.absmax = fmaxf(s.absmax, fabsf(v));
        s.lo = fminf(s.lo, v);
        s.hi = fmaxf(s.hi, v);
        s.sum_squares += double(v) * double(v);
    }
    return s;
}

// The grid the spec's rule picks for n values (read with a stride) whose statistics are s;
// alpha as in grid_from_stats. The mse rule tries the ratios k / mse_grid from 1 down to 1/5;
// the first smallest squared error wins. Host and device (GPTQ's per-group grids on the GPU).
QOPT_HD inline GroupGrid choose_grid(const QuantSpec& spec, float alpha, const GroupStats& s, const float* values,
                                     long n, long stride = 1) {
    if (spec.rule != ScaleRule::Mse) return grid_from_stats(spec.grid, spec.bits, spec.rule, spec.clip_ratio, alpha, s, n);
    GroupGrid best = grid_at_ratio(spec.grid, spec.bits, s, 1.0f);
    double best_error = INFINITY;
    for (int k = spec.mse_grid; k * 5 >= spec.mse_grid; --k) {
        const GroupGrid g = grid_at_ratio(spec.grid, spec.bits, s, float(k) / float(spec.mse_grid));
        double error = 0;
        for (long i = 0; i < n; ++i) {
            const float v = values[i * stride];
            const double d = double(quant_value(g, quant_code(g, v))) - double(v);
            error += d * d;
        }
        if (error < best_error) best_error = error, best = g;
    }
    return best;
}

// The alpha choose_grid needs for this spec (0 unless the rule is gaussian).
inline float rule_alpha(const QuantSpec& spec) {
    return spec.rule == ScaleRule::Gaussian ? gaussian_clip_multiple(spec.bits) : 0.0f;
}

// The grid the spec's rule picks for these n values (read with a stride of 1).
inline GroupGrid choose_grid(const QuantSpec& spec, const float* values, long n) {
    return choose_grid(spec, rule_alpha(spec), group_stats(values, n), values, n);
}

// Quantized tensor [rows, cols]: integer codes (int8 holds every width up to 8 bits) and one
// grid per group, groups in row-major order (per-tensor: 1; per-row: rows; per-group:
// rows * cols / group_size).
struct QuantizedTensor {
    int rows = 0, cols = 0;
    QuantSpec spec;
    std::vector<int8_t> codes;
    std::vector<GroupGrid> grids;
    std::vector<float> dequantize() const;
};
QuantizedTensor quantize_cpu(const float* values, int rows, int cols, const QuantSpec& spec);

// Fake-quant (quantize then dequantize), CPU reference, with the backward mask of the
// estimator: keep[i] = 1 where the gradient passes. STE (trust < 0): everywhere. Trust
// (QuEST): where |q(x) - x| <= trust * RMS(group), or, with trust == 0, where the error is
// at most half a step (inside the clip range). keep may be null.
template <typename T>
void fake_quant_cpu(T* out, uint8_t* keep, const T* in, int rows, int cols, const QuantSpec& spec, float trust);

}  // namespace qopt
