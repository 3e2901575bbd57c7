// PSGD-Kron on the GPU: the CPU reference's step (optim/psgd.hpp) over groups of same-shape
// matrices, with the schedule's decisions shared by all (as the reference). Per step and
// group: momentum (one element-wise pass), the preconditioned update Q1^T Q1 D Q2^T Q2 (2
// batched GEMMs with the products Q^T Q kept until the factors change, or 4 triangular
// products chained where the factors change too often for that to pay, which
// psgd_products_pay_off decides), its RMS clip (per-matrix sums of squares) and the apply
// pass. On the steps the schedule picks, the factor update: the probe V (the same
// counter-based normal numbers as the CPU), A = Q1 D Q2^T (2 factor products), B = Q1^-T V
// Q2^-1 (2 batched triangular solves), the four Gram matrices (GroupGemm::gram), the
// spectral-norm lower bound (one block per matrix) and Q <- (I - triu(.)) Q (a product of two
// upper-triangular matrices). Products with a factor of 512 and more skip its zero blocks
// (GEMMs over the blocks of the triangle), below that they are batched GEMMs.
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
// change of the factors. For gpt2-124m's 3072 x 768 matrices the products pay off from ~10
// steps on: during PSGD's first ~500 steps (an update at every step) every step is chained,
// which saves the 3072^3 product per update; at the 0.03 floor the P's are kept.
bool psgd_products_pay_off(int m, int n, double steps_until_change) {
    const double chained = 2 * factor_product_cost(m, n) + 2 * factor_product_cost(n, m);
    const double with_products = double(m) * m * n + double(m) * n * n;
    const double forming = factor_product_cost(m, m) + factor_product_cost(n, n);
    return forming < steps_until_change * (chained - with_products);
}

namespace {

class GpuPsgd final : public GpuMatrixMethod {
public:
    GpuPsgd(const Routing& routing, const OptimizerConfig& config)
        : config_(config.psgd), weight_decay_(config.weight_decay()), gemm_{config.precond_tf32} {
        groups_ = group_tiles(routing);
        for (TileGroup& g : groups_) {
            const int m = g.rows, n = g.cols, count = g.count();
            const auto [left_diagonal, right_diagonal] = config_.diagonal_factors(m, n);
            QOPT_CHECK(!left_diagonal && !right_diagonal, "PSGD on the GPU: the ", m, " x ", n,
                       " matrices would get a diagonal factor (--psgd-memory-save-mode ", config_.memory_save_mode,
                       ", --psgd-max-size-triangular ", config_.max_size_triangular, ", --psgd-min-ndim-triangular ",
                       config_.min_ndim_triangular, "), which only the CPU implements so far (--device cpu)");
            State& s = state_.emplace_back();
            // Initial state exactly as the CPU's (identity factors times sqrt(init_scale)).
            PsgdMatrixState initial;
            initial.init(m, n, config_);
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
            s.left_product.resize(left.size());
            s.right_product.resize(right.size());
        }
        const GroupScratch sizes = group_scratch(groups_);
        for (DeviceBuffer<float>* b : {&debiased_, &probe_, &work_t_, &work_a_, &work_b_}) b->resize(sizes.work);
        for (DeviceBuffer<float>* b : {&factor_a_, &factor_b_, &factor_c_}) b->resize(sizes.factor);
        bound_work_.resize(3 * sizes.dim);
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
                max_abs_gpu(scalars, s.q_left.data(), count, int64_t(m) * m);
                max_abs_gpu(scalars + count, s.q_right.data(), count, int64_t(n) * n);
                psgd_balance_gpu(s.q_left.data(), s.q_right.data(), scalars, scalars + count, count, int64_t(m) * m,
                                 int64_t(n) * n);
            }
            if (decision.update) update_preconditioner(g, s, step, c.momentum_into_precond_update ? d : g.grads.data());
            if (decision.update || decision.balance) s.products_current = false;
            // U = Q1^T Q1 D Q2^T Q2 -> work_a: as P1 D P2 with P1 = Q1^T Q1 and P2 = Q2^T Q2 kept
            // until the factors change, where forming them pays for itself before then.
            if (!s.products_current && psgd_products_pay_off(m, n, steps_until_change)) {
                upper_product(s.left_product.data(), s.q_left.data(), true, s.q_left.data(), m, m, count);
                upper_product(s.right_product.data(), s.q_right.data(), true, s.q_right.data(), n, n, count);
                s.products_current = true;
            }
            if (s.products_current) {
                gemm_(work_t_.data(), s.left_product.data(), false, d, false, m, n, m, count);
                gemm_(work_a_.data(), work_t_.data(), false, s.right_product.data(), false, m, n, n, count);
            } else {
                upper_product(work_t_.data(), s.q_left.data(), false, d, m, n, count);
                product_upper(work_a_.data(), work_t_.data(), s.q_right.data(), true, m, n, count);
                upper_product(work_t_.data(), s.q_left.data(), true, work_a_.data(), m, n, count);
                product_upper(work_a_.data(), work_t_.data(), s.q_right.data(), false, m, n, count);
            }
            sum_squares_gpu(scalars, work_a_.data(), count, size);
            psgd_clip_scale_gpu(scalars, scalars, count, size);
            apply_tiles_gpu(params, params_bf16, work_a_.data(), scalars, nullptr, 0.0f, false, g.table.data(), count,
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
            fn(g, "q_left", {m, m}, s.q_left);
            fn(g, "q_right", {n, n}, s.q_right);
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
        DeviceBuffer<float> momentum, q_left, q_right;
        DeviceBuffer<float> left_product, right_product;  // Q1^T Q1, Q2^T Q2 (derived, not saved)
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
        // A = Q1 X Q2^T -> work_a;  B = Q1^-T V Q2^-1 -> work_b.
        upper_product(work_t_.data(), s.q_left.data(), false, x, m, n, count);
        product_upper(work_a_.data(), work_t_.data(), s.q_right.data(), true, m, n, count);
        CUDA_CHECK(cudaMemcpy(work_b_.data(), probe_.data(), size_t(size) * count * sizeof(float),
                              cudaMemcpyDeviceToDevice));
        solve_upper_transposed_left_batched_gpu(work_b_.data(), s.q_left.data(), m, n, count);
        solve_upper_right_batched_gpu(work_b_.data(), s.q_right.data(), m, n, count);
        // Q1 -= lr_p / lb(AA^T + BB^T) triu(AA^T - BB^T) Q1, then Q2 likewise with A^T A, B^T B.
        gemm_.gram(factor_a_.data(), work_a_.data(), false, m, n, count, 1.0f, 0.0f);
        gemm_.gram(factor_b_.data(), work_b_.data(), false, m, n, count, 1.0f, 0.0f);
        update_factor(s.q_left, m, count);
        gemm_.gram(factor_a_.data(), work_a_.data(), true, n, m, count, 1.0f, 0.0f);
        gemm_.gram(factor_b_.data(), work_b_.data(), true, n, m, count, 1.0f, 0.0f);
        update_factor(s.q_right, n, count);
    }

    // With t1 in factor_a, t2 in factor_b: q = (I - triu(t1 - t2) lr_p / lb(t1 + t2)) q, taken
    // only where it came out finite.
    void update_factor(DeviceBuffer<float>& q, int n, int count) {
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

std::unique_ptr<GpuMatrixMethod> make_gpu_psgd(const Routing& routing, const OptimizerConfig& config) {
    return std::make_unique<GpuPsgd>(routing, config);
}

}  // namespace qopt
