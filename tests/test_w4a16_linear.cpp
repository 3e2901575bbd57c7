// Weight-only layers with packed 2..4-bit weights (quant/w4a16_linear.*): the packed weights
// dequantize to the fake-quant path's weights bit for bit (every grid and granularity); the GPU
// layer (GEMV for 1..16 rows, tensor-core GEMM beyond) against the CPU reference within bf16
// rounding (whole models with packed weights: tests/test_int8_linear.cpp, with the W8A8 path).
// GPU cases skip without a GPU.
#include "core/error.hpp"
#include "gpu_helpers.hpp"
#include "quant/integer_execution.hpp"
#include "quant/w4a16_linear.hpp"

using namespace qopt;
using namespace qopt::test;

namespace {

QuantSpec weight_spec(int bits, QuantGrid grid, Granularity granularity, ScaleRule rule, int group_size = 32) {
    QuantSpec spec;
    spec.bits = bits, spec.grid = grid, spec.granularity = granularity, spec.rule = rule;
    if (granularity == Granularity::Group) spec.group_size = group_size;
    return spec;
}

// Every format the packed path runs, cycled through: bits, grids, granularities, rules.
std::vector<QuantSpec> weight_specs() {
    std::vector<QuantSpec> specs;
    const ScaleRule rules[] = {ScaleRule::Absmax, ScaleRule::Mse, ScaleRule::Gaussian, ScaleRule::Clip};
    int i = 0;
    for (int bits : {4, 3, 2})
        for (QuantGrid grid : {QuantGrid::Symmetric, QuantGrid::Asymmetric, QuantGrid::Centered})
            for (Granularity granularity : {Granularity::Row, Granularity::Group, Granularity::Tensor}) {
                ScaleRule rule = rules[i % 4];
                if (grid == QuantGrid::Asymmetric && rule == ScaleRule::Gaussian) rule = ScaleRule::Absmax;  // symmetric rule
                QuantSpec spec = weight_spec(bits, grid, granularity, rule, i % 2 ? 32 : 16);
                spec.clip_ratio = 0.9f;
                ++i;
                specs.push_back(spec);
            }
    return specs;
}

std::vector<float> random_floats(size_t n, std::mt19937_64& gen) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> x(n);
    for (float& v : x) v = normal(gen) * (gen() % 61 == 0 ? 8.0f : 1.0f);  // a few outliers
    return x;
}

}  // namespace

TEST_CASE("packed W4A16 weights dequantize to the fake-quant weights bit for bit; the reference product; refusals") {
    std::mt19937_64 gen(fresh_seed());
    const int rows = 24, cols = 96;
    const std::vector<float> w = random_floats(size_t(rows) * cols, gen);
    for (const QuantSpec& spec : weight_specs()) {
        CAPTURE(spec.describe());
        const QuantizedTensor q = quantize_cpu(w.data(), rows, cols, spec);
        const PackedWeights packed = pack_weights(q);
        REQUIRE(packed.packed.size() == size_t(rows) * cols / 2);
        std::vector<float> fake(w.size());
        fake_quant_cpu(fake.data(), nullptr, w.data(), rows, cols, spec, -1.0f);
        const std::vector<float> values = dequantized_weights(packed);
        size_t differ = 0;
        for (size_t i = 0; i < w.size(); ++i) differ += values[i] != bf16_round(fake[i]);
        CHECK(differ == 0);
        // The reference product over those weights, against a plain float64 sum.
        const int n_rows = 3;
        std::vector<float> x = random_floats(size_t(n_rows) * cols, gen), bias = random_floats(rows, gen);
        for (float& v : x) v = bf16_round(v);
        std::vector<float> out(size_t(n_rows) * rows);
        w4a16_linear_cpu(out.data(), x.data(), packed, bias.data(), n_rows);
        double worst = 0;
        for (int n = 0; n < n_rows; ++n)
            for (int o = 0; o < rows; ++o) {
                double sum = bias[size_t(o)];
                for (int k = 0; k < cols; ++k)
                    sum += double(x[size_t(n) * cols + k]) * double(bf16_round(fake[size_t(o) * cols + k]));
                worst = std::max(worst, std::fabs(out[size_t(n) * rows + o] - sum) / (std::fabs(sum) + 1e-3));
            }
        CHECK(worst < 1e-6);
    }
    // What the packed path cannot run is refused by name.
    const QuantSpec eight = weight_spec(8, QuantGrid::Symmetric, Granularity::Row, ScaleRule::Absmax);
    CHECK_THROWS_WITH_AS(check_weight_only_spec(eight), doctest::Contains("2-4-bit"), Error);
    const QuantSpec groups_of_24 = weight_spec(4, QuantGrid::Symmetric, Granularity::Group, ScaleRule::Absmax, 24);
    CHECK_THROWS_WITH_AS(pack_weights(quantize_cpu(w.data(), rows, cols, groups_of_24)),
                         doctest::Contains("multiple of 16"), Error);
    const QuantSpec row = weight_spec(4, QuantGrid::Symmetric, Granularity::Row, ScaleRule::Absmax);
    CHECK_THROWS_WITH_AS(pack_weights(quantize_cpu(w.data(), rows * 2, 48, row)), doctest::Contains("multiple of 32"),
                         Error);
    // Which integer path runs a configuration.
    LinearQuantConfig quant;
    quant.weights = row;
    CHECK(integer_path(quant) == IntegerPath::PackedWeights);
    quant.activations = weight_spec(8, QuantGrid::Symmetric, Granularity::Row, ScaleRule::Absmax);
    quant.weights.bits = 8;
    CHECK(integer_path(quant) == IntegerPath::Int8Product);
    quant.activations.bits = 16;
    CHECK_THROWS_WITH_AS(integer_path(quant), doctest::Contains("2-4-bit"), Error);
}

