// Muon's CPU reference (optim/muon.hpp). Newton-Schulz keeps singular vectors and maps each
// singular value through the quintic 5 times, so on a matrix built from a known SVD the output
// is known exactly; the update rule is checked by hand on a 1 x 1 matrix (where NS5 of a
// nonzero value u is sign(u) f5(|u| / (|u| + 1e-7))) and for the shape scale on a tall matrix.
#include "helpers.hpp"
#include "optim/muon.hpp"

using namespace qopt;
using namespace qopt::test;

namespace {

// Columns of a random [n, r] matrix made orthonormal (Gram-Schmidt, twice for accuracy).
std::vector<double> orthonormal_columns(int n, int r, std::mt19937_64& gen) {
    std::vector<double> q = random_vector<double>(size_t(n) * r, gen);
    for (int pass = 0; pass < 2; ++pass)
        for (int j = 0; j < r; ++j) {
            for (int p = 0; p < j; ++p) {
                double dot = 0;
                for (int i = 0; i < n; ++i) dot += q[size_t(i) * r + j] * q[size_t(i) * r + p];
                for (int i = 0; i < n; ++i) q[size_t(i) * r + j] -= dot * q[size_t(i) * r + p];
            }
            double norm = 0;
            for (int i = 0; i < n; ++i) norm += q[size_t(i) * r + j] * q[size_t(i) * r + j];
            for (int i = 0; i < n; ++i) q[size_t(i) * r + j] /= std::sqrt(norm);
        }
    return q;
}

// U diag(s) V^T for U [rows, r], V [cols, r].
std::vector<double> compose(const std::vector<double>& u, const std::vector<double>& s, const std::vector<double>& v,
                            int rows, int cols) {
    const int r = int(s.size());
    std::vector<double> m(size_t(rows) * cols, 0.0);
    for (int i = 0; i < rows; ++i)
        for (int j = 0; j < cols; ++j)
            for (int p = 0; p < r; ++p) m[size_t(i) * cols + j] += u[size_t(i) * r + p] * s[size_t(p)] * v[size_t(j) * r + p];
    return m;
}

double f5(double s, const MuonConfig& c) {
    for (int i = 0; i < c.ns_steps; ++i) s = newton_schulz_scalar_step(s, c);
    return s;
}

}  // namespace

TEST_CASE("Newton-Schulz keeps singular vectors and maps singular values through the quintic") {
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    const MuonConfig config;
    for (auto [rows, cols] : {std::pair{5, 5}, std::pair{8, 3}, std::pair{3, 8}, std::pair{1, 6}, std::pair{6, 1}}) {
        CAPTURE(rows);
        CAPTURE(cols);
        const int r = std::min(rows, cols);
        const std::vector<double> u = orthonormal_columns(rows, r, gen), v = orthonormal_columns(cols, r, gen);
        std::vector<double> s(static_cast<size_t>(r));
        std::uniform_real_distribution<double> uniform(0.2, 3.0);
        double norm_sq = 0;
        for (double& x : s) x = uniform(gen), norm_sq += x * x;
        const std::vector<double> g = compose(u, s, v, rows, cols);
        std::vector<double> mapped(s.size());
        for (size_t p = 0; p < s.size(); ++p) {
            mapped[p] = f5(s[p] / (std::sqrt(norm_sq) + 1e-7), config);
            // The quintic's fixed band: normalised values in [0.03, 1] end in [0.68, 1.14].
            CHECK(mapped[p] > 0.68);
            CHECK(mapped[p] < 1.14);
        }
        std::vector<double> out(g.size());
        newton_schulz_cpu(out.data(), g.data(), rows, cols, config);
        CHECK(relative_error(out, compose(u, mapped, v, rows, cols)) < 1e-10);
    }
}

TEST_CASE("Muon update by hand: momentum, Nesterov, weight decay, shape scale") {
    MuonConfig config;
    double weight_decay = 0.1;
    const double lr = 0.02;
    // 1 x 1: NS5(u) = sign(u) f5(|u| / (|u| + 1e-7)) (the normalisation's epsilon); scale 1.
    const auto ns_1x1 = [&](double u) { return (u > 0 ? 1 : -1) * f5(std::abs(u) / (std::abs(u) + 1e-7), config); };
    double param = 0.5, momentum = 0.0;
    const double g1 = 2.0, g2 = -1.0;
    muon_update_cpu(&param, &g1, &momentum, 1, 1, lr, weight_decay, config);
    CHECK(momentum == doctest::Approx(0.05 * g1));  // (1 - 0.95) g1
    double expected = 0.5 * (1 - lr * 0.1) - lr * ns_1x1(0.05 * g1 + 0.95 * 0.1);  // U = 0.195
    CHECK(param == doctest::Approx(expected).epsilon(1e-12));
    muon_update_cpu(&param, &g2, &momentum, 1, 1, lr, weight_decay, config);
    const double m2 = 0.95 * 0.1 + 0.05 * g2;           // 0.045
    CHECK(momentum == doctest::Approx(m2));
    const double u2 = 0.05 * g2 + 0.95 * m2;             // -0.05 + 0.04275 < 0: the step flips sign
    CHECK(u2 < 0);
    expected = expected * (1 - lr * 0.1) - lr * ns_1x1(u2);
    CHECK(param == doctest::Approx(expected).epsilon(1e-12));

    // Without Nesterov the update is the momentum itself; here u = 0.05 * 2 > 0 again.
    config.nesterov = false;
    weight_decay = 0.0;
    param = 0.0, momentum = 0.0;
    muon_update_cpu(&param, &g1, &momentum, 1, 1, lr, weight_decay, config);
    CHECK(param == doctest::Approx(-lr * ns_1x1(0.05 * g1)).epsilon(1e-12));

    // Tall 6 x 2: the step is lr * sqrt(3) * NS5(U), U = 0.0975 G on the first step.
    config = MuonConfig{};
    std::mt19937_64 gen(fresh_seed());
    const std::vector<double> g = random_vector<double>(12, gen);
    std::vector<double> w(12, 0.0), m(12, 0.0), u(12), o(12);
    muon_update_cpu(w.data(), g.data(), m.data(), 6, 2, lr, 0.0, config);
    for (size_t i = 0; i < 12; ++i) u[i] = 0.0975 * g[i];
    newton_schulz_cpu(o.data(), u.data(), 6, 2, config);
    for (size_t i = 0; i < 12; ++i) CHECK(w[i] == doctest::Approx(-lr * std::sqrt(3.0) * o[i]).epsilon(1e-12));
}
