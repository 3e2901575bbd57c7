// PSGD-Kron on the GPU: the CPU reference's step (optim/psgd.hpp) over groups of same-shape
// matrices, with the schedule's decisions shared by all (as the reference). Per step and
// group: momentum (one element-wise pass), the preconditioned update Q1^T Q1 D Q2^T Q2 (2
// batched GEMMs with the products Q^T Q kept until the factors change, or 4 triangular
// products chained where the factors change too often for that to pay, which
// psgd_products_pay_off decides), its RMS clip (per-matrix sums of squares) and the apply
// pass. On the steps the schedule picks, the factor update: the probe V (the same
// counter-based normal numbers as the CPU), A = Q1 D Q2^T (2 factor products), B = Q1^-T V
// Q2^-1 (2 batched triangular solves), the four Gram matrices (GroupGemm::gram), the
// spectral-norm lower bound (passes over columns and rows) and Q <- (I - triu(.)) Q (a product
// of two upper-triangular matrices). Products with a factor of 512 and more skip its zero blocks
// (GEMMs over the blocks of the triangle), below that they are batched GEMMs. A diagonal factor
// (the memory-saving rules: a vector q) enters each of U, A and B as one scaling pass over rows
// or columns (q^2, q, 1/q), its Gram matrix is the rows' (columns') sums of squares and its
// update one element-wise pass.
#include <algorithm>
#include <cmath>

#include "core/error.hpp"
#include "kernels/cuda_common.cuh"
#include "optim/gpu_matrix_method.hpp"
#include "optim/preconditioner_kernels.hpp"

namespace qopt {

namespace {

// Products with a factor of at least kTriangularProductMin go by GEMMs over its blocks that are
// not zero (kernels/gpu.hpp; 58% of a GEMM's multiply-adds at 3072, 67% at 768, and faster
// there by measurement), below that (a single block of 256) as one batched GEMM.
constexpr int kTriangularProductMin = 512;
bool blocked(int n) { return n >= kTriangularProductMin; }

// Multiply-adds of a k x k factor times a k x l matrix.
double factor_product_cost(int k, int l) {
    return double(k) * k * l * (blocked(k) ? upper_triangular_product_fraction(k) : 1.0);
}

}  // namespace

// Counted in multiply-adds per matrix: the chained Q1^T (Q1 D Q2^T) Q2 costs four factor
// products, 2 f(m, n) + 2 f(n, m) with f(k, l) = k^2 l (times the blocked products' share);
// P1 D P2 costs m^2 n + m n^2 (dense P), after f(m, m) + f(n, n) to form P1 and P2 once per
// change of the factors. A diagonal factor is a scaling either way and drops out of all three.
// For gpt2-124m's 3072 x 768 matrices the products pay off from ~10 steps on: during PSGD's
// first ~500 steps (an update at every step) every step is chained, which saves the 3072^3
// product per update; at the 0.03 floor the P's are kept.
bool psgd_products_pay_off(int m, int n, double steps_until_change, bool left_diagonal, bool right_diagonal) {
    const double left = left_diagonal ? 0.0 : 1.0, right = right_diagonal ? 0.0 : 1.0;
    const double chained = left * 2 * factor_product_cost(m, n) + right * 2 * factor_product_cost(n, m);
    const double with_products = left * double(m) * m * n + right * double(m) * n * n;
    const double forming = left * factor_product_cost(m, m) + right * factor_product_cost(n, n);
    return forming < steps_until_change * (chained - with_products);
}

namespace {

class GpuPsgd final : public GpuMatrixMethod {
public:
    GpuPsgd(const Routing& routing, const OptimizerConfig& config, const std::vector<bool>* owned_matrices)
        : config_(config.psgd), weight_decay_(config.weight_decay()), gemm_{config.precond_tf32} {
        groups_ = group_tiles(routing, 0, owned_matrices);
        for (TileGroup& g : groups_) {
            const int m = g.rows, n = g.cols, count = g.count();
            State& s = state_.emplace_back();
            // Initial state exactly as the CPU's (identity factors times sqrt(init_scale), or
            // vectors of it where the memory-saving rules make a factor diagonal).
            PsgdMatrixState initial;
            initial.init(m, n, config_);
            s.left_diagonal = initial.left_diagonal;
            s.right_diagonal = initial.right_diagonal;
            std::vector<float> momentum, left, right;
            for (int t = 0; t < count; ++t) {
                momentum.insert(momentum.end(), initial.momentum.begin(), initial.momentum.end());
                left.insert(left.end(), initial.q_left.begin(), initial.q_left.end());
                right.insert(right.end(), initial.q_right.begin(), initial.q_right.end());
            }
            s.momentum.upload(momentum);
            s.q_left.upload(left);
            s.q_right.upload(right);
            s.matrix_index.upload(g.matrix_index);
            if (!s.left_diagonal) s.left_product.resize(left.size());
            if (!s.right_diagonal) s.right_product.resize(right.size());
        }
        const GroupScratch sizes = group_scratch(groups_);
        for (DeviceBuffer<float>* b : {&debiased_, &probe_, &work_t_, &work_a_, &work_b_}) b->resize(sizes.work);
        for (DeviceBuffer<float>* b : {&factor_a_, &factor_b_, &factor_c_}) b->resize(sizes.factor);
        size_t bound_work = 0;
        for (const TileGroup& g : groups_)
            bound_work = std::max({bound_work, psgd_norm_lower_bound_work(g.rows, g.count()),
                                   psgd_norm_lower_bound_work(g.cols, g.count())});
        bound_work_.resize(bound_work);
        scalars_.resize(4 * std::max<size_t>(1, sizes.dim));
    }