TEST_CASE("GPU W4A16 layer: the CPU reference within bf16 rounding (GEMV and GEMM, odd sizes, every format)") {
    REQUIRE_GPU();
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    const std::vector<QuantSpec> specs = weight_specs();
    size_t next_spec = 0;
    // (input rows, in_dim, out_dim): the GEMV (1..16 rows, passes of 4) and the GEMM (17+) with partial tiles in both
    // directions, several k steps, and one gpt2-124m shape.
    for (auto [n_rows, in_dim, out_dim] : {std::tuple{1, 96, 40}, std::tuple{2, 256, 72}, std::tuple{3, 64, 8},
                                           std::tuple{4, 1024, 136}, std::tuple{5, 96, 40}, std::tuple{14, 256, 40},
                                           std::tuple{17, 96, 40}, std::tuple{200, 160, 136},
                                           std::tuple{300, 768, 256}, std::tuple{128, 3072, 768}}) {
        for (int repeat = 0; repeat < 3; ++repeat) {
            const QuantSpec& spec = specs[next_spec++ % specs.size()];
            CAPTURE(n_rows);
            CAPTURE(in_dim);
            CAPTURE(out_dim);
            CAPTURE(spec.describe());
            const std::vector<float> w = random_floats(size_t(out_dim) * in_dim, gen);
            std::vector<float> x = random_floats(size_t(n_rows) * in_dim, gen), bias = random_floats(out_dim, gen);
            for (float& v : x) v = bf16_round(v);
            const bool with_bias = repeat != 1;
            const PackedWeights packed = pack_weights(quantize_cpu(w.data(), out_dim, in_dim, spec));
            std::vector<float> expected(size_t(n_rows) * out_dim);
            w4a16_linear_cpu(expected.data(), x.data(), packed, with_bias ? bias.data() : nullptr, n_rows);
            // Each output's error bound: its bf16 rounding plus fp32 summation over |x| |w|.
            const std::vector<float> values = dequantized_weights(packed);
            DevicePackedWeights packed_d;
            packed_d.upload(packed);
            const DeviceBuffer<bf16> x_d = uploaded(to_bf16(x));
            const DeviceBuffer<float> bias_d = uploaded(bias);
            DeviceBuffer<bf16> out = poisoned<bf16>(expected.size());
            w4a16_linear_forward_gpu(out.data(), x_d.data(), packed_d, with_bias ? bias_d.data() : nullptr, n_rows);
            const std::vector<double> got = to_double(out.download());
            size_t bad = 0;
            for (int n = 0; n < n_rows; ++n)
                for (int o = 0; o < out_dim; ++o) {
                    double magnitude = 0;
                    for (int k = 0; k < in_dim; ++k)
                        magnitude += std::fabs(x[size_t(n) * in_dim + k] * values[size_t(o) * in_dim + k]);
                    const double ref = expected[size_t(n) * out_dim + o];
                    const double error = std::fabs(got[size_t(n) * out_dim + o] - ref);
                    bad += !(error <= std::fabs(ref) / 256 + 1e-5 * magnitude + 1e-6);  // NaN (unwritten) counts
                }
            CHECK(bad == 0);
        }
    }
    // A misaligned input is refused by name.
    const std::vector<float> w = random_floats(64 * 64, gen);
    DevicePackedWeights packed_d;
    packed_d.upload(pack_weights(quantize_cpu(w.data(), 64, 64, weight_spec(4, QuantGrid::Symmetric, Granularity::Row,
                                                                             ScaleRule::Absmax))));
    DeviceBuffer<bf16> x(8 * 64 + 1), out(8 * 64);
    CHECK_THROWS_WITH_AS(w4a16_linear_forward_gpu(out.data(), x.data() + 1, packed_d, nullptr, 8),
                         doctest::Contains("16-byte aligned"), Error);
}
