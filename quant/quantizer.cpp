#include "quant/quantizer.hpp"

#include <algorithm>
#include <cmath>

#include "core/error.hpp"

namespace qopt {

float gaussian_clip_multiple(int bits) {
    static const float alpha[] = {0.79788f, 1.49353f, 2.05107f, 2.51393f, 2.91609f, 3.27660f, 3.60105f, 3.88494f};
    QOPT_CHECK(bits >= 1 && bits <= 8, "no Gaussian clip multiple for ", bits, " bits (1..8)");
    return alpha[bits - 1];
}

QuantGrid parse_quant_grid(const std::string& name) {
    if (name == "symmetric") return QuantGrid::Symmetric;
    if (name == "asymmetric") return QuantGrid::Asymmetric;
    if (name == "centered") return QuantGrid::Centered;
    fail("unknown quantization grid '", name, "' (symmetric, asymmetric or centered)");
}

ScaleRule parse_scale_rule(const std::string& name) {
    if (name == "absmax") return ScaleRule::Absmax;
    if (name == "clip") return ScaleRule::Clip;
    if (name == "mse") return ScaleRule::Mse;
    if (name == "gaussian") return ScaleRule::Gaussian;
    fail("unknown scale rule '", name, "' (absmax, clip, mse or gaussian)");
}

Granularity parse_granularity(const std::string& name) {
    if (name == "tensor") return Granularity::Tensor;
    if (name == "row") return Granularity::Row;
    if (name == "group") return Granularity::Group;
    fail("unknown quantization granularity '", name, "' (tensor, row or group)");
}

const char* quant_grid_name(QuantGrid grid) {
    switch (grid) {
        case QuantGrid::Symmetric: return "symmetric";
        case QuantGrid::Asymmetric: return "asymmetric";
        case QuantGrid::Centered: return "centered";
    }
    return "?";
}

const char* scale_rule_name(ScaleRule rule) {
    switch (rule) {
        case ScaleRule::Absmax: return "absmax";
        case ScaleRule::Clip: return "clip";
        case ScaleRule::Mse: return "mse";
        case ScaleRule::Gaussian: return "gaussian";
    }
    return "?";
}

const char* granularity_name(Granularity granularity) {
    switch (granularity) {
        case Granularity::Tensor: return "tensor";
        case Granularity::Row: return "row";
        case Granularity::Group: return "group";
    }
    return "?";
}

void QuantSpec::validate(int cols) const {
    if (!enabled()) {
        QOPT_CHECK(bits == 16, "quantization bits must be 2..8 (or 16: off), not ", bits);
        return;
    }
    QOPT_CHECK(bits >= 2, "quantization bits must be 2..8 (or 16: off), not ", bits);
    QOPT_CHECK(rule != ScaleRule::Clip || (clip_ratio > 0 && clip_ratio <= 1), "clip ratio must be in (0, 1], not ",
               clip_ratio);
    QOPT_CHECK(rule != ScaleRule::Mse || mse_grid >= 5, "MSE search grid must have at least 5 points, not ",
               mse_grid);
    QOPT_CHECK(rule != ScaleRule::Gaussian || grid != QuantGrid::Asymmetric,
               "the gaussian scale rule is symmetric: use it with the symmetric or centered grid");
    if (granularity == Granularity::Group) {
        QOPT_CHECK(group_size >= 2, "quantization group size must be at least 2, not ", group_size);
        QOPT_CHECK(cols <= 0 || cols % group_size == 0, "quantization group size ", group_size,
                   " does not divide the row length ", cols);
    }
}

std::string QuantSpec::describe() const {
    if (!enabled()) return "off";
    std::string text = concat("int", bits, " ", quant_grid_name(grid), " ", scale_rule_name(rule));
    if (rule == ScaleRule::Clip) text += concat("(", clip_ratio, ")");
    if (granularity == Granularity::Group) text += concat(" per-group(", group_size, ")");
    else text += concat(" per-", granularity_name(granularity));
    return text;
}

QuantizedTensor quantize_cpu(const float* values, int rows, int cols, const QuantSpec& spec) {
    QOPT_CHECK(spec.enabled(), "quantize_cpu needs a quantizing spec (bits 2..8)");
    spec.validate(cols);
    QuantizedTensor q;
    q.rows = rows, q.cols = cols, q.spec = spec;
    const long total = long(rows) * cols;
    q.codes.resize(size_t(total));
    const long group = spec.granularity == Granularity::Tensor ? total : spec.group_cols(cols);
    const long n_groups = total / group;
    q.grids.resize(size_t(n_groups));
#pragma omp parallel for schedule(static)
    for (long gi = 0; gi < n_groups; ++gi) {
        const float* x = values + gi * group;
        const GroupGrid g = choose_grid(spec, x, group);
        q.grids[size_t(gi)] = g;
        for (long i = 0; i < group; ++i) q.codes[size_t(gi * group + i)] = int8_t(quant_code(g, x[i]));
    }
    return q;
}

std::vector<float> QuantizedTensor::dequantize() const {
    const long total = long(rows) * cols;
    const long group = total / long(grids.size());
    std::vector<float> out(static_cast<size_t>(total));
    for (long i = 0; i < total; ++i) out[size_t(i)] = quant_value(grids[size_t(i / group)], codes[size_t(i)]);
    return out;
}

template <typename T>
void fake_quant_cpu(T* out, uint8_t* keep, const T* in, int rows, int cols, const QuantSpec& spec, float trust) {
    const long total = long(rows) * cols;
    if (!spec.enabled()) {
        std::copy(in, in + total, out);
        if (keep) std::fill(keep, keep + total, uint8_t(1));
        return;
    }
    spec.validate(cols);
    const long group = spec.granularity == Granularity::Tensor ? total : spec.group_cols(cols);
    const long n_groups = total / group;
#pragma omp parallel for schedule(static)
    for (long gi = 0; gi < n_groups; ++gi) {
        std::vector<float> x(in + gi * group, in + (gi + 1) * group);
        const GroupStats stats = group_stats(x.data(), group);
        const GroupGrid g = choose_grid(spec, rule_alpha(spec), stats, x.data(), group);
        const float threshold = keep_threshold(trust, stats, group, g);
        for (long i = 0; i < group; ++i) {
            const float q = quant_value(g, quant_code(g, x[size_t(i)]));
            out[gi * group + i] = T(q);
            if (keep) keep[gi * group + i] = uint8_t(trust < 0 || std::fabs(q - x[size_t(i)]) <= threshold);
        }
    }
}

template void fake_quant_cpu<float>(float*, uint8_t*, const float*, int, int, const QuantSpec&, float);
template void fake_quant_cpu<double>(double*, uint8_t*, const double*, int, int, const QuantSpec&, float);

}  // namespace qopt
