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
    QOPT_CHECK(beta3 == -1.0 || (beta3 >= 0 && beta3 < 1), "--shampoo-beta3 must be -1 (beta1) or in [0, 1)");
    QOPT_CHECK(dampening >= 0 && dampening < 1, "--shampoo-dampening must be in [0, 1)");
    QOPT_CHECK(block_size > 0, "--shampoo-block-size must be positive");
    QOPT_CHECK(precondition_frequency > 0, "--shampoo-precondition-frequency must be positive");
    QOPT_CHECK(start_preconditioning_step == -1 || start_preconditioning_step >= precondition_frequency,
               "--shampoo-start-step must be -1 or at least --shampoo-precondition-frequency (as the reference)");
    QOPT_CHECK(inverse_root >= 0, "--shampoo-inverse-root must be >= 0 (0: 4 for matrices)");
    QOPT_CHECK(graft_beta2 > 0 && graft_beta2 <= 1 && graft_eps > 0, "bad Shampoo grafting settings");
    QOPT_CHECK(eigen_tolerance >= 0 && eigen_tolerance <= 1, "--shampoo-eigen-tolerance must be in [0, 1]");
    QOPT_CHECK(qr_iterations >= 1, "--shampoo-qr-iterations must be at least 1");
    // One refresh pending at a time: its roots take effect before the next refresh.
    const int most_lag = std::min(precondition_frequency, first_refresh_gap()) - 1;
    QOPT_CHECK(refresh_lag >= 0 && refresh_lag <= most_lag, "--shampoo-refresh-lag must be in [0, ", most_lag,
               "] (below the steps between refreshes)");
    QOPT_CHECK(refresh_lag == 0 || !keeps_eigenbasis(),
               "--shampoo-refresh-lag needs the full eigendecomposition refresh (--shampoo-eigen-method eigh, "
               "--shampoo-eigen-tolerance 0)");
}

Json ShampooConfig::to_json() const {
    Json j = Json::object();
    j["lr"] = lr;
    j["beta1"] = beta1;
    j["beta2"] = beta2;
    j["eps"] = eps;
    j["beta3"] = step_beta3();
    j["bias_correction"] = bias_correction;
    j["momentum"] = momentum;
    j["nesterov"] = nesterov;
    j["dampening"] = dampening;
    j["weight_decay_type"] = shampoo_decay_name(decay_type);
    j["block_size"] = int64_t(block_size);
    j["precondition_frequency"] = int64_t(precondition_frequency);
    j["start_preconditioning_step"] = int64_t(start_step());
    j["inverse_root"] = int64_t(root());
    j["grafting"] = shampoo_grafting_name(grafting);
    j["graft_drop_weighting"] = graft_drop_weighting;
    j["graft_beta2"] = graft_beta2;
    j["graft_eps"] = graft_eps;
    j["eigen_method"] = shampoo_eigen_method_name(eigen_method);
    j["eigen_tolerance"] = eigen_tolerance;
    if (eigen_method == ShampooEigenMethod::qr) j["qr_iterations"] = int64_t(qr_iterations);
    j["refresh_lag"] = int64_t(refresh_lag);
    return j;
}

const char* shampoo_decay_name(ShampooDecay type) {
    switch (type) {
        case ShampooDecay::l2: return "l2";
        case ShampooDecay::decoupled: return "decoupled";
        case ShampooDecay::corrected: return "corrected";
        case ShampooDecay::independent: return "independent";
    }
    return "decoupled";
}

const char* shampoo_eigen_method_name(ShampooEigenMethod method) {
    return method == ShampooEigenMethod::qr ? "qr" : "eigh";
}

const char* shampoo_grafting_name(ShampooGrafting type) {
    switch (type) {
        case ShampooGrafting::none: return "none";
        case ShampooGrafting::sgd: return "sgd";
        case ShampooGrafting::adagrad: return "adagrad";
        case ShampooGrafting::rmsprop: return "rmsprop";
        case ShampooGrafting::adam: return "adam";
    }
    return "adam";
}

double ShampooConfig::graft_divisor(long step) const {
    const bool corrected = grafting == ShampooGrafting::adam && !graft_drop_weighting && graft_beta2 < 1;
    return corrected ? 1 - std::pow(graft_beta2, double(step)) : 1.0;
}

double ShampooConfig::filter_divisor(long step) const {
    if (!bias_correction) return 1.0;
    const double b3 = step_beta3();
    return b3 == beta1 ? 1 - std::pow(beta1, double(step)) : 1 - b3 * std::pow(beta1, double(step - 1));
}

