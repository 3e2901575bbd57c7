// The matrix optimizers' CPU references (optim/scion, shampoo, soap, psgd, dense) checked by
// their algebra and by hand-derived cases, the routing, state round trips through every
// optimizer, and short training runs with each of the six.
#include <algorithm>
#include <sstream>

#include "core/error.hpp"
#include "helpers.hpp"
#include "train_helpers.hpp"
#include "optim/dense.hpp"
#include "optim/optimizer.hpp"
#include "train/checkpoint.hpp"
#include "train/trainer.hpp"

using namespace qopt;
using namespace qopt::test;

namespace {

Dense random_dense(int rows, int cols, std::mt19937_64& gen, double scale = 1.0) {
    Dense d(rows, cols);
    std::normal_distribution<double> normal(0.0, scale);
    for (double& x : d.values) x = normal(gen);
    return d;
}

double max_abs_diff(const Dense& a, const Dense& b) {
    double worst = 0;
    for (size_t i = 0; i < a.values.size(); ++i) worst = std::max(worst, std::abs(a.values[i] - b.values[i]));
    return worst;
}

// Largest singular value by power iteration on a^T a.
double spectral_norm(const Dense& a) {
    std::vector<double> x(size_t(a.cols), 1.0);
    double norm = 0;
    for (int it = 0; it < 300; ++it) {
        std::vector<double> y(size_t(a.rows), 0.0), z(size_t(a.cols), 0.0);
        for (int r = 0; r < a.rows; ++r)
            for (int c = 0; c < a.cols; ++c) y[size_t(r)] += a(r, c) * x[size_t(c)];
        for (int r = 0; r < a.rows; ++r)
            for (int c = 0; c < a.cols; ++c) z[size_t(c)] += a(r, c) * y[size_t(r)];
        double zn = 0;
        for (double v : z) zn += v * v;
        zn = std::sqrt(zn);
        for (size_t i = 0; i < z.size(); ++i) x[i] = z[i] / zn;
        norm = std::sqrt(zn);
    }
    return norm;
}

// a = vectors diag(values) vectors^T rebuilt from a decomposition.
Dense recompose(const SymmetricEigen& e) {
    Dense scaled = e.vectors;
    for (int r = 0; r < scaled.rows; ++r)
        for (int c = 0; c < scaled.cols; ++c) scaled(r, c) *= e.values[size_t(c)];
    return matmul(scaled, e.vectors, false, true);
}

}  // namespace

TEST_CASE("dense helpers: symmetric eigendecomposition, Householder QR, triangular solve") {
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    const Dense x = random_dense(9, 7, gen);
    const Dense a = matmul(x, x, false, true);  // symmetric PSD 9 x 9, rank 7
    const SymmetricEigen e = symmetric_eigen(a);
    for (size_t i = 1; i < e.values.size(); ++i) CHECK(e.values[i - 1] >= e.values[i]);
    CHECK(max_abs_diff(matmul(e.vectors, e.vectors, true, false), Dense::identity(9)) < 1e-10);
    CHECK(max_abs_diff(recompose(e), a) < 1e-9);
    CHECK(std::abs(e.values[8]) < 1e-9);  // rank 7

    const Dense tall = random_dense(8, 5, gen);
    const Dense q = householder_q(tall);
    CHECK(max_abs_diff(matmul(q, q, true, false), Dense::identity(5)) < 1e-12);
    const Dense r = matmul(q, tall, true, false);  // Q^T A = R is upper triangular and Q R = A
    for (int i = 0; i < 5; ++i)
        for (int j = 0; j < i; ++j) CHECK(std::abs(r(i, j)) < 1e-12);
    CHECK(max_abs_diff(matmul(q, r), tall) < 1e-12);

    Dense u = random_dense(6, 6, gen);
    for (int i = 0; i < 6; ++i) {
        for (int j = 0; j < i; ++j) u(i, j) = 0;
        u(i, i) = 2 + std::abs(u(i, i));
    }
    const Dense rhs = random_dense(4, 6, gen);
    CHECK(max_abs_diff(matmul(solve_upper_right(rhs, u), u), rhs) < 1e-12);

    // Orders: stable (the two 2s keep their order), NaN last both ways.
    const std::vector<double> values = {2.0, NAN, 3.0, 2.0, -1.0};
    CHECK(ascending_order(values) == std::vector<int>{4, 0, 3, 2, 1});
    CHECK(descending_order(values) == std::vector<int>{2, 0, 3, 4, 1});
    // Per matrix (two of three values, as the GPU methods download them): each order indexes its
    // own matrix.
    CHECK(orders_per_matrix({1.0f, 3.0f, 2.0f, NAN, 0.0f, 5.0f}, 3, false) == std::vector<int>{0, 2, 1, 1, 2, 0});
    CHECK(orders_per_matrix({1.0f, 3.0f, 2.0f, NAN, 0.0f, 5.0f}, 3, true) == std::vector<int>{1, 2, 0, 2, 1, 0});
    CHECK_THROWS_AS(orders_per_matrix({1.0f, 2.0f}, 3, true), Error);
}

// The products and the triangular solve against the textbook loops they replace: op(a)(i, p)
// op(b)(p, j) summed over p, and y[:, j] = (x[:, j] - sum_{i<j} y[:, i] u[i, j]) / u[j, j]. The
// shapes cover whole 8 x 8 register tiles, ragged edges, a single row or column, and long inner
// dimensions; the larger ones run on several threads.
TEST_CASE("dense products and triangular solve match the plain loops: every transpose, ragged tiles, long inner dimensions") {
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    const int shapes[][3] = {{1, 1, 1}, {8, 8, 8}, {3, 5, 7}, {17, 300, 9}, {64, 513, 40}, {1, 600, 33}, {45, 2, 1}};
    for (const auto& shape : shapes) {
        const int m = shape[0], depth = shape[1], n = shape[2];
        for (int transpose_a = 0; transpose_a < 2; ++transpose_a)
            for (int transpose_b = 0; transpose_b < 2; ++transpose_b) {
                INFO(m << " x " << depth << " x " << n << ", transposes " << transpose_a << transpose_b);
                const Dense a = transpose_a ? random_dense(depth, m, gen) : random_dense(m, depth, gen);
                const Dense b = transpose_b ? random_dense(n, depth, gen) : random_dense(depth, n, gen);
                Dense expected(m, n);
                double scale = 0;
                for (int i = 0; i < m; ++i)
                    for (int j = 0; j < n; ++j) {
                        double sum = 0, magnitude = 0;
                        for (int p = 0; p < depth; ++p) {
                            const double term = (transpose_a ? a(p, i) : a(i, p)) * (transpose_b ? b(j, p) : b(p, j));
                            sum += term;
                            magnitude += std::abs(term);
                        }
                        expected(i, j) = sum;
                        scale = std::max(scale, magnitude);
                    }
                const Dense product = matmul(a, b, transpose_a, transpose_b);
                REQUIRE(product.rows == m);
                REQUIRE(product.cols == n);
                // Same sums in the same order up to FMA contraction: within a few ulps of sum |terms|.
                CHECK(max_abs_diff(product, expected) <= 1e-14 * scale);
            }
    }
    CHECK_THROWS_AS(matmul(Dense(3, 4), Dense(5, 2)), Error);

    for (const int n : {1, 7, 64, 129}) {
        for (const int rows : {1, 3, 40}) {
            INFO("n " << n << ", rows " << rows);
            Dense u = random_dense(n, n, gen);
            for (int i = 0; i < n; ++i) {
                for (int j = 0; j < i; ++j) u(i, j) = 0;
                u(i, i) = 2 + std::abs(u(i, i));
                for (int j = i + 1; j < n; ++j) u(i, j) /= std::sqrt(double(n));  // well conditioned
            }
            const Dense x = random_dense(rows, n, gen);
            Dense expected(rows, n);
            for (int r = 0; r < rows; ++r)
                for (int j = 0; j < n; ++j) {
                    double sum = x(r, j);
                    for (int i = 0; i < j; ++i) sum -= expected(r, i) * u(i, j);
                    expected(r, j) = sum / u(j, j);
                }
            const Dense y = solve_upper_right(x, u);
            CHECK(max_abs_diff(y, expected) <= 1e-12 * (1 + frobenius_norm(expected)));
            CHECK(max_abs_diff(matmul(y, u), x) <= 1e-12 * (1 + frobenius_norm(x)));
        }
    }
    CHECK_THROWS_AS(solve_upper_right(Dense(2, 3), Dense(2, 2)), Error);
}

