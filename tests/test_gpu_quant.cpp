// Quantization kernels against their CPU references (quant/hadamard.hpp, quant/quantizer.hpp)
// on fresh random inputs. The rotation does the same additions in the same order, so fp32
// results must be equal to the bit. Fake-quant shares the grid arithmetic with the CPU but
// sums squares in another order, so a code may differ where an element sits on a rounding
// boundary: at most 1 in 1000 elements, and then by one step. Skips without a GPU.
#include <cstring>
#include <tuple>

#include "gpu_helpers.hpp"
#include "core/error.hpp"
#include "kernels/activations.hpp"
#include "kernels/matmul.hpp"
#include "kernels/elementwise.hpp"
#include "quant/hadamard.hpp"
#include "quant/int8_linear.hpp"
#include "quant/quant_gpu.hpp"
#include "quant/quantizer.hpp"

using namespace qopt;
using namespace qopt::test;

namespace {

std::vector<float> bf16_to_float(const std::vector<bf16>& v) {
    std::vector<float> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) out[i] = __bfloat162float(v[i]);
    return out;
}

// Byte masks (the CPU reference's) <-> the kernels' bit masks.
std::vector<uint32_t> pack_keep(const std::vector<uint8_t>& keep) {
    std::vector<uint32_t> words(keep_mask_words(keep.size()), 0);
    for (size_t e = 0; e < keep.size(); ++e)
        if (keep[e]) words[(e >> 7) * 4 + (e & 3)] |= 1u << ((e & 127) >> 2);
    return words;
}
std::vector<uint8_t> unpack_keep(const std::vector<uint32_t>& words, size_t n) {
    std::vector<uint8_t> keep(n);
    for (size_t e = 0; e < n; ++e) keep[e] = keep_mask_bit(words.data(), e);
    return keep;
}

float round_bf16(float x) {
    const uint32_t bits = uint32_t(to_bf16_bits_cpu(x)) << 16;
    float out;
    std::memcpy(&out, &bits, sizeof out);
    return out;
}

// How far a GPU fake-quant result is from the CPU reference: elements whose value or mask bit
// differ, and the largest value difference.
struct FakeQuantMismatch {
    long values = 0, keep = 0;
    double worst = 0;
};
FakeQuantMismatch compare_fake_quant(const DeviceBuffer<bf16>& out, const DeviceBuffer<uint32_t>& keep,
                                     const std::vector<float>& expected, const std::vector<uint8_t>& expected_keep) {
    const std::vector<float> got = bf16_to_float(out.download());
    const std::vector<uint8_t> got_keep = unpack_keep(keep.download(), expected.size());
    FakeQuantMismatch m;
    for (size_t i = 0; i < expected.size(); ++i) {
        const float want = round_bf16(expected[i]);
        if (got[i] != want) ++m.values, m.worst = std::max(m.worst, double(std::fabs(got[i] - want)));
        m.keep += got_keep[i] != expected_keep[i];
    }
    return m;
}

}  // namespace

TEST_CASE("GPU Hadamard rotation equals the CPU reference (fp32 to the bit, bf16 within rounding)") {
    REQUIRE_GPU();
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    for (auto [rows, cols, block] : {std::tuple{3, 16, 16}, std::tuple{37, 768, 128}, std::tuple{5, 3072, 1024},
                                     std::tuple{2, 16384, 16384}, std::tuple{11, 96, 32}}) {
        CAPTURE(cols);
        CAPTURE(block);
        const std::vector<float> x = random_vector<float>(size_t(rows) * cols, gen);
        std::vector<float> expected = x;
        hadamard_rows_cpu(expected.data(), rows, cols, block);
        DeviceBuffer<float> data = uploaded(x);
        hadamard_rows_gpu(data.data(), rows, cols, block);
        CHECK(data.download() == expected);

        const Bf16Input xb = random_bf16(size_t(rows) * cols, gen);
        std::vector<float> expected_b(xb.exact.begin(), xb.exact.end());
        hadamard_rows_cpu(expected_b.data(), rows, cols, block);
        DeviceBuffer<bf16> data_b = uploaded(xb.device_values);
        hadamard_rows_gpu(data_b.data(), rows, cols, block);
        CHECK(relative_error(bf16_to_float(data_b.download()), expected_b) < 4e-3);
    }
}

