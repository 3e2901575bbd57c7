// Quantizers and the Hadamard rotation, CPU references, checked by their algebraic properties:
// the rotation is orthonormal, its own inverse and equals the explicit Sylvester matrix; grid
// values are fixed points; round-to-nearest error is at most half a step inside the clip
// range; each grid shape has its stated levels; the rules pick the ranges they promise (the
// Gaussian multiples minimise the error on Gaussian data, MSE search beats absmax).
#include <algorithm>
#include <set>

#include "core/error.hpp"
#include "helpers.hpp"
#include "quant/hadamard.hpp"
#include "quant/quantizer.hpp"

using namespace qopt;
using namespace qopt::test;

namespace {

// H_b by the recursion H_2k = [[H, H], [H, -H]] / sqrt(2), as a dense matrix.
std::vector<double> sylvester(int b) {
    std::vector<double> h = {1.0};
    for (int n = 1; n < b; n *= 2) {
        std::vector<double> next(size_t(4) * n * n);
        for (int i = 0; i < n; ++i)
            for (int j = 0; j < n; ++j) {
                const double v = h[size_t(i) * n + j] / std::sqrt(2.0);
                next[size_t(i) * 2 * n + j] = v;
                next[size_t(i) * 2 * n + j + n] = v;
                next[size_t(i + n) * 2 * n + j] = v;
                next[size_t(i + n) * 2 * n + j + n] = -v;
            }
        h = next;
    }
    return h;
}

double squared_norm(const std::vector<double>& v) {
    double s = 0;
    for (double x : v) s += x * x;
    return s;
}

}  // namespace

TEST_CASE("Hadamard rotation: explicit matrix, orthonormal, its own inverse, block-diagonal") {
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    for (auto [cols, block] : {std::pair{16, 16}, std::pair{64, 16}, std::pair{96, 32}, std::pair{256, 128},
                               std::pair{768, 128}, std::pair{1024, 1024}}) {
        CAPTURE(cols);
        CAPTURE(block);
        const int rows = 7;
        const std::vector<double> x = random_vector<double>(size_t(rows) * cols, gen);
        std::vector<double> y = x;
        hadamard_rows_cpu(y.data(), rows, cols, block);
        // Against x H_b computed densely, block by block.
        const std::vector<double> h = sylvester(block);
        double max_diff = 0;
        for (int r = 0; r < rows; ++r)
            for (int start = 0; start < cols; start += block)
                for (int j = 0; j < block; ++j) {
                    double dense = 0;
                    for (int i = 0; i < block; ++i)
                        dense += x[size_t(r) * cols + start + i] * h[size_t(i) * block + j];
                    max_diff = std::max(max_diff, std::fabs(dense - y[size_t(r) * cols + start + j]));
                }
        CHECK(max_diff < 1e-12);
        CHECK(std::fabs(squared_norm(y) - squared_norm(x)) < 1e-10 * squared_norm(x));
        hadamard_rows_cpu(y.data(), rows, cols, block);
        CHECK(relative_error(y, x) < 1e-14);
    }
}

TEST_CASE("Hadamard block for a row length: largest power of two <= requested that divides it") {
    CHECK(hadamard_block_for(768, 128) == 128);
    CHECK(hadamard_block_for(64, 128) == 64);
    CHECK(hadamard_block_for(1280, 128) == 128);
    CHECK(hadamard_block_for(96, 128) == 32);
    CHECK(hadamard_block_for(3072, 4096) == 1024);
    CHECK(hadamard_block_for(768, 0) == 0);
    CHECK(hadamard_block_for(7, 128) == 0);
}

