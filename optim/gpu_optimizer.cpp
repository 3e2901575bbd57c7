#include "optim/gpu_optimizer.hpp"

#include <cmath>
#include <cstring>
#include <map>

#include "core/error.hpp"
#include "optim/optimizer_kernels.hpp"

namespace qopt {

GpuOptimizer::GpuOptimizer(const ParamLayout& layout, const OptimizerConfig& config, const OwnedSlots* owned)
    : config_(config), routing_(route_parameters(layout, config)), owned_(owned ? *owned : OwnedSlots::all(routing_)) {
    config_.validate();
    QOPT_CHECK(owned_.adamw.size() == routing_.adamw.size() && owned_.scion.size() == routing_.scion.size() &&
                   owned_.matrices.size() == routing_.matrices.size(),
               "optimizer shard: the owned-slot lists do not match this model's routing");
    const std::vector<bool>* owned_matrices = owned ? &owned_.matrices : nullptr;
    switch (config_.kind) {
        case OptimizerKind::Shampoo: method_ = make_gpu_shampoo(routing_, config_, owned_matrices); break;
        case OptimizerKind::Soap: method_ = make_gpu_soap(routing_, config_, owned_matrices); break;
        case OptimizerKind::Psgd: method_ = make_gpu_psgd(routing_, config_, owned_matrices); break;
        default: break;
    }

    // AdamW: the owned rows' state packed in slot order; a chunk table over them.
    std::vector<int64_t> chunks;
    size_t adam_total = 0;
    for (size_t i = 0; i < routing_.adamw.size(); ++i) {
        const TensorSlot& s = routing_.adamw[i];
        const ParamRange range = owned_range(s, owned_.adamw[i]);
        adam_offsets_.push_back(adam_total);
        for (size_t start = 0; start < range.count; start += kAdamwChunk) {
            const int64_t count = int64_t(std::min<size_t>(kAdamwChunk, range.count - start));
            chunks.push_back(int64_t(range.offset + start));
            chunks.push_back(int64_t(adam_total + start));
            chunks.push_back(count | (int64_t(s.decay) << 32));
        }
        adam_total += range.count;
    }
    n_adam_chunks_ = int(chunks.size() / 3);
    if (!chunks.empty()) adam_chunks_.upload(chunks);
    adam_m_.resize(adam_total);
    adam_v_.resize(adam_total);
    if (adam_total) {
        adam_m_.fill_bytes(0);
        adam_v_.fill_bytes(0);
    }

    // Scion's element-wise rules: one task per row.
    std::vector<int64_t> tasks;
    size_t scion_total = 0;
    for (size_t i = 0; i < routing_.scion.size(); ++i) {
        const TensorSlot& s = routing_.scion[i];
        const RowRange rows = owned_.scion[i];
        scion_offsets_.push_back(scion_total);
        const int mode = s.scion_norm == ScionNorm::Sign ? 0 : s.scion_norm == ScionNorm::RowNorm ? 2 : 1;
        QOPT_CHECK(s.scion_norm != ScionNorm::Spectral, "Scion: the spectral norm is for hidden matrices only");
        const float scale = float(s.scion_scale);
        uint32_t scale_bits;
        std::memcpy(&scale_bits, &scale, sizeof scale_bits);
        // A 1-D tensor is one row (BiasRMS over the whole vector).
        for (int r = rows.begin; r < rows.end; ++r) {
            tasks.push_back(int64_t(s.offset) + int64_t(r) * s.cols);
            tasks.push_back(int64_t(scion_total) + int64_t(r - rows.begin) * s.cols);
            tasks.push_back(int64_t(s.cols) | (int64_t(mode) << 32));
            tasks.push_back(int64_t(scale_bits) | (int64_t(s.decay) << 32));
        }
        scion_total += owned_range(s, rows).count;
    }
    n_scion_tasks_ = int(tasks.size() / 4);
    if (!tasks.empty()) scion_tasks_.upload(tasks);
    scion_momentum_.resize(scion_total);
    if (scion_total) scion_momentum_.fill_bytes(0);

    // Muon / Scion: hidden matrices grouped by shape.
    std::map<std::pair<int, int>, size_t> group_of;
    for (size_t i = 0; i < (method_ ? 0 : routing_.matrices.size()); ++i) {
        if (!owned_.matrices[i]) continue;
        const MatrixSlot& m = routing_.matrices[i];
        auto [it, added] = group_of.emplace(std::make_pair(m.rows, m.cols), groups_.size());
        if (added) {
            groups_.emplace_back();
            groups_.back().rows = m.rows;
            groups_.back().cols = m.cols;
        }
        groups_[it->second].members.push_back(int(i));
    }
    for (Group& g : groups_) {
        std::vector<int64_t> offsets;
        for (int i : g.members) offsets.push_back(int64_t(routing_.matrices[size_t(i)].offset));
        g.offsets.upload(offsets);
        const size_t count = g.members.size(), n = size_t(g.rows) * g.cols, s = size_t(std::min(g.rows, g.cols));
        g.momentum.resize(n * count);
        g.momentum.fill_bytes(0);
        g.ns_x.resize(n * count);
        g.ns_x2.resize(n * count);
        g.ns_a.resize(s * s * count);
        g.ns_p.resize(s * s * count);
        g.ns_partials.resize(size_t(kNsPartials) * count);
        g.stream = std::make_unique<SideStream>();
    }
}

void GpuOptimizer::step(float* params, const float* grads, double lr, double grad_scale, bf16* params_bf16) {
    ++step_;
    const double wd = config_.weight_decay();
    const double adamw_lr = lr * config_.aux_adamw_lr() / config_.method_lr();
    // AdamW's chunks and Scion's element-wise rows: one launch each on the default stream.
    auto run_elementwise = [&] {
        adamw_chunks_gpu(params, grads, adam_m_.data(), adam_v_.data(), params_bf16, adam_chunks_.data(),
                         n_adam_chunks_, float(adamw_lr), float(config_.adamw.beta1), float(config_.adamw.beta2),
                         float(config_.adamw.eps), float(wd), step_, float(grad_scale));
        scion_rows_gpu(params, grads, scion_momentum_.data(), params_bf16, scion_tasks_.data(), n_scion_tasks_,
                       float(lr), float(config_.scion.momentum), config_.scion.unconstrained, float(wd),
                       float(grad_scale));
    };
    if (groups_.empty()) {
        run_elementwise();
        if (method_) method_->step(params, grads, lr, grad_scale, params_bf16, step_);
        return;
    }

    const bool muon = config_.kind == OptimizerKind::Muon;
    const MuonConfig& mc = config_.muon;
    // Muon: M = b M + (1 - b) G, U = (1 - b) G + b M (Nesterov) or M.  Scion: M = (1 - a) M + a G, U = M.
    const float m_keep = muon ? float(mc.momentum) : float(1 - config_.scion.momentum);
    const float g_weight = muon ? float(1 - mc.momentum) : float(config_.scion.momentum);
    const float u_grad = muon && mc.nesterov ? float(1 - mc.momentum) : 0.0f;
    const float u_momentum = muon && mc.nesterov ? float(mc.momentum) : 1.0f;
    const int ns_steps = muon ? mc.ns_steps : config_.scion.ns_steps;
    // Each group on its own stream, after the gradients (everything enqueued so far); the default
    // stream's later work waits for all of them.
    for (Group& g : groups_) {
        const cudaStream_t stream = g.stream->after_default_stream();
        const int count = int(g.members.size()), r = g.rows, c = g.cols;
        const int64_t n = int64_t(r) * c;
        ns_prepare_gpu(g.ns_x.data(), g.momentum.data(), g.ns_partials.data(), grads, g.offsets.data(), count, n,
                       float(grad_scale), m_keep, g_weight, u_grad, u_momentum, stream);
        const bf16* orthogonal = newton_schulz_batched_gpu(g.ns_x.data(), g.ns_x2.data(), g.ns_a.data(), g.ns_p.data(),
                                                           count, r, c, ns_steps, float(mc.ns_a), float(mc.ns_b),
                                                           float(mc.ns_c), stream);
        float keep, step_scale;
        if (muon) {
            keep = float(1 - lr * wd);
            step_scale = float(lr * std::sqrt(std::max(1.0, double(r) / double(c))));
        } else {
            keep = float(config_.scion.unconstrained ? 1 - lr * wd : 1 - lr);
            step_scale = float(lr * config_.scion.hidden_scale * std::sqrt(double(r) / double(c)));
        }
        matrix_apply_gpu(params, params_bf16, orthogonal, g.offsets.data(), count, n, keep, step_scale, stream);
    }
    // The element-wise rules (embeddings, norms: other parameters than the groups') run beside them.
    run_elementwise();
    for (Group& g : groups_) g.stream->join_into_default_stream();
}

void GpuOptimizer::visit_rows(const RowsVisitor& fn) const {
    for (size_t i = 0; i < routing_.adamw.size(); ++i) {
        fn(routing_.adamw[i], owned_.adamw[i], adam_offsets_[i], "exp_avg", kAdamExpAvg);
        fn(routing_.adamw[i], owned_.adamw[i], adam_offsets_[i], "exp_avg_sq", kAdamExpAvgSq);
    }
    for (size_t i = 0; i < routing_.scion.size(); ++i)
        fn(routing_.scion[i], owned_.scion[i], scion_offsets_[i], "momentum", kScionMomentum);
}

OptimizerState GpuOptimizer::state() const {
    OptimizerState state;
    state.optimizer = optimizer_name(config_.kind);
    state.step = step_;
    const std::vector<float> host[kPackedBuffers] = {adam_m_.download(), adam_v_.download(),
                                                      scion_momentum_.download()};
    visit_rows([&](const TensorSlot& s, const RowRange& rows, size_t packed_offset, const char* state_name,
                   PackedBuffer which) {
        if (rows.count() == 0) return;
        const std::vector<float>& packed = host[which];
        std::vector<int64_t> shape = s.shape;
        if (rows.count() != s.rows) shape[0] = rows.count();  // a share of a 2-D tensor's rows
        const auto begin = packed.begin() + long(packed_offset);
        state.tensors.push_back({s.name + "." + state_name, shape,
                                 {begin, begin + long(owned_range(s, rows).count)}, rows.begin});
    });
    for (const Group& g : groups_) {
        const std::vector<float> all = g.momentum.download();
        const size_t n = size_t(g.rows) * g.cols;
        for (size_t j = 0; j < g.members.size(); ++j) {
            const MatrixSlot& m_slot = routing_.matrices[size_t(g.members[j])];
            state.tensors.push_back({m_slot.name + ".momentum", {g.rows, g.cols},
                                     {all.begin() + long(j * n), all.begin() + long((j + 1) * n)}});
        }
    }
    if (method_) method_->save(state);
    return state;
}

void GpuOptimizer::load_state(const OptimizerState& state) {
    QOPT_CHECK(state.optimizer == optimizer_name(config_.kind), "the checkpoint's optimizer state is ",
               state.optimizer, "'s, but this run uses ", optimizer_name(config_.kind));
    std::vector<float> host[kPackedBuffers] = {std::vector<float>(adam_m_.size()), std::vector<float>(adam_v_.size()),
                                               std::vector<float>(scion_momentum_.size())};
    visit_rows([&](const TensorSlot& s, const RowRange& rows, size_t packed_offset, const char* state_name,
                   PackedBuffer which) {
        if (rows.count() == 0) return;
        // Whole tensors in, the owned rows kept.
        const std::vector<float>& whole = state.values(s.name + "." + state_name, s.numel);
        const size_t first = size_t(rows.begin) * size_t(s.cols), count = owned_range(s, rows).count;
        std::vector<float>& packed = host[which];
        std::copy(whole.begin() + long(first), whole.begin() + long(first + count), packed.begin() + long(packed_offset));
    });
    if (!host[kAdamExpAvg].empty()) {
        adam_m_.upload_prefix(host[kAdamExpAvg]);
        adam_v_.upload_prefix(host[kAdamExpAvgSq]);
    }
    if (!host[kScionMomentum].empty()) scion_momentum_.upload_prefix(host[kScionMomentum]);
    for (Group& g : groups_) {
        const size_t n = size_t(g.rows) * g.cols;
        std::vector<float> all(n * g.members.size());
        for (size_t j = 0; j < g.members.size(); ++j) {
            const auto& values = state.values(routing_.matrices[size_t(g.members[j])].name + ".momentum", n);
            std::copy(values.begin(), values.end(), all.begin() + long(j * n));
        }
        g.momentum.upload_prefix(all);
    }
    if (method_) method_->load(state);
    step_ = state.step;
}

size_t GpuOptimizer::state_bytes() const {
    size_t floats = adam_m_.size() + adam_v_.size() + scion_momentum_.size();
    size_t ns_bytes = 0;  // each group's Newton-Schulz scratch
    for (const Group& g : groups_) {
        floats += g.momentum.size() + g.ns_partials.size();
        ns_bytes += (g.ns_x.size() + g.ns_x2.size() + g.ns_a.size() + g.ns_p.size()) * sizeof(bf16);
    }
    const size_t method_bytes = method_ ? method_->state_bytes() + method_->scratch_bytes() : 0;
    return floats * sizeof(float) + ns_bytes + method_bytes;
}

}  // namespace qopt
