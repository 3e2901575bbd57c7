// Integer linear layers (quant/int8_linear.*): the CPU reference against the quantizer and the
// exact product it stands for; the GPU kernels against the CPU reference bit for bit (absmax and
// clip; the gaussian rule's sum of squares is reduced in another order) and the whole layer
// against the fake-quant path it replaces (bf16 operands: within bf16 rounding); whole models in
// integers against their fake-quant evaluation. GPU cases skip without a GPU.
#include "core/error.hpp"
#include "eval/eval_model.hpp"
#include "gpu_helpers.hpp"
#include "kernels/matmul.hpp"
#include "model/gpu_model.hpp"
#include "quant/hadamard.hpp"
#include "quant/int8_linear.hpp"
#include "quant/integer_execution.hpp"
#include "quant/quant_gpu.hpp"

using namespace qopt;
using namespace qopt::test;

namespace {

QuantSpec row_spec(int bits, ScaleRule rule) {
    QuantSpec spec;
    spec.bits = bits, spec.rule = rule, spec.clip_ratio = 0.8f;
    return spec;
}

// bf16 inputs with a few large entries per row (activation-like outliers), as exact floats.
std::vector<float> bf16_rows(int rows, int cols, std::mt19937_64& gen) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> x(size_t(rows) * cols);
    for (size_t i = 0; i < x.size(); ++i) {
        const float v = normal(gen) * (gen() % 97 == 0 ? 20.0f : 1.0f);
        x[i] = bf16_round(v);
    }
    return x;
}

// The integer layer on the CPU: x [rows, in_dim] and w [out_dim, in_dim] quantized per row by
// `spec` (codes and steps), their exact integer product, scaled and biased.
struct IntegerLayerReference {
    std::vector<int8_t> xq, wq;
    std::vector<float> sx, sw, out;
};
IntegerLayerReference integer_layer_cpu(const std::vector<float>& x, const std::vector<float>& w,
                                        const std::vector<float>& bias, int rows, int in_dim, int out_dim,
                                        const QuantSpec& spec) {
    IntegerLayerReference r{std::vector<int8_t>(x.size()), std::vector<int8_t>(w.size()),
                            std::vector<float>(size_t(rows)), std::vector<float>(size_t(out_dim)),
                            std::vector<float>(size_t(rows) * out_dim)};
    quantize_rows_int8_cpu(r.xq.data(), r.sx.data(), x.data(), rows, in_dim, spec);
    quantize_rows_int8_cpu(r.wq.data(), r.sw.data(), w.data(), out_dim, in_dim, spec);
    std::vector<int32_t> product(r.out.size());
    int8_matmul_cpu(product.data(), r.xq.data(), r.wq.data(), rows, in_dim, out_dim);
    dequantize_product_cpu(r.out.data(), product.data(), r.sx.data(), r.sw.data(), bias.data(), rows, out_dim);
    return r;
}

}  // namespace

