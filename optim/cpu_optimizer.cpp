// The CPU optimizers: the routed AdamW plus each method's per-matrix reference, over the flat
// parameter buffer. Every buffer of the state is visited in one fixed order by name, which is
// how state() and load_state() (and so checkpoints) see it.
#include <functional>

#include "core/error.hpp"
#include "optim/optimizer.hpp"

namespace qopt {

namespace {

// A buffer may be a part of its tensor: rows [row_begin, row_begin + shape[0]) of a tensor of
// full_count values (a ZeRO-1 share of an AdamW tensor); whole tensors have row_begin 0.
struct Part {
    int64_t row_begin;
    size_t full_count;
};
using BufferVisitor = std::function<void(const std::string& name, std::vector<int64_t> shape,
                                         std::vector<float>& values, const Part& part)>;

class CpuOptimizer final : public Optimizer {
public:
    CpuOptimizer(const ParamLayout& layout, const OptimizerConfig& config, const OwnedSlots* owned)
        : config_(config), routing_(route_parameters(layout, config)),
          owned_(owned ? *owned : OwnedSlots::all(routing_)) {
        config_.validate();
        QOPT_CHECK(owned_.adamw.size() == routing_.adamw.size() && owned_.scion.size() == routing_.scion.size() &&
                       owned_.matrices.size() == routing_.matrices.size(),
                   "optimizer shard: the owned-slot lists do not match this model's routing");
        // Slots of other ranks keep empty state, so that indices stay those of the whole routing.
        for (size_t i = 0; i < routing_.adamw.size(); ++i) {
            const size_t n = owned_range(routing_.adamw[i], owned_.adamw[i]).count;
            adam_m_.emplace_back(n, 0.0f);
            adam_v_.emplace_back(n, 0.0f);
        }
        for (size_t i = 0; i < routing_.scion.size(); ++i) {
            const RowRange rows = owned_.scion[i];
            QOPT_CHECK(rows.count() == 0 || rows.count() == routing_.scion[i].rows ||
                           scion_rows_separable(routing_.scion[i].scion_norm),
                       "optimizer shard: ", routing_.scion[i].name, "'s Scion rule needs the whole tensor");
            scion_momentum_.emplace_back(owned_range(routing_.scion[i], rows).count, 0.0f);
        }
        for (size_t i = 0; i < routing_.matrices.size(); ++i) {
            const MatrixSlot& m = routing_.matrices[i];
            const size_t n = size_t(m.rows) * m.cols;
            momentum_.emplace_back();
            soap_.emplace_back();
            shampoo_.emplace_back();
            psgd_.emplace_back();
            if (!owned_.matrices[i]) continue;
            switch (config_.kind) {
                case OptimizerKind::AdamW: break;
                case OptimizerKind::Muon:
                case OptimizerKind::Scion: momentum_.back().assign(n, 0.0f); break;
                case OptimizerKind::Soap: soap_.back().init(m.rows, m.cols, config_.soap); break;
                case OptimizerKind::Psgd: psgd_.back().init(m.rows, m.cols, config_.psgd); break;
                case OptimizerKind::Shampoo:
                    for (const auto& b : shampoo_blocks(m.rows, m.cols, config_.shampoo.block_size))
                        shampoo_.back().emplace_back().init(b, config_.shampoo);
                    break;
            }
        }
    }