double ShampooConfig::decay_coefficient(double wd, double lr, double peak_lr) const {
    switch (decay_type) {
        case ShampooDecay::corrected: return wd * lr / peak_lr;
        case ShampooDecay::independent: return wd / peak_lr;
        default: return wd;
    }
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
    const bool kept = c.keeps_eigenbasis();
    auto identity = [&](std::vector<float>& vectors, std::vector<float>& values, int side) {
        vectors.assign(kept ? size_t(side) * side : 0, 0.0f);
        values.assign(kept ? size_t(side) : 0, 1.0f);
        for (size_t i = 0; kept && i < size_t(side); ++i) vectors[i * side + i] = 1.0f;
    };
    identity(left_vectors, left_values, b.block_rows);
    identity(right_vectors, right_values, b.block_cols);
    pending_left_root.assign(c.refresh_lag > 0 ? left.size() : 0, 0.0f);
    pending_right_root.assign(c.refresh_lag > 0 ? right.size() : 0, 0.0f);
}

Dense shampoo_inverse_root(const SymmetricEigen& e, double eps, int root) {
    const double shift = std::min(*std::min_element(e.values.begin(), e.values.end()), 0.0);
    const int n = e.vectors.rows;
    Dense scaled = e.vectors;
    for (int j = 0; j < n; ++j) {
        const double power = std::pow(e.values[j] - shift + eps, -1.0 / root);
        for (int r = 0; r < n; ++r) scaled(r, j) *= power;
    }
    return matmul(scaled, e.vectors, false, true);
}

Dense shampoo_inverse_root(const Dense& a, double eps, int root) {
    return shampoo_inverse_root(symmetric_eigen(a), eps, root);
}

bool eigenbasis_within_tolerance(const Dense& b, double tolerance) {
    double total = 0, off_diagonal = 0;
    for (int r = 0; r < b.rows; ++r)
        for (int c = 0; c < b.cols; ++c) {
            const double x2 = b(r, c) * b(r, c);
            total += x2;
            if (r != c) off_diagonal += x2;
        }
    return std::sqrt(off_diagonal) <= tolerance * std::sqrt(total);
}

SymmetricEigen shampoo_amortized_eigen(const Dense& a, const Dense& kept_vectors, const ShampooConfig& c,
                                       EigenRefreshCounts* counts) {
    Dense b = matmul(kept_vectors, matmul(a, kept_vectors), true, false);
    SymmetricEigen e{{}, kept_vectors};
    if (c.eigen_method == ShampooEigenMethod::eigh) {
        const bool within = eigenbasis_within_tolerance(b, c.eigen_tolerance);
        if (counts) ++(within ? counts->kept : counts->decomposed);
        if (!within) return symmetric_eigen(a);
    } else {
        // The unshifted QR algorithm: B = Q R, B <- R Q = Q^T B Q keeps B similar to a, V <- V Q.
        for (int i = 0; i < c.qr_iterations && !eigenbasis_within_tolerance(b, c.eigen_tolerance); ++i) {
            const Dense q = householder_q(b);
            b = matmul(q, matmul(b, q), true, false);
            e.vectors = matmul(e.vectors, q);
        }
    }
    e.values.resize(size_t(b.rows));
    for (int j = 0; j < b.rows; ++j) e.values[size_t(j)] = b(j, j);
    if (c.eigen_method == ShampooEigenMethod::qr) {
        // The reference then sorts the pairs by ascending value (stable). The QR algorithm is not
        // permutation-equivariant, so this order is where the next refresh starts from.
        const std::vector<int> order = ascending_order(e.values);
        SymmetricEigen sorted{std::vector<double>(e.values.size()), Dense(b.rows, b.rows)};
        for (int j = 0; j < b.rows; ++j) {
            sorted.values[size_t(j)] = e.values[size_t(order[size_t(j)])];
            for (int r = 0; r < b.rows; ++r) sorted.vectors(r, j) = e.vectors(r, order[size_t(j)]);
        }
        return sorted;
    }
    return e;
}