TEST_CASE("integer layer reference: the quantizer's codes, and the exact product scaled") {
    std::mt19937_64 gen(fresh_seed());
    const int rows = 9, in_dim = 40, out_dim = 7;
    const std::vector<float> x = bf16_rows(rows, in_dim, gen), w = bf16_rows(out_dim, in_dim, gen);
    for (int bits : {8, 4})
        for (ScaleRule rule : {ScaleRule::Absmax, ScaleRule::Clip, ScaleRule::Gaussian, ScaleRule::Mse}) {
            const QuantSpec spec = row_spec(bits, rule);
            CAPTURE(spec.describe());
            std::vector<int8_t> codes(x.size());
            std::vector<float> steps(rows);
            quantize_rows_int8_cpu(codes.data(), steps.data(), x.data(), rows, in_dim, spec);
            const QuantizedTensor q = quantize_cpu(x.data(), rows, in_dim, spec);
            CHECK(codes == q.codes);
            for (int r = 0; r < rows; ++r) CHECK(steps[size_t(r)] == q.grids[size_t(r)].step);
        }
    // The scaled integer product equals sum_i (xq_i * sx)(wq_i * sw) + b, computed in float64.
    const QuantSpec spec = row_spec(8, ScaleRule::Absmax);
    const std::vector<float> bias(out_dim, 0.25f);
    const IntegerLayerReference layer = integer_layer_cpu(x, w, bias, rows, in_dim, out_dim, spec);
    const std::vector<int8_t>& xq = layer.xq;
    const std::vector<int8_t>& wq = layer.wq;
    const std::vector<float>& sx = layer.sx;
    const std::vector<float>& sw = layer.sw;
    const std::vector<float>& out = layer.out;
    double worst = 0;
    for (int n = 0; n < rows; ++n)
        for (int o = 0; o < out_dim; ++o) {
            double expected = bias[size_t(o)];
            for (int i = 0; i < in_dim; ++i)
                expected += double(xq[size_t(n) * in_dim + i]) * sx[size_t(n)] * double(wq[size_t(o) * in_dim + i]) *
                            sw[size_t(o)];
            // float32 roundings of the scaled product and of the bias add: relative to the terms' sizes.
            const double size = std::fabs(expected - bias[size_t(o)]) + std::fabs(bias[size_t(o)]);
            worst = std::max(worst, std::fabs(out[size_t(n) * out_dim + o] - expected) / size);
        }
    CHECK(worst < 1e-6);
    // QuEST's centered grid runs as doubled odd integers with half the step: integer * step is the
    // quantizer's value (code + 1/2) * step, bit for bit.
    for (int bits : {4, 7}) {
        QuantSpec centered = row_spec(bits, ScaleRule::Gaussian);
        centered.grid = QuantGrid::Centered;
        CAPTURE(centered.describe());
        const QuantizedTensor q = quantize_cpu(w.data(), out_dim, in_dim, centered);
        const IntegerMatrix m = integer_matrix(q);
        int worst_code = 0;
        for (size_t i = 0; i < m.codes.size(); ++i) {
            const int r = int(i / in_dim);
            CHECK(m.codes[i] % 2 != 0);
            worst_code = std::max(worst_code, std::abs(int(m.codes[i])));
            REQUIRE(float(m.codes[i]) * m.steps[size_t(r)] == quant_value(q.grids[size_t(r)], float(q.codes[i])));
        }
        CHECK(worst_code <= (1 << bits) - 1);
        CHECK(fp8_exact(centered) == (bits <= 4));
    }
    // What the integer path cannot execute is refused by name.
    QuantSpec asymmetric = spec;
    asymmetric.grid = QuantGrid::Asymmetric;
    CHECK_THROWS_WITH_AS(check_integer_spec(asymmetric, true), doctest::Contains("symmetric or centered"), Error);
    QuantSpec centered8 = spec;
    centered8.grid = QuantGrid::Centered;
    CHECK_THROWS_WITH_AS(check_integer_spec(centered8, true), doctest::Contains("at most 7 bits"), Error);
    QuantSpec grouped = spec;
    grouped.granularity = Granularity::Group, grouped.group_size = 32;
    CHECK_THROWS_WITH_AS(check_integer_spec(grouped, false), doctest::Contains("one scale per row"), Error);
    CHECK_THROWS_WITH_AS(check_integer_spec(row_spec(8, ScaleRule::Mse), true), doctest::Contains("mse"), Error);
}

