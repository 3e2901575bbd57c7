// SOAP on the GPU: the CPU reference's step (optim/soap.hpp) over groups of same-shape
// matrices. Per step and group: the rotation QL^T G QR and back (4 batched GEMMs), Adam in the
// rotated basis (one element-wise pass), the factor EMAs (GroupGemm::gram, beta = shampoo_beta),
// the weight update (one pass). Every precondition_frequency updates: M back to parameter
// space and into the new bases (4 GEMMs), and per factor one power-iteration step L Q (a GEMM),
// the eigenvalue estimates diag(Q^T L Q) (sorted as the reference sorts them, on the GPU) and
// a QR (qr_q_batched_gpu: Cholesky QR in float64, batched; the reference's torch.linalg.qr is
// Householder, and the two Q differ only in their columns' signs, to which SOAP's update is
// blind: the first moment goes through parameter space at every refresh and the second is a
// square). The first call takes full eigendecompositions
// (cuSOLVER, batched). A side longer than max_precond_dim has no factor (one-sided SOAP, as the
// reference): its rotation is the identity and its axis keeps its order at refreshes. Merged
// dimensions (merge_dims) run on the CPU only so far.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.hpp"
#include "kernels/cuda_common.cuh"
#include "optim/gpu_matrix_method.hpp"
#include "optim/preconditioner_kernels.hpp"

namespace qopt {

namespace {

class GpuSoap final : public GpuMatrixMethod {
public:
    GpuSoap(const Routing& routing, const OptimizerConfig& config, const std::vector<bool>* owned_matrices)
        : config_(config.soap), weight_decay_(config.weight_decay()), gemm_{config.precond_tf32} {
        groups_ = group_tiles(routing, 0, owned_matrices);
        for (TileGroup& g : groups_) {
            const int m = g.rows, n = g.cols, count = g.count();
            const SoapView view = soap_view(m, n, config_);
            QOPT_CHECK(view.rows == m, "SOAP on the GPU: a ", m, " x ", n, " matrix at --soap-max-precond-dim ",
                       config_.max_precond_dim, " with --soap-merge-dims would be merged into one dimension, which "
                       "only the CPU (--device cpu) runs so far");
            State& s = state_.emplace_back();
            s.has_left = view.left;
            s.has_right = view.right;
            const size_t left_size = view.left ? size_t(m) * m * count : 0;
            const size_t right_size = view.right ? size_t(n) * n * count : 0;
            zeroed(s.left, left_size);
            zeroed(s.right, right_size);
            zeroed(s.left_basis, left_size);
            zeroed(s.right_basis, right_size);
            zeroed(s.exp_avg, g.tile_size() * count);
            zeroed(s.exp_avg_sq, g.tile_size() * count);
        }
        const GroupScratch sizes = group_scratch(groups_);
        work_a_.resize(sizes.work);
        work_b_.resize(sizes.work);
        factor_a_.resize(sizes.factor);
        factor_b_.resize(sizes.factor);
        candidate_.resize(sizes.factor);
        values_.resize(sizes.dim);
        orders_.resize(2 * sizes.dim);
        size_t most_tiles = 0;
        for (const TileGroup& g : groups_) most_tiles = std::max(most_tiles, size_t(g.count()));
        accepted_.resize(most_tiles);
        // The first call's eigendecompositions and the refreshes' QRs: their workspaces now, so
        // that the memory check before training sees them.
        for (size_t gi = 0; gi < groups_.size(); ++gi) {
            const TileGroup& g = groups_[gi];
            for (const auto& [n, present] : {std::pair<int, bool>{g.rows, state_[gi].has_left},
                                             std::pair<int, bool>{g.cols, state_[gi].has_right}})
                if (present) {
                    reserve_symmetric_eigen_gpu(n, g.count(), factor_a_.data());
                    reserve_qr_q_gpu(n, g.count(), factor_a_.data());
                }
        }
    }

