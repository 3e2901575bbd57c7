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

}  // namespace qopt