TEST_CASE("GPU integer layer: codes, scales and outputs equal the CPU reference; close to the fake-quant path") {
    REQUIRE_GPU();
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    for (auto [rows, in_dim, out_dim] : {std::tuple{36, 100, 36}, std::tuple{256, 768, 2304}, std::tuple{64, 3072, 768}}) {
        CAPTURE(rows);
        CAPTURE(in_dim);
        const std::vector<float> x = bf16_rows(rows, in_dim, gen), w = bf16_rows(out_dim, in_dim, gen);
        std::vector<float> bias(static_cast<size_t>(out_dim));
        for (float& b : bias) b = float(int(gen() % 200) - 100) / 64.0f;
        const DeviceBuffer<bf16> x_d = uploaded(to_bf16(x));
        for (ScaleRule rule : {ScaleRule::Absmax, ScaleRule::Clip, ScaleRule::Gaussian}) {
            const QuantSpec spec = row_spec(8, rule);
            CAPTURE(spec.describe());
            std::vector<int8_t> codes(x.size());
            std::vector<float> steps(static_cast<size_t>(rows));
            quantize_rows_int8_cpu(codes.data(), steps.data(), x.data(), rows, in_dim, spec);
            DeviceBuffer<int8_t> codes_d = poisoned<int8_t>(codes.size());
            DeviceBuffer<float> steps_d = poisoned<float>(steps.size());
            quantize_rows_int8_gpu(codes_d.data(), steps_d.data(), x_d.data(), rows, in_dim, spec);
            const std::vector<int8_t> codes_gpu = codes_d.download();
            const std::vector<float> steps_gpu = steps_d.download();
            if (rule != ScaleRule::Gaussian) {
                CHECK(codes_gpu == codes);
                CHECK(steps_gpu == steps);
            } else {  // the RMS from another summation order: a step may move by an ulp
                size_t differ = 0;
                for (size_t i = 0; i < codes.size(); ++i) differ += codes_gpu[i] != codes[i];
                CHECK(differ <= codes.size() / 1000 + 1);
                CHECK(relative_error(steps_gpu, steps) < 1e-6);
            }
        }
        // The whole layer (absmax, as the study's W8A8) against the CPU reference, to the bit.
        const QuantSpec spec = row_spec(8, ScaleRule::Absmax);
        const IntegerLayerReference layer = integer_layer_cpu(x, w, bias, rows, in_dim, out_dim, spec);
        const std::vector<int8_t>& wq = layer.wq;
        const std::vector<float>& sw = layer.sw;
        const std::vector<float>& expected = layer.out;
        const DeviceBuffer<int8_t> wq_d = uploaded(wq);
        const DeviceBuffer<float> sw_d = uploaded(sw), bias_d = uploaded(bias);
        DeviceBuffer<bf16> out = poisoned<bf16>(expected.size());
        Int8LinearScratch scratch;
        int8_linear_forward_gpu(out.data(), x_d.data(), wq_d.data(), sw_d.data(), bias_d.data(), rows, in_dim, out_dim,
                                spec, 0, scratch);
        const std::vector<bf16> got = out.download();
        size_t mismatches = 0;
        for (size_t i = 0; i < got.size(); ++i)
            mismatches += __bfloat162float(got[i]) != bf16_round(expected[i]);
        CHECK(mismatches == 0);
        // The fake-quant path of the same layer: Q(x) (GPU kernel) times the dequantized weight in
        // bf16, fp32 accumulation: equal up to the bf16 rounding of every operand.
        DeviceBuffer<bf16> x_fake = poisoned<bf16>(x.size());
        rotate_fake_quant_rows_gpu(x_fake.data(), nullptr, x_d.data(), rows, in_dim, 0, spec, -1.0f);
        std::vector<float> w_fake(w.size());
        for (size_t i = 0; i < w.size(); ++i) w_fake[i] = quant_value(GroupGrid{sw[i / in_dim], 0, 0, -127, 127}, wq[i]);
        const DeviceBuffer<bf16> w_fake_d = uploaded(to_bf16(w_fake)), bias_bf16 = uploaded(to_bf16(bias));
        DeviceBuffer<bf16> fake_out = poisoned<bf16>(expected.size());
        matmul_forward_gpu(fake_out.data(), x_fake.data(), w_fake_d.data(), bias_bf16.data(), rows, in_dim, out_dim);
        CHECK(relative_error(to_double(fake_out.download()), to_double(got)) < 1e-2);
    }
    // The int8 product takes sizes that are multiples of 4 (cuBLASLt's int8 layout): others are refused.
    DeviceBuffer<bf16> x(37 * 8), out(37 * 4);
    DeviceBuffer<int8_t> w(4 * 8);
    DeviceBuffer<float> steps(4);
    Int8LinearScratch scratch;
    CHECK_THROWS_WITH_AS(int8_linear_forward_gpu(out.data(), x.data(), w.data(), steps.data(), nullptr, 37, 8, 4,
                                                 row_spec(8, ScaleRule::Absmax), 0, scratch),
                         doctest::Contains("multiples of 4"), Error);
}