TEST_CASE("symmetric eigendecomposition: hand-derived spectra, clusters, rank deficiency, non-finite input") {
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);

    SUBCASE("2 x 2 by hand: [[2, 1], [1, 2]] has 3 on (1, 1)/sqrt 2 and 1 on (1, -1)/sqrt 2") {
        Dense a(2, 2, 1.0);
        a(0, 0) = a(1, 1) = 2;
        const SymmetricEigen e = symmetric_eigen(a);
        CHECK(e.values[0] == doctest::Approx(3.0).epsilon(1e-15));
        CHECK(e.values[1] == doctest::Approx(1.0).epsilon(1e-15));
        const double h = std::sqrt(0.5);
        CHECK(std::abs(std::abs(e.vectors(0, 0)) - h) < 1e-15);
        CHECK(e.vectors(0, 0) * e.vectors(1, 0) > 0);  // (1, 1) up to sign
        CHECK(e.vectors(0, 1) * e.vectors(1, 1) < 0);  // (1, -1) up to sign
    }
    SUBCASE("the second-difference matrix: 2 - 2 cos(k pi / (n + 1)), vectors sin(j k pi / (n + 1))") {
        const int n = 40;
        Dense a(n, n);
        for (int i = 0; i < n; ++i) {
            a(i, i) = 2;
            if (i + 1 < n) a(i, i + 1) = a(i + 1, i) = -1;
        }
        const SymmetricEigen e = symmetric_eigen(a);
        for (int j = 0; j < n; ++j) {
            const int k = n - j;  // descending values: the largest has k = n
            const double angle = k * M_PI / (n + 1);
            CHECK(std::abs(e.values[size_t(j)] - (2 - 2 * std::cos(angle))) < 1e-14);
            // The vector, normalised: sqrt(2 / (n + 1)) sin(i k pi / (n + 1)), i = 1..n, up to sign.
            double dot = 0;
            for (int i = 0; i < n; ++i) dot += e.vectors(i, j) * std::sqrt(2.0 / (n + 1)) * std::sin((i + 1) * angle);
            CHECK(std::abs(std::abs(dot) - 1) < 1e-13);
        }
    }
    SUBCASE("a prescribed spectrum with clusters and zeros, in a random basis") {
        const int n = 30;
        const Dense q = householder_q(random_dense(n, n, gen));
        std::vector<double> spectrum(size_t(n), 0.0);  // 5 (x4), 1 (x3), 1e-9, 0 (the rest)
        for (int i = 0; i < 4; ++i) spectrum[size_t(i)] = 5;
        for (int i = 4; i < 7; ++i) spectrum[size_t(i)] = 1;
        spectrum[7] = 1e-9;
        const SymmetricEigen prescribed{spectrum, q};
        const SymmetricEigen e = symmetric_eigen(recompose(prescribed));
        for (int j = 0; j < n; ++j) CHECK(std::abs(e.values[size_t(j)] - spectrum[size_t(j)]) < 1e-13);
        // Within a cluster any orthonormal basis will do: compare the projectors onto the
        // eigenspace of 5 (the first four columns).
        Dense p_expected(n, n), p_found(n, n);
        for (int r = 0; r < n; ++r)
            for (int c = 0; c < n; ++c)
                for (int k = 0; k < 4; ++k) {
                    p_expected(r, c) += q(r, k) * q(c, k);
                    p_found(r, c) += e.vectors(r, k) * e.vectors(c, k);
                }
        CHECK(max_abs_diff(p_found, p_expected) < 1e-12);
        CHECK(max_abs_diff(matmul(e.vectors, e.vectors, true, false), Dense::identity(n)) < 1e-13);
    }
    SUBCASE("a wide Gram matrix of rank n/2: backward stable, orthonormal, descending") {
        const int n = 160;
        const Dense x = random_dense(n, n / 2, gen);
        const Dense a = matmul(x, x, false, true);
        const SymmetricEigen e = symmetric_eigen(a);
        const double norm = frobenius_norm(a);
        CHECK(max_abs_diff(recompose(e), a) < 1e-14 * n * norm);
        CHECK(max_abs_diff(matmul(e.vectors, e.vectors, true, false), Dense::identity(n)) < 1e-13);
        for (int j = 1; j < n; ++j) CHECK(e.values[size_t(j - 1)] >= e.values[size_t(j)]);
        for (int j = n / 2; j < n; ++j) CHECK(std::abs(e.values[size_t(j)]) < 1e-14 * n * norm);
    }
    SUBCASE("sizes 0 and 1, and a diagonal matrix (its entries sorted, unit vectors)") {
        CHECK(symmetric_eigen(Dense(0, 0)).values.empty());
        const SymmetricEigen one = symmetric_eigen(Dense(1, 1, -2.5));
        CHECK(one.values == std::vector<double>{-2.5});
        CHECK(one.vectors(0, 0) == 1.0);
        Dense diagonal(4, 4);
        const double entries[4] = {0.5, -3, 7, 2};
        for (int i = 0; i < 4; ++i) diagonal(i, i) = entries[i];
        const SymmetricEigen e = symmetric_eigen(diagonal);
        CHECK(e.values == std::vector<double>{7, 2, 0.5, -3});
        const int rows[4] = {2, 3, 0, 1};  // where each sorted value sits
        for (int j = 0; j < 4; ++j) CHECK(std::abs(e.vectors(rows[j], j)) == 1.0);
    }
    SUBCASE("non-finite input gives NaN values and vectors, which commit_preconditioner refuses") {
        Dense a = Dense::identity(5);
        a(1, 3) = a(3, 1) = INFINITY;
        const SymmetricEigen e = symmetric_eigen(a);
        for (double v : e.values) CHECK(std::isnan(v));
        CHECK_FALSE(all_finite(e.vectors));
        std::vector<float> kept(25, 0.0f);
        CHECK_FALSE(commit_preconditioner(kept, e.vectors));
        a(1, 3) = a(3, 1) = NAN;
        CHECK(std::isnan(symmetric_eigen(a).values[0]));
    }
}

TEST_CASE("Coupled inverse Newton roots (Distributed Shampoo's CoupledNewtonConfig) equal the eigendecomposition's") {
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    // Well-conditioned SPD matrices (x x^T / n + I / 2: eigenvalues in [0.5, ~5]), roots 1 to 4
    // and 8: the root equals (a + eps I)^(-1/root) from the eigendecomposition, and X^root (a + eps I) = I.
    const int n = 20;
    for (int root : {1, 2, 3, 4, 8}) {
        CAPTURE(root);
        const Dense x = random_dense(n, n, gen);
        Dense a = matmul(x, x, false, true);
        for (double& v : a.values) v /= n;
        for (int i = 0; i < n; ++i) a(i, i) += 0.5;
        const double eps = 1e-3;
        const NewtonRoot newton = coupled_newton_inverse_root(a, root, eps, 100, 1e-12);
        CHECK(newton.converged);
        CHECK(newton.iterations < 40);
        const Dense exact = shampoo_inverse_root(a, eps, root);
        CHECK(max_abs_diff(newton.root, exact) < 1e-9 * frobenius_norm(exact));
        Dense power = Dense::identity(n);
        for (int k = 0; k < root; ++k) power = matmul(power, newton.root);
        for (int i = 0; i < n; ++i) a(i, i) += eps;
        CHECK(max_abs_diff(matmul(power, a), Dense::identity(n)) < 1e-9);
    }
    // The iteration's budget: a tolerance it cannot reach in 3 steps is reported as not converged.
    const Dense x = random_dense(n, n, gen);
    const NewtonRoot short_run = coupled_newton_inverse_root(matmul(x, x, false, true), 4, 1e-6, 3, 1e-12);
    CHECK(short_run.iterations == 3);
    CHECK_FALSE(short_run.converged);
}

TEST_CASE("Scion LMOs have the stated norms; the constrained step by hand") {
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    const int rows = 12, cols = 7;
    const Dense m = random_dense(rows, cols, gen);
    Dense d(rows, cols);
    // Sign: every entry is +-1/d_in, the extreme point of the max-norm ball scaled by 1/d_in.
    scion_lmo_cpu(d.values.data(), m.values.data(), rows, cols, ScionNorm::Sign, 5);
    for (size_t i = 0; i < d.values.size(); ++i) CHECK(d.values[i] * m.values[i] * cols == doctest::Approx(std::abs(m.values[i])));
    // ColNorm (embedding rows): each stored row has RMS 1; RowNorm: ||row|| sqrt(d_in) = 1.
    scion_lmo_cpu(d.values.data(), m.values.data(), rows, cols, ScionNorm::ColNorm, 5);
    for (int r = 0; r < rows; ++r) {
        double sq = 0;
        for (int c = 0; c < cols; ++c) sq += d(r, c) * d(r, c);
        CHECK(std::sqrt(sq / cols) == doctest::Approx(1.0).epsilon(1e-6));
    }
    scion_lmo_cpu(d.values.data(), m.values.data(), rows, cols, ScionNorm::RowNorm, 5);
    for (int r = 0; r < rows; ++r) {
        double sq = 0;
        for (int c = 0; c < cols; ++c) sq += d(r, c) * d(r, c);
        CHECK(std::sqrt(sq) * std::sqrt(double(cols)) == doctest::Approx(1.0).epsilon(1e-6));
    }
    // BiasRMS over a vector: RMS 1.
    scion_lmo_cpu(d.values.data(), m.values.data(), 1, rows * cols, ScionNorm::BiasRMS, 5);
    CHECK(frobenius_norm(d) / std::sqrt(double(rows * cols)) == doctest::Approx(1.0).epsilon(1e-6));
    // Spectral: sqrt(d_out / d_in) times NS5(m), whose singular values lie in NS5's band
    // [0.68, 1.14] (exact orthogonalisation would give 1), and d points along m: <m, d> > 0.
    scion_lmo_cpu(d.values.data(), m.values.data(), rows, cols, ScionNorm::Spectral, 5);
    Dense unscaled = d;
    for (double& x : unscaled.values) x /= std::sqrt(double(rows) / cols);
    const double top = spectral_norm(unscaled);
    CHECK(top > 0.68);
    CHECK(top < 1.15);
    double dot = 0;
    for (size_t i = 0; i < d.values.size(); ++i) dot += d.values[i] * m.values[i];
    CHECK(dot > 0);

    // Constrained step on a 1 x 2 "matrix" with Sign: W = (1 - lr) W - lr scale sign(M) / 2.
    ScionConfig c;
    c.momentum = 0.5;
    float param[2] = {1.0f, -1.0f}, grad[2] = {2.0f, -4.0f}, mom[2] = {0.0f, 1.0f};
    scion_update_cpu(param, grad, mom, 1, 2, ScionNorm::Sign, 10.0, 0.1, 0.0, c);
    CHECK(mom[0] == doctest::Approx(1.0));   // 0.5 * 0 + 0.5 * 2
    CHECK(mom[1] == doctest::Approx(-1.5));  // 0.5 * 1 + 0.5 * -4
    CHECK(param[0] == doctest::Approx(0.9 * 1.0 - 0.1 * 10.0 * 0.5));
    CHECK(param[1] == doctest::Approx(0.9 * -1.0 + 0.1 * 10.0 * 0.5));
}