TEST_CASE("Quantizer grids: level counts, zero, fixed points, half-step error, code range") {
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    const int rows = 13, cols = 96;
    const std::vector<float> x = random_vector<float>(size_t(rows) * cols, gen, 3.0);
    for (QuantGrid grid : {QuantGrid::Symmetric, QuantGrid::Asymmetric, QuantGrid::Centered})
        for (int bits : {2, 3, 4, 8})
            for (Granularity granularity : {Granularity::Tensor, Granularity::Row, Granularity::Group}) {
                QuantSpec spec;
                spec.bits = bits, spec.grid = grid, spec.granularity = granularity, spec.group_size = 32;
                CAPTURE(spec.describe());
                const QuantizedTensor q = quantize_cpu(x.data(), rows, cols, spec);
                const size_t groups = granularity == Granularity::Tensor ? 1 : granularity == Granularity::Row ? rows : rows * 3;
                REQUIRE(q.grids.size() == groups);
                const std::vector<float> deq = q.dequantize();
                const long group = long(x.size() / groups);
                std::set<float> levels;
                bool codes_in_range = true, error_ok = true;
                for (size_t i = 0; i < x.size(); ++i) {
                    const GroupGrid& g = q.grids[i / size_t(group)];
                    codes_in_range &= q.codes[i] >= g.code_min && q.codes[i] <= g.code_max;
                    // absmax: every element lies inside the clip range
                    error_ok &= std::fabs(deq[i] - x[i]) <= 0.5f * g.step * 1.0001f;
                    if (i / size_t(group) == 0) levels.insert(deq[i]);
                }
                CHECK(codes_in_range);
                CHECK(error_ok);
                CHECK(levels.size() <= size_t(1) << bits);
                const GroupGrid& g0 = q.grids[0];
                const bool has_zero = quant_value(g0, quant_code(g0, 0.0f)) == 0.0f;
                CHECK(has_zero == (grid != QuantGrid::Centered));
                if (grid == QuantGrid::Symmetric) CHECK(g0.code_max == (1 << (bits - 1)) - 1);
                if (grid == QuantGrid::Centered) CHECK(g0.code_max - g0.code_min + 1 == (1 << bits));
                // Dequantized values are fixed points of their own grids.
                bool fixed = true;
                for (size_t i = 0; i < x.size(); ++i)
                    fixed &= quant_code(q.grids[i / size_t(group)], deq[i]) == q.codes[i];
                CHECK(fixed);
                // fake_quant_cpu is quantize + dequantize.
                std::vector<float> fake(x.size());
                fake_quant_cpu(fake.data(), nullptr, x.data(), rows, cols, spec, -1.0f);
                CHECK(fake == deq);
            }
}

TEST_CASE("Quantizer scale rules: absmax hits the extreme, clip, gaussian range, mse never worse") {
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    const int cols = 512;
    const std::vector<float> x = random_vector<float>(size_t(cols), gen, 1.5);
    float absmax = 0;
    double sum_squares = 0;
    for (float v : x) absmax = std::max(absmax, std::fabs(v)), sum_squares += double(v) * v;
    const float rms = float(std::sqrt(sum_squares / cols));
    QuantSpec spec;
    spec.bits = 4;
    const GroupGrid a = choose_grid(spec, x.data(), cols);
    CHECK(a.step == doctest::Approx(absmax / 7).epsilon(1e-6));
    spec.rule = ScaleRule::Clip, spec.clip_ratio = 0.5f;
    CHECK(choose_grid(spec, x.data(), cols).step == doctest::Approx(0.5 * absmax / 7).epsilon(1e-6));
    spec.rule = ScaleRule::Gaussian, spec.grid = QuantGrid::Centered;
    CHECK(choose_grid(spec, x.data(), cols).step == doctest::Approx(2 * (2.51393 * rms) / 15).epsilon(1e-5));

    auto error = [&](const GroupGrid& g) {
        double e = 0;
        for (float v : x) e += std::pow(double(quant_value(g, quant_code(g, v))) - v, 2);
        return e;
    };
    for (QuantGrid grid : {QuantGrid::Symmetric, QuantGrid::Asymmetric, QuantGrid::Centered}) {
        spec.grid = grid;
        spec.rule = ScaleRule::Absmax;
        const double absmax_error = error(choose_grid(spec, x.data(), cols));
        spec.rule = ScaleRule::Mse;
        const GroupGrid best = choose_grid(spec, x.data(), cols);
        CHECK(error(best) <= absmax_error);
        // No candidate ratio of the search does better (brute force).
        for (int k = spec.mse_grid; 5 * k >= spec.mse_grid; --k) {
            spec.rule = ScaleRule::Clip, spec.clip_ratio = float(k) / spec.mse_grid;
            CHECK(error(choose_grid(spec, x.data(), cols)) >= error(best));
        }
    }
}

