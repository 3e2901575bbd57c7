// Shampoo on the GPU: the CPU reference's step (optim/shampoo.hpp) over groups of same-shape
// blocks (every matrix cut into blocks of at most block_size; blocks of one shape from all
// matrices form one group). Per step and group: the factor statistics L += G G^T, R += G^T G
// (2 batched GEMMs), the filtered gradient and Adam grafting (one element-wise pass), the
// preconditioned direction L_root F R_root (2 GEMMs), the grafting norms (per-block sums of
// squares) and one pass that applies momentum, decay and the step. Every
// precondition_frequency steps the inverse roots: the symmetric eigendecompositions of all
// factors of one size in a single batched cuSOLVER call (the call is latency-bound: on an H100
// 12 and 48 matrices of 768^2 take 57 and 61 ms, 168 take 156 ms; `bench --linalg`), then per
// group the eigenvalue powers on the eigenvector columns and one GEMM V' V^T. With
// refine_tolerance > 0, each size's batch first takes one refinement step of the kept
// eigenbases (shampoo_refined_inverse_root: four batched fp32 GEMMs, two element-wise passes and
// the root's GEMM), and only the factors whose estimated error exceeds the tolerance (and all of
// them at the first refresh) go through the eigendecomposition, gathered into one call.
#include <algorithm>
#include <cmath>
#include <sstream>

#include "core/error.hpp"
#include "kernels/cuda_common.cuh"
#include "optim/gpu_matrix_method.hpp"
#include "optim/preconditioner_kernels.hpp"

namespace qopt {

namespace {

class GpuShampoo final : public GpuMatrixMethod {
public:
    GpuShampoo(const Routing& routing, const OptimizerConfig& config)
        : config_(config.shampoo), weight_decay_(config.weight_decay()), gemm_{config.precond_tf32} {
        groups_ = group_tiles(routing, config_.block_size);
        for (TileGroup& g : groups_) {
            const int br = g.rows, bc = g.cols, count = g.count();
            State& s = state_.emplace_back();
            zeroed(s.left, size_t(br) * br * count);
            zeroed(s.right, size_t(bc) * bc * count);
            zeroed(s.left_root, size_t(br) * br * count);
            zeroed(s.right_root, size_t(bc) * bc * count);
            zeroed(s.filtered, g.tile_size() * count);
            zeroed(s.graft_sq, g.tile_size() * count);
            if (config_.momentum > 0) zeroed(s.momentum, g.tile_size() * count);
            if (refine()) {
                zeroed(s.left_basis, size_t(br) * br * count);
                zeroed(s.right_basis, size_t(bc) * bc * count);
            }
        }
        const GroupScratch sizes = group_scratch(groups_);
        work_a_.resize(sizes.work);
        work_b_.resize(sizes.work);
        work_c_.resize(sizes.work);
        factor_b_.resize(sizes.factor);
        candidate_.resize(sizes.factor);
        norms_.resize(3 * sizes.dim);
        // Every factor, by size: one eigendecomposition batch per size.
        size_t merged_floats = 0, merged_values = 0;
        for (size_t gi = 0; gi < groups_.size(); ++gi)
            for (bool left : {true, false}) {
                const int n = left ? groups_[gi].rows : groups_[gi].cols;
                auto found = std::find_if(sizes_.begin(), sizes_.end(), [&](const FactorSize& f) { return f.n == n; });
                if (found == sizes_.end()) found = sizes_.insert(sizes_.end(), FactorSize{n, {}, 0});
                found->factors.push_back({gi, left, found->count});
                found->count += groups_[gi].count();
            }
        for (const FactorSize& f : sizes_) {
            merged_floats = std::max(merged_floats, size_t(f.n) * f.n * f.count);
            merged_values = std::max(merged_values, size_t(f.n) * f.count);
        }
        merged_factors_.resize(merged_floats);
        merged_vectors_.resize(merged_floats);
        values_.resize(merged_values);
        if (refine()) {
            size_t most = 0;
            for (const FactorSize& f : sizes_) most = std::max(most, f.count);
            merged_bases_.resize(merged_floats);
            merged_s_.resize(merged_floats);
            merged_roots_.resize(merged_floats);
            refine_scalars_.resize(2 * most);
            refine_error_.resize(most);
        }
    }