TEST_CASE("Scion's Sign, RowNorm and ColNorm LMOs act on rows apart (a ZeRO-1 rank may own some rows), BiasRMS and Spectral do not") {
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    const int rows = 9, cols = 7, split = 4;
    const Dense m = random_dense(rows, cols, gen);
    for (ScionNorm norm : {ScionNorm::Sign, ScionNorm::RowNorm, ScionNorm::ColNorm, ScionNorm::BiasRMS, ScionNorm::Spectral}) {
        INFO(std::string(scion_norm_name(norm)));
        std::vector<double> whole(size_t(rows) * cols), top(size_t(split) * cols), bottom(size_t(rows - split) * cols);
        scion_lmo_cpu(whole.data(), m.values.data(), rows, cols, norm, 5);
        scion_lmo_cpu(top.data(), m.values.data(), split, cols, norm, 5);
        scion_lmo_cpu(bottom.data(), m.values.data() + size_t(split) * cols, rows - split, cols, norm, 5);
        double worst = 0;
        for (size_t i = 0; i < whole.size(); ++i) {
            const double part = i < top.size() ? top[i] : bottom[i - top.size()];
            worst = std::max(worst, std::abs(part - whole[i]));
        }
        if (scion_rows_separable(norm))
            CHECK(worst == 0.0);
        else
            CHECK(worst > 1e-3);
    }
}

