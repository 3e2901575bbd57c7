#include "optim/soap.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.hpp"

namespace qopt {

void SoapConfig::validate() const {
    QOPT_CHECK(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1, "--soap-beta1/--soap-beta2 must be in [0, 1)");
    QOPT_CHECK(shampoo_beta < 1, "--soap-shampoo-beta must be < 1");
    QOPT_CHECK(eps > 0, "--soap-eps must be positive");
    QOPT_CHECK(precondition_frequency > 0, "--soap-precondition-frequency must be positive");
    QOPT_CHECK(max_precond_dim > 0, "--soap-max-precond-dim must be positive");
}

Json SoapConfig::to_json() const {
    Json j = Json::object();
    j["lr"] = lr;
    j["beta1"] = beta1;
    j["beta2"] = beta2;
    j["shampoo_beta"] = shampoo_beta;
    j["eps"] = eps;
    j["precondition_frequency"] = int64_t(precondition_frequency);
    j["max_precond_dim"] = int64_t(max_precond_dim);
    j["normalize_grads"] = normalize_grads;
    j["correct_bias"] = correct_bias;
    j["merge_dims"] = merge_dims;
    return j;
}

SoapView soap_view(int rows, int cols, const SoapConfig& c) {
    const size_t values = size_t(rows) * cols;
    if (c.merge_dims && values <= size_t(c.max_precond_dim)) return {1, int(values), false, true};
    return {rows, cols, rows <= c.max_precond_dim, cols <= c.max_precond_dim};
}

void SoapMatrixState::init(int rows, int cols, const SoapConfig& c) {
    view = soap_view(rows, cols, c);
    const size_t m = view.left ? size_t(view.rows) : 0, n = view.right ? size_t(view.cols) : 0;
    left.assign(m * m, 0.0f);
    right.assign(n * n, 0.0f);
    left_basis.assign(m * m, 0.0f);
    right_basis.assign(n * n, 0.0f);
    exp_avg.assign(size_t(rows) * cols, 0.0f);
    exp_avg_sq.assign(size_t(rows) * cols, 0.0f);
}

namespace {

// f = lerp(f, x, 1 - beta) = beta f + (1 - beta) x
void lerp_factor(std::vector<float>& f, const Dense& x, double beta) {
    for (size_t i = 0; i < f.size(); ++i) f[i] = float(beta * double(f[i]) + (1.0 - beta) * x.values[i]);
}

// The bases of one matrix; a side without a factor is the identity (held as an empty Dense).
struct Bases {
    Dense left, right;
    // QL^T X QR: into the eigenbasis.
    Dense rotate_in(const Dense& x) const {
        const Dense l = left.values.empty() ? x : matmul(left, x, true, false);
        return right.values.empty() ? l : matmul(l, right);
    }
    // QL X QR^T: back to the parameter space.
    Dense rotate_out(const Dense& x) const {
        const Dense l = left.values.empty() ? x : matmul(left, x);
        return right.values.empty() ? l : matmul(l, right, false, true);
    }
};

// L = lerp(L, G G^T, 1 - beta), R = lerp(R, G^T G, 1 - beta), for the sides that have a factor.
void accumulate_factors(SoapMatrixState& s, const Dense& g, double beta) {
    if (s.view.left) lerp_factor(s.left, matmul(g, g, false, true), beta);
    if (s.view.right) lerp_factor(s.right, matmul(g, g, true, false), beta);
}

}  // namespace

Dense soap_initial_basis(const Dense& factor) { return symmetric_eigen(factor).vectors; }

Dense soap_refresh_basis(const Dense& factor, const Dense& basis, std::vector<int>& order) {
    const int n = factor.rows;
    const Dense projected = matmul(basis, matmul(factor, basis), true, false);  // Q^T L Q
    std::vector<double> estimates(static_cast<size_t>(n));
    for (int j = 0; j < n; ++j) estimates[size_t(j)] = projected(j, j);
    order = descending_order(estimates);
    Dense sorted(n, n);
    for (int r = 0; r < n; ++r)
        for (int j = 0; j < n; ++j) sorted(r, j) = basis(r, order[j]);
    return householder_q(matmul(factor, sorted));
}

int soap_update_cpu(float* param, const float* grad, SoapMatrixState& s, int rows, int cols, double lr,
                     double weight_decay, long call, const SoapConfig& c) {
    QOPT_CHECK(s.exp_avg.size() == size_t(rows) * cols, "SOAP: state for ", s.exp_avg.size(), " values, matrix ",
               rows, " x ", cols);
    rows = s.view.rows;  // the view: the same row-major values, [1, m n] when merged
    cols = s.view.cols;
    const Dense g = dense_from(grad, rows, cols);
    const double factor_beta = c.factor_beta();
    if (call == 1) {
        accumulate_factors(s, g, factor_beta);
        int rejected = 0;
        if (s.view.left) {
            const Dense left = dense_from(s.left.data(), rows, rows);
            rejected += !commit_preconditioner(s.left_basis,
                                               all_finite(left) ? soap_initial_basis(left) : Dense(rows, rows, NAN));
        }
        if (s.view.right) {
            const Dense right = dense_from(s.right.data(), cols, cols);
            rejected += !commit_preconditioner(s.right_basis,
                                               all_finite(right) ? soap_initial_basis(right) : Dense(cols, cols, NAN));
        }
        return rejected;
    }
    const long t = call - 1;
    int rejected = 0;
    Bases bases;
    if (s.view.left) bases.left = dense_from(s.left_basis.data(), rows, rows);
    if (s.view.right) bases.right = dense_from(s.right_basis.data(), cols, cols);
    const Dense rotated = bases.rotate_in(g);
    Dense direction(rows, cols);
    for (size_t i = 0; i < direction.values.size(); ++i) {
        const double x = rotated.values[i];
        const double m = c.beta1 * double(s.exp_avg[i]) + (1 - c.beta1) * x;
        const double v = c.beta2 * double(s.exp_avg_sq[i]) + (1 - c.beta2) * x * x;
        s.exp_avg[i] = float(m);
        s.exp_avg_sq[i] = float(v);
        direction.values[i] = double(s.exp_avg[i]) / (std::sqrt(double(s.exp_avg_sq[i])) + c.eps);
    }
    Dense update = bases.rotate_out(direction);
    if (c.normalize_grads) {
        const double rms = frobenius_norm(update) / std::sqrt(double(update.values.size()));
        for (double& u : update.values) u /= 1e-30 + rms;
    }
    double step_size = lr;
    if (c.correct_bias)
        step_size *= std::sqrt(1 - std::pow(c.beta2, double(t))) / (1 - std::pow(c.beta1, double(t)));
    for (size_t i = 0; i < update.values.size(); ++i) {
        const double p = double(param[i]) - step_size * update.values[i];
        param[i] = float(p - lr * weight_decay * p);
    }
    accumulate_factors(s, g, factor_beta);
    if (t % c.precondition_frequency == 0) {
        // M back to the parameter space with the old bases, new bases, then M into the new ones.
        const Dense m_original = bases.rotate_out(dense_from(s.exp_avg.data(), rows, cols));
        // A side without a factor keeps its (identity) basis, its axis in order.
        std::vector<int> left_order(static_cast<size_t>(rows)), right_order(static_cast<size_t>(cols));
        std::iota(left_order.begin(), left_order.end(), 0);
        std::iota(right_order.begin(), right_order.end(), 0);
        auto refresh = [&](const std::vector<float>& factor_values, std::vector<float>& basis_values, Dense& basis,
                           std::vector<int>& order, int n) {
            const Dense factor = dense_from(factor_values.data(), n, n);
            std::vector<int> candidate_order;
            const Dense candidate =
                all_finite(factor) ? soap_refresh_basis(factor, basis, candidate_order) : Dense(n, n, NAN);
            if (commit_preconditioner(basis_values, candidate)) {
                basis = candidate;
                order = candidate_order;
                return 0;
            }
            return 1;  // the old basis stays, its columns in their old order
        };
        if (s.view.left) rejected += refresh(s.left, s.left_basis, bases.left, left_order, rows);
        if (s.view.right) rejected += refresh(s.right, s.right_basis, bases.right, right_order, cols);
        std::vector<float> v_sorted(s.exp_avg_sq.size());
        for (int r = 0; r < rows; ++r)
            for (int j = 0; j < cols; ++j)
                v_sorted[size_t(r) * cols + j] = s.exp_avg_sq[size_t(left_order[r]) * cols + right_order[j]];
        s.exp_avg_sq = v_sorted;
        store_floats(bases.rotate_in(m_original), s.exp_avg);
    }
    return rejected;
}

}  // namespace qopt