TEST_CASE("fp8 codes: every integer of magnitude <= 16 has its exact e4m3 byte; larger ones are refused") {
    std::vector<int8_t> codes;
    for (int c = -16; c <= 16; ++c) codes.push_back(int8_t(c));
    const std::vector<uint8_t> bytes = fp8_codes(codes);
    for (size_t i = 0; i < codes.size(); ++i) {
        // Decode: sign, exponent (bias 7), 3 mantissa bits; no code here is subnormal.
        const uint8_t b = bytes[i];
        const int exponent = (b >> 3) & 15, mantissa = b & 7;
        const double magnitude = b & 0x7f ? std::ldexp(1.0 + mantissa / 8.0, exponent - 7) : 0.0;
        CHECK((b & 0x80 ? -magnitude : magnitude) == double(codes[i]));
    }
    CHECK(bytes[16] == 0x00);  // 0
    CHECK(bytes[17] == 0x38);  // 1 = 2^0
    CHECK_THROWS_WITH_AS(fp8_codes({17}), doctest::Contains("not exact in e4m3"), Error);
    QuantSpec spec = row_spec(5, ScaleRule::Absmax);
    CHECK(fp8_exact(spec));
    spec.bits = 6;
    CHECK_FALSE(fp8_exact(spec));
}

TEST_CASE("GPU fp8 product of small integer codes equals the exact integer product; W4A4 layer with scales in the "
          "epilogue equals the CPU reference within bf16 rounding") {
    REQUIRE_GPU();
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    for (auto [rows, in_dim, out_dim] : {std::tuple{48, 272, 80}, std::tuple{256, 768, 2304}, std::tuple{64, 3072, 768}}) {
        CAPTURE(rows);
        CAPTURE(in_dim);
        // Codes of a 5-bit grid (+-15), unit scales, fp32 output: the integer sums, exactly.
        const std::vector<int8_t> xq = random_codes(size_t(rows) * in_dim, 15, gen);
        const std::vector<int8_t> wq = random_codes(size_t(out_dim) * in_dim, 15, gen);
        std::vector<int32_t> product(size_t(rows) * out_dim);
        int8_matmul_cpu(product.data(), xq.data(), wq.data(), rows, in_dim, out_dim);
        const DeviceBuffer<uint8_t> x_d = uploaded(fp8_codes(xq)), w_d = uploaded(fp8_codes(wq));
        const DeviceBuffer<float> ones_rows = uploaded(std::vector<float>(size_t(rows), 1.0f)),
                                  ones_out = uploaded(std::vector<float>(size_t(out_dim), 1.0f));
        DeviceBuffer<float> exact = poisoned<float>(product.size());
        fp8_scaled_matmul_gpu(exact.data(), true, x_d.data(), w_d.data(), ones_rows.data(), ones_out.data(), nullptr,
                              rows, in_dim, out_dim);
        const std::vector<float> got = exact.download();
        size_t mismatches = 0;
        for (size_t i = 0; i < got.size(); ++i) mismatches += got[i] != float(product[i]);
        CHECK(mismatches == 0);

        // The W4A4 layer: input quantized on the GPU to e4m3 codes (the same codes and steps as
        // the int8 kernel), weights' steps and the input's in the epilogue, bf16 bias.
        const std::vector<float> x = bf16_rows(rows, in_dim, gen), w = bf16_rows(out_dim, in_dim, gen);
        std::vector<float> bias(static_cast<size_t>(out_dim));
        for (float& b : bias) b = bf16_round(float(int(gen() % 200) - 100) / 64.0f);
        const QuantSpec spec = row_spec(4, ScaleRule::Absmax);
        const IntegerLayerReference reference = integer_layer_cpu(x, w, bias, rows, in_dim, out_dim, spec);
        const std::vector<int8_t>& x4 = reference.xq;
        const std::vector<int8_t>& w4 = reference.wq;
        const std::vector<float>& sx = reference.sx;
        const std::vector<float>& sw = reference.sw;
        const std::vector<float>& expected = reference.out;
        const DeviceBuffer<bf16> x_bf16 = uploaded(to_bf16(x));
        DeviceBuffer<uint8_t> x4_d = poisoned<uint8_t>(x.size());
        DeviceBuffer<float> sx_d = poisoned<float>(sx.size());
        quantize_rows_fp8_gpu(x4_d.data(), sx_d.data(), x_bf16.data(), rows, in_dim, spec);
        CHECK(x4_d.download() == fp8_codes(x4));
        CHECK(sx_d.download() == sx);
        QuantSpec centered = spec;  // QuEST's grid: doubled odd codes, half steps
        centered.grid = QuantGrid::Centered;
        std::vector<int8_t> xc(x.size());
        std::vector<float> sc(static_cast<size_t>(rows));
        quantize_rows_int8_cpu(xc.data(), sc.data(), x.data(), rows, in_dim, centered);
        quantize_rows_fp8_gpu(x4_d.data(), sx_d.data(), x_bf16.data(), rows, in_dim, centered);
        CHECK(x4_d.download() == fp8_codes(xc));
        CHECK(sx_d.download() == sc);
        const DeviceBuffer<uint8_t> w4_d = uploaded(fp8_codes(w4));
        const DeviceBuffer<float> sw_d = uploaded(sw);
        const DeviceBuffer<bf16> bias_d = uploaded(to_bf16(bias));
        DeviceBuffer<bf16> out = poisoned<bf16>(expected.size());
        Int8LinearScratch scratch;
        fp8_linear_forward_gpu(out.data(), x_bf16.data(), w4_d.data(), sw_d.data(), bias_d.data(), rows, in_dim,
                               out_dim, spec, 0, scratch);
        // The epilogue may multiply the two steps in another order than the reference: at most
        // one bf16 step apart.
        const std::vector<bf16> layer = out.download();
        size_t far = 0;
        for (size_t i = 0; i < layer.size(); ++i) {
            const float reference = bf16_round(expected[i]), value = __bfloat162float(layer[i]);
            far += std::fabs(value - reference) > std::ldexp(std::fabs(reference), -7) + 1e-30f;
        }
        CHECK(far == 0);
        CHECK(relative_error(to_double(layer), std::vector<double>(expected.begin(), expected.end())) < 4e-3);
    }
    DeviceBuffer<uint8_t> codes(32 * 24);
    DeviceBuffer<float> steps(32);
    DeviceBuffer<float> out(32 * 16);
    CHECK_THROWS_WITH_AS(fp8_scaled_matmul_gpu(out.data(), true, codes.data(), codes.data(), steps.data(), steps.data(),
                                               nullptr, 32, 24, 16),
                         doctest::Contains("multiples of 16"), Error);
}