    void step(float* params, const float* grads, double lr, double grad_scale, bf16* params_bf16, long step) override {
        const ShampooConfig& c = config_;
        const double bias1 = 1 - std::pow(c.beta1, double(step));
        const double graft_bias2 = 1 - std::pow(c.graft_beta2, double(step));
        const double factor_bias = c.beta2 < 1 ? 1 - std::pow(c.beta2, double(step)) : 1.0;
        const bool refresh_roots = step % c.precondition_frequency == 0;
        const bool precondition = step >= c.start_step() && step >= c.precondition_frequency;
        // beta2 = 1: the factors are sums; else an EMA (bias-corrected at the root).
        const float keep_factor = c.beta2 < 1 ? float(c.beta2) : 1.0f, add_factor = c.beta2 < 1 ? float(1 - c.beta2) : 1.0f;
        for (size_t gi = 0; gi < groups_.size(); ++gi) {
            TileGroup& g = groups_[gi];
            State& s = state_[gi];
            const int br = g.rows, bc = g.cols, count = g.count();
            g.gather(grads, float(grad_scale));
            const float* grad = g.grads.data();
            gemm_(s.left.data(), grad, false, grad, true, br, br, bc, count, add_factor, keep_factor);
            gemm_(s.right.data(), grad, true, grad, false, bc, bc, br, count, add_factor, keep_factor);
        }
        if (refresh_roots) refresh_inverse_roots(factor_bias);
        for (size_t gi = 0; gi < groups_.size(); ++gi) {
            TileGroup& g = groups_[gi];
            State& s = state_[gi];
            const int br = g.rows, bc = g.cols, count = g.count();
            const int64_t n = int64_t(g.tile_size());
            const float* grad = g.grads.data();
            // F_hat -> work_a, grafting direction A -> work_b.
            shampoo_filter_graft_gpu(work_a_.data(), work_b_.data(), s.filtered.data(), s.graft_sq.data(), grad,
                                     n * count, float(c.beta1), float(bias1), c.adam_grafting, float(c.graft_beta2),
                                     float(graft_bias2), float(c.graft_eps));
            const float* direction = work_b_.data();
            const float* scale = nullptr;
            if (precondition) {
                // S = L_root F_hat R_root -> work_a.
                gemm_(work_c_.data(), s.left_root.data(), false, work_a_.data(), false, br, bc, br, count);
                gemm_(work_a_.data(), work_c_.data(), false, s.right_root.data(), false, br, bc, bc, count);
                direction = work_a_.data();
                if (c.adam_grafting) {
                    float* graft_sq = norms_.data();
                    float* shampoo_sq = norms_.data() + count;
                    float* ratio = norms_.data() + 2 * count;
                    sum_squares_gpu(graft_sq, work_b_.data(), count, n);
                    sum_squares_gpu(shampoo_sq, work_a_.data(), count, n);
                    norm_ratio_gpu(ratio, graft_sq, shampoo_sq, count);
                    scale = ratio;
                }
            }
            apply_tiles_gpu(params, params_bf16, direction, scale, c.momentum > 0 ? s.momentum.data() : nullptr,
                            float(c.momentum), c.nesterov, g.table.data(), count, br, bc,
                            float(1 - lr * weight_decay_), float(lr));
        }
    }

    void visit_state(const StateVisitor& fn) override {
        for (size_t gi = 0; gi < groups_.size(); ++gi) {
            const TileGroup& g = groups_[gi];
            State& s = state_[gi];
            const int64_t br = g.rows, bc = g.cols;
            fn(g, "left", {br, br}, s.left);
            fn(g, "right", {bc, bc}, s.right);
            fn(g, "left_root", {br, br}, s.left_root);
            fn(g, "right_root", {bc, bc}, s.right_root);
            fn(g, "filtered", {br, bc}, s.filtered);
            fn(g, "graft_sq", {br, bc}, s.graft_sq);
            if (s.momentum.size()) fn(g, "momentum", {br, bc}, s.momentum);
            if (refine()) {
                fn(g, "left_basis", {br, br}, s.left_basis);
                fn(g, "right_basis", {bc, bc}, s.right_basis);
            }
        }
    }

    void load(const OptimizerState& state) override {
        GpuMatrixMethod::load(state);
        have_bases_ = true;  // all-zero bases (saved before the first refresh) fail refinement's test
    }

    std::string refresh_summary() const override {
        if (!refine()) return "";
        std::ostringstream out;
        out << "roots: " << refined_roots_ << " refined, " << exact_roots_ << " by eigendecomposition";
        return out.str();
    }