TEST_CASE("GPU rotate + fake-quant equals the CPU reference for every grid, rule and granularity") {
    REQUIRE_GPU();
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    const int rows = 67, cols = 768;
    for (QuantGrid grid : {QuantGrid::Symmetric, QuantGrid::Asymmetric, QuantGrid::Centered})
        for (ScaleRule rule : {ScaleRule::Absmax, ScaleRule::Clip, ScaleRule::Mse, ScaleRule::Gaussian})
            for (Granularity granularity : {Granularity::Tensor, Granularity::Row, Granularity::Group})
                for (int block : {0, 128}) {
                    if (rule == ScaleRule::Gaussian && grid == QuantGrid::Asymmetric) continue;
                    if (rule == ScaleRule::Mse && granularity == Granularity::Tensor) continue;  // CPU-only
                    QuantSpec spec;
                    spec.bits = rule == ScaleRule::Mse ? 3 : 4;
                    spec.grid = grid, spec.rule = rule, spec.granularity = granularity, spec.group_size = 64;
                    spec.clip_ratio = 0.8f;
                    const float trust = rule == ScaleRule::Gaussian ? 0.3f : 0.0f;
                    CAPTURE(spec.describe());
                    CAPTURE(block);
                    const bool fp32_input = block == 0;  // both input types, alternating
                    const Bf16Input xb = random_bf16(size_t(rows) * cols, gen, 2.0);
                    std::vector<float> x(xb.exact.begin(), xb.exact.end());
                    if (fp32_input) x = random_vector<float>(size_t(rows) * cols, gen, 2.0);
                    // x[0] an outlier so clipping rules differ from absmax
                    x[5] = 40.0f;
                    std::vector<float> rotated = x;
                    hadamard_rows_cpu(rotated.data(), rows, cols, block);
                    std::vector<float> expected(x.size());
                    std::vector<uint8_t> expected_keep(x.size());
                    fake_quant_cpu(expected.data(), expected_keep.data(), rotated.data(), rows, cols, spec, trust);

                    DeviceBuffer<bf16> out = poisoned<bf16>(x.size());
                    DeviceBuffer<uint32_t> keep = poisoned<uint32_t>(keep_mask_words(x.size()));
                    DeviceBuffer<double> scratch((size_t(rows) + 1) * 4);
                    if (fp32_input) {
                        DeviceBuffer<float> in = uploaded(x);
                        rotate_fake_quant_rows_gpu(out.data(), keep.data(), in.data(), rows, cols, block, spec, trust,
                                                   scratch.data());
                    } else {
                        std::vector<bf16> xin(x.size());
                        for (size_t i = 0; i < x.size(); ++i) xin[i] = __float2bfloat16(x[i]);
                        DeviceBuffer<bf16> in = uploaded(xin);
                        rotate_fake_quant_rows_gpu(out.data(), keep.data(), in.data(), rows, cols, block, spec, trust,
                                                   scratch.data());
                    }
                    const FakeQuantMismatch m = compare_fake_quant(out, keep, expected, expected_keep);
                    // One step of this data is at most 2 * 40 / 3 (3-bit absmax of the outlier row).
                    CHECK(m.values <= long(x.size()) / 1000);
                    CHECK(m.worst <= 27.0);
                    CHECK(m.keep <= long(x.size()) / 1000);
                    CHECK(std::isfinite(__bfloat162float(out.download()[0])));
                }
}