    void step(float* params, const float* grads, double lr, double grad_scale, bf16* params_bf16, long step) override {
        const PsgdConfig& c = config_;
        const PsgdSchedule::Decision decision = schedule_.next(c);
        const double debias = 1 - std::pow(c.beta1, double(step));
        // The factors change on an update step, which comes with the schedule's probability p:
        // from this step on they are expected to stay for 1/p steps (this one included).
        const double steps_until_change = 1.0 / c.update_probability(schedule_.prob_step);
        for (size_t gi = 0; gi < groups_.size(); ++gi) {
            TileGroup& g = groups_[gi];
            State& s = state_[gi];
            const int m = g.rows, n = g.cols, count = g.count();
            const int64_t size = int64_t(g.tile_size());
            g.gather(grads, float(grad_scale));
            float* d = debiased_.data();
            psgd_momentum_gpu(d, s.momentum.data(), g.grads.data(), size * count, float(c.beta1), float(debias));
            float* scalars = scalars_.data();
            if (decision.balance) {
                const int64_t left_size = int64_t(m) * (s.left_diagonal ? 1 : m);
                const int64_t right_size = int64_t(n) * (s.right_diagonal ? 1 : n);
                max_abs_gpu(scalars, s.q_left.data(), count, left_size);
                max_abs_gpu(scalars + count, s.q_right.data(), count, right_size);
                psgd_balance_gpu(s.q_left.data(), s.q_right.data(), scalars, scalars + count, count, left_size,
                                 right_size);
            }
            if (decision.update) update_preconditioner(g, s, step, c.momentum_into_precond_update ? d : g.grads.data());
            if (decision.update || decision.balance) s.products_current = false;
            precondition(g, s, d, steps_until_change);
            sum_squares_gpu(scalars, work_a_.data(), count, size);
            psgd_clip_scale_gpu(scalars, scalars, count, size);
            apply_tiles_gpu(params, params_bf16, work_a_.data(), scalars, nullptr, 0.0f, 0.0f, false, g.table.data(), count,
                            m, n, 0.0f, float(1 - lr * weight_decay_), float(lr));
        }
    }

    void save(OptimizerState& state) const override {
        state.extra["psgd_schedule"] = schedule_.to_json();
        GpuMatrixMethod::save(state);
    }

    void load(const OptimizerState& state) override {
        QOPT_CHECK(state.extra.contains("psgd_schedule"), "the checkpoint's PSGD state has no psgd_schedule");
        schedule_ = PsgdSchedule::from_json(state.extra.at("psgd_schedule"));
        GpuMatrixMethod::load(state);
        for (State& s : state_) s.products_current = false;
    }

    void visit_state(const StateVisitor& fn) override {
        for (size_t gi = 0; gi < groups_.size(); ++gi) {
            const TileGroup& g = groups_[gi];
            State& s = state_[gi];
            const int64_t m = g.rows, n = g.cols;
            fn(g, "momentum", {m, n}, s.momentum);
            fn(g, "q_left", s.left_diagonal ? std::vector<int64_t>{m} : std::vector<int64_t>{m, m}, s.q_left);
            fn(g, "q_right", s.right_diagonal ? std::vector<int64_t>{n} : std::vector<int64_t>{n, n}, s.q_right);
        }
    }