    size_t scratch_bytes() const override {
        size_t floats = work_a_.size() + work_b_.size() + work_c_.size() + factor_b_.size() + candidate_.size() +
                        merged_factors_.size() + merged_vectors_.size() + values_.size() + norms_.size() +
                        merged_bases_.size() + merged_s_.size() + merged_roots_.size() + refine_scalars_.size() +
                        refine_error_.size();
        for (const TileGroup& g : groups_) floats += g.grads.size();
        return floats * sizeof(float);
    }

private:
    struct State {
        DeviceBuffer<float> left, right, left_root, right_root, filtered, graft_sq, momentum;
        DeviceBuffer<float> left_basis, right_basis;  // refine_tolerance > 0 only
    };

    bool refine() const { return config_.refine_tolerance > 0; }

    // Where a group's left or right factors sit in their size's batch.
    struct FactorSlot {
        size_t group;
        bool left;
        size_t first;  // index of the group's first factor in the batch
    };
    struct FactorSize {
        int n;
        std::vector<FactorSlot> factors;
        size_t count;  // matrices in the batch
    };

    // Every root = (factor / divisor + eps I)^(-1/r) (eigenvalues shifted up to >= 0 first),
    // taken only where it came out finite (commit_tiles). Per factor size: the factors gathered
    // into one batch, one eigendecomposition call, then each group's roots from its slice.
    void refresh_inverse_roots(double divisor) {
        if (refine()) {
            for (const FactorSize& size : sizes_) refine_inverse_roots(size, divisor);
            have_bases_ = true;
            return;
        }
        for (const FactorSize& size : sizes_) {
            const int n = size.n;
            const size_t matrix = size_t(n) * n;
            gather(merged_factors_, size, false);
            // The gathered factors are the eigendecomposition's scratch too (overwritten).
            symmetric_eigen_batched_gpu(merged_vectors_.data(), values_.data(), merged_factors_.data(), n, size.count,
                                        merged_factors_.data());
            for (const FactorSlot& f : size.factors) {
                State& s = state_[f.group];
                const int count = groups_[f.group].count();
                root_from_vectors(candidate_.data(), factor_b_.data(), merged_vectors_.data() + f.first * matrix,
                                  values_.data() + f.first * n, n, count, divisor);
                commit_tiles((f.left ? s.left_root : s.right_root).data(), candidate_.data(), n, count);
            }
        }
    }

    // One size's factors (or, with `bases`, their kept eigenbases) into its batch buffer.
    void gather(DeviceBuffer<float>& into, const FactorSize& size, bool bases) {
        const size_t matrix = size_t(size.n) * size.n;
        for (const FactorSlot& f : size.factors) {
            const State& s = state_[f.group];
            const DeviceBuffer<float>& from =
                bases ? (f.left ? s.left_basis : s.right_basis) : (f.left ? s.left : s.right);
            CUDA_CHECK(cudaMemcpyAsync(into.data() + f.first * matrix, from.data(),
                                       matrix * groups_[f.group].count() * sizeof(float), cudaMemcpyDeviceToDevice));
        }
    }

    // root = vectors diag((values / divisor - shift + eps)^(-1/r)) vectors^T for `count` n x n
    // matrices (inverse_root_columns_gpu; shifts null: values descending), via `scaled`; the
    // product by `gemm` (the method's own unless given).
    void root_from_vectors(float* root, float* scaled, const float* vectors, const float* values, int n, int count,
                           double divisor, const float* shifts = nullptr, const GroupGemm* gemm = nullptr) {
        inverse_root_columns_gpu(scaled, vectors, values, n, count, float(divisor), config_.eps, config_.root(), shifts);
        (gemm ? *gemm : gemm_)(root, scaled, false, vectors, true, n, n, n, count);
    }

