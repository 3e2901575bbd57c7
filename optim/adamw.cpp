#include "optim/adamw.hpp"

#include "core/error.hpp"

namespace qopt {

void AdamWConfig::validate() const {
    QOPT_CHECK(beta1 >= 0 && beta1 < 1, "--beta1 must be in [0, 1), got ", beta1);
    QOPT_CHECK(beta2 >= 0 && beta2 < 1, "--beta2 must be in [0, 1), got ", beta2);
    QOPT_CHECK(eps > 0, "--adam-eps must be positive, got ", eps);
    QOPT_CHECK(weight_decay >= 0, "--weight-decay must be non-negative, got ", weight_decay);
}

Json AdamWConfig::to_json() const {
    Json json = Json::object();
    json["beta1"] = beta1;
    json["beta2"] = beta2;
    json["eps"] = eps;
    json["weight_decay"] = weight_decay;
    return json;
}

bool decays_by_default(const ParamTensor& tensor) { return tensor.shape.size() == 2; }

AdamW::AdamW(const ParamLayout& layout, const AdamWConfig& config)
    : layout_(layout), config_(config), m_(layout.total, 0.0f), v_(layout.total, 0.0f) {
    config_.validate();
}

void AdamW::step(float* params, const float* grads, double lr) {
    ++step_;
    for (const auto& t : layout_.tensors)
        adamw_update_cpu(params + t.offset, grads + t.offset, m_.data() + t.offset, v_.data() + t.offset, t.numel, lr,
                         config_, step_, decays_by_default(t));
}

}  // namespace qopt