TEST_CASE("Shampoo: inverse roots, a 1 x 1 step by hand, and a badly conditioned quadratic") {
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    // (A + eps I)^(-1/4) to the fourth power times (A + eps I) is I.
    const Dense x = random_dense(6, 6, gen);
    Dense a = matmul(x, x, false, true);
    const Dense root = shampoo_inverse_root(a, 1e-3, 4);
    for (int i = 0; i < 6; ++i) a(i, i) += 1e-3;
    const Dense square = matmul(root, root);
    CHECK(max_abs_diff(matmul(matmul(square, square), a), Dense::identity(6)) < 1e-8);

    // 1 x 1, no momentum filter, roots every step from step 1: L = R = g^2, S = g / |g| (eps
    // tiny), grafted to Adam's size |g| / (|g| + eps_g) ~ 1: the step is lr sign(g).
    ShampooConfig c;
    c.beta1 = 0.0;
    c.precondition_frequency = 1;
    float p = 0.5f, g = -3.0f;
    std::vector<ShampooBlockState> blocks(1);
    blocks[0].init({0, 0, 1, 1}, c);
    shampoo_update_cpu(&p, &g, blocks, 1, 1, 0.1, 0.0, 1, c);
    CHECK(p == doctest::Approx(0.5 + 0.1).epsilon(1e-6));
    CHECK(blocks[0].left[0] == doctest::Approx(9.0));

    // The reference's schedule: start step 15, frequency 10 -> roots at 15, 20, 30 (not 10),
    // Shampoo's direction from 15; a start step before the first refresh is refused.
    ShampooConfig sched;
    sched.start_preconditioning_step = 15;
    CHECK_FALSE(sched.refreshes_roots(10));
    CHECK(sched.refreshes_roots(15));
    CHECK(sched.refreshes_roots(20));
    CHECK_FALSE(sched.refreshes_roots(25));
    CHECK_FALSE(sched.preconditions(14));
    CHECK(sched.preconditions(15));
    sched.start_preconditioning_step = 5;
    CHECK_THROWS_WITH_AS(sched.validate(), doctest::Contains("--shampoo-start-step"), Error);

    // Decay goes through momentum, as the reference orders it (weight decay into the direction,
    // then ClassicMomentum). Zero gradients leave only the decay: D_t = wd W_(t-1),
    // K_t = mu K_(t-1) + D_t, W_t = W_(t-1) - lr K_t; so W_1 = W_0 (1 - lr wd) and
    // W_2 = W_1 - lr (mu wd W_0 + wd W_1).
    ShampooConfig mc;
    mc.momentum = 0.5;
    const double lr = 0.1, wd = 0.2;
    float w = 2.0f, zero = 0.0f;
    std::vector<ShampooBlockState> momentum_block(1);
    momentum_block[0].init({0, 0, 1, 1}, mc);
    shampoo_update_cpu(&w, &zero, momentum_block, 1, 1, lr, wd, 1, mc);
    const double w1 = 2.0 * (1 - lr * wd);
    CHECK(w == doctest::Approx(w1).epsilon(1e-6));
    shampoo_update_cpu(&w, &zero, momentum_block, 1, 1, lr, wd, 2, mc);
    CHECK(w == doctest::Approx(w1 - lr * (mc.momentum * wd * 2.0 + wd * w1)).epsilon(1e-6));

    // ClassicMomentumConfig's dampening d: K = mu K + (1 - d) D, and the Nesterov direction
    // (1 - d) D + mu K. Zero gradients, one step: D = wd W_0, K = (1 - d) D, so the Nesterov
    // direction is (1 - d)(1 + mu) D and the plain one (1 - d) D.
    for (bool nesterov : {false, true}) {
        CAPTURE(nesterov);
        ShampooConfig dc;
        dc.momentum = 0.5;
        dc.dampening = 0.25;
        dc.nesterov = nesterov;
        float wd_w = 2.0f;
        std::vector<ShampooBlockState> damped(1);
        damped[0].init({0, 0, 1, 1}, dc);
        shampoo_update_cpu(&wd_w, &zero, damped, 1, 1, lr, wd, 1, dc);
        const double factor = nesterov ? 0.75 * 1.5 : 0.75;
        CHECK(wd_w == doctest::Approx(2.0 - lr * factor * wd * 2.0).epsilon(1e-6));
        CHECK(damped[0].momentum[0] == doctest::Approx(0.75 * wd * 2.0).epsilon(1e-6));
    }

    // beta3 and bias correction (the reference's _compute_filtered_grad_list), by hand on 1 x 1
    // without grafting and before the first root (the direction is F_hat): beta1 0.9, beta3 0.5,
    // g = 1 then 2. Step 1: D = 0.5 * 0 + 0.5 * 1, divisor 1 - 0.5 * 0.9^0 = 0.5, F_hat = 1;
    // step 2: F_old = 0.1, D = 0.5 * 0.1 + 0.5 * 2 = 1.05, divisor 1 - 0.5 * 0.9 = 0.55.
    // Without bias correction the divisors are 1. beta3 = beta1 is the default -1, bit for bit.
    for (bool corrected : {true, false}) {
        CAPTURE(corrected);
        ShampooConfig fc;
        fc.grafting = ShampooGrafting::none;
        fc.precondition_frequency = 1000;
        fc.beta3 = 0.5;
        fc.bias_correction = corrected;
        float fw = 0.0f;
        std::vector<ShampooBlockState> filtered(1);
        filtered[0].init({0, 0, 1, 1}, fc);
        const float g1 = 1.0f, g2 = 2.0f;
        shampoo_update_cpu(&fw, &g1, filtered, 1, 1, 1.0, 0.0, 1, fc);
        CHECK(fw == doctest::Approx(corrected ? -1.0 : -0.5).epsilon(1e-6));
        shampoo_update_cpu(&fw, &g2, filtered, 1, 1, 1.0, 0.0, 2, fc);
        const double step2 = corrected ? 1.05 / 0.55 : 1.05;
        CHECK(fw == doctest::Approx((corrected ? -1.0 : -0.5) - step2).epsilon(1e-6));
        CHECK(filtered[0].filtered[0] == doctest::Approx(0.29).epsilon(1e-6));
    }
    {
        ShampooConfig same, unset;
        same.beta3 = same.beta1;
        same.precondition_frequency = unset.precondition_frequency = 2;
        std::mt19937_64 gen(5);
        std::vector<float> wa = random_vector<float>(12, gen), wb = wa;
        std::vector<ShampooBlockState> sa(1), sb(1);
        sa[0].init({0, 0, 3, 4}, same);
        sb[0].init({0, 0, 3, 4}, unset);
        for (int t = 1; t <= 4; ++t) {
            const std::vector<float> grad = random_vector<float>(12, gen);
            shampoo_update_cpu(wa.data(), grad.data(), sa, 3, 4, 1e-2, 0.1, t, same);
            shampoo_update_cpu(wb.data(), grad.data(), sb, 3, 4, 1e-2, 0.1, t, unset);
        }
        CHECK(wa == wb);
    }

    // Grafting methods by hand (the reference's AdagradPreconditionerList and SGD), 1 x 1, beta1 0
    // (F_hat = G), before the first root (the direction is A), g = 1 then 2, graft beta2 0.5:
    //   sgd: A = G;  adagrad: V = 1, 5 -> A = 1, 2 / sqrt(5);
    //   rmsprop: V = 0.5, 2.25 -> A = 1 / sqrt(0.5), 2 / 1.5;  with drop_weighting: V = 1, 4.5;
    //   adam: V as rmsprop, divided by 1 - 0.5^t: 1, 3 -> A = 1, 2 / sqrt(3).
    struct GraftCase {
        ShampooGrafting type;
        bool drop;
        double a1, a2;
    };
    for (const GraftCase& gc : {GraftCase{ShampooGrafting::sgd, false, 1.0, 2.0},
                                GraftCase{ShampooGrafting::adagrad, false, 1.0, 2.0 / std::sqrt(5.0)},
                                GraftCase{ShampooGrafting::rmsprop, false, 1.0 / std::sqrt(0.5), 2.0 / 1.5},
                                GraftCase{ShampooGrafting::rmsprop, true, 1.0, 2.0 / std::sqrt(4.5)},
                                GraftCase{ShampooGrafting::adam, false, 1.0, 2.0 / std::sqrt(3.0)},
                                GraftCase{ShampooGrafting::adam, true, 1.0, 2.0 / std::sqrt(4.5)}}) {
        CAPTURE(shampoo_grafting_name(gc.type));
        CAPTURE(gc.drop);
        ShampooConfig gc_config;
        gc_config.beta1 = 0.0;
        gc_config.precondition_frequency = 1000;
        gc_config.grafting = gc.type;
        gc_config.graft_beta2 = 0.5;
        gc_config.graft_eps = 1e-12;
        gc_config.graft_drop_weighting = gc.drop;
        float gw = 0.0f;
        std::vector<ShampooBlockState> grafted(1);
        grafted[0].init({0, 0, 1, 1}, gc_config);
        const float g1 = 1.0f, g2 = 2.0f;
        shampoo_update_cpu(&gw, &g1, grafted, 1, 1, 1.0, 0.0, 1, gc_config);
        CHECK(gw == doctest::Approx(-gc.a1).epsilon(1e-6));
        shampoo_update_cpu(&gw, &g2, grafted, 1, 1, 1.0, 0.0, 2, gc_config);
        CHECK(gw == doctest::Approx(-gc.a1 - gc.a2).epsilon(1e-6));
    }
    // After the first root, grafting sets the size of Shampoo's direction: on 1 x 1 with roots
    // every step S = g / |g|, which SGD grafting scales back to g; without grafting it stays S.
    for (ShampooGrafting type : {ShampooGrafting::sgd, ShampooGrafting::none}) {
        CAPTURE(shampoo_grafting_name(type));
        ShampooConfig rc;
        rc.beta1 = 0.0;
        rc.precondition_frequency = 1;
        rc.grafting = type;
        float rw = 0.0f;
        const float g3 = -3.0f;
        std::vector<ShampooBlockState> rooted(1);
        rooted[0].init({0, 0, 1, 1}, rc);
        shampoo_update_cpu(&rw, &g3, rooted, 1, 1, 0.1, 0.0, 1, rc);
        CHECK(rw == doctest::Approx(type == ShampooGrafting::sgd ? 0.3 : 0.1).epsilon(1e-6));
    }

    // Weight decay types: l2 adds alpha W to the gradient (it reaches the factors), the others add
    // it to the direction; their alpha is wd, wd lr / peak lr or wd / peak lr. Zero gradient,
    // W_0 = 2, wd 0.2, no grafting: with l2, g = 0.4 and L = g^2 = 0.16, and F_hat = 0.4 at step 1,
    // so both kinds move W by lr 0.4 then; only l2 has a factor.
    for (ShampooDecay type : {ShampooDecay::l2, ShampooDecay::decoupled}) {
        CAPTURE(shampoo_decay_name(type));
        ShampooConfig wc;
        wc.grafting = ShampooGrafting::none;
        wc.decay_type = type;
        float ww = 2.0f;
        std::vector<ShampooBlockState> decayed(1);
        decayed[0].init({0, 0, 1, 1}, wc);
        shampoo_update_cpu(&ww, &zero, decayed, 1, 1, lr, wc.decay_coefficient(0.2, lr, lr), 1, wc);
        CHECK(ww == doctest::Approx(2.0 - lr * 0.4).epsilon(1e-6));
        CHECK(decayed[0].left[0] == doctest::Approx(type == ShampooDecay::l2 ? 0.16 : 0.0).epsilon(1e-6));
    }
    ShampooConfig decay_config;
    CHECK(decay_config.decay_coefficient(0.2, 0.05, 0.1) == doctest::Approx(0.2));
    decay_config.decay_type = ShampooDecay::corrected;
    CHECK(decay_config.decay_coefficient(0.2, 0.05, 0.1) == doctest::Approx(0.1));
    decay_config.decay_type = ShampooDecay::independent;
    CHECK(decay_config.decay_coefficient(0.2, 0.05, 0.1) == doctest::Approx(2.0));
    ShampooConfig bad;
    bad.beta3 = 1.0;
    CHECK_THROWS_WITH_AS(bad.validate(), doctest::Contains("--shampoo-beta3"), Error);
    bad.beta3 = -1.0;
    bad.dampening = 1.0;
    CHECK_THROWS_WITH_AS(bad.validate(), doctest::Contains("--shampoo-dampening"), Error);

    // Quadratic f(W) = 1/2 tr((W - W*)^T H_L (W - W*) H_R) with Hessian H_R (x) H_L of condition
    // number 1e4: G = H_L (W - W*) H_R. Shampoo (no grafting, beta2 = 1, roots every step)
    // reaches a loss far below what gradient descent at its largest stable step reaches. How far
    // varies with the random target W* (over 400 targets: Shampoo's loss / GD's has median 5e-5,
    // 99th percentile 8e-3, and a single target failed 1e-2 about once in 300), so the claim is
    // checked on the median of five targets.
    const int n = 6;
    Dense hl(n, n), hr(n, n);
    for (int i = 0; i < n; ++i) {
        hl(i, i) = std::pow(10.0, 2.0 * i / (n - 1));   // 1 .. 100
        hr(i, i) = std::pow(10.0, -2.0 * i / (n - 1));  // 1 .. 0.01
    }
    ShampooConfig sc;
    sc.grafting = ShampooGrafting::none;
    sc.beta1 = 0.0;
    sc.precondition_frequency = 1;
    sc.eps = 1e-10;
    std::vector<double> shampoo_over_start, shampoo_over_gd;
    for (int target_index = 0; target_index < 5; ++target_index) {
        const Dense target = random_dense(n, n, gen);
        auto loss_and_grad = [&](const std::vector<float>& w, std::vector<float>& grad) {
            Dense diff(n, n);
            for (size_t i = 0; i < diff.values.size(); ++i) diff.values[i] = w[i] - target.values[i];
            const Dense gd = matmul(matmul(hl, diff), hr);
            for (size_t i = 0; i < grad.size(); ++i) grad[i] = float(gd.values[i]);
            double f = 0;
            for (size_t i = 0; i < diff.values.size(); ++i) f += 0.5 * diff.values[i] * gd.values[i];
            return f;
        };
        std::vector<float> w_shampoo(size_t(n) * n, 0.0f), w_gd(size_t(n) * n, 0.0f), grad(size_t(n) * n);
        std::vector<ShampooBlockState> state(1);
        state[0].init({0, 0, n, n}, sc);
        const double start = loss_and_grad(w_shampoo, grad);
        for (int step = 1; step <= 200; ++step) {
            loss_and_grad(w_shampoo, grad);
            shampoo_update_cpu(w_shampoo.data(), grad.data(), state, n, n, 2.0, 0.0, step, sc);
            loss_and_grad(w_gd, grad);
            for (size_t i = 0; i < grad.size(); ++i) w_gd[i] -= float(1.0 / 100.0 * grad[i]);  // 1 / L_max
        }
        const double f_shampoo = loss_and_grad(w_shampoo, grad), f_gd = loss_and_grad(w_gd, grad);
        shampoo_over_start.push_back(f_shampoo / start);
        shampoo_over_gd.push_back(f_shampoo / f_gd);
    }
    auto median = [](std::vector<double> values) {
        std::nth_element(values.begin(), values.begin() + long(values.size() / 2), values.end());
        return values[values.size() / 2];
    };
    CAPTURE(median(shampoo_over_start));
    CAPTURE(median(shampoo_over_gd));
    CHECK(median(shampoo_over_start) < 1e-4);
    CHECK(median(shampoo_over_gd) < 1e-2);
}

