#include "optim/adamw_gpu.hpp"

#include "core/error.hpp"

namespace qopt {

AdamWGpu::AdamWGpu(const ParamLayout& layout, const AdamWConfig& config)
    : config_(config), total_(layout.total), m_(layout.total), v_(layout.total) {
    config_.validate();
    for (const auto& t : layout.tensors) {
        const bool decay = decays_by_default(t);
        if (!runs_.empty() && runs_.back().decay == decay && runs_.back().offset + runs_.back().count == t.offset)
            runs_.back().count += t.numel;
        else
            runs_.push_back(Run{t.offset, t.numel, decay});
    }
    m_.fill_bytes(0);
    v_.fill_bytes(0);
}

void AdamWGpu::step(float* params, const float* grads, double lr, double grad_scale, bf16* params_bf16) {
    ++step_;
    for (const Run& run : runs_)
        adamw_update_gpu(params + run.offset, grads + run.offset, m_.data() + run.offset, v_.data() + run.offset,
                         run.count, float(lr), float(config_.beta1), float(config_.beta2), float(config_.eps),
                         run.decay ? float(config_.weight_decay) : 0.0f, step_, float(grad_scale),
                         params_bf16 ? params_bf16 + run.offset : nullptr);
}

void AdamWGpu::set_moments(const std::vector<float>& m, const std::vector<float>& v) {
    QOPT_CHECK(m.size() == total_ && v.size() == total_, "optimizer state has ", m.size(), "/", v.size(),
               " values for ", total_, " parameters");
    m_.upload(m);
    v_.upload(v);
}

}  // namespace qopt
