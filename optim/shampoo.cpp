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
    QOPT_CHECK(start_preconditioning_step == -1 || start_preconditioning_step >= precondition_frequency,
               "--shampoo-start-step must be -1 or at least --shampoo-precondition-frequency (as the reference)");
    QOPT_CHECK(inverse_root >= 0, "--shampoo-inverse-root must be >= 0 (0: 4 for matrices)");
    QOPT_CHECK(graft_beta2 > 0 && graft_beta2 <= 1 && graft_eps > 0, "bad Shampoo grafting settings");
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
}

Dense shampoo_inverse_root(const Dense& a, double eps, int root) {
    SymmetricEigen e = symmetric_eigen(a);
    const double shift = std::min(e.values.back(), 0.0);  // values are descending
    const int n = a.rows;
    Dense scaled = e.vectors;
    for (int j = 0; j < n; ++j) {
        const double power = std::pow(e.values[j] - shift + eps, -1.0 / root);
        for (int r = 0; r < n; ++r) scaled(r, j) *= power;
    }
    return matmul(scaled, e.vectors, false, true);
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
        if (c.refreshes_roots(step)) {
            auto root_of = [&](const std::vector<float>& f, int n, std::vector<float>& out) {
                Dense d(n, n);
                for (size_t i = 0; i < f.size(); ++i) d.values[i] = f[i] / factor_bias;
                // A non-finite factor has no root (and would only cost a full eigen sweep).
                const Dense inv = all_finite(d) ? shampoo_inverse_root(d, c.eps, c.root()) : Dense(n, n, NAN);
                if (!commit_preconditioner(out, inv)) ++rejected;
            };
            root_of(s.left, br, s.left_root);
            root_of(s.right, bc, s.right_root);
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
        if (c.preconditions(step)) {
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
        // Decoupled decay joins the direction before momentum (the reference's _apply_weight_decay
        // then _apply_classic_momentum): without momentum, W (1 - lr wd) - lr D.
        for (int r = 0; r < br; ++r)
            for (int j = 0; j < bc; ++j) direction(r, j) += weight_decay * param[size_t(b.row0 + r) * cols + b.col0 + j];
        if (c.momentum > 0) {
            for (size_t i = 0; i < direction.values.size(); ++i) {
                s.momentum[i] = float(c.momentum * s.momentum[i] + direction.values[i]);
                direction.values[i] = c.nesterov ? direction.values[i] + c.momentum * s.momentum[i] : s.momentum[i];
            }
        }
        for (int r = 0; r < br; ++r)
            for (int j = 0; j < bc; ++j) {
                float& p = param[size_t(b.row0 + r) * cols + b.col0 + j];
                p = float(double(p) - lr * direction(r, j));
            }
    }
    return rejected;
}

}  // namespace qopt