TEST_CASE("Shampoo's kept eigenbasis (the reference's amortized eigendecompositions): criterion, eigh skips, QR "
          "algorithm") {
    std::mt19937_64 gen(fresh_seed());
    // The criterion ||B - diag(B)||_F <= T ||B||_F: here 0.1414 / 2.2405 = 0.0631.
    Dense b(2, 2);
    b(0, 0) = 2.0, b(1, 1) = 1.0, b(0, 1) = b(1, 0) = 0.1;
    CHECK(eigenbasis_within_tolerance(b, 0.07));
    CHECK_FALSE(eigenbasis_within_tolerance(b, 0.06));

    // a = U diag(32, 16, ..., 1) U^T, U a random orthogonal matrix: eigenvalues a factor 2 apart.
    const int n = 6;
    const Dense u = householder_q(random_dense(n, n, gen));
    Dense scaled = u;
    for (int r = 0; r < n; ++r)
        for (int j = 0; j < n; ++j) scaled(r, j) *= std::pow(2.0, n - 1 - j);
    const Dense a = matmul(scaled, u, false, true);
    const double eps = 1e-12;
    const Dense exact_root = shampoo_inverse_root(a, eps, 4);
    const Dense identity = Dense::identity(n);

    ShampooConfig c;
    c.eigen_tolerance = 1.0;  // eigh, always within: nothing is decomposed
    SymmetricEigen kept = shampoo_amortized_eigen(a, identity, c);
    CHECK(max_abs_diff(kept.vectors, identity) == 0.0);
    for (int j = 0; j < n; ++j) CHECK(kept.values[size_t(j)] == doctest::Approx(a(j, j)).epsilon(1e-12));

    c.eigen_tolerance = 1e-3;  // a is far from diagonal: the full eigendecomposition
    CHECK(max_abs_diff(shampoo_inverse_root(shampoo_amortized_eigen(a, identity, c), eps, 4), exact_root) < 1e-10);
    // From its own eigenbasis, a is within tolerance: that basis stays, with a's eigenvalues.
    kept = shampoo_amortized_eigen(a, u, c);
    CHECK(max_abs_diff(kept.vectors, u) == 0.0);
    for (int j = 0; j < n; ++j)
        CHECK(kept.values[size_t(j)] == doctest::Approx(std::pow(2.0, n - 1 - j)).epsilon(1e-10));

    // QR algorithm: one step from the identity is B = Q^T a Q with a = Q R, V = Q, the pairs then
    // sorted by ascending value; many steps converge to the eigendecomposition (eigenvalue ratio
    // 1/2 per step); within tolerance, no step.
    c.eigen_method = ShampooEigenMethod::qr;
    c.eigen_tolerance = 0.0;
    c.qr_iterations = 1;
    const Dense q = householder_q(a);
    const Dense one_step = matmul(q, matmul(a, q), true, false);
    std::vector<double> one_step_values(static_cast<size_t>(n));
    for (int j = 0; j < n; ++j) one_step_values[size_t(j)] = one_step(j, j);
    const std::vector<int> order = ascending_order(one_step_values);
    kept = shampoo_amortized_eigen(a, identity, c);
    for (int j = 0; j < n; ++j) {
        const int from = order[size_t(j)];
        CHECK(kept.values[size_t(j)] == doctest::Approx(one_step_values[size_t(from)]).epsilon(1e-12));
        if (j > 0) CHECK(kept.values[size_t(j)] >= kept.values[size_t(j - 1)]);
        for (int r = 0; r < n; ++r) CHECK(std::abs(kept.vectors(r, j) - q(r, from)) < 1e-14);
    }
    c.qr_iterations = 100;
    CHECK(max_abs_diff(shampoo_inverse_root(shampoo_amortized_eigen(a, identity, c), eps, 4), exact_root) < 1e-9);
    c.eigen_tolerance = 1.0;  // no step: the identity, its columns sorted by a's diagonal
    std::vector<double> diagonal(static_cast<size_t>(n));
    for (int j = 0; j < n; ++j) diagonal[size_t(j)] = a(j, j);
    const std::vector<int> diagonal_order = ascending_order(diagonal);
    kept = shampoo_amortized_eigen(a, identity, c);
    for (int j = 0; j < n; ++j)
        for (int r = 0; r < n; ++r) CHECK(kept.vectors(r, j) == (r == diagonal_order[size_t(j)] ? 1.0 : 0.0));

    // In the step (roots every step, factors summed): the first refresh decomposes; with a zero
    // gradient next, L is unchanged, its kept basis is within tolerance and stays bit for bit,
    // and the root stays to fp32 rounding; a large gradient after that moves the basis.
    ShampooConfig sc;
    sc.precondition_frequency = 1;
    sc.eigen_tolerance = 1e-4;
    std::vector<ShampooBlockState> state(1);
    state[0].init({0, 0, 4, 4}, sc);
    REQUIRE(state[0].left_vectors.size() == 16);
    CHECK(state[0].left_vectors[5] == 1.0f);
    std::vector<float> w(16, 0.5f), g(16), zero(16, 0.0f);
    for (float& x : g) x = float(std::normal_distribution<double>()(gen));
    shampoo_update_cpu(w.data(), g.data(), state, 4, 4, 1e-3, 0.0, 1, sc);
    const std::vector<float> vectors_1 = state[0].left_vectors, root_1 = state[0].left_root;
    CHECK(vectors_1 != std::vector<float>(identity.values.begin(), identity.values.end()) );
    shampoo_update_cpu(w.data(), zero.data(), state, 4, 4, 1e-3, 0.0, 2, sc);
    CHECK(state[0].left_vectors == vectors_1);
    CHECK(max_abs_diff(dense_from(state[0].left_root.data(), 4, 4), dense_from(root_1.data(), 4, 4)) <
          1e-4 * frobenius_norm(dense_from(root_1.data(), 4, 4)));
    for (float& x : g) x = 10.0f * float(std::normal_distribution<double>()(gen));
    shampoo_update_cpu(w.data(), g.data(), state, 4, 4, 1e-3, 0.0, 3, sc);
    CHECK(state[0].left_vectors != vectors_1);
    for (float x : w) CHECK(std::isfinite(x));
    // Out-of-range settings are refused.
    sc.eigen_tolerance = 1.5;
    CHECK_THROWS_WITH_AS(sc.validate(), doctest::Contains("--shampoo-eigen-tolerance"), Error);
    sc.eigen_tolerance = 0.0;
    sc.qr_iterations = 0;
    CHECK_THROWS_WITH_AS(sc.validate(), doctest::Contains("--shampoo-qr-iterations"), Error);
}

TEST_CASE("SOAP: the first call only sets up the bases, a 1 x 1 step by hand, frequency 1 finds the eigenbasis") {
    SoapConfig c;
    float p = 2.0f, g = 0.5f;
    SoapMatrixState s;
    s.init(1, 1, c);
    soap_update_cpu(&p, &g, s, 1, 1, 0.1, 0.01, 1, c);
    CHECK(p == 2.0f);  // skipped, as the reference
    CHECK(s.left[0] == doctest::Approx(0.05 * 0.25));  // lerp(0, g^2, 1 - 0.95)
    CHECK(std::abs(s.left_basis[0]) == doctest::Approx(1.0));
    soap_update_cpu(&p, &g, s, 1, 1, 0.1, 0.01, 2, c);
    // t = 1: m = 0.05 g, v = 0.05 g^2 (in the +-1 rotated basis), step lr sqrt(0.05) / 0.05.
    const double direction = 0.05 * 0.5 / (std::sqrt(0.05 * 0.25) + 1e-8);
    const double moved = 2.0 - 0.1 * std::sqrt(0.05) / 0.05 * direction;
    CHECK(p == doctest::Approx(moved * (1 - 0.1 * 0.01)).epsilon(1e-6));

    // The same gradient every step with frequency 1: the bases converge to G's singular vectors,
    // so the rotated gradient QL^T G QR becomes diagonal.
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    const int rows = 7, cols = 5;
    const Dense grad = random_dense(rows, cols, gen);
    std::vector<float> gf(grad.values.begin(), grad.values.end()), w(size_t(rows) * cols, 0.0f);
    SoapConfig f1;
    f1.precondition_frequency = 1;
    SoapMatrixState st;
    st.init(rows, cols, f1);
    for (long call = 1; call <= 60; ++call) soap_update_cpu(w.data(), gf.data(), st, rows, cols, 1e-3, 0.0, call, f1);
    Dense ql(rows, rows), qr(cols, cols);
    for (size_t i = 0; i < ql.values.size(); ++i) ql.values[i] = st.left_basis[i];
    for (size_t i = 0; i < qr.values.size(); ++i) qr.values[i] = st.right_basis[i];
    CHECK(max_abs_diff(matmul(ql, ql, true, false), Dense::identity(rows)) < 1e-5);
    const Dense rotated = matmul(matmul(ql, grad, true, false), qr);
    double off = 0, total = 0;
    for (int r = 0; r < rows; ++r)
        for (int col = 0; col < cols; ++col) {
            total += rotated(r, col) * rotated(r, col);
            if (r != col) off += rotated(r, col) * rotated(r, col);
        }
    CHECK(off < 1e-6 * total);
}