TEST_CASE("GPU rotate + fake-quant register path: every split of a row over warps, blocks below and at 128") {
    REQUIRE_GPU();
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    QuantSpec gaussian;  // QuEST's default: centered grid, Gaussian scale, per row, trust bound
    gaussian.bits = 4, gaussian.grid = QuantGrid::Centered, gaussian.rule = ScaleRule::Gaussian;
    QuantSpec asymmetric;  // range statistics, half-step mask
    asymmetric.bits = 3, asymmetric.grid = QuantGrid::Asymmetric, asymmetric.rule = ScaleRule::Absmax;
    QuantSpec clipped;  // absmax statistics, STE (every bit set)
    clipped.bits = 8, clipped.grid = QuantGrid::Symmetric, clipped.rule = ScaleRule::Clip, clipped.clip_ratio = 0.9f;
    // Every split (quant_kernels.cu's fast_shape): 1, 2, 3, 4, 6 and 8 chunks per warp (128 ..
    // 1024 columns), 5 warps of 1 chunk (640), 4 warps per row with 2 rows per CTA (3072), 8
    // warps (8192), wide CTAs of 24 and 32 warps (12288, 16384), and past them the shared-memory
    // path (32768).
    for (int cols : {128, 256, 384, 512, 640, 768, 1024, 3072, 8192, 12288, 16384, 32768})
        for (int block : {128, 64})
            for (auto [spec, trust] : {std::pair{gaussian, 0.3f}, std::pair{asymmetric, 0.0f}, std::pair{clipped, -1.0f}}) {
                CAPTURE(cols);
                CAPTURE(block);
                CAPTURE(spec.describe());
                const int rows = cols >= 8192 ? 5 : 21;
                const Bf16Input xb = random_bf16(size_t(rows) * cols, gen, 2.0);
                std::vector<float> rotated(xb.exact.begin(), xb.exact.end());
                hadamard_rows_cpu(rotated.data(), rows, cols, block);
                std::vector<float> expected(rotated.size());
                std::vector<uint8_t> expected_keep(rotated.size());
                fake_quant_cpu(expected.data(), expected_keep.data(), rotated.data(), rows, cols, spec, trust);
                DeviceBuffer<bf16> in = uploaded(xb.device_values), out = poisoned<bf16>(rotated.size());
                DeviceBuffer<uint32_t> keep = poisoned<uint32_t>(keep_mask_words(rotated.size()));
                rotate_fake_quant_rows_gpu(out.data(), keep.data(), in.data(), rows, cols, block, spec, trust);
                const FakeQuantMismatch m = compare_fake_quant(out, keep, expected, expected_keep);
                CHECK(m.values <= long(rotated.size()) / 1000);
                CHECK(m.keep <= long(rotated.size()) / 1000);
                CHECK(m.worst <= 2.0);  // one step; the widest, 3-bit asymmetric, is about 2 * 5 / 7 here
            }
}

TEST_CASE("GPU fake-quant of act(pre-activation) equals the activation pass then rotate + fake-quant") {
    REQUIRE_GPU();
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    QuantSpec spec;  // QuEST's default
    spec.bits = 4, spec.grid = QuantGrid::Centered, spec.rule = ScaleRule::Gaussian;
    const int rows = 23;
    for (int cols : {3072, 96})  // register path and the two-pass fallback (block 32, rows not of whole chunks)
        for (MlpActivation activation : {MlpActivation::Gelu, MlpActivation::Relu2}) {
            CAPTURE(cols);
            const int block = cols == 96 ? 32 : 128;
            const size_t n = size_t(rows) * cols;
            const Bf16Input pre = random_bf16(n, gen, 2.0);
            DeviceBuffer<bf16> pre_d = uploaded(pre.device_values);
            DeviceBuffer<bf16> fused = poisoned<bf16>(n), act = poisoned<bf16>(n), two_pass = poisoned<bf16>(n);
            DeviceBuffer<uint32_t> fused_keep = poisoned<uint32_t>(keep_mask_words(n));
            DeviceBuffer<uint32_t> two_pass_keep = poisoned<uint32_t>(keep_mask_words(n));
            activation_fake_quant_rows_gpu(fused.data(), fused_keep.data(), pre_d.data(), activation, rows, cols, block,
                                           spec, 0.3f);
            activation_forward_gpu(act.data(), pre_d.data(), activation, n);
            rotate_fake_quant_rows_gpu(two_pass.data(), two_pass_keep.data(), act.data(), rows, cols, block, spec, 0.3f);
            // The same kernels' arithmetic on the same bf16 activation: equal to the bit.
            const std::vector<bf16> fused_values = fused.download(), two_pass_values = two_pass.download();
            CHECK(std::memcmp(fused_values.data(), two_pass_values.data(), n * sizeof(bf16)) == 0);
            CHECK(fused_keep.download() == two_pass_keep.download());
            // And the CPU reference: the activation in float, rounded to bf16, rotated, quantized.
            std::vector<float> activated(n);
            std::vector<float> pre_values(pre.exact.begin(), pre.exact.end());
            if (activation == MlpActivation::Gelu) gelu_forward_cpu(activated.data(), pre_values.data(), n);
            else relu2_forward_cpu(activated.data(), pre_values.data(), n);
            for (float& a : activated) a = round_bf16(a);
            hadamard_rows_cpu(activated.data(), rows, cols, block);
            std::vector<float> expected(n);
            std::vector<uint8_t> expected_keep(n);
            fake_quant_cpu(expected.data(), expected_keep.data(), activated.data(), rows, cols, spec, 0.3f);
            const FakeQuantMismatch m = compare_fake_quant(fused, fused_keep, expected, expected_keep);
            CHECK(m.values <= long(n) / 1000);
            CHECK(m.keep <= long(n) / 1000);
        }
}