TEST_CASE("Gaussian clip multiples minimise the centered grid's error on Gaussian data") {
    std::mt19937_64 gen(fresh_seed());
    const std::vector<float> x = random_vector<float>(200000, gen);
    double sum_squares = 0;
    for (float v : x) sum_squares += double(v) * v;
    const double rms = std::sqrt(sum_squares / double(x.size()));
    for (int bits : {2, 3, 4, 6}) {
        CAPTURE(bits);
        auto error_at = [&](double multiple) {
            QuantSpec spec;
            spec.bits = bits, spec.grid = QuantGrid::Centered;
            const GroupGrid g = make_grid(spec, float(-multiple * rms), float(multiple * rms));
            double e = 0;
            for (float v : x) e += std::pow(double(quant_value(g, quant_code(g, v))) - v, 2);
            return e;
        };
        const double alpha = gaussian_clip_multiple(bits);
        CHECK(error_at(alpha) < error_at(0.9 * alpha));
        CHECK(error_at(alpha) < error_at(1.1 * alpha));
    }
}

TEST_CASE("Trust estimator mask: STE keeps all; trust keeps exactly the small errors") {
    std::mt19937_64 gen(fresh_seed());
    const int rows = 5, cols = 256;
    const std::vector<float> x = random_vector<float>(size_t(rows) * cols, gen);
    QuantSpec spec;
    spec.bits = 3, spec.grid = QuantGrid::Centered, spec.rule = ScaleRule::Gaussian;
    std::vector<float> q(x.size());
    std::vector<uint8_t> keep(x.size());
    fake_quant_cpu(q.data(), keep.data(), x.data(), rows, cols, spec, -1.0f);
    CHECK(std::count(keep.begin(), keep.end(), 1) == long(x.size()));
    const float trust = 0.1f;
    fake_quant_cpu(q.data(), keep.data(), x.data(), rows, cols, spec, trust);
    long kept = 0, dropped = 0;
    bool consistent = true;
    for (int r = 0; r < rows; ++r) {
        double s = 0;
        for (int c = 0; c < cols; ++c) s += double(x[size_t(r) * cols + c]) * x[size_t(r) * cols + c];
        const double rms = std::sqrt(s / cols);
        for (int c = 0; c < cols; ++c) {
            const size_t i = size_t(r) * cols + c;
            const double err = std::fabs(double(q[i]) - x[i]);
            if (std::fabs(err - trust * rms) < 1e-6) continue;  // on the boundary either answer is right
            consistent &= (keep[i] == 1) == (err <= trust * rms);
            (keep[i] ? kept : dropped)++;
        }
    }
    CHECK(consistent);
    CHECK(kept > 0);
    CHECK(dropped > 0);
    // Default trust (0): half a step, i.e. everything inside the clip range passes.
    fake_quant_cpu(q.data(), keep.data(), x.data(), rows, cols, spec, 0.0f);
    for (int r = 0; r < rows; ++r) {
        const GroupGrid g = choose_grid(spec, x.data() + size_t(r) * cols, cols);
        const float range = g.step * float((1 << spec.bits) - 1) / 2;
        bool inside_kept = true;
        for (int c = 0; c < cols; ++c) {
            const size_t i = size_t(r) * cols + c;
            if (std::fabs(x[i]) < range * 0.999f) inside_kept &= keep[i] == 1;
            if (std::fabs(x[i]) > range + g.step) inside_kept &= keep[i] == 0;
        }
        CHECK(inside_kept);
    }
}

TEST_CASE("Quantizer specs: bad bits, clip ratios and group sizes are refused with a message") {
    QuantSpec spec;
    spec.bits = 9;
    CHECK_THROWS_WITH_AS(spec.validate(), doctest::Contains("bits must be 2..8"), Error);
    spec.bits = 4, spec.granularity = Granularity::Group, spec.group_size = 48;
    CHECK_THROWS_WITH_AS(spec.validate(64), doctest::Contains("does not divide"), Error);
    spec.granularity = Granularity::Row, spec.rule = ScaleRule::Clip, spec.clip_ratio = 1.5f;
    CHECK_THROWS_WITH_AS(spec.validate(), doctest::Contains("clip ratio"), Error);
    spec.rule = ScaleRule::Gaussian, spec.grid = QuantGrid::Asymmetric;
    CHECK_THROWS_WITH_AS(spec.validate(), doctest::Contains("gaussian"), Error);
    CHECK_THROWS_WITH_AS(parse_scale_rule("minmax"), doctest::Contains("absmax, clip, mse or gaussian"), Error);
}