namespace {

// Runs `calls` SOAP calls on one matrix from zero weights; returns the weights.
std::vector<float> soap_run(const std::vector<std::vector<float>>& grads, int rows, int cols, const SoapConfig& c,
                            SoapMatrixState* state_out = nullptr) {
    SoapMatrixState s;
    s.init(rows, cols, c);
    std::vector<float> w(size_t(rows) * cols, 0.25f);
    for (size_t call = 0; call < grads.size(); ++call)
        REQUIRE(soap_update_cpu(w.data(), grads[call].data(), s, rows, cols, 1e-2, 0.1, long(call) + 1, c) == 0);
    if (state_out) *state_out = s;
    return w;
}

double relative_change_difference(const std::vector<float>& a, const std::vector<float>& b, float start) {
    double diff = 0, norm = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        diff += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
        norm += (double(b[i]) - start) * (double(b[i]) - start);
    }
    return std::sqrt(diff / norm);
}

}  // namespace

TEST_CASE("SOAP's max_precond_dim and merge_dims: no factor is the identity basis, as the reference") {
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    std::normal_distribution<double> normal(0.0, 1.0);
    std::uniform_real_distribution<double> uniform(0.0, 1.0);
    SoapConfig c;
    c.precondition_frequency = 3;  // refreshes at calls 4, 7, 10 fall inside the runs
    // `calls` gradients of `values` standard normal numbers.
    auto gaussian_calls = [&](int calls, int values) {
        std::vector<std::vector<float>> grads(static_cast<size_t>(calls));
        for (auto& g : grads)
            for (int i = 0; i < values; ++i) g.push_back(float(normal(gen)));
        return grads;
    };

    SUBCASE("both sides longer than max_precond_dim: Adam with the first call skipped, written out") {
        const int rows = 6, cols = 5, calls = 11;
        const auto grads = gaussian_calls(calls, rows * cols);
        SoapConfig adam = c;
        adam.max_precond_dim = 4;
        SoapMatrixState state;
        const std::vector<float> w = soap_run(grads, rows, cols, adam, &state);
        CHECK(state.left.empty());
        CHECK(state.right_basis.empty());
        // m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2, w -= lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt v + eps),
        // then w -= lr wd w; t counts from the second call.
        for (int i = 0; i < rows * cols; ++i) {
            double m = 0, v = 0, p = 0.25;
            for (int t = 1; t < calls; ++t) {
                const double g = grads[size_t(t)][size_t(i)];
                m = double(float(adam.beta1 * m + (1 - adam.beta1) * g));
                v = double(float(adam.beta2 * v + (1 - adam.beta2) * g * g));
                const double step = 1e-2 * std::sqrt(1 - std::pow(adam.beta2, t)) / (1 - std::pow(adam.beta1, t));
                p = double(float((p - step * m / (std::sqrt(v) + adam.eps)) * (1 - 1e-2 * 0.1)));
            }
            CHECK(w[size_t(i)] == doctest::Approx(p).epsilon(1e-6));
        }
    }

    // Gradients whose long side's factor is diagonal with a fixed descending order, and zero
    // beyond: there the full algorithm's basis is the identity up to signs (to which SOAP's update
    // is blind) and the zero block's basis touches only zero rows, so dropping that factor must
    // change nothing. Nonzero rows i < 3 are c_i u_i with |c_0| > |c_1| > |c_2| and u a fresh
    // orthogonal matrix at every call (a fixed u would make the rotated gradient diagonal, and
    // Adam's eps-sized ratios of its rounding noise would differ between the two runs).
    auto structured = [&](int calls, bool by_rows) {
        const int n = 3, long_side = 5;
        std::vector<std::vector<float>> grads(size_t(calls), std::vector<float>(size_t(n) * long_side, 0.0f));
        for (auto& g : grads) {
            const Dense u = householder_q(random_dense(n, n, gen));
            for (int i = 0; i < n; ++i) {
                const double scale = (n - i) * (1.0 + 0.3 * uniform(gen)) * (uniform(gen) < 0.5 ? -1 : 1);
                for (int j = 0; j < n; ++j) {
                    // by rows: G [5, 3], row i = scale u_i; else G [3, 5], column i = scale u_i.
                    const size_t at = by_rows ? size_t(i) * n + j : size_t(j) * long_side + i;
                    g[at] = float(scale * u(i, j));
                }
            }
        }
        return grads;
    };
    SUBCASE("one side longer than max_precond_dim: one-sided SOAP equals the full one on such gradients") {
        SoapConfig one_sided = c;
        one_sided.max_precond_dim = 3;
        for (bool left_dropped : {true, false}) {
            CAPTURE(left_dropped);
            const int rows = left_dropped ? 5 : 3, cols = left_dropped ? 3 : 5;
            const auto grads = structured(11, left_dropped);
            SoapMatrixState state;
            const std::vector<float> w = soap_run(grads, rows, cols, one_sided, &state);
            CHECK((left_dropped ? state.left : state.right).empty());
            CHECK((left_dropped ? state.right : state.left).size() == 9);
            CHECK(relative_change_difference(w, soap_run(grads, rows, cols, c), 0.25f) < 1e-5);
            // On general gradients the dropped factor matters: the check above can fail.
            const auto general = gaussian_calls(11, 15);
            CHECK(relative_change_difference(soap_run(general, rows, cols, one_sided), soap_run(general, rows, cols, c),
                                             0.25f) > 1e-2);
        }
    }
    SUBCASE("merge_dims: a matrix of at most max_precond_dim values is SOAP on its [1, m n] view") {
        const int rows = 3, cols = 4, calls = 11;
        const auto grads = gaussian_calls(calls, rows * cols);
        SoapConfig merged = c;
        merged.merge_dims = true;
        merged.max_precond_dim = 12;
        SoapMatrixState state;
        const std::vector<float> w = soap_run(grads, rows, cols, merged, &state);
        CHECK(state.left.empty());
        CHECK(state.right.size() == 144);
        // [1, 12] with its 1 x 1 left factor (basis +-1) is the same algorithm.
        CHECK(relative_change_difference(w, soap_run(grads, 1, 12, c), 0.25f) < 1e-5);
        // Above max_precond_dim nothing merges: plain SOAP, bit for bit.
        merged.max_precond_dim = 11;
        CHECK(soap_run(grads, rows, cols, merged) == soap_run(grads, rows, cols, c));
    }
}

TEST_CASE("PSGD: schedule, norm lower bound, and factors that stay triangular with P positive definite") {
    PsgdConfig c;
    CHECK(c.update_probability(0) == 1.0);
    CHECK(c.update_probability(500) == 1.0);
    CHECK(c.update_probability(1500) == doctest::Approx(std::exp(-1.0)));
    CHECK(c.update_probability(100000) == doctest::Approx(0.03));
    PsgdSchedule schedule;
    int updates = 0;
    for (int i = 0; i < 500; ++i) updates += schedule.next(c).update;
    CHECK(updates == 500);
    updates = 0;
    for (int i = 0; i < 4000; ++i) updates += schedule.next(c).update;
    CHECK(updates > 400);
    CHECK(updates < 1500);

    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    const Dense x = random_dense(8, 8, gen);
    const Dense spd = matmul(x, x, false, true);
    const double lambda_max = symmetric_eigen(spd).values[0];
    const double bound = psgd_norm_lower_bound(spd);
    CHECK(bound <= lambda_max * (1 + 1e-12));
    CHECK(bound >= lambda_max / std::sqrt(8.0));

    // 40 steps with preconditioner updates on random gradients of a 6 x 4 matrix.
    const int rows = 6, cols = 4;
    PsgdMatrixState s;
    s.init(rows, cols, c);
    std::vector<float> w(size_t(rows) * cols, 0.0f);
    for (long step = 1; step <= 40; ++step) {
        const Dense g = random_dense(rows, cols, gen);
        const std::vector<float> gf(g.values.begin(), g.values.end());
        PsgdSchedule::Decision decision;
        decision.update = true;
        decision.balance = step % 10 == 0;
        psgd_update_cpu(w.data(), gf.data(), s, rows, cols, 1e-3, 0.0, step, 0, decision, c);
    }
    for (const auto& [q, n] : {std::pair{&s.q_left, rows}, std::pair{&s.q_right, cols}}) {
        Dense qd(n, n);
        for (size_t i = 0; i < qd.values.size(); ++i) qd.values[i] = (*q)[i];
        for (int r = 0; r < n; ++r)
            for (int col = 0; col < r; ++col) CHECK(qd(r, col) == 0.0);
        CHECK(matmul(qd, qd, true, false).values == matmul(qd, qd, true, false).transposed().values);
        const SymmetricEigen e = symmetric_eigen(matmul(qd, qd, true, false));
        CHECK(e.values.back() > 0);
        for (float v : *q) CHECK(std::isfinite(v));
    }
    // The update's RMS is clipped at 1.1: |dW| / lr has RMS <= 1.1.
    std::vector<float> before = w;
    const Dense g = random_dense(rows, cols, gen, 1e3);
    const std::vector<float> gf(g.values.begin(), g.values.end());
    psgd_update_cpu(w.data(), gf.data(), s, rows, cols, 1e-3, 0.0, 41, 0, {}, c);
    double sq = 0;
    for (size_t i = 0; i < w.size(); ++i) sq += std::pow((w[i] - before[i]) / 1e-3, 2);
    CHECK(std::sqrt(sq / double(w.size())) <= 1.1 * (1 + 1e-4));
}

