// Shampoo on the GPU: the CPU reference's step (optim/shampoo.hpp) over groups of same-shape
// blocks (every matrix cut into blocks of at most block_size; blocks of one shape from all
// matrices form one group). Per step and group: the factor statistics L += G G^T, R += G^T G
// (GroupGemm::gram: 2 batched GEMMs, or a syrk per block from 2048), the filtered gradient and
// Adam grafting (one element-wise pass), the preconditioned direction L_root F R_root (2
// GEMMs), the grafting norms (per-block sums of squares) and one pass that applies momentum, decay and the step. Every
// precondition_frequency steps the inverse roots: the symmetric eigendecompositions of all
// factors of one size in a single batched cuSOLVER call (the call is latency-bound: on an H100
// 12 and 48 matrices of 768^2 take 57 and 61 ms, 168 take 156 ms; `bench --linalg`), then per
// group the eigenvalue powers on the eigenvector columns and one GEMM V' V^T. The sizes'
// decompositions run at once, each on a stream and a host thread of its own (the call holds its
// thread until it is nearly done, see below; on an H200 the two sizes of gpt2-124m took 222 ms
// against 272 one after the other, tools/probes/syev_threads_probe.cu). With a kept
// eigenbasis (--shampoo-eigen-tolerance, --shampoo-eigen-method qr; refresh_from_kept_eigenbasis)
// the refresh starts from B = V^T L V over the same batches.
//
// With --shampoo-refresh-lag K (ShampooConfig::refresh_lag) a refresh does not hold up the step:
// the default stream copies every factor into per-size snapshots; a non-blocking side stream
// starts after that and runs the sizes' eigendecompositions one after the other, then the roots
// into pending buffers (its own cuSOLVER and cuBLASLt workspaces), overlapping the next K
// steps' forward and backward passes; step s + K makes the default stream wait for the side
// stream, then takes the pending roots where finite. cuSOLVER's batched syev holds its calling
// thread until it is done (H200: 131 of 139 ms for 168 matrices of 768^2, on a non-blocking
// stream too), so the side stream is fed from a thread of its own, joined at step s + K. Saving
// or loading the state waits for the side stream first.
#include <algorithm>
#include <cmath>
#include <exception>
#include <system_error>
#include <thread>

#include "core/error.hpp"
#include "kernels/cuda_common.cuh"
#include "kernels/side_stream.hpp"
#include "optim/gpu_matrix_method.hpp"
#include "optim/preconditioner_kernels.hpp"

