// AdamW as torch.optim.AdamW computes it (decoupled weight decay, bias correction).
// For step t = 1, 2, ... and each parameter p with gradient g:
//   m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2
//   p = p - lr * wd * p                                  (decay first, on the old p)
//   p = p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
// Weight decay applies only where `decay` says (2-D tensors by default: embeddings and
// matrices; never norm gains or biases).
#pragma once
#include <cmath>
#include <cstddef>
#include <string>
#include <vector>

#include "core/json.hpp"
#include "model/params.hpp"

namespace qopt {

struct AdamWConfig {
    double beta1 = 0.9;
    double beta2 = 0.95;
    double eps = 1e-8;
    double weight_decay = 0.1;
    void validate() const;
    Json to_json() const;
};

// CPU reference of the update over n contiguous elements (one tensor).
template <typename T>
void adamw_update_cpu(T* param, const T* grad, T* m, T* v, size_t n, double lr, const AdamWConfig& c, long step,
                      bool decay) {
    const double bias1 = 1.0 - std::pow(c.beta1, double(step));
    const double bias2 = 1.0 - std::pow(c.beta2, double(step));
    const double decay_factor = decay ? 1.0 - lr * c.weight_decay : 1.0;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; ++i) {
        const double g = double(grad[i]);
        const double mi = c.beta1 * double(m[i]) + (1.0 - c.beta1) * g;
        const double vi = c.beta2 * double(v[i]) + (1.0 - c.beta2) * g * g;
        m[i] = T(mi);
        v[i] = T(vi);
        const double update = (mi / bias1) / (std::sqrt(vi / bias2) + c.eps);
        param[i] = T(double(param[i]) * decay_factor - lr * update);
    }
}

// Whether a tensor gets weight decay under the default rule.
bool decays_by_default(const ParamTensor& tensor);

}  // namespace qopt