TEST_CASE("PSGD's memory-saving rules pick the reference's diagonal factors") {
    PsgdConfig c;
    using Pair = std::pair<bool, bool>;
    CHECK(c.diagonal_factors(5, 3) == Pair{false, false});
    CHECK(c.diagonal_factors(1, 3) == Pair{false, false});  // size 1: a 1 x 1 triangle, the same
    c.memory_save_mode = "one_diag";
    CHECK(c.diagonal_factors(5, 3) == Pair{true, false});
    CHECK(c.diagonal_factors(3, 5) == Pair{false, true});
    CHECK(c.diagonal_factors(4, 4) == Pair{false, true});  // numpy's argsort, reversed: the last
    c.memory_save_mode = "smart_one_diag";
    CHECK(c.diagonal_factors(5, 3) == Pair{true, false});
    CHECK(c.diagonal_factors(4, 4) == Pair{false, false});  // not strictly larger
    c.memory_save_mode = "all_diag";
    CHECK(c.diagonal_factors(4, 4) == Pair{true, true});
    c.memory_save_mode = "none";
    c.max_size_triangular = 4;
    CHECK(c.diagonal_factors(5, 3) == Pair{true, false});
    c.max_size_triangular = 8192;
    c.min_ndim_triangular = 3;
    CHECK(c.diagonal_factors(5, 3) == Pair{true, true});
    c.min_ndim_triangular = 2;
    c.memory_save_mode = "two_diag";
    CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("--psgd-memory-save-mode"), std::exception);
}

TEST_CASE("PSGD with diagonal factors: one step equals the reference's formulas written out") {
    // The reference (kron_torch) with Q1 = diag(q1) and Q2 triangular (one_diag on a 5 x 3
    // matrix), and with both diagonal (all_diag): A = diag(q1) G Q2^T, B = diag(q1)^-1 V Q2^-1,
    // q1 -= lr_p (t1 - t2) q1 / max|t1 + t2| with t1, t2 the row sums of squares of A and B;
    // U = diag(q1)^2 D Q2^T Q2. Written here element by element, from the initial factors
    // (q1 = 1, Q2 = I) after one update with D = G + sqrt(eps) mean|G| V (step 1, beta1 debiased).
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    const int rows = 5, cols = 3;
    for (const std::string mode : {"one_diag", "all_diag"}) {
        CAPTURE(mode);
        PsgdConfig c;
        c.memory_save_mode = mode;
        c.precond_lr = 0.3;
        PsgdMatrixState s;
        s.init(rows, cols, c);
        REQUIRE(s.left_diagonal);
        REQUIRE(s.right_diagonal == (mode == "all_diag"));
        CHECK(s.q_left.size() == size_t(rows));
        const Dense g = random_dense(rows, cols, gen);
        const std::vector<float> gf(g.values.begin(), g.values.end());
        std::vector<float> w(size_t(rows) * cols, 0.0f);
        PsgdSchedule::Decision decision;
        decision.update = true;
        const double lr = 1e-2;
        psgd_update_cpu(w.data(), gf.data(), s, rows, cols, lr, 0.0, 1, 0, decision, c);

        // D: the debiased momentum at step 1 is G (through float), perturbed by the probe.
        double mean_abs = 0;
        std::vector<double> d(gf.size()), v(gf.size());
        for (size_t i = 0; i < gf.size(); ++i) mean_abs += std::abs(double(float((1 - c.beta1) * gf[i]) / (1 - c.beta1)));
        mean_abs /= double(gf.size());
        for (size_t i = 0; i < gf.size(); ++i) {
            v[i] = psgd_probe(c, 1, 0, i);
            d[i] = double(float((1 - c.beta1) * gf[i])) / (1 - c.beta1) + std::sqrt(1.1920928955078125e-07) * mean_abs * v[i];
        }
        // With Q2 = I (triangular) or q2 = 1 (diagonal) and q1 = 1: A = D, B = V. A diagonal
        // factor's new value from ones: 1 - lr_p (t1 - t2) / max|t1 + t2|, t1 and t2 the row (or
        // column) sums of squares of D and V.
        auto new_diagonal = [&](bool columns) {
            const int length = columns ? cols : rows;
            std::vector<double> t1(size_t(length), 0.0), t2(size_t(length), 0.0);
            for (int r = 0; r < rows; ++r)
                for (int k = 0; k < cols; ++k) {
                    const size_t i = size_t(r) * cols + k, at = size_t(columns ? k : r);
                    t1[at] += d[i] * d[i];
                    t2[at] += v[i] * v[i];
                }
            double norm = 0;
            for (int i = 0; i < length; ++i) norm = std::max(norm, std::abs(t1[size_t(i)] + t2[size_t(i)]));
            std::vector<double> q(static_cast<size_t>(length));
            for (int i = 0; i < length; ++i) q[size_t(i)] = 1 - c.precond_lr * (t1[size_t(i)] - t2[size_t(i)]) / norm;
            return q;
        };
        const std::vector<double> q1 = new_diagonal(false);
        for (int r = 0; r < rows; ++r) CHECK(s.q_left[size_t(r)] == doctest::Approx(q1[size_t(r)]).epsilon(1e-5));
        // The right factor's new value, as the code computed it (its own update is the
        // triangular or diagonal rule, tested elsewhere), enters U = diag(q1)^2 D P2.
        Dense p2(cols, cols);
        if (s.right_diagonal) {
            for (int k = 0; k < cols; ++k) p2(k, k) = double(s.q_right[size_t(k)]) * s.q_right[size_t(k)];
        } else {
            const Dense q2 = dense_from(s.q_right.data(), cols, cols);
            p2 = matmul(q2, q2, true, false);
        }
        std::vector<double> u(gf.size(), 0.0);
        double sq = 0;
        for (int r = 0; r < rows; ++r)
            for (int k = 0; k < cols; ++k) {
                for (int j = 0; j < cols; ++j) u[size_t(r) * cols + k] += q1[size_t(r)] * q1[size_t(r)] * d[size_t(r) * cols + j] * p2(j, k);
                sq += u[size_t(r) * cols + k] * u[size_t(r) * cols + k];
            }
        const double clip = std::min(1.0, 1.1 / (std::sqrt(sq / double(u.size())) + 1e-12));
        for (size_t i = 0; i < u.size(); ++i) CHECK(w[i] == doctest::Approx(-lr * u[i] * clip).epsilon(1e-4));
        if (s.right_diagonal) {  // from the column sums of squares of A = diag(q1_old) D = D
            const std::vector<double> q2 = new_diagonal(true);
            for (int k = 0; k < cols; ++k)
                CHECK(s.q_right[size_t(k)] == doctest::Approx(q2[size_t(k)]).epsilon(1e-5));
        }
    }
}

TEST_CASE("PSGD with diagonal factors stays finite and positive over many updates, and its state saves as vectors") {
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    ParamLayout layout;
    layout.append("tall", {12, 5}, ParamKind::Matrix);
    layout.append("square", {6, 6}, ParamKind::Matrix);
    OptimizerConfig c;
    c.kind = OptimizerKind::Psgd;
    c.psgd.memory_save_mode = "one_diag";
    auto cpu = make_cpu_optimizer(layout, c);
    std::vector<float> params = random_vector<float>(layout.total, gen);
    for (int step = 0; step < 30; ++step) {
        std::vector<float> grads = random_vector<float>(layout.total, gen);
        cpu->step(params.data(), grads.data(), 1e-3, 1.0);
    }
    for (float p : params) REQUIRE(std::isfinite(p));
    const OptimizerState state = cpu->state();
    const StateTensor* tall_left = state.find("tall.q_left");
    const StateTensor* square_right = state.find("square.q_right");
    REQUIRE(tall_left != nullptr);
    REQUIRE(square_right != nullptr);
    CHECK(tall_left->shape == std::vector<int64_t>{12});  // the larger dimension: diagonal
    CHECK(state.find("tall.q_right")->shape == std::vector<int64_t>{5, 5});
    CHECK(square_right->shape == std::vector<int64_t>{6});  // a tie: the last dimension
    for (float q : tall_left->values) CHECK(q > 0);  // the diagonal preconditioner stays positive
    // Resumed from its state, a new optimizer continues bit for bit.
    auto resumed = make_cpu_optimizer(layout, c);
    resumed->load_state(state);
    std::vector<float> params_b = params;
    std::vector<float> grads = random_vector<float>(layout.total, gen), grads_b = grads;
    cpu->step(params.data(), grads.data(), 1e-3, 1.0);
    resumed->step(params_b.data(), grads_b.data(), 1e-3, 1.0);
    CHECK(params == params_b);
    // The state of diagonal factors does not load where the factors are triangular.
    OptimizerConfig triangular = c;
    triangular.psgd.memory_save_mode = "none";
    CHECK_THROWS_AS(make_cpu_optimizer(layout, triangular)->load_state(state), Error);
}