    size_t scratch_bytes() const override {
        size_t floats = 0;
        for (const State& s : state_) floats += s.left_product.size() + s.right_product.size();
        floats += debiased_.size() + probe_.size() + work_t_.size() + work_a_.size() + work_b_.size() +
                        factor_a_.size() + factor_b_.size() + factor_c_.size() + bound_work_.size() + scalars_.size();
        for (const TileGroup& g : groups_) floats += g.grads.size();
        return floats * sizeof(float);
    }

private:
    struct State {
        DeviceBuffer<float> momentum, q_left, q_right;  // q_left [m, m], or [m] when diagonal; q_right alike
        DeviceBuffer<float> left_product, right_product;  // Q1^T Q1, Q2^T Q2 (derived, not saved; triangular only)
        bool left_diagonal = false, right_diagonal = false;
        bool products_current = false;
        DeviceBuffer<int> matrix_index;
    };

    // x (the debiased momentum or the gradient) is perturbed in place, as the reference does.
    void update_preconditioner(TileGroup& g, State& s, long step, float* x) {
        const PsgdConfig& c = config_;
        const int m = g.rows, n = g.cols, count = g.count();
        const int64_t size = int64_t(g.tile_size());
        float* mean_abs = scalars_.data() + 2 * size_t(count);
        mean_abs_gpu(mean_abs, x, count, size);
        psgd_probe_perturb_gpu(probe_.data(), x, mean_abs, s.matrix_index.data(), count, size, c.seed, step,
                               std::sqrt(1.1920928955078125e-07f));
        // A = Q1 X Q2^T -> work_a: the triangular factors' products, then the diagonal ones'
        // scaling (which commutes with a product on the other side).
        const float* left_tri = s.left_diagonal ? nullptr : s.q_left.data();
        const float* right_tri = s.right_diagonal ? nullptr : s.q_right.data();
        if (left_tri && right_tri) {
            upper_product(work_t_.data(), left_tri, false, x, m, n, count);
            product_upper(work_a_.data(), work_t_.data(), right_tri, true, m, n, count);
        } else if (left_tri) {
            upper_product(work_a_.data(), left_tri, false, x, m, n, count);
        } else if (right_tri) {
            product_upper(work_a_.data(), x, right_tri, true, m, n, count);
        }
        scale_diagonal_sides(s, work_a_.data(), left_tri || right_tri ? work_a_.data() : x, 1, m, n, count);
        // B = Q1^-T V Q2^-1 -> work_b: the diagonal factors' scaling (or a copy of V), then the
        // triangular solves in place.
        if (s.left_diagonal || s.right_diagonal)
            scale_diagonal_sides(s, work_b_.data(), probe_.data(), -1, m, n, count);
        else
            CUDA_CHECK(cudaMemcpy(work_b_.data(), probe_.data(), size_t(size) * count * sizeof(float),
                                  cudaMemcpyDeviceToDevice));
        if (left_tri) solve_upper_transposed_left_batched_gpu(work_b_.data(), left_tri, m, n, count);
        if (right_tri) solve_upper_right_batched_gpu(work_b_.data(), right_tri, m, n, count);
        // Q1 -= lr_p / lb(AA^T + BB^T) triu(AA^T - BB^T) Q1, then Q2 likewise with A^T A, B^T B
        // (a diagonal factor: the Gram matrices' diagonals, element-wise).
        update_factor(s.q_left, s.left_diagonal, false, m, n, count);
        update_factor(s.q_right, s.right_diagonal, true, n, m, count);
    }

    // U = Q1^T Q1 D Q2^T Q2 -> work_a. Triangular factors: as P1 D P2 with P = Q^T Q kept until
    // the factors change, where forming them pays for itself before then, else chained through
    // the factors; then the diagonal factors' q^2 scaling.
    void precondition(TileGroup& g, State& s, const float* d, double steps_until_change) {
        const int m = g.rows, n = g.cols, count = g.count();
        const float* left_tri = s.left_diagonal ? nullptr : s.q_left.data();
        const float* right_tri = s.right_diagonal ? nullptr : s.q_right.data();
        if (!s.products_current &&
            psgd_products_pay_off(m, n, steps_until_change, s.left_diagonal, s.right_diagonal)) {
            if (left_tri) upper_product(s.left_product.data(), left_tri, true, left_tri, m, m, count);
            if (right_tri) upper_product(s.right_product.data(), right_tri, true, right_tri, n, n, count);
            s.products_current = true;
        }
        // The left side (into work_t, or straight into work_a without a right triangular factor).
        const float* x = d;
        if (left_tri) {
            float* out = right_tri ? work_t_.data() : work_a_.data();
            if (s.products_current) {
                gemm_(out, s.left_product.data(), false, d, false, m, n, m, count);
            } else {
                upper_product(work_b_.data(), left_tri, false, d, m, n, count);
                upper_product(out, left_tri, true, work_b_.data(), m, n, count);
            }
            x = out;
        }
        if (right_tri) {
            if (s.products_current) {
                gemm_(work_a_.data(), x, false, s.right_product.data(), false, m, n, n, count);
            } else {
                product_upper(work_b_.data(), x, right_tri, true, m, n, count);
                product_upper(work_a_.data(), work_b_.data(), right_tri, false, m, n, count);
            }
            x = work_a_.data();
        }
        if (s.left_diagonal || s.right_diagonal) scale_diagonal_sides(s, work_a_.data(), x, 2, m, n, count);
    }

