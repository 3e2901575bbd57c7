#include "optim/psgd.hpp"

#include <algorithm>
#include <cmath>
#include <tuple>

#include "core/error.hpp"
#include "optim/optimizer_state.hpp"

namespace qopt {

double PsgdConfig::update_probability(long n) const {
    const double p = update_prob_max * std::exp(-update_prob_decay * (double(n) - double(update_prob_flat_start)));
    return std::min(std::max(p, update_prob_min), update_prob_max);
}

void PsgdConfig::validate() const {
    QOPT_CHECK(beta1 >= 0 && beta1 < 1, "--psgd-beta1 must be in [0, 1)");
    QOPT_CHECK(precond_lr > 0, "--psgd-precond-lr must be positive");
    QOPT_CHECK(precond_init_scale > 0, "--psgd-precond-init-scale must be positive");
    QOPT_CHECK(update_prob_min > 0 && update_prob_min <= update_prob_max && update_prob_max <= 1,
               "PSGD update probabilities must satisfy 0 < min <= max <= 1");
    QOPT_CHECK(update_prob_decay >= 0, "--psgd-update-prob-decay must be non-negative");
    QOPT_CHECK(max_size_triangular > 0, "--psgd-max-size-triangular must be positive");
    QOPT_CHECK(min_ndim_triangular >= 0, "--psgd-min-ndim-triangular must be non-negative");
    QOPT_CHECK(std::find(kPsgdMemorySaveModes.begin(), kPsgdMemorySaveModes.end(), memory_save_mode) !=
                   kPsgdMemorySaveModes.end(),
               "--psgd-memory-save-mode must be none, smart_one_diag, one_diag or all_diag, not '", memory_save_mode,
               "'");
    QOPT_CHECK(balance_probability >= 0 && balance_probability <= 1, "--psgd-balance-prob must be in [0, 1]");
}

Json PsgdConfig::to_json() const {
    Json j = Json::object();
    j["lr"] = lr;
    j["beta1"] = beta1;
    j["precond_lr"] = precond_lr;
    j["precond_init_scale"] = precond_init_scale;
    j["update_prob_max"] = update_prob_max;
    j["update_prob_min"] = update_prob_min;
    j["update_prob_decay"] = update_prob_decay;
    j["update_prob_flat_start"] = int64_t(update_prob_flat_start);
    j["max_size_triangular"] = int64_t(max_size_triangular);
    j["min_ndim_triangular"] = int64_t(min_ndim_triangular);
    j["memory_save_mode"] = memory_save_mode;
    j["momentum_into_precond_update"] = momentum_into_precond_update;
    j["balance_probability"] = balance_probability;
    j["seed"] = seed;
    return j;
}

std::pair<bool, bool> PsgdConfig::diagonal_factors(int rows, int cols) const {
    // memory_save_mode first (numpy's argsort, reversed: of two equal sizes the last is largest).
    bool left = memory_save_mode == "all_diag", right = left;
    if (memory_save_mode == "one_diag") (rows > cols ? left : right) = true;
    if (memory_save_mode == "smart_one_diag" && rows != cols) (rows > cols ? left : right) = true;
    // Then the per-dimension rules (a matrix has 2 dimensions). The reference also makes a
    // dimension of size 1 diagonal; its 1 x 1 triangular factor here updates identically.
    const bool all = 2 < min_ndim_triangular;
    left = left || all || rows > max_size_triangular;
    right = right || all || cols > max_size_triangular;
    return {left, right};
}

PsgdSchedule::Decision PsgdSchedule::next(const PsgdConfig& c) {
    Decision d;
    const double p = c.update_probability(prob_step);
    ++update_counter;
    d.update = double(update_counter) >= 1.0 / p;
    if (d.update) update_counter = 0;
    ++prob_step;
    // One uniform draw per step, as the reference's rng.random() < 0.01.
    const double u = double(mix64(c.seed ^ mix64(0xBA1A7CEull + balance_draws++)) >> 11) * (1.0 / 9007199254740992.0);
    d.balance = u < c.balance_probability && d.update;
    return d;
}

Json PsgdSchedule::to_json() const {
    Json j = Json::object();
    j["prob_step"] = int64_t(prob_step);
    j["update_counter"] = int64_t(update_counter);
    j["balance_draws"] = balance_draws;
    return j;
}

PsgdSchedule PsgdSchedule::from_json(const Json& j) {
    PsgdSchedule s;
    s.prob_step = long(j.at("prob_step").as_int("prob_step"));
    s.update_counter = long(j.at("update_counter").as_int("update_counter"));
    s.balance_draws = j.at("balance_draws").as_uint("balance_draws");
    return s;
}

void PsgdMatrixState::init(int rows, int cols, const PsgdConfig& c) {
    momentum.assign(size_t(rows) * cols, 0.0f);
    std::tie(left_diagonal, right_diagonal) = c.diagonal_factors(rows, cols);
    const double scale = std::sqrt(c.precond_init_scale);  // init_scale^(1 / order)
    // scale I, or scale times ones when diagonal.
    auto identity = [&](std::vector<float>& q, int n, bool diagonal) {
        q.assign(diagonal ? size_t(n) : size_t(n) * n, 0.0f);
        for (int i = 0; i < n; ++i) q[diagonal ? size_t(i) : size_t(i) * n + i] = float(scale);
    };
    identity(q_left, rows, left_diagonal);
    identity(q_right, cols, right_diagonal);
}

float psgd_probe(const PsgdConfig& c, long step, int matrix_index, size_t element) {
    return counter_normal(c.seed, (uint64_t(step) << 20) ^ uint64_t(matrix_index), element);
}

double psgd_norm_lower_bound(const Dense& input) {
    double max_abs = 0;
    for (double x : input.values) max_abs = std::max(max_abs, std::abs(x));
    if (max_abs == 0) return 0;
    const int n = input.rows;
    Dense a = input;
    for (double& x : a.values) x /= max_abs;
    int best = 0;
    double best_sq = -1;
    for (int j = 0; j < n; ++j) {
        double sq = 0;
        for (int i = 0; i < n; ++i) sq += a(i, j) * a(i, j);
        if (sq > best_sq) best_sq = sq, best = j;
    }
    std::vector<double> x(n);
    for (int i = 0; i < n; ++i) x[i] = a(i, best);
    std::vector<double> xa(n, 0.0);  // x^T a
    for (int i = 0; i < n; ++i)
        for (int j = 0; j < n; ++j) xa[j] += x[i] * a(i, j);
    double norm = 0;
    for (double v : xa) norm += v * v;
    norm = std::sqrt(norm);
    for (double& v : xa) v /= norm;
    double out = 0;
    for (int k = 0; k < n; ++k) {
        double sum = 0;
        for (int j = 0; j < n; ++j) sum += a(k, j) * xa[j];
        out += sum * sum;
    }
    return std::sqrt(out) * max_abs;
}

namespace {

// The reference's floor under the update's normalizer: float32's smallest normal number.
constexpr double kTiny = 1.17549435e-38;

// q -= lr_p / lb(t1 + t2) * triu(t1 - t2) q; false when the result was not finite (q kept).
bool update_factor(std::vector<float>& q_values, const Dense& t1, const Dense& t2, double precond_lr) {
    const int n = t1.rows;
    Dense sum = t1, diff = t1;
    for (size_t i = 0; i < sum.values.size(); ++i) {
        sum.values[i] += t2.values[i];
        diff.values[i] -= t2.values[i];
    }
    const double bound = std::max(psgd_norm_lower_bound(sum), kTiny);
    for (int r = 0; r < n; ++r)
        for (int c = 0; c < n; ++c) diff(r, c) = c >= r ? diff(r, c) * precond_lr / bound : 0.0;
    const Dense q = dense_from(q_values.data(), n, n);
    Dense updated = matmul(diff, q);
    for (size_t i = 0; i < updated.values.size(); ++i) updated.values[i] = q.values[i] - updated.values[i];
    return commit_preconditioner(q_values, updated);
}

// The diagonal factor's update: q -= lr_p (t1 - t2) q / max|t1 + t2| (t1, t2 the row or column
// sums of squares of A and B); false when the result was not finite (q kept).
bool update_diagonal_factor(std::vector<float>& q_values, const std::vector<double>& t1,
                            const std::vector<double>& t2, double precond_lr) {
    double norm = 0;
    for (size_t i = 0; i < t1.size(); ++i) norm = std::max(norm, std::abs(t1[i] + t2[i]));
    norm = std::max(norm, kTiny);
    Dense updated(1, int(q_values.size()));
    for (size_t i = 0; i < q_values.size(); ++i)
        updated.values[i] = q_values[i] - precond_lr * (t1[i] - t2[i]) * q_values[i] / norm;
    return commit_preconditioner(q_values, updated);
}

// Sums of squares of x's rows (or columns): the Gram matrix's diagonal, which is all a diagonal
// factor's update uses.
std::vector<double> row_sums_of_squares(const Dense& x, bool columns) {
    std::vector<double> sums(size_t(columns ? x.cols : x.rows), 0.0);
    for (int r = 0; r < x.rows; ++r)
        for (int c = 0; c < x.cols; ++c) sums[size_t(columns ? c : r)] += x(r, c) * x(r, c);
    return sums;
}

// x with row i (or column i) scaled by scale[i] raised to `power` (1: diag(q) x; -1: diag(q)^-1 x;
// 2: diag(q)^2 x, the diagonal factor's Q^T Q).
Dense scale_rows(const Dense& x, const std::vector<float>& scale, int power, bool columns) {
    Dense out = x;
    for (int r = 0; r < x.rows; ++r)
        for (int c = 0; c < x.cols; ++c) out(r, c) *= std::pow(double(scale[size_t(columns ? c : r)]), power);
    return out;
}

}  // namespace

int psgd_update_cpu(float* param, const float* grad, PsgdMatrixState& s, int rows, int cols, double lr,
                     double weight_decay, long step, int matrix_index, PsgdSchedule::Decision decision,
                     const PsgdConfig& c) {
    const size_t n = size_t(rows) * cols;
    const double debias = 1 - std::pow(c.beta1, double(step));
    int rejected = 0;
    Dense d(rows, cols);
    for (size_t i = 0; i < n; ++i) {
        s.momentum[i] = float(c.beta1 * s.momentum[i] + (1 - c.beta1) * grad[i]);
        d.values[i] = s.momentum[i] / debias;
    }
    if (decision.balance) {
        // Both factors scaled to the geometric mean of their max-abs norms.
        double left_max = 0, right_max = 0;
        for (float x : s.q_left) left_max = std::max(left_max, double(std::abs(x)));
        for (float x : s.q_right) right_max = std::max(right_max, double(std::abs(x)));
        const double mean = std::sqrt(left_max * right_max);
        for (float& x : s.q_left) x = float(x * (mean / left_max));
        for (float& x : s.q_right) x = float(x * (mean / right_max));
    }
    if (decision.update) {
        Dense probe(rows, cols);
        for (size_t i = 0; i < n; ++i) probe.values[i] = psgd_probe(c, step, matrix_index, i);
        Dense g(rows, cols);
        for (size_t i = 0; i < n; ++i) g.values[i] = c.momentum_into_precond_update ? d.values[i] : grad[i];
        double mean_abs = 0;
        for (double x : g.values) mean_abs += std::abs(x);
        mean_abs /= double(n);
        const double noise = std::sqrt(1.1920928955078125e-07) * mean_abs;
        for (size_t i = 0; i < n; ++i) g.values[i] += noise * probe.values[i];
        if (c.momentum_into_precond_update) d = g;  // the reference perturbs the debiased momentum itself
        // A = Q1 G Q2^T; B = Q1^-T V Q2^-1 = (V^T Q1^-1)^T Q2^-1 (a diagonal factor scales rows
        // or columns instead).
        Dense a = s.left_diagonal ? scale_rows(g, s.q_left, 1, false)
                                  : matmul(dense_from(s.q_left.data(), rows, rows), g);
        a = s.right_diagonal ? scale_rows(a, s.q_right, 1, true)
                             : matmul(a, dense_from(s.q_right.data(), cols, cols), false, true);
        Dense b = s.left_diagonal ? scale_rows(probe, s.q_left, -1, false)
                                  : solve_upper_right(probe.transposed(), dense_from(s.q_left.data(), rows, rows))
                                        .transposed();
        b = s.right_diagonal ? scale_rows(b, s.q_right, -1, true)
                             : solve_upper_right(b, dense_from(s.q_right.data(), cols, cols));
        if (s.left_diagonal)
            rejected += !update_diagonal_factor(s.q_left, row_sums_of_squares(a, false), row_sums_of_squares(b, false),
                                                c.precond_lr);
        else
            rejected += !update_factor(s.q_left, matmul(a, a, false, true), matmul(b, b, false, true), c.precond_lr);
        if (s.right_diagonal)
            rejected += !update_diagonal_factor(s.q_right, row_sums_of_squares(a, true), row_sums_of_squares(b, true),
                                                c.precond_lr);
        else
            rejected += !update_factor(s.q_right, matmul(a, a, true, false), matmul(b, b, true, false), c.precond_lr);
    }
    // U = Q1^T Q1 D Q2^T Q2 (a diagonal factor: q^2 on the rows or columns).
    Dense u = d;
    if (s.left_diagonal) {
        u = scale_rows(u, s.q_left, 2, false);
    } else {
        const Dense q1 = dense_from(s.q_left.data(), rows, rows);
        u = matmul(matmul(q1, q1, true, false), u);
    }
    if (s.right_diagonal) {
        u = scale_rows(u, s.q_right, 2, true);
    } else {
        const Dense q2 = dense_from(s.q_right.data(), cols, cols);
        u = matmul(u, matmul(q2, q2, true, false));
    }
    const double rms = frobenius_norm(u) / std::sqrt(double(n));
    const double clip = std::min(1.0, 1.1 / (rms + 1e-12));
    for (size_t i = 0; i < n; ++i) {
        const double p = param[i];
        param[i] = float(p - lr * (u.values[i] * clip + weight_decay * p));
    }
    return rejected;
}

}  // namespace qopt
