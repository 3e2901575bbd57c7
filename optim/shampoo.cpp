#include "optim/shampoo.hpp"

#include <algorithm>
#include <cmath>

#include "core/error.hpp"

namespace qopt {

void ShampooConfig::validate() const {
    QOPT_CHECK(beta1 >= 0 && beta1 < 1, "--shampoo-beta1 must be in [0, 1)");
    QOPT_CHECK(beta2 > 0 && beta2 <= 1, "--shampoo-beta2 must be in (0, 1]");
    QOPT_CHECK(eps > 0, "--shampoo-eps must be positive");
    QOPT_CHECK(momentum >= 0 && momentum < 1, "--shampoo-momentum must be in [0, 1)");
    QOPT_CHECK(block_size > 0, "--shampoo-block-size must be positive");
    QOPT_CHECK(precondition_frequency > 0, "--shampoo-precondition-frequency must be positive");
    QOPT_CHECK(inverse_root >= 0, "--shampoo-inverse-root must be >= 0 (0: 4 for matrices)");
    QOPT_CHECK(graft_beta2 > 0 && graft_beta2 <= 1 && graft_eps > 0, "bad Shampoo grafting settings");
    QOPT_CHECK(refine_tolerance >= 0 && refine_tolerance < 1, "--shampoo-refine-tolerance must be in [0, 1)");
}

Json ShampooConfig::to_json() const {
    Json j = Json::object();
    j["lr"] = lr;
    j["beta1"] = beta1;
    j["beta2"] = beta2;
    j["eps"] = eps;
    j["momentum"] = momentum;
    j["nesterov"] = nesterov;
    j["block_size"] = int64_t(block_size);
    j["precondition_frequency"] = int64_t(precondition_frequency);
    j["start_preconditioning_step"] = int64_t(start_step());
    j["inverse_root"] = int64_t(root());
    j["adam_grafting"] = adam_grafting;
    j["graft_beta2"] = graft_beta2;
    j["graft_eps"] = graft_eps;
    j["refine_tolerance"] = refine_tolerance;
    return j;
}

std::vector<ShampooBlock> shampoo_blocks(int rows, int cols, int block_size) {
    std::vector<ShampooBlock> blocks;
    for (int r = 0; r < rows; r += block_size)
        for (int c = 0; c < cols; c += block_size)
            blocks.push_back({r, c, std::min(block_size, rows - r), std::min(block_size, cols - c)});
    return blocks;
}

void ShampooBlockState::init(const ShampooBlock& b, const ShampooConfig& c) {
    const size_t n = size_t(b.block_rows) * b.block_cols;
    left.assign(size_t(b.block_rows) * b.block_rows, 0.0f);
    right.assign(size_t(b.block_cols) * b.block_cols, 0.0f);
    left_root.assign(left.size(), 0.0f);
    right_root.assign(right.size(), 0.0f);
    filtered.assign(n, 0.0f);
    graft_sq.assign(n, 0.0f);
    momentum.assign(c.momentum > 0 ? n : 0, 0.0f);
    left_basis.assign(c.refine_tolerance > 0 ? left.size() : 0, 0.0f);
    right_basis.assign(c.refine_tolerance > 0 ? right.size() : 0, 0.0f);
}

namespace {

// root = basis diag((lambda_j - min(lambda, 0) + eps)^(-1/r)) basis^T.
Dense root_from_basis(const Dense& basis, const std::vector<double>& values, double eps, int root) {
    const double shift = std::min(*std::min_element(values.begin(), values.end()), 0.0);
    Dense scaled = basis;
    for (int j = 0; j < basis.cols; ++j) {
        const double power = std::pow(values[size_t(j)] - shift + eps, -1.0 / root);
        for (int r = 0; r < basis.rows; ++r) scaled(r, j) *= power;
    }
    return matmul(scaled, basis, false, true);
}

}  // namespace

ShampooRoot shampoo_inverse_root(const Dense& a, double eps, int root) {
    SymmetricEigen e = symmetric_eigen(a);
    return {root_from_basis(e.vectors, e.values, eps, root), e.vectors};
}

RefinedRoot shampoo_refined_inverse_root(const Dense& a, const Dense& x, double eps, int root, double tolerance) {
    const int n = a.rows;
    const Dense s = matmul(x, matmul(a, x), true, false);
    const Dense gram = matmul(x, x, true, false);  // R = I - gram
    RefinedRoot out;
    std::vector<double> lambda(static_cast<size_t>(n));
    bool is_basis = true;
    double largest = 0;
    for (int i = 0; i < n; ++i) {
        is_basis = is_basis && gram(i, i) > 0.5;
        lambda[size_t(i)] = s(i, i) / gram(i, i);
        largest = std::max(largest, std::abs(lambda[size_t(i)]));
    }
    const double shift = std::min(*std::min_element(lambda.begin(), lambda.end()), 0.0);
    const double rounding = 2.0 * std::sqrt(double(n)) * std::ldexp(1.0, -24) * largest;
    const double kappa = std::sqrt(tolerance);
    auto f = [&](double mu) { return std::pow(mu, -1.0 / root); };
    Dense e(n, n);
    for (int i = 0; i < n; ++i)
        for (int j = 0; j < n; ++j) {
            const double r_ij = (i == j ? 1.0 : 0.0) - gram(i, j);
            const double gap = lambda[size_t(j)] - lambda[size_t(i)];
            if (i != j && std::abs(s(i, j)) <= kappa * std::abs(gap)) {
                e(i, j) = (s(i, j) + lambda[size_t(j)] * r_ij) / gap;
                continue;
            }
            e(i, j) = r_ij / 2;
            if (i == j || std::abs(s(i, j)) <= rounding) continue;
            const double mu_i = lambda[size_t(i)] - shift + eps, mu_j = lambda[size_t(j)] - shift + eps;
            const double divided = mu_i == mu_j ? -f(mu_i) / (root * mu_i) : (f(mu_i) - f(mu_j)) / (mu_i - mu_j);
            out.error = std::max(out.error, std::abs(s(i, j) * divided) / f(std::min(mu_i, mu_j)));
        }
    out.basis = matmul(x, e);
    for (size_t i = 0; i < out.basis.values.size(); ++i) out.basis.values[i] += x.values[i];
    out.root = root_from_basis(out.basis, lambda, eps, root);
    out.accepted = is_basis && std::isfinite(out.error) && out.error <= tolerance && all_finite(out.root);
    return out;
}

int shampoo_update_cpu(float* param, const float* grad, std::vector<ShampooBlockState>& states, int rows, int cols,
                        double lr, double weight_decay, long step, const ShampooConfig& c) {
    const auto blocks = shampoo_blocks(rows, cols, c.block_size);
    QOPT_CHECK(states.size() == blocks.size(), "shampoo: state has ", states.size(), " blocks, expected ",
               blocks.size());
    const double bias1 = 1 - std::pow(c.beta1, double(step));
    const double graft_bias2 = 1 - std::pow(c.graft_beta2, double(step));
    const double factor_bias = c.beta2 < 1 ? 1 - std::pow(c.beta2, double(step)) : 1.0;
    int rejected = 0;
    for (size_t bi = 0; bi < blocks.size(); ++bi) {
        const ShampooBlock& b = blocks[bi];
        ShampooBlockState& s = states[bi];
        const int br = b.block_rows, bc = b.block_cols;
        Dense g(br, bc);
        for (int r = 0; r < br; ++r)
            for (int j = 0; j < bc; ++j) g(r, j) = grad[size_t(b.row0 + r) * cols + b.col0 + j];
        // Factors.
        const Dense ggt = matmul(g, g, false, true), gtg = matmul(g, g, true, false);
        auto accumulate = [&](std::vector<float>& f, const Dense& x) {
            for (size_t i = 0; i < f.size(); ++i)
                f[i] = c.beta2 < 1 ? float(c.beta2 * f[i] + (1 - c.beta2) * x.values[i]) : float(f[i] + x.values[i]);
        };
        accumulate(s.left, ggt);
        accumulate(s.right, gtg);
        if (step % c.precondition_frequency == 0) {
            auto root_of = [&](const std::vector<float>& f, int n, std::vector<float>& out, std::vector<float>& basis) {
                Dense d(n, n);
                for (size_t i = 0; i < f.size(); ++i) d.values[i] = f[i] / factor_bias;
                // A non-finite factor has no root (and would only cost a full eigen sweep).
                if (!all_finite(d)) {
                    if (!commit_preconditioner(out, Dense(n, n, NAN))) ++rejected;
                    return;
                }
                ShampooRoot r;
                bool refined = false;
                if (c.refine_tolerance > 0) {
                    RefinedRoot attempt =
                        shampoo_refined_inverse_root(d, dense_from(basis.data(), n, n), c.eps, c.root(), c.refine_tolerance);
                    if ((refined = attempt.accepted)) r = {std::move(attempt.root), std::move(attempt.basis)};
                }
                if (!refined) r = shampoo_inverse_root(d, c.eps, c.root());
                if (!commit_preconditioner(out, r.root)) ++rejected;
                else if (c.refine_tolerance > 0) commit_preconditioner(basis, r.basis);
            };
            root_of(s.left, br, s.left_root, s.left_basis);
            root_of(s.right, bc, s.right_root, s.right_basis);
        }
        // Filtered gradient and grafting direction.
        Dense filtered_hat(br, bc), graft(br, bc);
        for (size_t i = 0; i < filtered_hat.values.size(); ++i) {
            const double gi = g.values[i];
            s.filtered[i] = float(c.beta1 * s.filtered[i] + (1 - c.beta1) * gi);
            filtered_hat.values[i] = s.filtered[i] / bias1;
            if (c.adam_grafting) {
                s.graft_sq[i] = float(c.graft_beta2 * s.graft_sq[i] + (1 - c.graft_beta2) * gi * gi);
                graft.values[i] = filtered_hat.values[i] / (std::sqrt(s.graft_sq[i] / graft_bias2) + c.graft_eps);
            } else {
                graft.values[i] = filtered_hat.values[i];
            }
        }
        Dense direction = graft;
        if (step >= c.start_step() && step >= c.precondition_frequency) {
            Dense lroot(br, br), rroot(bc, bc);
            for (size_t i = 0; i < lroot.values.size(); ++i) lroot.values[i] = s.left_root[i];
            for (size_t i = 0; i < rroot.values.size(); ++i) rroot.values[i] = s.right_root[i];
            direction = matmul(matmul(lroot, filtered_hat), rroot);
            if (c.adam_grafting) {
                const double shampoo_norm = frobenius_norm(direction);
                const double graft_norm = frobenius_norm(graft);
                const double ratio = shampoo_norm > 0 ? graft_norm / shampoo_norm : 0.0;
                for (double& x : direction.values) x *= ratio;
            }
        }
        if (c.momentum > 0) {
            for (size_t i = 0; i < direction.values.size(); ++i) {
                s.momentum[i] = float(c.momentum * s.momentum[i] + direction.values[i]);
                direction.values[i] = c.nesterov ? direction.values[i] + c.momentum * s.momentum[i] : s.momentum[i];
            }
        }
        for (int r = 0; r < br; ++r)
            for (int j = 0; j < bc; ++j) {
                float& p = param[size_t(b.row0 + r) * cols + b.col0 + j];
                p = float(double(p) * (1 - lr * weight_decay) - lr * direction(r, j));
            }
    }
    return rejected;
}

}  // namespace qopt