TEST_CASE("GPU masked Hadamard (the estimator's backward) equals the CPU reference") {
    REQUIRE_GPU();
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    const int rows = 29, cols = 3072;
    for (int block : {128, 256, 32}) {  // register path (<= 128) and shared-memory path
    CAPTURE(block);
    const std::vector<float> grad = random_vector<float>(size_t(rows) * cols, gen);
    const std::vector<float> base = random_vector<float>(size_t(rows) * cols, gen);
    std::vector<uint8_t> keep(grad.size());
    for (auto& k : keep) k = uint8_t(gen() % 4 != 0);
    std::vector<float> masked(grad.size());
    for (size_t i = 0; i < grad.size(); ++i) masked[i] = keep[i] ? grad[i] : 0.0f;
    hadamard_rows_cpu(masked.data(), rows, cols, block);
    DeviceBuffer<float> grad_d = uploaded(grad);
    DeviceBuffer<uint32_t> keep_d = uploaded(pack_keep(keep));
    DeviceBuffer<float> out = poisoned<float>(grad.size());
    masked_hadamard_rows_gpu(out.data(), grad_d.data(), keep_d.data(), rows, cols, block, false);
    CHECK(out.download() == masked);
    // Accumulating into bf16.
    std::vector<bf16> base_b(base.size()), grad_b(grad.size());
    std::vector<float> expected(base.size());
    for (size_t i = 0; i < base.size(); ++i) base_b[i] = __float2bfloat16(base[i]), grad_b[i] = __float2bfloat16(grad[i]);
    std::vector<float> masked_b(grad.size());
    for (size_t i = 0; i < grad.size(); ++i) masked_b[i] = keep[i] ? __bfloat162float(grad_b[i]) : 0.0f;
    hadamard_rows_cpu(masked_b.data(), rows, cols, block);
    for (size_t i = 0; i < base.size(); ++i) expected[i] = __bfloat162float(base_b[i]) + masked_b[i];
    DeviceBuffer<bf16> acc = uploaded(base_b);
    DeviceBuffer<bf16> grad_bd = uploaded(grad_b);
    masked_hadamard_rows_gpu(acc.data(), grad_bd.data(), keep_d.data(), rows, cols, block, true);
    CHECK(relative_error(bf16_to_float(acc.download()), expected) < 4e-3);
    }
}

TEST_CASE("GPU masked Hadamard with the activation's derivative equals rotation then the CPU activation backward") {
    REQUIRE_GPU();
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    const int rows = 19;
    for (int cols : {3072, 96})  // register path and the two-pass fallback
        for (MlpActivation activation : {MlpActivation::Gelu, MlpActivation::Relu2}) {
            CAPTURE(cols);
            const int block = cols == 96 ? 32 : 128;
            const Bf16Input grad = random_bf16(size_t(rows) * cols, gen), pre = random_bf16(size_t(rows) * cols, gen);
            std::vector<uint8_t> keep(grad.exact.size());
            for (auto& k : keep) k = uint8_t(gen() % 5 != 0);
            std::vector<double> rotated(grad.exact.size()), expected(grad.exact.size(), 0.0);
            for (size_t i = 0; i < rotated.size(); ++i) rotated[i] = keep[i] ? grad.exact[i] : 0.0;
            hadamard_rows_cpu(rotated.data(), rows, cols, block);
            if (activation == MlpActivation::Gelu) gelu_backward_cpu(expected.data(), rotated.data(), pre.exact.data(), expected.size());
            else relu2_backward_cpu(expected.data(), rotated.data(), pre.exact.data(), expected.size());
            DeviceBuffer<bf16> grad_d = uploaded(grad.device_values), pre_d = uploaded(pre.device_values);
            DeviceBuffer<uint32_t> keep_d = uploaded(pack_keep(keep));
            DeviceBuffer<bf16> out = poisoned<bf16>(expected.size());
            masked_hadamard_activation_rows_gpu(out.data(), grad_d.data(), keep_d.data(), pre_d.data(), activation, rows,
                                                cols, block);
            CHECK(relative_error(to_double(out.download()), expected) < 1e-2);
        }
}