    // out = in with rows scaled by q_left^power and columns by q_right^power where that factor is
    // diagonal (psgd_scale_rows_columns_gpu; out may be in).
    void scale_diagonal_sides(const State& s, float* out, const float* in, int power, int m, int n, int count) {
        psgd_scale_rows_columns_gpu(out, in, s.left_diagonal ? s.q_left.data() : nullptr,
                                    s.right_diagonal ? s.q_right.data() : nullptr, power, m, n, count);
    }

    // The factor q of side n (the left: A's rows; `columns`: the right, A's columns; A, B are
    // rows x n, or n x rows), taken only where the update came out finite:
    //   triangular: t1 = A A^T, t2 = B B^T (the side's Gram matrices);
    //               q = (I - triu(t1 - t2) lr_p / lb(t1 + t2)) q
    //   diagonal:   t1, t2 their diagonals; q -= lr_p (t1 - t2) q / max|t1 + t2|
    void update_factor(DeviceBuffer<float>& q, bool diagonal, bool columns, int n, int other, int count) {
        const int rows = columns ? other : n, cols = columns ? n : other;
        if (diagonal) {
            sums_of_squares_gpu(factor_a_.data(), work_a_.data(), rows, cols, count, columns);
            sums_of_squares_gpu(factor_b_.data(), work_b_.data(), rows, cols, count, columns);
            psgd_diagonal_factor_update_gpu(factor_c_.data(), q.data(), factor_a_.data(), factor_b_.data(), n, count,
                                            float(config_.precond_lr));
            commit_tiles(q.data(), factor_c_.data(), n, count, nullptr, true);
            return;
        }
        gemm_.gram(factor_a_.data(), work_a_.data(), columns, n, other, count, 1.0f, 0.0f);
        gemm_.gram(factor_b_.data(), work_b_.data(), columns, n, other, count, 1.0f, 0.0f);
        float* bound = scalars_.data() + 3 * size_t(count);
        psgd_norm_lower_bound_gpu(bound, factor_a_.data(), factor_b_.data(), bound_work_.data(), n, count);
        psgd_factor_multiplier_gpu(factor_c_.data(), factor_a_.data(), factor_b_.data(), bound, n, count,
                                   float(config_.precond_lr));
        // Both upper triangular (zeros below the diagonals): from kTriangularProductMin by GEMMs
        // over the blocks that are not zero, 26% of a GEMM's multiply-adds at 3072, 37% at 768.
        if (blocked(n))
            upper_triangular_square_product_batched_gpu(factor_a_.data(), factor_c_.data(), q.data(), n, count,
                                                        gemm_.tf32);
        else
            gemm_(factor_a_.data(), factor_c_.data(), false, q.data(), false, n, n, n, count);
        commit_tiles(q.data(), factor_a_.data(), n, count);
    }

    // out [n, cols] = op(u) b for upper-triangular u (the factors, their multipliers).
    void upper_product(float* out, const float* u, bool transpose_u, const float* b, int n, int cols, int count) {
        if (blocked(n))
            upper_triangular_product_batched_gpu(out, u, transpose_u, b, n, cols, count, gemm_.tf32);
        else
            gemm_(out, u, transpose_u, b, false, n, cols, n, count);
    }
    // out [rows, n] = b op(u), the same with u on the right.
    void product_upper(float* out, const float* b, const float* u, bool transpose_u, int rows, int n, int count) {
        if (blocked(n))
            product_with_upper_triangular_batched_gpu(out, b, u, transpose_u, rows, n, count, gemm_.tf32);
        else
            gemm_(out, b, false, u, transpose_u, rows, n, n, count);
    }

    PsgdConfig config_;
    double weight_decay_;
    GroupGemm gemm_;
    PsgdSchedule schedule_;
    std::vector<TileGroup> groups_;
    std::vector<State> state_;
    DeviceBuffer<float> debiased_, probe_, work_t_, work_a_, work_b_, factor_a_, factor_b_, factor_c_, bound_work_,
        scalars_;
};

}  // namespace

std::unique_ptr<GpuMatrixMethod> make_gpu_psgd(const Routing& routing, const OptimizerConfig& config,
                                               const std::vector<bool>* owned_matrices) {
    return std::make_unique<GpuPsgd>(routing, config, owned_matrices);
}

}  // namespace qopt