TEST_CASE("GPU rotation + quantization to integer codes in one pass: code * step is the fake-quant value bit for "
          "bit (int8 and e4m3 codes; symmetric and centered; blocks 0, 64, 128)") {
    REQUIRE_GPU();
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    // e4m3 byte -> integer, for the codes this path writes (|code| <= 15).
    std::vector<int8_t> integers;
    for (int c = -16; c <= 16; ++c) integers.push_back(int8_t(c));
    const std::vector<uint8_t> bytes = fp8_codes(integers);
    std::vector<int> from_byte(256, 1000);
    for (size_t i = 0; i < bytes.size(); ++i) from_byte[bytes[i]] = integers[i];
    for (auto [rows, cols] : {std::pair{37, 768}, std::pair{20, 3072}, std::pair{9, 256}})
        for (int block : {0, 64, 128})
            for (QuantGrid grid : {QuantGrid::Symmetric, QuantGrid::Centered})
                for (ScaleRule rule : {ScaleRule::Absmax, ScaleRule::Gaussian})
                    for (bool fp8 : {false, true}) {
                        QuantSpec spec = row_spec(4, rule);
                        spec.grid = grid;
                        CAPTURE(rows);
                        CAPTURE(cols);
                        CAPTURE(block);
                        CAPTURE(spec.describe());
                        CAPTURE(fp8);
                        const std::vector<float> x = bf16_rows(rows, cols, gen);
                        const DeviceBuffer<bf16> x_d = uploaded(to_bf16(x));
                        const size_t n = x.size();
                        DeviceBuffer<uint8_t> codes = poisoned<uint8_t>(n);
                        DeviceBuffer<float> steps = poisoned<float>(size_t(rows));
                        REQUIRE(rotate_quantize_codes_gpu(codes.data(), fp8, steps.data(), x_d.data(), rows, cols, block,
                                                          spec));
                        // The same kernel's fake-quant output: (code + offset) * step, as bf16.
                        DeviceBuffer<bf16> fake = poisoned<bf16>(n);
                        rotate_fake_quant_rows_gpu(fake.data(), nullptr, x_d.data(), rows, cols, block, spec, -1.0f);
                        const std::vector<uint8_t> got = codes.download();
                        const std::vector<float> step = steps.download();
                        const std::vector<bf16> want = fake.download();
                        size_t mismatches = 0;
                        for (size_t i = 0; i < n; ++i) {
                            const int integer = fp8 ? from_byte[got[i]] : int(int8_t(got[i]));
                            const float value = float(integer) * step[i / size_t(cols)];
                            mismatches += __bfloat162float(__float2bfloat16(value)) != __bfloat162float(want[i]);
                        }
                        CHECK(mismatches == 0);
                        if (block == 0) {  // and, unrotated, the per-row kernel's codes (sums of squares
                                           // in another order for gaussian: a step may move by an ulp)
                            DeviceBuffer<uint8_t> expected = poisoned<uint8_t>(n);
                            DeviceBuffer<float> expected_steps = poisoned<float>(size_t(rows));
                            if (fp8)
                                quantize_rows_fp8_gpu(expected.data(), expected_steps.data(), x_d.data(), rows, cols, spec);
                            else
                                quantize_rows_int8_gpu(reinterpret_cast<int8_t*>(expected.data()), expected_steps.data(),
                                                       x_d.data(), rows, cols, spec);
                            const std::vector<uint8_t> other = expected.download();
                            size_t differ = 0;
                            for (size_t i = 0; i < n; ++i) differ += got[i] != other[i];
                            CHECK(differ <= (rule == ScaleRule::Absmax ? 0 : n / 1000 + 1));
                            CHECK(relative_error(step, expected_steps.download()) < 1e-6);
                        }
                    }
    // Rows the register path does not take (not a multiple of 128) are left to the two passes.
    DeviceBuffer<bf16> x(size_t(4) * 100);
    DeviceBuffer<uint8_t> codes(size_t(4) * 100);
    DeviceBuffer<float> steps(4);
    CHECK_FALSE(rotate_quantize_codes_gpu(codes.data(), true, steps.data(), x.data(), 4, 100, 0,
                                          row_spec(4, ScaleRule::Absmax)));
}