    void step(float* params, const float* grads, double lr, double grad_scale, bf16* params_bf16, long call) override {
        const SoapConfig& c = config_;
        const float factor_beta = float(c.factor_beta());
        for (size_t gi = 0; gi < groups_.size(); ++gi) {
            TileGroup& g = groups_[gi];
            State& s = state_[gi];
            const int m = g.rows, n = g.cols, count = g.count();
            g.gather(grads, float(grad_scale));
            const float* grad = g.grads.data();
            if (call == 1) {
                update_factors(g, s, factor_beta);
                // Initial bases, taken where finite (else the identity).
                if (s.has_left) {
                    symmetric_eigen_batched_gpu(candidate_.data(), values_.data(), s.left.data(), m, count,
                                                factor_a_.data());
                    commit_tiles(s.left_basis.data(), candidate_.data(), m, count);
                }
                if (s.has_right) {
                    symmetric_eigen_batched_gpu(candidate_.data(), values_.data(), s.right.data(), n, count,
                                                factor_a_.data());
                    commit_tiles(s.right_basis.data(), candidate_.data(), n, count);
                }
                continue;
            }
            const long t = call - 1;
            // rotated = QL^T G QR -> work_b; direction (in place) -> work_b; update = QL D QR^T -> work_b.
            rotate(work_b_.data(), grad, s, false, m, n, count);
            soap_adam_gpu(work_b_.data(), s.exp_avg.data(), s.exp_avg_sq.data(), work_b_.data(),
                          int64_t(g.tile_size()) * count, float(c.beta1), float(c.beta2), float(c.eps));
            rotate(work_b_.data(), work_b_.data(), s, true, m, n, count);
            const float* scale = nullptr;
            if (c.normalize_grads) {
                sum_squares_gpu(values_.data(), work_b_.data(), count, int64_t(g.tile_size()));
                inverse_rms_gpu(values_.data(), values_.data(), count, int64_t(g.tile_size()));
                scale = values_.data();
            }
            double step_size = lr;
            if (c.correct_bias)
                step_size *= std::sqrt(1 - std::pow(c.beta2, double(t))) / (1 - std::pow(c.beta1, double(t)));
            // The reference subtracts the step, then decays: W = (W - s U)(1 - lr wd).
            const double keep = 1 - lr * weight_decay_;
            apply_tiles_gpu(params, params_bf16, work_b_.data(), scale, nullptr, 0.0f, 0.0f, false, g.table.data(), count, m,
                            n, 0.0f, float(keep), float(step_size * keep));
            update_factors(g, s, factor_beta);
            if (t % c.precondition_frequency == 0) refresh(g, s);
        }
    }

    void visit_state(const StateVisitor& fn) override {
        for (size_t gi = 0; gi < groups_.size(); ++gi) {
            const TileGroup& g = groups_[gi];
            State& s = state_[gi];
            const int64_t m = g.rows, n = g.cols;
            if (s.has_left) fn(g, "left", {m, m}, s.left);
            if (s.has_right) fn(g, "right", {n, n}, s.right);
            if (s.has_left) fn(g, "left_basis", {m, m}, s.left_basis);
            if (s.has_right) fn(g, "right_basis", {n, n}, s.right_basis);
            fn(g, "exp_avg", {m, n}, s.exp_avg);
            fn(g, "exp_avg_sq", {m, n}, s.exp_avg_sq);
        }
    }

    size_t scratch_bytes() const override {
        size_t bytes = (work_a_.size() + work_b_.size() + factor_a_.size() + factor_b_.size() + candidate_.size() +
                        values_.size()) *
                       sizeof(float);
        for (const TileGroup& g : groups_) bytes += g.grads.size() * sizeof(float);
        return bytes + (orders_.size() + accepted_.size()) * sizeof(int);
    }

private:
    struct State {
        bool has_left = true, has_right = true;  // false: no factor on that side (identity basis)
        DeviceBuffer<float> left, right, left_basis, right_basis, exp_avg, exp_avg_sq;
    };

    // L = b L + (1 - b) G G^T,  R = b R + (1 - b) G^T G, for the sides with a factor.
    void update_factors(TileGroup& g, State& s, float beta) {
        const int m = g.rows, n = g.cols, count = g.count();
        if (s.has_left) gemm_.gram(s.left.data(), g.grads.data(), false, m, n, count, 1 - beta, beta);
        if (s.has_right) gemm_.gram(s.right.data(), g.grads.data(), true, n, m, count, 1 - beta, beta);
    }