    void step(float* params, float* grads, double lr, double grad_scale) override {
        ++step_;
        if (grad_scale != 1.0) {
            auto scale = [&](size_t offset, size_t n) {
                for (size_t i = 0; i < n; ++i) grads[offset + i] *= float(grad_scale);
            };
            for (size_t i = 0; i < routing_.adamw.size(); ++i) {
                const ParamRange r = owned_range(routing_.adamw[i], owned_.adamw[i]);
                scale(r.offset, r.count);
            }
            for (size_t i = 0; i < routing_.scion.size(); ++i) {
                const ParamRange r = owned_range(routing_.scion[i], owned_.scion[i]);
                scale(r.offset, r.count);
            }
            for (size_t i = 0; i < routing_.matrices.size(); ++i)
                if (owned_.matrices[i])
                    scale(routing_.matrices[i].offset, size_t(routing_.matrices[i].rows) * routing_.matrices[i].cols);
        }
        const double wd = config_.weight_decay();
        const double adamw_lr = lr * config_.aux_adamw_lr() / config_.method_lr();
        AdamWConfig adamw = config_.adamw;
        for (size_t i = 0; i < routing_.adamw.size(); ++i) {
            if (adam_m_[i].empty()) continue;
            const size_t at = owned_range(routing_.adamw[i], owned_.adamw[i]).offset;
            adamw_update_cpu(params + at, grads + at, adam_m_[i].data(), adam_v_[i].data(), adam_m_[i].size(),
                             adamw_lr, adamw, step_, routing_.adamw[i].decay);
        }
        for (size_t i = 0; i < routing_.scion.size(); ++i) {
            if (scion_momentum_[i].empty()) continue;
            const TensorSlot& s = routing_.scion[i];
            const size_t at = owned_range(s, owned_.scion[i]).offset;
            scion_update_cpu(params + at, grads + at, scion_momentum_[i].data(), owned_.scion[i].count(), s.cols,
                             s.scion_norm, s.scion_scale, lr, s.decay ? wd : 0.0, config_.scion);
        }
        PsgdSchedule::Decision psgd_decision;
        if (config_.kind == OptimizerKind::Psgd) psgd_decision = psgd_schedule_.next(config_.psgd);
        for (size_t i = 0; i < routing_.matrices.size(); ++i) {
            if (!owned_.matrices[i]) continue;
            const MatrixSlot& m = routing_.matrices[i];
            float* p = params + m.offset;
            const float* g = grads + m.offset;
            switch (config_.kind) {
                case OptimizerKind::AdamW: break;
                case OptimizerKind::Muon:
                    muon_update_cpu(p, g, momentum_[i].data(), m.rows, m.cols, lr, wd, config_.muon);
                    break;
                case OptimizerKind::Scion:
                    scion_update_cpu(p, g, momentum_[i].data(), m.rows, m.cols, ScionNorm::Spectral,
                                     config_.scion.hidden_scale, lr, wd, config_.scion);
                    break;
                case OptimizerKind::Shampoo:
                    rejected_ += shampoo_update_cpu(p, g, shampoo_[i], m.rows, m.cols, lr,
                                                    config_.shampoo.decay_coefficient(wd, lr, config_.method_lr()),
                                                    step_, config_.shampoo,
                                                    &eigen_refreshes_);
                    break;
                case OptimizerKind::Soap:
                    rejected_ += soap_update_cpu(p, g, soap_[i], m.rows, m.cols, lr, wd, step_, config_.soap);
                    break;
                case OptimizerKind::Psgd:
                    rejected_ += psgd_update_cpu(p, g, psgd_[i], m.rows, m.cols, lr, wd, step_, int(i), psgd_decision,
                                                 config_.psgd);
                    break;
            }
        }
    }

    long step_count() const override { return step_; }
    long rejected_preconditioners() const override { return rejected_; }
    EigenRefreshCounts eigen_refreshes() const override { return eigen_refreshes_; }

    OptimizerState state() const override {
        OptimizerState state;
        state.optimizer = optimizer_name(config_.kind);
        state.step = step_;
        if (config_.kind == OptimizerKind::Psgd) state.extra["psgd_schedule"] = psgd_schedule_.to_json();
        const_cast<CpuOptimizer*>(this)->visit([&](const std::string& name, std::vector<int64_t> shape,
                                                   std::vector<float>& values, const Part& part) {
            state.tensors.push_back({name, std::move(shape), values, part.row_begin});
        });
        return state;
    }

    void load_state(const OptimizerState& state) override {
        QOPT_CHECK(state.optimizer == optimizer_name(config_.kind), "the checkpoint's optimizer state is ",
                   state.optimizer, "'s, but this run uses ", optimizer_name(config_.kind));
        visit([&](const std::string& name, std::vector<int64_t> shape, std::vector<float>& values, const Part& part) {
            const std::vector<float>& whole = state.values(name, part.full_count);
            const size_t offset = values.empty() ? 0 : size_t(part.row_begin) * (values.size() / size_t(shape[0]));
            values.assign(whole.begin() + long(offset), whole.begin() + long(offset + values.size()));
        });
        if (config_.kind == OptimizerKind::Psgd) psgd_schedule_ = PsgdSchedule::from_json(state.extra.at("psgd_schedule"));
        step_ = state.step;
    }