int shampoo_update_cpu(float* param, const float* grad, std::vector<ShampooBlockState>& states, int rows, int cols,
                        double lr, double decay, long step, const ShampooConfig& c,
                        EigenRefreshCounts* counts) {
    const auto blocks = shampoo_blocks(rows, cols, c.block_size);
    QOPT_CHECK(states.size() == blocks.size(), "shampoo: state has ", states.size(), " blocks, expected ",
               blocks.size());
    const double bias1 = c.filter_divisor(step), beta3 = c.step_beta3();
    const bool l2 = c.decay_type == ShampooDecay::l2;
    const double direction_decay = l2 ? 0.0 : decay;
    const double graft_bias2 = c.graft_divisor(step), graft_keep = c.graft_keep(), graft_weight = c.graft_weight();
    const double factor_bias = c.beta2 < 1 ? 1 - std::pow(c.beta2, double(step)) : 1.0;
    int rejected = 0;
    for (size_t bi = 0; bi < blocks.size(); ++bi) {
        const ShampooBlock& b = blocks[bi];
        ShampooBlockState& s = states[bi];
        const int br = b.block_rows, bc = b.block_cols;
        Dense g(br, bc);
        for (int r = 0; r < br; ++r)
            for (int j = 0; j < bc; ++j) {
                const size_t at = size_t(b.row0 + r) * cols + b.col0 + j;
                g(r, j) = double(grad[at]) + (l2 ? decay * double(param[at]) : 0.0);
            }
        // Factors.
        const Dense ggt = matmul(g, g, false, true), gtg = matmul(g, g, true, false);
        auto accumulate = [&](std::vector<float>& f, const Dense& x) {
            for (size_t i = 0; i < f.size(); ++i)
                f[i] = c.beta2 < 1 ? float(c.beta2 * f[i] + (1 - c.beta2) * x.values[i]) : float(f[i] + x.values[i]);
        };
        accumulate(s.left, ggt);
        accumulate(s.right, gtg);
        if (c.refreshes_roots(step)) {
            auto root_of = [&](const std::vector<float>& f, int n, std::vector<float>& out, std::vector<float>& vectors,
                               std::vector<float>& values, std::vector<float>& pending) {
                Dense d(n, n);
                for (size_t i = 0; i < f.size(); ++i) d.values[i] = f[i] / factor_bias;
                // A non-finite factor has no root (and would only cost a full eigen sweep).
                const bool finite = all_finite(d);
                if (!c.keeps_eigenbasis()) {
                    const Dense root = finite ? shampoo_inverse_root(d, c.eps, c.root()) : Dense(n, n, NAN);
                    if (c.refresh_lag > 0)
                        store_floats(root, pending);  // checked when it takes effect
                    else if (!commit_preconditioner(out, root))
                        ++rejected;
                    return;
                }
                if (!finite) {
                    if (!commit_preconditioner(out, Dense(n, n, NAN))) ++rejected;
                    return;
                }
                const SymmetricEigen e = shampoo_amortized_eigen(d, dense_from(vectors.data(), n, n), c, counts);
                if (!commit_preconditioner(out, shampoo_inverse_root(e, c.eps, c.root()))) {
                    ++rejected;
                    return;  // the eigenbasis stays with the root it made
                }
                store_floats(e.vectors, vectors);
                for (int j = 0; j < n; ++j) values[size_t(j)] = float(e.values[size_t(j)]);
            };
            root_of(s.left, br, s.left_root, s.left_vectors, s.left_values, s.pending_left_root);
            root_of(s.right, bc, s.right_root, s.right_vectors, s.right_values, s.pending_right_root);
        }
        if (c.switches_roots(step)) {
            if (!commit_preconditioner(s.left_root, dense_from(s.pending_left_root.data(), br, br))) ++rejected;
            if (!commit_preconditioner(s.right_root, dense_from(s.pending_right_root.data(), bc, bc))) ++rejected;
        }
        // Filtered gradient and grafting direction.
        Dense filtered_hat(br, bc), graft(br, bc);
        for (size_t i = 0; i < filtered_hat.values.size(); ++i) {
            const double gi = g.values[i], filtered_before = s.filtered[i];
            s.filtered[i] = float(c.beta1 * filtered_before + (1 - c.beta1) * gi);
            // The reference reuses F itself when beta3 = beta1.
            const double d = beta3 == c.beta1 ? double(s.filtered[i]) : beta3 * filtered_before + (1 - beta3) * gi;
            filtered_hat.values[i] = d / bias1;
            if (c.graft_second_moment()) {
                s.graft_sq[i] = float(graft_keep * s.graft_sq[i] + graft_weight * gi * gi);
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
            if (c.grafts()) {
                const double shampoo_norm = frobenius_norm(direction);
                const double graft_norm = frobenius_norm(graft);
                const double ratio = shampoo_norm > 0 ? graft_norm / shampoo_norm : 0.0;
                for (double& x : direction.values) x *= ratio;
            }
        }
        // Decoupled decay joins the direction before momentum (the reference's _apply_weight_decay
        // then _apply_classic_momentum): without momentum, W (1 - lr wd) - lr D.
        for (int r = 0; r < br; ++r)
            for (int j = 0; j < bc; ++j)
                direction(r, j) += direction_decay * param[size_t(b.row0 + r) * cols + b.col0 + j];
        if (c.momentum > 0) {
            const double undamped = 1 - c.dampening;
            for (size_t i = 0; i < direction.values.size(); ++i) {
                s.momentum[i] = float(c.momentum * s.momentum[i] + undamped * direction.values[i]);
                direction.values[i] =
                    c.nesterov ? undamped * direction.values[i] + c.momentum * s.momentum[i] : s.momentum[i];
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
