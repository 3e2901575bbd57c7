#include "quant/int8_linear.hpp"

#include <algorithm>

#include "core/error.hpp"

namespace qopt {

void check_integer_spec(const QuantSpec& spec, bool activations) {
    const char* what = activations ? "activations" : "weights";
    QOPT_CHECK(spec.enabled(), "integer execution: the ", what, " are not quantized (", spec.describe(), ")");
    spec.validate();
    QOPT_CHECK(spec.grid != QuantGrid::Asymmetric, "integer execution needs the symmetric or centered grid for the ",
               what, " (the tensor cores have no zero point), not ", quant_grid_name(spec.grid));
    QOPT_CHECK(spec.grid != QuantGrid::Centered || spec.bits <= 7, "integer execution of the centered grid needs at "
               "most 7 bits for the ", what, " (its doubled codes must fit int8), not ", spec.bits);
    QOPT_CHECK(spec.granularity == Granularity::Row, "integer execution needs one scale per row for the ", what,
               " (per token / per output channel), not per ", granularity_name(spec.granularity));
    QOPT_CHECK(!activations || spec.rule != ScaleRule::Mse,
               "integer execution quantizes activations by absmax, clip or gaussian, not the mse search");
}

IntegerMatrix integer_matrix(QuantizedTensor q) {
    check_integer_spec(q.spec, false);
    QOPT_CHECK(q.grids.size() == size_t(q.rows), "integer execution: ", q.grids.size(), " grids for ", q.rows, " rows");
    IntegerMatrix m;
    m.codes = std::move(q.codes);
    const bool doubled = q.spec.grid == QuantGrid::Centered;
    if (doubled)
        for (int8_t& c : m.codes) c = int8_t(integer_code(c, true));
    for (const GroupGrid& g : q.grids) m.steps.push_back(integer_step(g.step, doubled));
    return m;
}

bool fp8_exact(const QuantSpec& spec) {
    // Largest integer code: 2^(b-1) - 1 (symmetric), 2^b - 1 (centered, doubled); e4m3 is exact to 16.
    return spec.enabled() && ((spec.grid == QuantGrid::Symmetric && spec.bits <= 5) ||
                              (spec.grid == QuantGrid::Centered && spec.bits <= 4));
}

void check_fp8_spec(const QuantSpec& spec) {
    QOPT_CHECK(fp8_exact(spec), "fp8 codes need a symmetric grid of at most 5 bits or a centered one of at most 4, not ",
               spec.describe());
}

std::vector<uint8_t> fp8_codes(const std::vector<int8_t>& codes) {
    std::vector<uint8_t> bytes(codes.size());
    for (size_t i = 0; i < codes.size(); ++i) {
        QOPT_CHECK(codes[i] >= -16 && codes[i] <= 16, "fp8 codes: ", int(codes[i]), " is not exact in e4m3");
        bytes[i] = integer_code_byte(codes[i], true);
    }
    return bytes;
}

void quantize_rows_int8_cpu(int8_t* codes, float* steps, const float* x, int rows, int cols, const QuantSpec& spec) {
    const IntegerMatrix m = integer_matrix(quantize_cpu(x, rows, cols, spec));
    std::copy(m.codes.begin(), m.codes.end(), codes);
    std::copy(m.steps.begin(), m.steps.end(), steps);
}

void dequantize_product_cpu(float* out, const int32_t* product, const float* in_steps, const float* w_steps,
                            const float* bias, int n_rows, int out_dim) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < n_rows; ++n)
        for (int o = 0; o < out_dim; ++o) {
            const size_t i = size_t(n) * out_dim + o;
            const float scaled = mul_rn(mul_rn(float(product[i]), in_steps[n]), w_steps[o]);
            out[i] = bias ? scaled + bias[o] : scaled;
        }
}

}  // namespace qopt