namespace {

std::vector<float> tiny_params(const ModelConfig& config, uint64_t seed) {
    std::vector<float> params(ParamLayout::build(config).total);
    init_params(ParamLayout::build(config), seed, params.data());
    for (float& p : params) p = bf16_round(p);
    return params;
}

LinearQuantConfig w8a8(int hadamard) {
    QuantOptions options;
    options.format = "w8a8";
    options.hadamard = hadamard;
    return resolve_linear_quant(options, QuantStyle::Rtn);
}

}  // namespace

TEST_CASE("integer matrices: RTN of the rotated weights or a quantized file's stored codes; CPU refuses") {
    const ModelConfig config = preset_config("olmo2-tiny");
    const std::vector<float> params = tiny_params(config, fresh_seed());
    const LinearQuantConfig quant = w8a8(64);
    const std::vector<QuantizedTensor> matrices = integer_matrices(config, params, quant);
    const std::vector<LinearMatrix> linears = linear_matrices(config, ParamLayout::build(config));
    REQUIRE(matrices.size() == linears.size());
    std::vector<QuantizedTensor> stored;
    for (size_t i = 0; i < linears.size(); ++i) {
        const LinearMatrix& m = linears[i];
        std::vector<float> w(params.begin() + long(m.offset), params.begin() + long(m.offset + size_t(m.rows) * m.cols));
        hadamard_rows_cpu(w.data(), m.rows, m.cols, hadamard_block_for(m.cols, 64));
        stored.push_back(quantize_cpu(w.data(), m.rows, m.cols, quant.weights));
        CHECK(matrices[i].codes == stored.back().codes);
    }
    const std::vector<QuantizedTensor> from_file = integer_matrices(config, params, quant, &stored);
    for (size_t i = 0; i < matrices.size(); ++i) {
        CHECK(from_file[i].codes == matrices[i].codes);
        CHECK(integer_matrix(from_file[i]).steps == integer_matrix(matrices[i]).steps);
    }
    std::unique_ptr<EvalModel> cpu = make_eval_model(config, "cpu");
    CHECK_THROWS_WITH_AS(cpu->run_in_integers(matrices), doctest::Contains("GPU only"), Error);
}