    // One size's roots with refinement (see the file comment). Buffers, in order of use:
    // merged_factors_ F, merged_bases_ X, merged_vectors_ F X then X', merged_s_ X^T F X then
    // the scaled columns, merged_roots_ X^T X then the step E then the roots. The factors that
    // fall back are gathered (host-side list: one wait per size) and decomposed in one call.
    void refine_inverse_roots(const FactorSize& size, double divisor) {
        const int n = size.n;
        const int count = int(size.count);
        const size_t matrix = size_t(n) * n;
        gather(merged_factors_, size, false);
        std::vector<int> exact;
        if (have_bases_) {
            gather(merged_bases_, size, true);
            // Always fp32: the error estimate's rounding floor is that of fp32 products.
            const GroupGemm fp32{false};
            fp32(merged_vectors_.data(), merged_factors_.data(), false, merged_bases_.data(), false, n, n, n, count);
            fp32(merged_s_.data(), merged_bases_.data(), true, merged_vectors_.data(), false, n, n, n, count);
            fp32(merged_roots_.data(), merged_bases_.data(), true, merged_bases_.data(), false, n, n, n, count);
            refine_eigenvalues_gpu(values_.data(), refine_scalars_.data(), refine_error_.data(), merged_s_.data(),
                                   merged_roots_.data(), n, count, float(divisor));
            refine_rotation_gpu(merged_roots_.data(), merged_s_.data(), values_.data(), refine_scalars_.data(),
                                refine_error_.data(), n, count, float(divisor), config_.eps, config_.root(),
                                std::sqrt(config_.refine_tolerance));
            // X' = X + X E.
            batched_matmul_f32_gpu(merged_vectors_.data(), merged_bases_.data(), merged_bases_.data(), false,
                                   merged_roots_.data(), false, n, n, n, 1.0f, 1.0f, count, int64_t(matrix),
                                   int64_t(matrix), int64_t(matrix));
            // The values are divided already; the shifts are the first `count` scalars.
            root_from_vectors(merged_roots_.data(), merged_s_.data(), merged_vectors_.data(), values_.data(), n, count,
                              1.0, refine_scalars_.data(), &fp32);
            const std::vector<float> error = refine_error_.download();
            for (int t = 0; t < count; ++t)
                if (!(error[size_t(t)] <= config_.refine_tolerance)) exact.push_back(t);
        } else {
            for (int t = 0; t < count; ++t) exact.push_back(t);
        }
        refined_roots_ += count - long(exact.size());
        exact_roots_ += long(exact.size());
        if (!exact.empty()) {
            // The falling-back factors gathered into merged_s_, decomposed (vectors into
            // merged_bases_), their roots into merged_factors_, then put in their slots.
            const int m = int(exact.size());
            for (int k = 0; k < m; ++k)
                CUDA_CHECK(cudaMemcpyAsync(merged_s_.data() + k * matrix, merged_factors_.data() + exact[size_t(k)] * matrix,
                                           matrix * sizeof(float), cudaMemcpyDeviceToDevice));
            symmetric_eigen_batched_gpu(merged_bases_.data(), values_.data(), merged_s_.data(), n, m, merged_s_.data());
            root_from_vectors(merged_factors_.data(), merged_s_.data(), merged_bases_.data(), values_.data(), n, m,
                              divisor);
            for (int k = 0; k < m; ++k) {
                const size_t slot = size_t(exact[size_t(k)]) * matrix;
                CUDA_CHECK(cudaMemcpyAsync(merged_roots_.data() + slot, merged_factors_.data() + k * matrix,
                                           matrix * sizeof(float), cudaMemcpyDeviceToDevice));
                CUDA_CHECK(cudaMemcpyAsync(merged_vectors_.data() + slot, merged_bases_.data() + k * matrix,
                                           matrix * sizeof(float), cudaMemcpyDeviceToDevice));
            }
        }
        for (const FactorSlot& f : size.factors) {
            State& s = state_[f.group];
            const int group_count = groups_[f.group].count();
            commit_tiles((f.left ? s.left_root : s.right_root).data(), merged_roots_.data() + f.first * matrix, n,
                         group_count);
            commit_tiles((f.left ? s.left_basis : s.right_basis).data(), merged_vectors_.data() + f.first * matrix, n,
                         group_count, nullptr, false);
        }
    }

    ShampooConfig config_;
    double weight_decay_;
    GroupGemm gemm_;
    std::vector<TileGroup> groups_;
    std::vector<State> state_;
    std::vector<FactorSize> sizes_;
    DeviceBuffer<float> work_a_, work_b_, work_c_, factor_b_, candidate_, values_, norms_;
    DeviceBuffer<float> merged_factors_, merged_vectors_;  // one size's factors, then their eigenvectors
    // Refinement (refine_tolerance > 0): one size's bases, X^T F X, roots; per-matrix scalars.
    DeviceBuffer<float> merged_bases_, merged_s_, merged_roots_, refine_scalars_, refine_error_;
    bool have_bases_ = false;  // a refresh has run (or state was loaded): bases to refine
    long refined_roots_ = 0, exact_roots_ = 0;
};

}  // namespace

std::unique_ptr<GpuMatrixMethod> make_gpu_shampoo(const Routing& routing, const OptimizerConfig& config) {
    return std::make_unique<GpuShampoo>(routing, config);
}

}  // namespace qopt