TEST_CASE("GPU int8 GEMM (cuBLASLt) equals the exact integer product bit for bit") {
    REQUIRE_GPU();
    std::mt19937_64 gen(fresh_seed());
    for (auto [rows, in_dim, out_dim] : {std::tuple{64, 768, 2304}, std::tuple{148, 768, 768}, std::tuple{32, 3072, 768},
                                         std::tuple{4, 16, 8}}) {
        CAPTURE(rows);
        CAPTURE(in_dim);
        CAPTURE(out_dim);
        const std::vector<int8_t> in = random_codes(size_t(rows) * in_dim, 127, gen);
        const std::vector<int8_t> weight = random_codes(size_t(out_dim) * in_dim, 127, gen);
        std::vector<int32_t> expected(size_t(rows) * out_dim);
        int8_matmul_cpu(expected.data(), in.data(), weight.data(), rows, in_dim, out_dim);
        DeviceBuffer<int8_t> in_d = uploaded(in), weight_d = uploaded(weight);
        DeviceBuffer<int32_t> out = poisoned<int32_t>(expected.size());
        int8_matmul_gpu(out.data(), in_d.data(), weight_d.data(), rows, in_dim, out_dim);
        CHECK(out.download() == expected);
    }
    std::vector<int8_t> small(12);
    DeviceBuffer<int8_t> a = uploaded(small);
    DeviceBuffer<int32_t> c(9);
    CHECK_THROWS_WITH_AS(int8_matmul_gpu(c.data(), a.data(), a.data(), 3, 4, 3), doctest::Contains("multiples of 4"),
                         Error);
}

TEST_CASE("GPU int8 GEMM with the scales in its epilogue (wgmma) equals the exact product and scale step bit for bit") {
    REQUIRE_GPU();
    if (!int8_scaled_matmul_available(16)) {
        MESSAGE("skipped: the int8 GEMM with epilogue scales needs an sm_90a build on an sm_90 GPU");
        return;
    }
    std::mt19937_64 gen(fresh_seed());
    std::uniform_real_distribution<float> step_dist(1e-4f, 2e-2f), bias_dist(-2.0f, 2.0f);
    // Full tiles, ragged rows and columns (out_dim odd: unpaired stores), a short contraction
    // ending inside a 128-deep stage, a long one, one row; one stage per tile with several tiles
    // per block (the persistent blocks' scale buffers rotate fastest there).
    for (auto [rows, in_dim, out_dim] : {std::tuple{256, 768, 2304}, std::tuple{300, 784, 200}, std::tuple{129, 144, 257},
                                         std::tuple{37, 4096, 96}, std::tuple{1, 16, 3}, std::tuple{4100, 112, 2310}}) {
        CAPTURE(rows);
        CAPTURE(in_dim);
        CAPTURE(out_dim);
        const std::vector<int8_t> in = random_codes(size_t(rows) * in_dim, 127, gen);
        const std::vector<int8_t> weight = random_codes(size_t(out_dim) * in_dim, 127, gen);
        std::vector<float> in_steps(static_cast<size_t>(rows)), w_steps(static_cast<size_t>(out_dim)),
            bias(static_cast<size_t>(out_dim));
        for (float& v : in_steps) v = step_dist(gen);
        for (float& v : w_steps) v = step_dist(gen);
        for (float& v : bias) v = bias_dist(gen);
        std::vector<int32_t> product(size_t(rows) * out_dim);
        int8_matmul_cpu(product.data(), in.data(), weight.data(), rows, in_dim, out_dim);
        const DeviceBuffer<int8_t> in_d = uploaded(in), weight_d = uploaded(weight);
        const DeviceBuffer<float> in_steps_d = uploaded(in_steps), w_steps_d = uploaded(w_steps), bias_d = uploaded(bias);
        for (bool with_bias : {true, false}) {
            CAPTURE(with_bias);
            std::vector<float> expected(product.size());
            dequantize_product_cpu(expected.data(), product.data(), in_steps.data(), w_steps.data(),
                                   with_bias ? bias.data() : nullptr, rows, out_dim);
            DeviceBuffer<bf16> out = poisoned<bf16>(expected.size());
            REQUIRE(int8_scaled_matmul_gpu(out.data(), in_d.data(), weight_d.data(), in_steps_d.data(), w_steps_d.data(),
                                           with_bias ? bias_d.data() : nullptr, rows, in_dim, out_dim));
            const std::vector<bf16> got = out.download();
            size_t mismatches = 0;
            for (size_t i = 0; i < got.size(); ++i) mismatches += __bfloat162float(got[i]) != bf16_round(expected[i]);
            CHECK(mismatches == 0);
        }
    }
    // Contractions that are not a multiple of 16 are left to the two-pass path.
    DeviceBuffer<int8_t> codes(64 * 24);
    DeviceBuffer<float> steps(64);
    DeviceBuffer<bf16> out(64 * 64);
    CHECK_FALSE(int8_scaled_matmul_gpu(out.data(), codes.data(), codes.data(), steps.data(), steps.data(), nullptr, 64,
                                       24, 64));
}
