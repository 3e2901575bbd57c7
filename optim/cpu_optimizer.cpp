// The CPU optimizers: the routed AdamW plus each method's per-matrix reference, over the flat
// parameter buffer. Every buffer of the state is visited in one fixed order by name, which is
// how state() and load_state() (and so checkpoints) see it.
#include <functional>

#include "core/error.hpp"
#include "optim/optimizer.hpp"

namespace qopt {

namespace {

using BufferVisitor = std::function<void(const std::string& name, std::vector<int64_t> shape, std::vector<float>& values)>;

class CpuOptimizer final : public Optimizer {
public:
    CpuOptimizer(const ParamLayout& layout, const OptimizerConfig& config)
        : config_(config), routing_(route_parameters(layout, config)) {
        config_.validate();
        for (const auto& slot : routing_.adamw) {
            adam_m_.emplace_back(slot.numel, 0.0f);
            adam_v_.emplace_back(slot.numel, 0.0f);
        }
        for (const auto& slot : routing_.scion) scion_momentum_.emplace_back(slot.numel, 0.0f);
        for (const auto& m : routing_.matrices) {
            const size_t n = size_t(m.rows) * m.cols;
            switch (config_.kind) {
                case OptimizerKind::AdamW: break;
                case OptimizerKind::Muon:
                case OptimizerKind::Scion: momentum_.emplace_back(n, 0.0f); break;
                case OptimizerKind::Soap: soap_.emplace_back().init(m.rows, m.cols, config_.soap); break;
                case OptimizerKind::Psgd: psgd_.emplace_back().init(m.rows, m.cols, config_.psgd); break;
                case OptimizerKind::Shampoo: {
                    auto& blocks = shampoo_.emplace_back();
                    for (const auto& b : shampoo_blocks(m.rows, m.cols, config_.shampoo.block_size))
                        blocks.emplace_back().init(b, config_.shampoo);
                    break;
                }
            }
        }
    }

    void step(float* params, float* grads, double lr, double grad_scale) override {
        ++step_;
        if (grad_scale != 1.0) {
            auto scale = [&](size_t offset, size_t n) {
                for (size_t i = 0; i < n; ++i) grads[offset + i] *= float(grad_scale);
            };
            for (const auto& s : routing_.adamw) scale(s.offset, s.numel);
            for (const auto& s : routing_.scion) scale(s.offset, s.numel);
            for (const auto& m : routing_.matrices) scale(m.offset, size_t(m.rows) * m.cols);
        }
        const double wd = config_.weight_decay();
        const double adamw_lr = lr * config_.aux_adamw_lr() / config_.method_lr();
        AdamWConfig adamw = config_.adamw;
        for (size_t i = 0; i < routing_.adamw.size(); ++i) {
            const TensorSlot& s = routing_.adamw[i];
            adamw_update_cpu(params + s.offset, grads + s.offset, adam_m_[i].data(), adam_v_[i].data(), s.numel,
                             adamw_lr, adamw, step_, s.decay);
        }
        for (size_t i = 0; i < routing_.scion.size(); ++i) {
            const TensorSlot& s = routing_.scion[i];
            scion_update_cpu(params + s.offset, grads + s.offset, scion_momentum_[i].data(), s.rows, s.cols,
                             s.scion_norm, s.scion_scale, lr, s.decay ? wd : 0.0, config_.scion);
        }
        PsgdSchedule::Decision psgd_decision;
        if (config_.kind == OptimizerKind::Psgd) psgd_decision = psgd_schedule_.next(config_.psgd);
        for (size_t i = 0; i < routing_.matrices.size(); ++i) {
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
                    rejected_ += shampoo_update_cpu(p, g, shampoo_[i], m.rows, m.cols, lr, wd, step_, config_.shampoo,
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
                                                   std::vector<float>& values) {
            state.tensors.push_back({name, std::move(shape), values});
        });
        return state;
    }

    void load_state(const OptimizerState& state) override {
        QOPT_CHECK(state.optimizer == optimizer_name(config_.kind), "the checkpoint's optimizer state is ",
                   state.optimizer, "'s, but this run uses ", optimizer_name(config_.kind));
        visit([&](const std::string& name, std::vector<int64_t>, std::vector<float>& values) {
            values = state.values(name, values.size());
        });
        if (config_.kind == OptimizerKind::Psgd) psgd_schedule_ = PsgdSchedule::from_json(state.extra.at("psgd_schedule"));
        step_ = state.step;
    }

    size_t state_bytes() const override {
        size_t floats = 0;
        const_cast<CpuOptimizer*>(this)->visit(
            [&](const std::string&, std::vector<int64_t>, std::vector<float>& values) { floats += values.size(); });
        return floats * sizeof(float);
    }

private:
    void visit(const BufferVisitor& fn) {
        for (size_t i = 0; i < routing_.adamw.size(); ++i) {
            const TensorSlot& s = routing_.adamw[i];
            fn(s.name + ".exp_avg", s.shape, adam_m_[i]);
            fn(s.name + ".exp_avg_sq", s.shape, adam_v_[i]);
        }
        for (size_t i = 0; i < routing_.scion.size(); ++i) {
            const TensorSlot& s = routing_.scion[i];
            fn(s.name + ".momentum", s.shape, scion_momentum_[i]);
        }
        for (size_t i = 0; i < routing_.matrices.size(); ++i) {
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

std::unique_ptr<Optimizer> make_cpu_optimizer(const ParamLayout& layout, const OptimizerConfig& config) {
    return std::make_unique<CpuOptimizer>(layout, config);
}

}  // namespace qopt