namespace qopt {

namespace {

class GpuShampoo final : public GpuMatrixMethod {
public:
    GpuShampoo(const Routing& routing, const OptimizerConfig& config, const std::vector<bool>* owned_matrices)
        : config_(config.shampoo),
          weight_decay_(config.weight_decay()),
          peak_lr_(config.method_lr()),
          gemm_{config.precond_tf32} {
        const bool lagged = config_.refresh_lag > 0;
        if (lagged) {
            refresh_stream_ = std::make_unique<SideStream>();
            refresh_gemm_ = GroupGemm{config.precond_tf32, refresh_stream_->stream()};
            reserve_matmul_workspace(refresh_stream_->stream());
        }
        groups_ = group_tiles(routing, config_.block_size, owned_matrices);
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
            if (lagged) {
                zeroed(s.pending_left_root, size_t(br) * br * count);
                zeroed(s.pending_right_root, size_t(bc) * bc * count);
            }
            if (config_.keeps_eigenbasis()) {
                // The initial eigenbasis exactly as the CPU's (ShampooBlockState::init: identity, ones).
                ShampooBlockState initial;
                initial.init({0, 0, br, bc}, config_);
                repeated(s.left_vectors, initial.left_vectors, count);
                repeated(s.left_values, initial.left_values, count);
                repeated(s.right_vectors, initial.right_vectors, count);
                repeated(s.right_values, initial.right_values, count);
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
        // The plain refresh (lagged or not, decompose_sizes) gives each size's factors,
        // eigenvectors and eigenvalues buffers of their own (without a lag the sizes are
        // decomposed at once); a kept eigenbasis goes one size at a time through the merged buffers.
        if (!config_.keeps_eigenbasis()) {
            for (const FactorSize& f : sizes_) {
                snapshots_.emplace_back().resize(size_t(f.n) * f.n * f.count);
                size_vectors_.emplace_back().resize(size_t(f.n) * f.n * f.count);
                size_values_.emplace_back().resize(size_t(f.n) * f.count);
                if (!lagged) eigen_streams_.push_back(std::make_unique<SideStream>());
            }
        } else {
            merged_factors_.resize(merged_floats);
            merged_vectors_.resize(merged_floats);
            values_.resize(merged_values);
            merged_work_.resize(merged_floats);
            merged_extra_.resize(merged_floats);
            estimates_.resize(merged_values);
            size_t most_factors = 0;
            for (const FactorSize& f : sizes_) most_factors = std::max(most_factors, f.count);
            sums_.resize(2 * most_factors);
            within_.resize(most_factors);
            orders_.resize(merged_values);
            accepted_.resize(most_factors);
        }
        // The refreshes' cuSOLVER workspaces now, so that the memory check before training sees them.
        for (size_t i = 0; i < sizes_.size(); ++i) {
            const FactorSize& f = sizes_[i];
            if (config_.eigen_method == ShampooEigenMethod::qr)
                reserve_qr_q_gpu(f.n, int(f.count), merged_extra_.data());
            else if (config_.keeps_eigenbasis())
                reserve_symmetric_eigen_gpu(f.n, int(f.count), merged_factors_.data());
            else if (lagged)
                reserve_symmetric_eigen_gpu(f.n, int(f.count), snapshots_[i].data(), refresh_stream_->stream());
            else
                reserve_symmetric_eigen_gpu(f.n, int(f.count), snapshots_[i].data(), eigen_streams_[i]->stream());
        }
    }

    ~GpuShampoo() override {
        if (refresh_thread_.joinable()) refresh_thread_.join();  // its error, if any, goes unreported
        // Their work reads and writes this object's buffers; their solvers go before the streams.
        auto finish = [](const std::unique_ptr<SideStream>& stream) {
            cudaStreamSynchronize(stream->stream());
            release_side_solver(stream->stream());
        };
        if (refresh_stream_) finish(refresh_stream_);
        for (const auto& stream : eigen_streams_) finish(stream);
    }

    void step(float* params, const float* grads, double lr, double grad_scale, bf16* params_bf16, long step) override {
        const ShampooConfig& c = config_;
        const double bias1 = c.filter_divisor(step);
        // Weight decay's alpha, into the gathered gradients (l2) or the direction (the others).
        const double decay = c.decay_coefficient(weight_decay_, lr, peak_lr_);
        const bool l2 = c.decay_type == ShampooDecay::l2;
        const double graft_bias2 = c.graft_divisor(step);
        const double factor_bias = c.beta2 < 1 ? 1 - std::pow(c.beta2, double(step)) : 1.0;
        const bool refresh_roots = c.refreshes_roots(step);
        const bool precondition = c.preconditions(step);
        // beta2 = 1: the factors are sums; else an EMA (bias-corrected at the root).
        const float keep_factor = c.beta2 < 1 ? float(c.beta2) : 1.0f, add_factor = c.beta2 < 1 ? float(1 - c.beta2) : 1.0f;
        for (size_t gi = 0; gi < groups_.size(); ++gi) {
            TileGroup& g = groups_[gi];
            State& s = state_[gi];
            const int br = g.rows, bc = g.cols, count = g.count();
            g.gather(grads, float(grad_scale), l2 ? params : nullptr, float(decay));
            const float* grad = g.grads.data();
            gemm_.gram(s.left.data(), grad, false, br, bc, count, add_factor, keep_factor);
            gemm_.gram(s.right.data(), grad, true, bc, br, count, add_factor, keep_factor);
        }
        if (refresh_roots) {
            if (c.refresh_lag > 0)
                launch_refresh(factor_bias);
            else if (c.keeps_eigenbasis())
                refresh_from_kept_eigenbasis(factor_bias);
            else
                refresh_inverse_roots(factor_bias);
        }
        if (c.switches_roots(step)) take_pending_roots();
        for (size_t gi = 0; gi < groups_.size(); ++gi) {
            TileGroup& g = groups_[gi];
            State& s = state_[gi];
            const int br = g.rows, bc = g.cols, count = g.count();
            const int64_t n = int64_t(g.tile_size());
            const float* grad = g.grads.data();
            // F_hat -> work_a, grafting direction A -> work_b.
            shampoo_filter_graft_gpu(work_a_.data(), work_b_.data(), s.filtered.data(), s.graft_sq.data(), grad,
                                     n * count, float(c.beta1), float(c.step_beta3()), float(bias1),
                                     c.graft_second_moment(), float(c.graft_keep()), float(c.graft_weight()),
                                     float(graft_bias2), float(c.graft_eps));
            const float* direction = work_b_.data();
            const float* scale = nullptr;
            if (precondition) {
                // S = L_root F_hat R_root -> work_a.
                gemm_(work_c_.data(), s.left_root.data(), false, work_a_.data(), false, br, bc, br, count);
                gemm_(work_a_.data(), work_c_.data(), false, s.right_root.data(), false, br, bc, bc, count);
                direction = work_a_.data();
                if (c.grafts()) {
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
                            float(c.momentum), float(c.dampening), c.nesterov, g.table.data(), count, br, bc,
                            l2 ? 0.0f : float(decay), 1.0f, float(lr));
        }
    }

    void visit_state(const StateVisitor& fn) override {
        // Pending roots are read or written only once the side stream is done with them.
        if (refresh_stream_) {
            join_refresh();
            CUDA_CHECK(cudaStreamSynchronize(refresh_stream_->stream()));
        }
        for (size_t gi = 0; gi < groups_.size(); ++gi) {
            const TileGroup& g = groups_[gi];
            State& s = state_[gi];
            const int64_t br = g.rows, bc = g.cols;
            fn(g, "left", {br, br}, s.left);
            fn(g, "right", {bc, bc}, s.right);
            fn(g, "left_root", {br, br}, s.left_root);
            fn(g, "right_root", {bc, bc}, s.right_root);
            if (config_.keeps_eigenbasis()) {
                fn(g, "left_eigenvectors", {br, br}, s.left_vectors);
                fn(g, "left_eigenvalues", {br}, s.left_values);
                fn(g, "right_eigenvectors", {bc, bc}, s.right_vectors);
                fn(g, "right_eigenvalues", {bc}, s.right_values);
            }
            if (s.pending_left_root.size()) {
                fn(g, "pending_left_root", {br, br}, s.pending_left_root);
                fn(g, "pending_right_root", {bc, bc}, s.pending_right_root);
            }
            fn(g, "filtered", {br, bc}, s.filtered);
            fn(g, "graft_sq", {br, bc}, s.graft_sq);
            if (s.momentum.size()) fn(g, "momentum", {br, bc}, s.momentum);
        }
    }

    EigenRefreshCounts eigen_refreshes() const override { return eigen_refreshes_; }

    size_t scratch_bytes() const override {
        size_t floats = work_a_.size() + work_b_.size() + work_c_.size() + factor_b_.size() + candidate_.size() +
                        merged_factors_.size() + merged_vectors_.size() + values_.size() + norms_.size() +
                        merged_work_.size() + merged_extra_.size() + estimates_.size() + sums_.size() +
                        within_.size() + accepted_.size() + orders_.size();
        for (const TileGroup& g : groups_) floats += g.grads.size();
        for (const auto* buffers : {&snapshots_, &size_vectors_, &size_values_})
            for (const DeviceBuffer<float>& buffer : *buffers) floats += buffer.size();
        return floats * sizeof(float);
    }

private:
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

    struct State {
        DeviceBuffer<float> left, right, left_root, right_root, filtered, graft_sq, momentum;
        DeviceBuffer<float> left_vectors, left_values, right_vectors, right_values;  // a kept eigenbasis only
        DeviceBuffer<float> pending_left_root, pending_right_root;                    // a refresh lag only
    };

    // buffer = count copies of one tile's state.
    static void repeated(DeviceBuffer<float>& buffer, const std::vector<float>& tile, int count) {
        std::vector<float> host;
        host.reserve(tile.size() * size_t(count));
        for (int t = 0; t < count; ++t) host.insert(host.end(), tile.begin(), tile.end());
        buffer.upload(host);
    }

    // The QR path's last step, as the CPU's: each matrix's (values, vector columns) sorted by
    // ascending value (stable; orders_per_matrix_gpu, as SOAP's sort), then permuted.
    void sort_ascending(float* vectors, int n, int total) {
        orders_per_matrix_gpu(orders_.data(), values_.data(), n, total, false);
        permute_rows_columns_gpu(merged_extra_.data(), values_.data(), nullptr, orders_.data(), 1, n, total);
        CUDA_CHECK(cudaMemcpyAsync(values_.data(), merged_extra_.data(), size_t(n) * total * sizeof(float),
                                   cudaMemcpyDeviceToDevice));
        permute_columns_gpu(merged_extra_.data(), vectors, orders_.data(), n, total);
        CUDA_CHECK(cudaMemcpyAsync(vectors, merged_extra_.data(), size_t(n) * n * total * sizeof(float),
                                   cudaMemcpyDeviceToDevice));
    }

    // The kept-eigenbasis refresh (the CPU's shampoo_amortized_eigen), per factor size over all of
    // its factors at once: B = V^T (L / divisor) V (two GEMMs per group). eigh: the factors
    // within tolerance keep V and take diag(B); the others go through one batched
    // eigendecomposition of just them (symmetric_eigen_listed_gpu). qr: up to qr_iterations times, Q of B
    // (qr_q_batched_gpu) with Q = I where B is already within tolerance, then B = Q^T B Q and V =
    // V Q, then the pairs sorted by ascending value. Then each root from (V, values), and where it
    // came out finite (commit_tiles) V and the values are kept with it.
    void refresh_from_kept_eigenbasis(double divisor) {
        const ShampooConfig& c = config_;
        for (const FactorSize& size : sizes_) {
            const int n = size.n, total = int(size.count);
            const size_t matrix = size_t(n) * n;
            float* b = merged_work_.data();
            float* vectors = merged_vectors_.data();
            for (const FactorSlot& f : size.factors) {
                const State& s = state_[f.group];
                const int count = groups_[f.group].count();
                const float* kept = (f.left ? s.left_vectors : s.right_vectors).data();
                CUDA_CHECK(cudaMemcpyAsync(vectors + f.first * matrix, kept, matrix * count * sizeof(float),
                                           cudaMemcpyDeviceToDevice));
                gemm_(factor_b_.data(), (f.left ? s.left : s.right).data(), false, kept, false, n, n, n, count,
                      float(1.0 / divisor));
                gemm_(b + f.first * matrix, kept, true, factor_b_.data(), false, n, n, n, count);
            }
            auto check_tolerance = [&] {
                off_diagonal_sum_squares_gpu(sums_.data(), b, n, total);
                sum_squares_gpu(sums_.data() + total, b, total, int64_t(matrix));
                within_tolerance_gpu(within_.data(), sums_.data(), sums_.data() + total, c.eigen_tolerance, total);
            };
            if (c.eigen_method == ShampooEigenMethod::eigh) {
                check_tolerance();
                diagonals_gpu(estimates_.data(), b, n, total);
                // Only this size's flags: the buffer is sized for the largest batch, and its tail
                // holds a larger size's flags from before.
                const std::vector<int> within = within_.download_prefix(size_t(total));
                const long kept = std::count(within.begin(), within.end(), 1);
                eigen_refreshes_.kept += kept;
                eigen_refreshes_.decomposed += total - kept;
                if (kept < total) {
                    // Only the factors outside the tolerance are decomposed: the batched syev is
                    // latency-bound, but its time still grows with the batch.
                    std::vector<int> outside;
                    for (int t = 0; t < total; ++t)
                        if (!within[size_t(t)]) outside.push_back(t);
                    gather_factors(size);
                    symmetric_eigen_listed_gpu(merged_extra_.data(), values_.data(), merged_factors_.data(), n, total,
                                               outside, merged_factors_.data());
                    select_tiles_gpu(vectors, merged_extra_.data(), within_.data(), false, int64_t(matrix), total);
                }
                take_estimated_values_gpu(values_.data(), estimates_.data(), within_.data(), float(divisor), n, total);
            } else {
                float* q = merged_factors_.data();
                float* product = merged_extra_.data();
                for (int iteration = 0; iteration < c.qr_iterations; ++iteration) {
                    check_tolerance();
                    qr_q_batched_gpu(q, b, n, total, product);
                    identity_where_gpu(q, within_.data(), n, total);
                    gemm_(product, b, false, q, false, n, n, n, total);
                    gemm_(b, q, true, product, false, n, n, n, total);
                    gemm_(product, vectors, false, q, false, n, n, n, total);
                    CUDA_CHECK(cudaMemcpyAsync(vectors, product, matrix * total * sizeof(float),
                                               cudaMemcpyDeviceToDevice));
                }
                diagonals_gpu(values_.data(), b, n, total);
                sort_ascending(vectors, n, total);
            }
            for (const FactorSlot& f : size.factors) {
                State& s = state_[f.group];
                const int count = groups_[f.group].count();
                const float* slot_vectors = vectors + f.first * matrix;
                const float* slot_values = values_.data() + f.first * n;
                commit_root(f, n, slot_vectors, slot_values, 1.0f, accepted_.data());
                select_tiles_gpu((f.left ? s.left_vectors : s.right_vectors).data(), slot_vectors, accepted_.data(),
                                 true, int64_t(matrix), count);
                select_tiles_gpu((f.left ? s.left_values : s.right_values).data(), slot_values, accepted_.data(), true,
                                 n, count);
            }
        }
    }

    // Each size's factors (snapshots_) decomposed into size_vectors_ and size_values_. Without a
    // lag the sizes' batched calls run at once: each from a host thread of its own (the call
    // holds it until it is nearly done) onto a stream of its own that starts after the work
    // enqueued on `origin` so far; `origin` then waits for all of them. With a lag, one after
    // the other on `origin` (the side stream): at once they finished sooner but slowed the
    // forward and backward passes beside them by as much (H100: whole step 354.5k against
    // 354.4k tokens/s, docs/optimizer-speed.md), for 1.66 GB more memory.
    void decompose_sizes(cudaStream_t origin) {
        // The snapshot is the eigendecomposition's scratch too (overwritten).
        auto decompose = [this](size_t i, cudaStream_t stream) {
            symmetric_eigen_batched_gpu(size_vectors_[i].data(), size_values_[i].data(), snapshots_[i].data(),
                                        sizes_[i].n, int(sizes_[i].count), snapshots_[i].data(), stream);
        };
        if (eigen_streams_.empty()) {
            for (size_t i = 0; i < sizes_.size(); ++i) decompose(i, origin);
            return;
        }
        std::vector<cudaStream_t> streams;
        for (const auto& stream : eigen_streams_) streams.push_back(stream->after(origin));
        int device = 0;
        CUDA_CHECK(cudaGetDevice(&device));
        std::vector<std::exception_ptr> errors(sizes_.size());
        auto decompose_caught = [&](size_t i) {
            try {
                CUDA_CHECK(cudaSetDevice(device));
                decompose(i, streams[i]);
            } catch (...) {
                errors[i] = std::current_exception();
            }
        };
        // Sizes 1, 2, ... on threads of their own, size 0 on this one. A size whose thread the
        // system cannot start runs here too, one after the other, instead of the process ending
        // with threads unjoined (std::thread throws std::system_error; the vector's room is
        // reserved first, so nothing else in the loop can throw).
        std::vector<std::thread> threads;
        threads.reserve(sizes_.size());
        size_t started = 1;
        try {
            for (; started < sizes_.size(); ++started) threads.emplace_back(decompose_caught, started);
        } catch (const std::system_error&) {
        }
        for (size_t i = started; i < sizes_.size(); ++i) decompose_caught(i);
        if (!sizes_.empty()) decompose_caught(0);
        for (std::thread& thread : threads) thread.join();
        for (const std::exception_ptr& error : errors)
            if (error) std::rethrow_exception(error);
        for (const auto& stream : eigen_streams_) stream->join_into(origin);
    }

    // Every root = (factor / divisor + eps I)^(-1/r) (eigenvalues shifted up to >= 0 first),
    // taken only where it came out finite (commit_tiles): every size's factors gathered into its
    // snapshot, all sizes decomposed at once, then each group's roots from its slice.
    void refresh_inverse_roots(double divisor) {
        for (size_t i = 0; i < sizes_.size(); ++i) gather_factors(sizes_[i], snapshots_[i].data());
        decompose_sizes(0);
        for_each_decomposed_factor([&](const FactorSlot& f, int n, const float* vectors, const float* values) {
            commit_root(f, n, vectors, values, float(divisor));
        });
    }

    // visit(slot, n, its eigenvectors, its eigenvalues) for every factor of every size, in the
    // sizes' order, from the per-size buffers that decompose_sizes filled.
    template <typename Visit>
    void for_each_decomposed_factor(Visit visit) {
        for (size_t i = 0; i < sizes_.size(); ++i) {
            const int n = sizes_[i].n;
            const size_t matrix = size_t(n) * n;
            for (const FactorSlot& f : sizes_[i].factors)
                visit(f, n, size_vectors_[i].data() + f.first * matrix, size_values_[i].data() + f.first * n);
        }
    }

    // With a lag: every size's factors copied now (default stream), then on the side stream each
    // size's eigendecomposition and roots into the pending buffers, as refresh_inverse_roots.
    void launch_refresh(double divisor) {
        join_refresh();  // the last one was taken already (the lag is below the refresh period)
        for (size_t i = 0; i < sizes_.size(); ++i) gather_factors(sizes_[i], snapshots_[i].data());
        refresh_stream_->after_default_stream();
        int device = 0;
        CUDA_CHECK(cudaGetDevice(&device));
        refresh_thread_ = std::thread([this, divisor, device] {
            try {
                CUDA_CHECK(cudaSetDevice(device));
                enqueue_roots(divisor);
            } catch (...) {
                refresh_error_ = std::current_exception();
            }
        });
    }

    // Waits for the refresh thread to have issued its work, and reports its error if it had one.
    void join_refresh() {
        if (refresh_thread_.joinable()) refresh_thread_.join();
        if (refresh_error_) {
            const std::exception_ptr error = refresh_error_;
            refresh_error_ = nullptr;
            std::rethrow_exception(error);
        }
    }

    // On the refresh thread: the sizes' eigendecompositions, then the roots, on the side stream.
    void enqueue_roots(double divisor) {
        decompose_sizes(refresh_stream_->stream());
        for_each_decomposed_factor([&](const FactorSlot& f, int n, const float* vectors, const float* values) {
            State& s = state_[f.group];
            root_candidates((f.left ? s.pending_left_root : s.pending_right_root).data(), f, n, vectors, values,
                            float(divisor), refresh_gemm_);
        });
    }

    // The step refresh_lag after a refresh: the default stream waits for the side stream (all of
    // whose work the joined thread has issued), then takes each pending root where finite (as
    // commit_root does at once without a lag).
    void take_pending_roots() {
        join_refresh();
        refresh_stream_->join_into_default_stream();
        for (size_t gi = 0; gi < groups_.size(); ++gi) {
            State& s = state_[gi];
            const int count = groups_[gi].count();
            commit_tiles(s.left_root.data(), s.pending_left_root.data(), groups_[gi].rows, count);
            commit_tiles(s.right_root.data(), s.pending_right_root.data(), groups_[gi].cols, count);
        }
    }

    // One size's factors (undivided) into `into` (merged_factors_ by default), each group at its slot.
    void gather_factors(const FactorSize& size, float* into = nullptr) {
        if (!into) into = merged_factors_.data();
        const size_t matrix = size_t(size.n) * size.n;
        for (const FactorSlot& f : size.factors) {
            const State& s = state_[f.group];
            CUDA_CHECK(cudaMemcpyAsync(into + f.first * matrix, (f.left ? s.left : s.right).data(),
                                       matrix * groups_[f.group].count() * sizeof(float), cudaMemcpyDeviceToDevice));
        }
    }

    // A group's roots (factor / divisor + eps I)^(-1/r) = V' V^T from the factors' eigenvectors V
    // and eigenvalues into `out`, on `gemm`'s stream (V' in factor_b_).
    void root_candidates(float* out, const FactorSlot& f, int n, const float* vectors, const float* values,
                         float divisor, const GroupGemm& gemm) {
        const int count = groups_[f.group].count();
        inverse_root_columns_gpu(factor_b_.data(), vectors, values, n, count, divisor, config_.eps, config_.root(),
                                 gemm.stream);
        gemm(out, factor_b_.data(), false, vectors, true, n, n, n, count);
    }

    // Those roots taken where finite (commit_tiles; accepted, if given, says where).
    void commit_root(const FactorSlot& f, int n, const float* vectors, const float* values, float divisor,
                     int* accepted = nullptr) {
        State& s = state_[f.group];
        root_candidates(candidate_.data(), f, n, vectors, values, divisor, gemm_);
        commit_tiles((f.left ? s.left_root : s.right_root).data(), candidate_.data(), n, groups_[f.group].count(),
                     accepted);
    }

    ShampooConfig config_;
    double weight_decay_, peak_lr_;
    GroupGemm gemm_;
    std::vector<TileGroup> groups_;
    std::vector<State> state_;
    std::vector<FactorSize> sizes_;
    DeviceBuffer<float> work_a_, work_b_, work_c_, factor_b_, candidate_, values_, norms_;
    DeviceBuffer<float> merged_factors_, merged_vectors_;  // one size's factors, then their eigenvectors
    // The plain refresh (lagged or not; no kept eigenbasis): each size's eigenvectors and
    // eigenvalues (its factors: snapshots_); without a lag, the stream its decomposition runs on.
    std::vector<DeviceBuffer<float>> size_vectors_, size_values_;
    std::vector<std::unique_ptr<SideStream>> eigen_streams_;
    // A kept eigenbasis only: B = V^T L V, a second work batch (eigenvectors, QR's Q products),
    // diag(B), the tolerance's sums and verdicts, and commit_tiles' verdicts.
    DeviceBuffer<float> merged_work_, merged_extra_, estimates_, sums_;
    DeviceBuffer<int> within_, accepted_, orders_;
    EigenRefreshCounts eigen_refreshes_;
    // A refresh lag only: the side stream and its products. Each size's factor snapshot (the
    // plain refresh's, lagged or not).
    std::unique_ptr<SideStream> refresh_stream_;
    GroupGemm refresh_gemm_;
    std::vector<DeviceBuffer<float>> snapshots_;
    std::thread refresh_thread_;          // issuing the side stream's work, until joined
    std::exception_ptr refresh_error_;    // what it threw, rethrown at the join
};

}  // namespace

std::unique_ptr<GpuMatrixMethod> make_gpu_shampoo(const Routing& routing, const OptimizerConfig& config,
                                                  const std::vector<bool>* owned_matrices) {
    return std::make_unique<GpuShampoo>(routing, config, owned_matrices);
}

}  // namespace qopt