TEST_CASE("routing: hidden matrices to the method (q, k, v apart), the rest to AdamW or Scion's rules") {
    const ParamLayout layout = ParamLayout::build(small_model("gpt2-tiny"));
    OptimizerConfig c;
    Routing adamw = route_parameters(layout, c);
    CHECK(adamw.matrices.empty());
    CHECK(adamw.adamw.size() == layout.tensors.size());
    c.kind = OptimizerKind::Muon;
    const Routing muon = route_parameters(layout, c);
    CHECK(muon.matrices.size() == 2 * 6);  // per block: q, k, v, out, up, down
    CHECK(muon.matrices[0].name == "layers.0.attn.qkv.weight.q");
    CHECK(muon.matrices[1].offset == muon.matrices[0].offset + 64 * 64);
    size_t covered = 0;
    for (const auto& m : muon.matrices) covered += size_t(m.rows) * m.cols;
    for (const auto& s : muon.adamw) covered += s.numel;
    CHECK(covered == layout.total);
    c.kind = OptimizerKind::Scion;
    const Routing scion = route_parameters(layout, c);
    CHECK(scion.adamw.empty());
    CHECK(scion.scion[0].name == "embed.weight");
    CHECK(scion.scion[0].scion_norm == ScionNorm::Sign);
    CHECK(scion.scion.back().scion_norm == ScionNorm::BiasRMS);
    CHECK(!scion.describe().empty());
}

TEST_CASE("Shampoo with a refresh lag: the roots of step s take effect at s + K, bit for bit those of no lag") {
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    std::mt19937_64 gen(seed);
    // 12 x 10 in blocks of at most 8: four blocks of three shapes. The factors depend on the
    // gradients alone, so runs fed the same gradients hold the same factors whatever their lag.
    const int rows = 12, cols = 10, steps = 16;
    std::vector<std::vector<float>> grads(steps + 1);
    for (auto& g : grads) g = random_vector<float>(size_t(rows) * cols, gen);
    const std::vector<float> start = random_vector<float>(size_t(rows) * cols, gen);
    struct Run {
        std::vector<std::vector<float>> left_roots, right_roots;  // block 1's roots after each step
        std::vector<std::vector<float>> weights;                  // the weights after each step
    };
    auto run = [&](int lag, int start_step, int frequency) {
        ShampooConfig c;
        c.block_size = 8;
        c.precondition_frequency = frequency;
        c.start_preconditioning_step = start_step;
        c.refresh_lag = lag;
        c.validate();
        std::vector<float> w = start;
        std::vector<ShampooBlockState> blocks;
        for (const ShampooBlock& b : shampoo_blocks(rows, cols, c.block_size)) blocks.emplace_back().init(b, c);
        Run r;
        for (long step = 1; step <= steps; ++step) {
            std::vector<float> g = grads[size_t(step)];
            CHECK(shampoo_update_cpu(w.data(), g.data(), blocks, rows, cols, 1e-2, 0.1, step, c) == 0);
            r.left_roots.push_back(blocks[1].left_root);
            r.right_roots.push_back(blocks[1].right_root);
            r.weights.push_back(w);
        }
        return r;
    };
    // Refreshes at 4, 8, 12, 16 (start step 4, frequency 4); no refresh within 16 steps at 100.
    const Run at_once = run(0, 4, 4), graft_only = run(0, 100, 100);
    CHECK(at_once.weights[3] != graft_only.weights[3]);  // no lag: Shampoo's direction from step 4
    for (int lag : {1, 3}) {
        CAPTURE(lag);
        const Run lagged = run(lag, 4, 4);
        for (int step = 1; step <= steps; ++step) {
            CAPTURE(step);
            const size_t i = size_t(step - 1);
            // The roots in use at `step`: the latest refresh's at or before step - lag.
            const int source = step - lag;
            if (source < 4) {
                CHECK(lagged.left_roots[i] == std::vector<float>(lagged.left_roots[i].size(), 0.0f));
            } else {
                const size_t from = size_t(source / 4 * 4 - 1);
                CHECK(lagged.left_roots[i] == at_once.left_roots[from]);
                CHECK(lagged.right_roots[i] == at_once.right_roots[from]);
            }
            // Before start step + lag, the grafting direction alone; Shampoo's from then on.
            if (step < 4 + lag)
                CHECK(lagged.weights[i] == graft_only.weights[i]);
            else if (step == 4 + lag)
                CHECK(lagged.weights[i] != graft_only.weights[i]);
        }
    }
    // The lag must end before the next refresh, and needs the full eigendecomposition.
    ShampooConfig c;
    c.precondition_frequency = 10;
    c.refresh_lag = 10;
    CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("--shampoo-refresh-lag must be in [0, 9]"), Error);
    c.start_preconditioning_step = 17;  // refreshes at 17, 20, 30: at most 2
    c.refresh_lag = 3;
    CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("[0, 2]"), Error);
    c.refresh_lag = 2;
    c.validate();
    c.eigen_method = ShampooEigenMethod::qr;
    CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("needs the full eigendecomposition"), Error);
}

TEST_CASE("every optimizer's state round-trips: saved, loaded into a new one, the next steps are identical") {
    const uint64_t seed = fresh_seed();
    INFO("seed " << seed);
    for (const char* preset : {"olmo2-tiny", "gpt2-tiny"}) {
        const ParamLayout layout = ParamLayout::build(small_model(preset));
        // shampoo-qr: Shampoo with a kept eigenbasis (its eigenvectors and eigenvalues in the state).
        // shampoo-lag: a refresh lag, saved while a refresh's roots are pending (refresh at 3,
        // taking effect at 5). soap-one-sided: the MLP's wider side beyond --soap-max-precond-dim.
        for (const std::string name :
             {"adamw", "muon", "scion", "shampoo", "soap", "psgd", "shampoo-qr", "shampoo-lag", "soap-one-sided"}) {
            CAPTURE(preset);
            CAPTURE(name);
            OptimizerConfig c;
            c.kind = parse_optimizer(name.substr(0, name.find('-')));
            if (name == "shampoo-qr") c.shampoo.eigen_method = ShampooEigenMethod::qr;
            c.shampoo.precondition_frequency = name == "shampoo-lag" ? 3 : 2;
            if (name == "shampoo-lag") c.shampoo.refresh_lag = 2;
            c.soap.precondition_frequency = 2;
            if (name == "soap-one-sided") c.soap.max_precond_dim = 100;
            c.shampoo.block_size = 48;  // the 64-wide matrices are cut into blocks
            std::mt19937_64 gen(seed);
            std::vector<float> params = random_vector<float>(layout.total, gen);
            auto first = make_cpu_optimizer(layout, c);
            auto grads_at = [&](int step) {
                std::mt19937_64 g(seed + uint64_t(step));
                return random_vector<float>(layout.total, g);
            };
            for (int step = 0; step < 3; ++step) {
                auto g = grads_at(step);
                first->step(params.data(), g.data(), 1e-3, 0.5);
            }
            const OptimizerState saved = first->state();
            CHECK(saved.total_floats() * sizeof(float) == first->state_bytes());
            auto second = make_cpu_optimizer(layout, c);
            second->load_state(saved);
            std::vector<float> params_b = params;
            for (int step = 3; step < 6; ++step) {
                auto g = grads_at(step), g_b = g;
                first->step(params.data(), g.data(), 1e-3, 1.0);
                second->step(params_b.data(), g_b.data(), 1e-3, 1.0);
            }
            CHECK(params == params_b);
            CHECK(second->step_count() == 6);
            for (float p : params) REQUIRE(std::isfinite(p));
            // Another optimizer's state is refused with a message.
            OptimizerConfig other = c;
            other.kind = c.kind == OptimizerKind::AdamW ? OptimizerKind::Muon : OptimizerKind::AdamW;
            CHECK_THROWS_WITH_AS(make_cpu_optimizer(layout, other)->load_state(saved),
                                 doctest::Contains("optimizer state is"), Error);
        }
    }
}

TEST_CASE("each optimizer trains a tiny model on the CPU: the loss falls, nothing diverges") {
    TempDir dir;
    for (const char* name : {"adamw", "muon", "scion", "shampoo", "soap", "psgd"}) {
        CAPTURE(name);
        const TrainOptions o = tiny_optimizer_run(dir, name, "cpu");
        std::ostringstream log;
        const TrainResult r = run_training(o, log);
        CAPTURE(log.str());
        CHECK(r.skipped_steps == 0);
        CHECK(std::isfinite(r.val_loss_end));
        CHECK(r.val_loss_end < r.val_loss_start - 0.3);
        CHECK(log.str().find("optimizer routing:") != std::string::npos);
        // The checkpoint holds this optimizer's state.
        const Checkpoint ckpt = read_checkpoint(r.last_checkpoint);
        CHECK(ckpt.optimizer.optimizer == name);
        CHECK(ckpt.optimizer.step == 40);
    }
}