TEST_CASE("GPU model in integers: loss equals the fake-quant evaluation (olmo2, gpt2; W8A8 on int8 tensor cores, "
          "W4A4 on fp8 tensor cores, W4A16 packed; +-Hadamard, groups)") {
    REQUIRE_GPU();
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    struct Format {
        const char* name;
        int hadamard;
        const char* granularity;  // empty: per row
        const char* grid;         // empty: symmetric
        double tolerance;         // relative to the loss
    };
    const Format formats[] = {{"w8a8", 0, "", "", 2e-3},
                              {"w8a8", 64, "", "", 2e-3},
                              {"w4a4", 0, "", "", 2e-3},  // fp8 tensor cores, scales in the epilogue
                              {"w4a4", 64, "", "", 2e-3},
                              {"w4a4", 64, "", "centered", 2e-3},  // QuEST's grid: doubled codes
                              {"w6a6", 0, "", "centered", 2e-3},   // the same on int8 tensor cores
                              {"w4a16", 0, "", "", 1e-3},
                              {"w4a16", 64, "", "", 1e-3},
                              {"w4a16", 0, "group", "asymmetric", 1e-3}};
    for (const std::string preset : {"olmo2-tiny", "gpt2-tiny"})
        for (const Format& format : formats) {
            CAPTURE(preset);
            CAPTURE(format.name);
            CAPTURE(format.hadamard);
            CAPTURE(format.grid);
            const ModelConfig config = preset_config(preset);
            const std::vector<float> params = tiny_params(config, seed);
            const bool int8 = std::string(format.name) != "w4a16";
            const int B = 2, T = int8 ? 64 : 63;  // the packed path takes any number of tokens
            const auto inputs = random_tokens(size_t(B) * T, config.vocab_size, gen);
            const auto targets = random_tokens(size_t(B) * T, config.vocab_size, gen);
            QuantOptions options;
            options.format = format.name;
            options.hadamard = format.hadamard;
            options.granularity = format.granularity, options.grid = format.grid, options.group_size = 32;
            const LinearQuantConfig quant = resolve_linear_quant(options, QuantStyle::Rtn);
            GpuModel fake(config);
            fake.upload_params(params);
            fake.set_linear_quant(quant);
            const double fake_loss = fake.loss(inputs.data(), targets.data(), B, T);
            GpuModel integer(config);
            integer.upload_params(params);
            LinearQuantConfig offline = quant;
            offline.weights_offline = true;
            integer.set_linear_quant(offline);
            integer.set_integer_weights(integer_matrices(config, params, quant));
            const double integer_loss = integer.loss(inputs.data(), targets.data(), B, T);
            CAPTURE(fake_loss);
            CAPTURE(integer_loss);
            CHECK(std::isfinite(integer_loss));
            CHECK(std::fabs(integer_loss - fake_loss) < format.tolerance * fake_loss);
            CHECK_THROWS_WITH_AS(integer.forward_backward(inputs.data(), targets.data(), B, T, 1.0f),
                                 doctest::Contains("forward only"), Error);
            if (int8)
                CHECK_THROWS_WITH_AS(integer.loss(inputs.data(), targets.data(), 1, 63),
                                     doctest::Contains("multiple of 4"), Error);
        }
}