    size_t state_bytes() const override {
        size_t floats = 0;
        const_cast<CpuOptimizer*>(this)->visit(
            [&](const std::string&, std::vector<int64_t>, std::vector<float>& values, const Part&) {
                floats += values.size();
            });
        return floats * sizeof(float);
    }

private:
    void visit(const BufferVisitor& part_fn) {
        // An element-wise slot's buffer: its owned rows (the whole tensor in a single process).
        auto rows_fn = [&](const TensorSlot& s, const RowRange& rows, const std::string& buffer,
                           std::vector<float>& values) {
            if (rows.count() == 0) return;
            std::vector<int64_t> shape = s.shape;
            if (rows.count() != s.rows) shape[0] = rows.count();  // a share of a 2-D tensor's rows
            part_fn(s.name + "." + buffer, shape, values, {rows.begin, s.numel});
        };
        for (size_t i = 0; i < routing_.adamw.size(); ++i) {
            rows_fn(routing_.adamw[i], owned_.adamw[i], "exp_avg", adam_m_[i]);
            rows_fn(routing_.adamw[i], owned_.adamw[i], "exp_avg_sq", adam_v_[i]);
        }
        for (size_t i = 0; i < routing_.scion.size(); ++i)
            rows_fn(routing_.scion[i], owned_.scion[i], "momentum", scion_momentum_[i]);
        auto fn = [&](const std::string& name, std::vector<int64_t> shape, std::vector<float>& values) {
            part_fn(name, std::move(shape), values, {0, values.size()});
        };
        for (size_t i = 0; i < routing_.matrices.size(); ++i) {
            if (!owned_.matrices[i]) continue;
            const MatrixSlot& m = routing_.matrices[i];
            const int64_t r = m.rows, c = m.cols;
            switch (config_.kind) {
                case OptimizerKind::AdamW: break;
                case OptimizerKind::Muon:
                case OptimizerKind::Scion: fn(m.name + ".momentum", {r, c}, momentum_[i]); break;
                case OptimizerKind::Soap: {
                    SoapMatrixState& s = soap_[i];
                    // Factors of the view; a side without one (max_precond_dim) has no tensors.
                    const int64_t vr = s.view.rows, vc = s.view.cols;
                    if (s.view.left) fn(m.name + ".left", {vr, vr}, s.left);
                    if (s.view.right) fn(m.name + ".right", {vc, vc}, s.right);
                    if (s.view.left) fn(m.name + ".left_basis", {vr, vr}, s.left_basis);
                    if (s.view.right) fn(m.name + ".right_basis", {vc, vc}, s.right_basis);
                    fn(m.name + ".exp_avg", {r, c}, s.exp_avg);
                    fn(m.name + ".exp_avg_sq", {r, c}, s.exp_avg_sq);
                    break;
                }
                case OptimizerKind::Psgd: {
                    PsgdMatrixState& s = psgd_[i];
                    fn(m.name + ".momentum", {r, c}, s.momentum);
                    // A diagonal factor is stored as its diagonal.
                    fn(m.name + ".q_left", s.left_diagonal ? std::vector<int64_t>{r} : std::vector<int64_t>{r, r},
                       s.q_left);
                    fn(m.name + ".q_right", s.right_diagonal ? std::vector<int64_t>{c} : std::vector<int64_t>{c, c},
                       s.q_right);
                    break;
                }
                case OptimizerKind::Shampoo: {
                    const auto blocks = shampoo_blocks(m.rows, m.cols, config_.shampoo.block_size);
                    for (size_t b = 0; b < blocks.size(); ++b) {
                        const int64_t br = blocks[b].block_rows, bc = blocks[b].block_cols;
                        ShampooBlockState& s = shampoo_[i][b];
                        const std::string prefix = m.name + ".block" + std::to_string(b);
                        fn(prefix + ".left", {br, br}, s.left);
                        fn(prefix + ".right", {bc, bc}, s.right);
                        fn(prefix + ".left_root", {br, br}, s.left_root);
                        fn(prefix + ".right_root", {bc, bc}, s.right_root);
                        if (!s.left_vectors.empty()) {  // a kept eigenbasis (ShampooConfig::keeps_eigenbasis)
                            fn(prefix + ".left_eigenvectors", {br, br}, s.left_vectors);
                            fn(prefix + ".left_eigenvalues", {br}, s.left_values);
                            fn(prefix + ".right_eigenvectors", {bc, bc}, s.right_vectors);
                            fn(prefix + ".right_eigenvalues", {bc}, s.right_values);
                        }
                        if (!s.pending_left_root.empty()) {  // a refresh lag (ShampooConfig::refresh_lag)
                            fn(prefix + ".pending_left_root", {br, br}, s.pending_left_root);
                            fn(prefix + ".pending_right_root", {bc, bc}, s.pending_right_root);
                        }
                        fn(prefix + ".filtered", {br, bc}, s.filtered);
                        fn(prefix + ".graft_sq", {br, bc}, s.graft_sq);
                        if (!s.momentum.empty()) fn(prefix + ".momentum", {br, bc}, s.momentum);
                    }
                    break;
                }
            }
        }
    }

    OptimizerConfig config_;
    Routing routing_;
    OwnedSlots owned_;
    long step_ = 0;
    long rejected_ = 0;
    EigenRefreshCounts eigen_refreshes_;
    std::vector<std::vector<float>> adam_m_, adam_v_, scion_momentum_, momentum_;
    std::vector<SoapMatrixState> soap_;
    std::vector<std::vector<ShampooBlockState>> shampoo_;
    std::vector<PsgdMatrixState> psgd_;
    PsgdSchedule psgd_schedule_;
};

}  // namespace

std::unique_ptr<Optimizer> make_cpu_optimizer(const ParamLayout& layout, const OptimizerConfig& config,
                                              const OwnedSlots* owned) {
    return std::make_unique<CpuOptimizer>(layout, config, owned);
}

}  // namespace qopt