    // out = QL^T x QR (into the bases) or QL x QR^T (back), a side without a factor the
    // identity. x may be out; work_a_ holds the product in between (so neither may be work_a_).
    void rotate(float* out, const float* x, const State& s, bool back, int m, int n, int count) {
        const size_t bytes = size_t(m) * n * count * sizeof(float);
        const float* current = x;
        if (s.has_left) {
            gemm_(work_a_.data(), s.left_basis.data(), !back, current, false, m, n, m, count);
            current = work_a_.data();
        }
        if (s.has_right) {
            if (current == out) {  // no left product: the GEMM may not read its own output
                CUDA_CHECK(cudaMemcpy(work_a_.data(), current, bytes, cudaMemcpyDeviceToDevice));
                current = work_a_.data();
            }
            gemm_(out, current, false, s.right_basis.data(), back, m, n, n, count);
        } else if (current != out) {
            CUDA_CHECK(cudaMemcpy(out, current, bytes, cudaMemcpyDeviceToDevice));
        }
    }

    // New bases for the group; exp_avg follows them, exp_avg_sq's axes are permuted as the
    // bases' columns were sorted.
    void refresh(TileGroup& g, State& s) {
        const int m = g.rows, n = g.cols, count = g.count();
        // M in parameter space: QL M QR^T -> work_b.
        rotate(work_b_.data(), s.exp_avg.data(), s, true, m, n, count);
        int* left_order = orders_.data();
        int* right_order = orders_.data() + size_t(m) * count;
        auto refresh_side = [&](bool present, const float* factor, float* basis, int* order, int size) {
            if (present) {
                refresh_basis(factor, basis, order, size, count);
                return;
            }
            identity_order_where_rejected_gpu(order, nullptr, size, count);  // no factor: the axis keeps its order
        };
        refresh_side(s.has_left, s.left.data(), s.left_basis.data(), left_order, m);
        refresh_side(s.has_right, s.right.data(), s.right_basis.data(), right_order, n);
        permute_rows_columns_gpu(work_a_.data(), s.exp_avg_sq.data(), left_order, right_order, m, n, count);
        CUDA_CHECK(cudaMemcpy(s.exp_avg_sq.data(), work_a_.data(), g.tile_size() * count * sizeof(float),
                              cudaMemcpyDeviceToDevice));
        // M into the new bases: QL^T M QR.
        rotate(s.exp_avg.data(), work_b_.data(), s, false, m, n, count);
    }

    // One power-iteration step with QR: sort Q's columns by diag(Q^T F Q) (descending, stable),
    // Q = qr(F Q_sorted). order receives the permutation (n ints per matrix). A basis that comes
    // out non-finite is not taken: Q stays, and its order is the identity.
    void refresh_basis(const float* factor, float* basis, int* order, int n, int count) {
        float* projected = factor_a_.data();
        gemm_(projected, factor, false, basis, false, n, n, n, count);
        column_dots_gpu(values_.data(), basis, projected, n, count);
        orders_per_matrix_gpu(order, values_.data(), n, count, true);
        permute_columns_gpu(factor_b_.data(), projected, order, n, count);
        qr_q_batched_gpu(candidate_.data(), factor_b_.data(), n, count, factor_a_.data());
        commit_tiles(basis, candidate_.data(), n, count, accepted_.data());
        identity_order_where_rejected_gpu(order, accepted_.data(), n, count);
    }

    SoapConfig config_;
    double weight_decay_;
    GroupGemm gemm_;
    std::vector<TileGroup> groups_;
    std::vector<State> state_;
    DeviceBuffer<float> work_a_, work_b_, factor_a_, factor_b_, candidate_, values_;
    DeviceBuffer<int> orders_, accepted_;
};

}  // namespace

std::unique_ptr<GpuMatrixMethod> make_gpu_soap(const Routing& routing, const OptimizerConfig& config,
                                               const std::vector<bool>* owned_matrices) {
    return std::make_unique<GpuSoap>(routing, config, owned_matrices);
}

}  // namespace qopt
